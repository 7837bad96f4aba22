//! The oracle: the product's promise, checked against what a run did. Every accepted
//! request ends once, with exactly the resources its terminal event says, whatever
//! crashed, was duplicated or raced on the way.
//!
//! The cloud checks its own rule as it goes (no request ever holds two live instances,
//! so no fleet ever holds more than its count). Once the run has settled, this judges:
//!
//! - **ends once**: every request id has at most one terminal outcome, and every copy of
//!   it is the same event byte for byte;
//! - **every message answered**: each message the broker took (from a producer or a
//!   worker) is answered by its request's terminal event, or refused by an event naming
//!   it, or set aside in the dead-letter queue with a worker's reason;
//! - **sequence**: a request's events carry `seq` 1, 2, 3… without a gap or two events
//!   under one number, and its terminal event is the last;
//! - **nothing left in progress**, and nothing left on the schedules;
//! - **the cloud holds what the events say**: a provision that ended `running` and was
//!   not torn down has exactly its one instance (unless the cloud killed it); one that
//!   ended `error`, or whose teardown said `stopped`, has none; no instance belongs to a
//!   request nobody sent;
//! - **quotas**: each tenant's quota in use is what it holds, in machines and vCPUs;
//! - **expiry**: every resource whose time came was torn down;
//! - **pacing**: while the store keeps the buckets whole, the cloud never throttled;
//! - **planted fleets**: in a run that signs, nothing of a fleet planted in the store by
//!   someone without the keys happens.
//!
//! What the contract itself does not promise is excused, and only that: a request whose
//! record the store lost after it ended may run again (README, "Redis durability"), and
//! the quotas of a store that lost everything start again from nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::Ordering;

use provisioner_core::StateStore;
use provisioner_events::{Operation, RejectedMessage, Request, State, StatusEvent, decode_request};

use crate::broker::Message;
use crate::run::World;
use crate::store::Loss;

/// The oracle's findings on a run.
#[derive(Debug, Default)]
pub struct Verdict {
    pub violations: Vec<String>,
    pub stats: Stats,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// What a run did, for the report.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub messages: usize,
    pub requests: usize,
    pub events: usize,
    /// Terminal outcomes by `state` or `state/class`.
    pub outcomes: BTreeMap<String, usize>,
    pub faults: BTreeMap<&'static str, u32>,
    pub crashes: usize,
    pub instances: usize,
    pub cloud_calls: u64,
    pub throttled: u32,
    /// Duplicated outcomes the contract allows (a record lost after its request ended).
    pub excused: usize,
    /// Provisions that ended in error saying a teardown is needed, with an instance left.
    pub flagged: usize,
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} messages, {} events, {} instances, {} cloud calls; outcomes {:?}; faults {:?}, {} crashes",
            self.requests,
            self.messages,
            self.events,
            self.instances,
            self.cloud_calls,
            self.outcomes,
            self.faults,
            self.crashes
        )
    }
}

fn outcome_kind(event: &StatusEvent) -> String {
    match &event.error {
        Some(error) => format!("{}/{}", event.state, error.class),
        None => event.state.to_string(),
    }
}

fn same_event(a: &StatusEvent, b: &StatusEvent) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Whether a record may stay in progress for good, as the contract allows when no reaper
/// ends abandoned records: a fleet whose request the store lost, or a request whose
/// message the broker lost.
pub fn may_stay_in_progress(world: &World, request_id: &str) -> bool {
    let purged = world.broker.purged().iter().any(|body| {
        provisioner_events::decode_request(body).is_ok_and(|r| r.request_id.as_str() == request_id)
    });
    // Its message and its record both lost (and no claim since): nothing in the queue or
    // the store names it any more, so no worker, reaper included, can know of it. What it
    // made is for the reconciler; its quota place stays taken. A record another request's
    // act_on made afresh (a reboot or teardown naming it) carries no request, and is no
    // claim (a kept seed: a reboot recreated such a record, and the leak was blamed).
    let unknown_to_all = purged
        && world.store.losses().iter().any(|l| match l {
            Loss::Record { request_id: id, .. } | Loss::Fleet { request_id: id, .. } => {
                id == request_id
            }
            Loss::Everything { .. } => true,
        })
        && !world.store.memory.was_claimed(request_id);
    // Without a reaper, a request whose message left the queue unanswered (purged, or
    // dead-lettered by the queue's delivery limit after workers died holding it that
    // many times: it waits in the dead-letter queue for a redrive) stays in progress, as
    // the README says.
    unknown_to_all
        || world.config.worker.reap_after.is_none()
            && (world.store.losses().iter().any(|l| match l {
                Loss::Fleet { request_id: id, .. } => id == request_id,
                Loss::Everything { .. } => true,
                Loss::Record { .. } => false,
            }) || purged
                || dead_lettered_at_the_limit(world, request_id))
}

/// Whether the broker dead-lettered a message of this request at the queue's delivery
/// limit (no worker decided it, so no status event says it).
fn dead_lettered_at_the_limit(world: &World, request_id: &str) -> bool {
    world.broker.dead_letters().iter().any(|d| {
        d.class.is_none()
            && d.reason == "delivery limit"
            && provisioner_events::decode_request(&d.message.body)
                .is_ok_and(|r| r.request_id.as_str() == request_id)
    })
}

/// Judges a settled run; `stuck` says why it did not settle, if it did not.
pub async fn judge(world: &World, stuck: Option<String>) -> Verdict {
    let mut v = Verdict::default();
    let violations = &mut v.violations;
    if let Some(why) = stuck {
        violations.push(format!(
            "the run did not settle within 6 h of the faults' end: {why}"
        ));
    }
    violations.extend(world.cloud.violations());
    let accepted: Vec<Message> = world.broker.accepted();
    let logged = world.broker.events();
    let events: Vec<StatusEvent> = logged.iter().map(|l| l.event.clone()).collect();
    // When a terminal event was recorded in the store (else first seen on the status
    // topic): a copy published again later says what was true when it was recorded.
    let first_seen = |wanted: &StatusEvent| {
        world
            .witness
            .recorded(wanted)
            .or_else(|| {
                logged
                    .iter()
                    .find(|l| same_event(&l.event, wanted))
                    .map(|l| l.at)
            })
            .unwrap_or_default()
    };
    let dead_letters = world.broker.dead_letters();
    let purged = world.broker.purged();
    let losses = world.store.losses();
    let lost_everything = losses.iter().any(|l| matches!(l, Loss::Everything { .. }));
    let lost_record = |id: &str| {
        losses.iter().any(|l| match l {
            Loss::Record { request_id, .. } | Loss::Fleet { request_id, .. } => request_id == id,
            Loss::Everything { .. } => true,
        })
    };
    let instances = world.cloud.instances();

    // Messages by request id, with what they decode to.
    let mut bodies: BTreeMap<String, Vec<(Vec<u8>, Request)>> = BTreeMap::new();
    let mut unreadable: Vec<Vec<u8>> = Vec::new();
    for message in &accepted {
        match decode_request(&message.body) {
            Ok(request) => {
                let copies = bodies.entry(request.request_id.to_string()).or_default();
                if !copies.iter().any(|(b, _)| *b == message.body) {
                    copies.push((message.body.clone(), request));
                }
            }
            Err(_) => unreadable.push(message.body.clone()),
        }
    }
    let mut by_id: BTreeMap<&str, Vec<&StatusEvent>> = BTreeMap::new();
    for event in &events {
        by_id
            .entry(event.request_id.as_str())
            .or_default()
            .push(event);
    }
    let refused = |body: &[u8]| {
        let hash = RejectedMessage::of(body);
        events
            .iter()
            .any(|e| e.rejected_message.as_ref() == Some(&hash))
    };
    // In the dead-letter queue because a worker refused it: with the worker's reason, or
    // by the queue's own dead-lettering when the reasoned publish was refused (not by
    // the broker's delivery limit, which no worker decided).
    let set_aside_with_reason = |body: &[u8]| {
        dead_letters
            .iter()
            .any(|d| d.message.body == body && (d.class.is_some() || d.reason == "rejected"))
    };
    for body in &unreadable {
        let known_id = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v.get("request_id")
                    .and_then(|i| i.as_str())
                    .map(str::to_owned)
            });
        let answered = set_aside_with_reason(body)
            || (known_id.is_some() && refused(body))
            || purged.iter().any(|p| p == body);
        if !answered {
            violations.push(format!(
                "a message that is no request ({}) was neither refused nor set aside",
                String::from_utf8_lossy(&body[..body.len().min(80)])
            ));
        }
    }

    // The terminal outcome of each request, its events in order, and the answers.
    let mut outcome: BTreeMap<String, StatusEvent> = BTreeMap::new();
    for (id, copies) in &bodies {
        let ours: Vec<&StatusEvent> = by_id
            .get(id.as_str())
            .map(|e| {
                e.iter()
                    .copied()
                    .filter(|e| e.rejected_message.is_none())
                    .collect()
            })
            .unwrap_or_default();
        let excused = lost_record(id);
        let mut terminals: Vec<&StatusEvent> = Vec::new();
        for event in ours.iter().filter(|e| e.state.is_terminal()) {
            if !terminals.iter().any(|t| same_event(t, event)) {
                terminals.push(event);
            }
        }
        if terminals.len() > 1 {
            if excused {
                v.stats.excused += 1;
            } else {
                let told: Vec<String> = terminals
                    .iter()
                    .map(|t| format!("{} seq {} by attempt {}", outcome_kind(t), t.seq, t.attempt))
                    .collect();
                violations.push(format!("{id} ended more than once: {}", told.join("; ")));
            }
        }
        // The latest end (a request run again after its record was lost ends again).
        let last = terminals.iter().max_by_key(|t| first_seen(t)).copied();
        if let Some(last) = last {
            *v.stats.outcomes.entry(outcome_kind(last)).or_default() += 1;
            outcome.insert(id.clone(), last.clone());
        }
        let held_hash = world
            .store
            .memory
            .get(id)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.payload_hash);
        for (body, request) in copies {
            let ran = last.is_some()
                && (excused
                    || held_hash.is_none()
                    || held_hash.as_deref() == Some(&request.payload_hash()));
            // A fleet lives in the store once handed over (its message is consumed):
            // one whose request the store lost is lost with it, as the README says.
            let a_fleet = request.is_fleet()
                || request.operation == Operation::Teardown
                    && request.target_request_id.as_ref().is_some_and(|target| {
                        bodies
                            .get(target.as_str())
                            .is_some_and(|c| c.iter().any(|(_, r)| r.is_fleet()))
                    });
            let fleet_lost = a_fleet
                && losses.iter().any(|l| match l {
                    Loss::Fleet { request_id, .. } => request_id == id,
                    Loss::Everything { .. } => true,
                    Loss::Record { .. } => false,
                });
            // A message lost from its queue was never delivered: no one can know it was
            // sent. (A request claimed before its message was lost is ended by the
            // reaper, which the check of records in progress holds to.)
            let purged_unseen = purged.iter().any(|p| p == body);
            // Dead-lettered at the delivery limit, and no reaper to end its record: it
            // waits in the dead-letter queue for an operator's redrive.
            let waits_for_a_redrive = last.is_none()
                && dead_lettered_at_the_limit(world, id)
                && may_stay_in_progress(world, id);
            if fleet_lost && last.is_none() || purged_unseen && !ran || waits_for_a_redrive {
                v.stats.excused += 1;
            } else if !(ran || refused(body) || set_aside_with_reason(body)) {
                violations.push(format!(
                    "{id}: a {} message was accepted and never answered (no terminal event, no refusal): {}",
                    request.operation,
                    String::from_utf8_lossy(body)
                ));
            }
        }
        // The sequence: 1, 2, 3…, one event per number, the terminal one last.
        if !excused && !ours.is_empty() {
            let mut by_seq: BTreeMap<u64, Vec<&StatusEvent>> = BTreeMap::new();
            for event in &ours {
                let same = by_seq.entry(event.seq).or_default();
                if !same.iter().any(|e| same_event(e, event)) {
                    same.push(event);
                }
            }
            if let Some((seq, twins)) = by_seq.iter().find(|(_, e)| e.len() > 1) {
                let told: Vec<String> = twins
                    .iter()
                    .map(|e| format!("{} attempt {}", outcome_kind(e), e.attempt))
                    .collect();
                violations.push(format!(
                    "{id}: two events carry seq {seq}: {}",
                    told.join(", ")
                ));
            }
            let max = by_seq.keys().next_back().copied().unwrap_or(0);
            for missing in (1..=max).filter(|s| !by_seq.contains_key(s)) {
                if world.witness.explains_gap(id, missing).is_some() {
                    continue;
                }
                let takers: Vec<String> = world
                    .witness
                    .takers(id, missing)
                    .iter()
                    .map(|r| format!("{} at {:?}", r.by, r.at))
                    .collect();
                violations.push(format!(
                    "{id}: its events skip seq {missing} (they go up to {max}); taken by {takers:?}, whose work went on undisturbed"
                ));
            }
            if let Some(last) = last
                && last.seq < max
            {
                violations.push(format!(
                    "{id}: an event with seq {max} came after its terminal event (seq {})",
                    last.seq
                ));
            }
        }
    }
    v.stats.messages = accepted.len();
    v.stats.requests = bodies.len();
    v.stats.events = events.len();

    // Nothing in progress once settled.
    for id in world.store.memory.record_ids() {
        if let Ok(Some(record)) = world.store.memory.get(&id).await
            && record.payload_hash.is_some()
            && record.result.is_none()
            && !may_stay_in_progress(world, &id)
        {
            violations.push(format!("{id} is still in progress in the store"));
        }
    }

    // What the cloud holds against what the events say.
    let owner_of_instance: BTreeMap<&str, &str> = instances
        .iter()
        .map(|i| (i.id.as_str(), i.owner.as_str()))
        .collect();
    // Each target's last `stopped` teardown, by when its end was seen: it undoes the
    // target's outcome only if it came after (a provision run again after its record was
    // lost may end after the teardown that removed its first resource).
    let mut torn_down_at: BTreeMap<String, std::time::Duration> = BTreeMap::new();
    for (id, copies) in &bodies {
        let Some(end) = outcome.get(id) else { continue };
        if end.state != State::Stopped || end.error.is_some() {
            continue;
        }
        // The message that ran under this id: the one whose payload its record holds, else
        // one of the operation its end names.
        let held = world
            .store
            .memory
            .get(id)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.payload_hash);
        let ran = copies
            .iter()
            .find(|(_, r)| held.as_deref() == Some(r.payload_hash().as_str()))
            .or_else(|| {
                copies
                    .iter()
                    .find(|(_, r)| Some(r.operation) == end.operation)
            });
        if let Some((_, request)) = ran {
            if request.operation != Operation::Teardown {
                continue;
            }
            if let Some(target) = &request.target_request_id {
                let at = first_seen(end);
                let entry = torn_down_at.entry(target.to_string()).or_default();
                *entry = (*entry).max(at);
            }
            if let Some(resource) = &request.resource_id
                && let Some(owner) = owner_of_instance.get(resource.as_str())
            {
                let at = first_seen(end);
                let entry = torn_down_at.entry((*owner).to_owned()).or_default();
                *entry = (*entry).max(at);
            }
        }
    }
    // Targets of a teardown that gave up past MAX_ATTEMPTS: its attempts died without
    // saying what they did, and its end says so; the resource may be there or not.
    let mut uncertain: BTreeSet<String> = BTreeSet::new();
    for (id, copies) in &bodies {
        let Some(end) = outcome.get(id) else { continue };
        if end
            .error
            .as_ref()
            .is_some_and(|e| e.message.contains("is not known: describe it"))
        {
            for (_, request) in copies {
                if let Some(target) = &request.target_request_id {
                    uncertain.insert(target.to_string());
                }
                if let Some(owner) = request
                    .resource_id
                    .as_ref()
                    .and_then(|r| owner_of_instance.get(r.as_str()))
                {
                    uncertain.insert((*owner).to_owned());
                }
            }
        }
    }
    let torn_down = |id: &str| {
        torn_down_at.get(id).is_some_and(|at| {
            !lost_record(id) || outcome.get(id).is_none_or(|end| *at >= first_seen(end))
        })
    };
    // Each provision as it ran: the message whose payload its record holds (any, if the
    // record is gone).
    let mut provisions: BTreeMap<&str, &Request> = BTreeMap::new();
    for (id, copies) in &bodies {
        let held = world
            .store
            .memory
            .get(id)
            .await
            .ok()
            .flatten()
            .and_then(|r| r.payload_hash);
        let ran = copies
            .iter()
            .find(|(_, r)| held.as_deref() == Some(r.payload_hash().as_str()))
            .or_else(|| copies.first())
            .map(|(_, r)| r);
        if let Some(request) = ran
            && request.operation == Operation::Provision
            && !request.is_fleet()
            && !request.dry_run
        {
            provisions.insert(id.as_str(), request);
        }
    }
    for (id, request) in &provisions {
        let live: Vec<&crate::cloud::Instance> = instances
            .iter()
            .filter(|i| i.owner == *id && i.is_live())
            .collect();
        let Some(end) = outcome.get(*id) else {
            // With no reaper, a request whose message was lost after its claim stays in
            // progress, and keeps what it made (the README says so; reconciling finds it).
            if !live.is_empty() && !may_stay_in_progress(world, id) {
                violations.push(format!(
                    "{id}: no outcome, yet it holds {} instance(s)",
                    live.len()
                ));
            }
            continue;
        };
        let said = end.resource.as_ref().map(|r| r.id.clone());
        let died = said
            .as_ref()
            .is_some_and(|s| instances.iter().any(|i| i.id == *s && i.died_on_its_own));
        let should_run = end.state == State::Running && end.error.is_none() && !torn_down(id);
        if should_run {
            if (died || uncertain.contains(*id)) && live.is_empty() {
                continue;
            }
            match live.as_slice() {
                [one] if Some(&one.id) == said.as_ref() => {}
                _ => violations.push(format!(
                    "{id} says it runs on {said:?}, but the cloud holds {:?}",
                    live.iter().map(|i| &i.id).collect::<Vec<_>>()
                )),
            }
        } else if !live.is_empty() {
            let says_teardown_needed = end
                .error
                .as_ref()
                .is_some_and(|e| e.message.contains("send a teardown"));
            if says_teardown_needed {
                v.stats.flagged += 1;
            } else {
                violations.push(format!(
                    "{id} ended {}{}, yet {:?} still run",
                    outcome_kind(end),
                    if torn_down(id) {
                        " and was torn down"
                    } else {
                        ""
                    },
                    live.iter().map(|i| &i.id).collect::<Vec<_>>()
                ));
            }
        }
        let _ = request;
    }
    // Fleets planted in the store by someone without the signing keys: nothing of them
    // happens (no member published, no event, no instance).
    let forged = world
        .forged
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for fleet in &forged {
        let of_it = |id: &str| id == fleet || id.starts_with(&format!("{fleet}#"));
        if bodies.keys().any(|id| of_it(id)) {
            violations.push(format!(
                "a request of the planted fleet {fleet} was published"
            ));
        }
        if events.iter().any(|e| of_it(&e.request_id)) {
            violations.push(format!("the planted fleet {fleet} has events"));
        }
        if let Some(instance) = instances.iter().find(|i| of_it(&i.owner)) {
            violations.push(format!("the planted fleet {fleet} made {}", instance.id));
        }
    }
    for instance in instances.iter().filter(|i| i.is_live()) {
        if !provisions.contains_key(instance.owner.as_str()) {
            violations.push(format!(
                "{} runs for {}, which nobody asked to provision",
                instance.id, instance.owner
            ));
        }
    }

    // Quotas: what each tenant holds, in machines and vCPUs.
    if !lost_everything {
        let mut tenants: BTreeSet<String> = BTreeSet::new();
        for request in provisions.values() {
            if let Some(tenant) = &request.tenant {
                tenants.insert(tenant.clone());
            }
        }
        for tenant in tenants {
            let holding: Vec<(&str, u64)> = provisions
                .iter()
                .filter(|(_, r)| r.tenant.as_deref() == Some(tenant.as_str()))
                .filter(|(id, _)| {
                    outcome
                        .get(**id)
                        .is_some_and(|e| e.state == State::Running && e.error.is_none())
                        && !torn_down(id)
                })
                .map(|(id, r)| {
                    let cpus = r
                        .spec
                        .as_ref()
                        .and_then(|s| s.get("cpus"))
                        .and_then(|c| c.as_u64())
                        .unwrap_or(1);
                    (*id, cpus)
                })
                .collect();
            // A provision whose record was lost may run again with another payload of
            // its id: its place stays the first run's (one per request id). One left in
            // progress for good (its message lost, no reaper) holds what it reserved.
            let in_progress_for_good = provisions.iter().any(|(id, r)| {
                r.tenant.as_deref() == Some(tenant.as_str()) && may_stay_in_progress(world, id)
            });
            if holding.iter().any(|(id, _)| lost_record(id)) || in_progress_for_good {
                continue;
            }
            let Ok(usage) = world.store.memory.quota(&tenant).await else {
                continue;
            };
            let vcpus: u64 = holding.iter().map(|(_, c)| c).sum();
            let used_vcpus = usage.units.get("vcpus").map_or(0, |u| u.used);
            if usage.used != holding.len() as u64 || used_vcpus != vcpus {
                violations.push(format!(
                    "tenant {tenant} is charged {} machines and {used_vcpus} vCPUs, and holds {} ({vcpus} vCPUs): {:?}",
                    usage.used,
                    holding.len(),
                    holding.iter().map(|(id, _)| id).collect::<Vec<_>>()
                ));
            }
        }
    }

    // Fleets: the fleet's end agrees with its members'.
    for (id, copies) in &bodies {
        let Some((_, fleet)) = copies.iter().find(|(_, r)| r.is_fleet()) else {
            continue;
        };
        let Some(end) = outcome.get(id) else { continue };
        let count = fleet.count.unwrap_or(1);
        // A member whose record was lost may run again after the fleet ended.
        if lost_record(id) || (0..count).any(|i| lost_record(&format!("{id}#{i}"))) {
            continue;
        }
        let members: Vec<Option<&StatusEvent>> = (0..count)
            .map(|i| outcome.get(&format!("{id}#{i}")))
            .collect();
        let running = members
            .iter()
            .filter(|m| m.is_some_and(|e| e.state == State::Running && e.error.is_none()))
            .count() as u32;
        let torn = end
            .error
            .as_ref()
            .is_some_and(|e| e.class == provisioner_events::ErrorClass::Conflict);
        match (&end.error, end.state) {
            (None, State::Running) if running < fleet.fleet_min_count() => violations.push(format!(
                "fleet {id} ended running with {running} of its members running, fewer than its min_count {}",
                fleet.fleet_min_count()
            )),
            // Giving up after MAX_ATTEMPTS coordinators ended without an outcome is the
            // documented bound; the message says the members are as their events say.
            (Some(error), State::Error)
                if !torn && running == count && !error.message.contains("gave up coordinating") =>
            {
                violations.push(format!(
                    "fleet {id} ended in error ({}: {}) while all {count} of its members ran",
                    error.class, error.message
                ))
            }
            (Some(error), _) if error.message.contains("every member was torn down") => {
                for i in 0..count {
                    let member = format!("{id}#{i}");
                    if instances.iter().any(|x| x.owner == member && x.is_live()) {
                        violations.push(format!(
                            "fleet {id} says every member was torn down, yet {member} still runs"
                        ));
                    }
                }
            }
            _ => {}
        }
    }

    // Expiry: whatever ran with a ttl or an expiry was torn down (unless the store lost
    // its schedule with everything else).
    for (id, request) in &provisions {
        if lost_everything {
            break;
        }
        if request.ttl_seconds.is_none() && request.expires_at.is_none() || lost_record(id) {
            continue;
        }
        let Some(end) = outcome.get(*id) else {
            continue;
        };
        if end.state == State::Running && end.error.is_none() && !torn_down(id) {
            let died = end
                .resource
                .as_ref()
                .is_some_and(|r| instances.iter().any(|i| i.id == r.id && i.died_on_its_own));
            if !died {
                violations.push(format!("{id} had a time to expire and was never torn down"));
            }
        }
    }

    // Pacing.
    let throttled: u32 = world.cloud.throttled().values().sum();
    if throttled > 0 && world.config.pacing_is_intact() {
        violations.push(format!(
            "the cloud throttled {throttled} call(s) while the workers' buckets were intact: {:?}",
            world.cloud.throttled()
        ));
    }

    v.stats.faults = world
        .faults
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    v.stats.crashes = world.crashes.load(Ordering::Relaxed);
    v.stats.instances = instances.len();
    v.stats.cloud_calls = world.cloud.calls();
    v.stats.throttled = throttled;
    v
}
