//! The timed faults of a run, drawn from its seed and struck while the producers publish:
//! a worker crashes, freezes past its lease and comes back (a zombie), or is drained; its
//! broker connection drops; Redis goes down, is cut off from one worker, slows, loses a
//! key or everything; the broker blocks publishing or loses a message; the wall clock
//! jumps; an instance dies on its own. (Crashes at step boundaries, lost replies, refused publishes and the
//! cloud's own failures strike per call, in the store, broker and cloud modules.)

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use provisioner_core::StateStore;

use crate::process::Life;
use crate::rng::Rng;
use crate::run::{World, drain, lose, process_of};
use crate::store::Loss;

#[derive(Debug, Clone, Copy)]
enum Fault {
    Crash,
    Pause,
    Drain,
    ConnectionDrop,
    StoreDown,
    StorePartition,
    StoreSlow,
    LoseRecord,
    LoseFleet,
    LoseEverything,
    BrokerBlock,
    MessageLost,
    ClockJump,
    InstanceDeath,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Crash => "crash",
            Fault::Pause => "pause",
            Fault::Drain => "drain",
            Fault::ConnectionDrop => "connection drop",
            Fault::StoreDown => "store down",
            Fault::StorePartition => "store partition",
            Fault::StoreSlow => "store slow",
            Fault::LoseRecord => "record lost",
            Fault::LoseFleet => "fleet lost",
            Fault::LoseEverything => "store lost everything",
            Fault::BrokerBlock => "broker blocked",
            Fault::MessageLost => "message lost",
            Fault::ClockJump => "clock jump",
            Fault::InstanceDeath => "instance died",
        }
    }
}

/// Draws the faults' times and strikes each in turn until the faults end.
pub async fn inject(world: Arc<World>) {
    let mut rng = Rng::stream(world.config.seed, "faults");
    let rates = world.config.rates;
    let minutes = world.config.chaos.as_secs_f64() / 60.0;
    let mut plan: Vec<(Duration, Fault)> = Vec::new();
    for (rate, fault) in [
        (rates.crash, Fault::Crash),
        (rates.pause, Fault::Pause),
        (rates.drain, Fault::Drain),
        (rates.connection_drop, Fault::ConnectionDrop),
        (rates.store_down, Fault::StoreDown),
        (rates.store_partition, Fault::StorePartition),
        (rates.store_slow, Fault::StoreSlow),
        (rates.lose_record, Fault::LoseRecord),
        (rates.lose_fleet, Fault::LoseFleet),
        (rates.lose_everything, Fault::LoseEverything),
        (rates.broker_block, Fault::BrokerBlock),
        (rates.message_lost, Fault::MessageLost),
        (rates.clock_jump, Fault::ClockJump),
        (rates.instance_death, Fault::InstanceDeath),
    ] {
        let expected = rate * minutes;
        let mut count = expected.floor() as u64;
        if rng.chance(expected.fract()) {
            count += 1;
        }
        for _ in 0..count {
            let at = rng.millis(0, world.config.chaos.as_millis() as u64);
            plan.push((at, fault));
        }
    }
    plan.sort_by_key(|(at, fault)| (*at, fault.name()));
    let start = Instant::now();
    for (at, fault) in plan {
        tokio::time::sleep_until(start + at).await;
        if !world.faults_on.load(Ordering::Relaxed) {
            return;
        }
        if strike(&world, &mut rng, fault) {
            world.count_fault(fault.name());
        }
    }
}

/// Strikes one fault; false when it found nothing to strike.
fn strike(world: &Arc<World>, rng: &mut Rng, fault: Fault) -> bool {
    let now = Instant::now();
    let slot = rng.range(0, world.config.workers as u64 - 1) as usize;
    let lease = world.config.worker.lease;
    let history = &world.history;
    match fault {
        Fault::Crash => match process_of(world, slot) {
            Some(process) if process.life() != Life::Crashed => {
                process.crash("a timed crash");
                true
            }
            _ => false,
        },
        Fault::Pause => {
            let Some(process) = process_of(world, slot) else {
                return false;
            };
            if process.life() != Life::Alive {
                return false;
            }
            // From a hiccup to well past the lease: a zombie when it comes back.
            let pause = rng.millis(100, (lease * 3).as_millis() as u64);
            process.pause_until(now + pause);
            world.witness.paused(&process.name, pause);
            history.note(&process.name, || {
                format!("paused for {} ms", pause.as_millis())
            });
            let heartbeat = world.config.heartbeat;
            if pause > heartbeat {
                let broker = world.broker.clone();
                let faults_on = world.faults_on.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(heartbeat).await;
                    if faults_on.load(Ordering::Relaxed)
                        && matches!(process.life(), Life::Paused(_))
                    {
                        broker.connection_died(&process.name);
                    }
                });
            }
            true
        }
        Fault::Drain => {
            let drained = drain(world, slot);
            if drained {
                history.note(&format!("slot {slot}"), || "SIGTERM: drain".into());
            }
            drained
        }
        Fault::ConnectionDrop => match process_of(world, slot) {
            Some(process) => {
                world.broker.connection_died(&process.name);
                true
            }
            None => false,
        },
        Fault::StoreDown => {
            let down = rng.millis(100, 20_000);
            world.store.weather().down_until = Some(now + down);
            history.note("store", || format!("down for {} ms", down.as_millis()));
            true
        }
        Fault::StorePartition => match process_of(world, slot) {
            Some(process) => {
                let cut = rng.millis(100, (lease * 2).as_millis() as u64);
                world
                    .store
                    .weather()
                    .partitioned
                    .insert(process.name.clone(), now + cut);
                history.note(&process.name, || {
                    format!("cut off from the store for {} ms", cut.as_millis())
                });
                true
            }
            None => false,
        },
        Fault::StoreSlow => {
            let slow = rng.millis(1000, 30_000);
            let by = rng.millis(10, 3000);
            let mut weather = world.store.weather();
            weather.slow_until = Some(now + slow);
            weather.slow_by = by;
            drop(weather);
            history.note("store", || {
                format!(
                    "slow for {} ms, by up to {} ms a call",
                    slow.as_millis(),
                    by.as_millis()
                )
            });
            true
        }
        Fault::LoseRecord => {
            // Half the time a record in progress: the loss that matters most while it
            // happens (its holder is at work).
            let ids = world.store.memory.record_ids();
            let working: Vec<String> = ids
                .iter()
                .filter(|id| world.store.memory.holder(id).is_some())
                .cloned()
                .collect();
            let ids = if !working.is_empty() && rng.chance(0.5) {
                working
            } else {
                ids
            };
            if ids.is_empty() {
                return false;
            }
            let id = rng.pick(&ids).clone();
            lose(
                world,
                Loss::Record {
                    request_id: id,
                    at: world.clock.elapsed(),
                },
            );
            true
        }
        Fault::LoseFleet => {
            let ids = world.store.memory.record_ids();
            let fleets: Vec<&String> = ids.iter().filter(|id| !id.contains('#')).collect();
            if fleets.is_empty() {
                return false;
            }
            let id = (*rng.pick(&fleets)).clone();
            lose(
                world,
                Loss::Fleet {
                    request_id: id,
                    at: world.clock.elapsed(),
                },
            );
            true
        }
        Fault::LoseEverything => {
            lose(
                world,
                Loss::Everything {
                    at: world.clock.elapsed(),
                },
            );
            true
        }
        Fault::BrokerBlock => {
            let blocked = rng.millis(100, 30_000);
            world.broker.block_until(now + blocked);
            history.note("broker", || {
                format!("blocks publishing for {} ms", blocked.as_millis())
            });
            true
        }
        Fault::MessageLost => match world.broker.lose_a_message(rng.next_u64()) {
            Some(key) => {
                history.note("broker", || format!("lost a {key} message"));
                true
            }
            None => false,
        },
        Fault::ClockJump => {
            let jump = if rng.chance(0.8) {
                rng.range(1, 600_000) as i64
            } else {
                -(rng.range(1, 30_000) as i64)
            };
            world.clock.jump(jump);
            history.note("clock", || format!("the wall clock jumps {jump} ms"));
            true
        }
        Fault::InstanceDeath => world.cloud.kill_one(rng.next_u64()).is_some(),
    }
}

/// A holder of the store's credentials, without the signing keys, plants fleets on the
/// coordinators' schedule while the faults strike, as a worker would keep them: one
/// unsealed, or a real fleet's sealed request moved to a new id. Only in runs that sign
/// (without signing the store is as trusted as the broker). The oracle holds that
/// nothing of a planted fleet happens: no member published, no event, no instance.
/// Drawn from a stream of its own, so the kept seeds' other draws stay what they were.
pub async fn forge(world: Arc<World>) {
    if world.config.signing.is_none() {
        return;
    }
    let mut rng = Rng::stream(world.config.seed, "forgeries");
    let mut plan: Vec<Duration> = (0..rng.range(1, 3))
        .map(|_| rng.millis(0, world.config.chaos.as_millis() as u64))
        .collect();
    plan.sort();
    let start = Instant::now();
    let schedule = format!("{}/fleets", crate::platform::PLATFORM);
    for (n, at) in plan.into_iter().enumerate() {
        tokio::time::sleep_until(start + at).await;
        if !world.faults_on.load(Ordering::Relaxed) {
            return;
        }
        let memory = &world.store.memory;
        let id = format!("forged-{n}");
        let mut real = None;
        if rng.chance(0.6) {
            for candidate in memory.record_ids() {
                if let Ok(Some(stored)) = memory.fleet(&candidate).await {
                    real = Some((candidate, stored));
                    break;
                }
            }
        }
        // Moved as it is (its body still names the real fleet), or altered to name the
        // planted id under the real seal: only the seal tells that one.
        let altered = rng.chance(0.5);
        let how = match (&real, altered) {
            (None, _) => "unsealed",
            (Some(_), false) => "moved",
            (Some(_), true) => "altered",
        };
        let real = real.map(|(candidate, stored)| {
            if altered {
                stored.replacen(
                    &format!(r#""request_id":"{candidate}""#),
                    &format!(r#""request_id":"{id}""#),
                    1,
                )
            } else {
                stored
            }
        });
        let stored = real.unwrap_or_else(|| {
            format!(
                r#"{{"schema_version":1,"request_id":"{id}","operation":"provision","platform":"{}","count":3,"spec":{{"program":"forged"}}}}"#,
                crate::platform::PLATFORM
            )
        });
        if memory.put_fleet(&id, &stored).await.is_err()
            || memory
                .schedule_expiry(&schedule, &id, world.clock.wall(0))
                .await
                .is_err()
        {
            continue;
        }
        world
            .forged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(id.clone());
        world
            .history
            .note("forger", || format!("planted fleet {id} ({how})"));
        world.count_fault("fleet forged");
    }
}
