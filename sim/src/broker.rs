//! The broker of a run, with RabbitMQ's semantics where the runtime relies on them: one
//! quorum work queue per platform shared by competing consumers, at most `prefetch`
//! unacknowledged per consumer, publisher confirms, delayed retries that come back as new
//! messages, a dead-letter queue, a delivery limit, and a connection whose death gives
//! every unacknowledged delivery back (redelivered) and makes its later settlements fail.
//!
//! Faults strike here too: a publish nacked or returned (not routed), or whose confirm
//! times out (routed all the same), a settlement's publish refused, an ack lost with its
//! connection, a connection dropped (every delivery on it redelivered), publishing blocked
//! by an alarm. Producers' messages go through [`SharedBroker::producer_publish`], which
//! records every copy the broker took: the oracle's ledger of accepted messages.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use provisioner_core::broker::{DeliveryParts, DeliveryStream, PendingConfirm, Settle, Settlement};
use provisioner_core::{Broker, BrokerError, Delivery, Environment};
use provisioner_events::{ErrorClass, PlatformName, StatusEvent};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::history::History;
use crate::process::Process;
use crate::rng::Rng;
use crate::witness::Witness;

/// How long a publisher waits for a confirm (the AMQP adapter's `publish_timeout`).
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// A message in a queue.
#[derive(Debug, Clone)]
pub struct Message {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub attempt: u32,
    pub waits: u32,
    pub redelivered: bool,
    /// Times the queue handed it out and got it back (the quorum queue's count).
    pub returns: u32,
    pub published_at: SystemTime,
    pub from_producers: bool,
    pub signature: Option<String>,
}

/// A message set aside.
#[derive(Debug, Clone)]
pub struct DeadLettered {
    pub message: Message,
    /// The worker's reason, or the queue's own (`delivery limit`, a refused publish).
    pub reason: String,
    pub class: Option<ErrorClass>,
}

/// A status event as the status topic's subscribers saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub at: Duration,
    pub by: String,
    pub event: StatusEvent,
}

#[derive(Debug)]
struct Unacked {
    message: Message,
    consumer: u64,
}

#[derive(Debug)]
struct Consumer {
    #[allow(dead_code)] // for the Debug of a stuck run
    worker: String,
    connection: u64,
    platform: PlatformName,
    prefetch: u32,
    unacked: u32,
    /// Cancelled by its worker: hands out nothing more.
    cancelled: bool,
    /// Its connection died: its stream ends.
    closed: bool,
}

/// Per-call chances of the broker's faults, drawn once per run.
#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerChances {
    /// A publish nacked or returned: not routed, and the publisher hears so.
    pub refuse: f64,
    /// A publish routed, and its confirm never comes (the publisher times out).
    pub confirm_lost: f64,
    /// An ack that dies with its connection: the message comes again.
    pub ack_lost: f64,
    /// Returned messages go back to the head of the queue (else its tail).
    pub requeue_at_head: bool,
    /// The quorum queue's delivery limit.
    pub delivery_limit: u32,
    /// Latency of a confirm, at most.
    pub confirm_ms: u64,
}

#[derive(Debug, Default)]
struct State {
    ready: BTreeMap<PlatformName, VecDeque<Message>>,
    unacked: BTreeMap<u64, Unacked>,
    consumers: BTreeMap<u64, Consumer>,
    /// The live connection of each worker process (they connect lazily).
    connections: BTreeMap<String, u64>,
    dead_letters: Vec<DeadLettered>,
    events: Vec<Logged>,
    /// Parked retries on their way back.
    delayed: usize,
    blocked_until: Option<Instant>,
    next_id: u64,
    /// Every message the broker took from a producer or a worker (not the parked
    /// copies of retries), in order: what must be answered.
    accepted: Vec<Message>,
    /// Messages lost from a queue (purged by hand, or by a broker that lost them).
    purged: Vec<Vec<u8>>,
}

/// The broker every view shares.
#[derive(Debug)]
pub struct SharedBroker {
    state: Mutex<State>,
    changed: Notify,
    chances: BrokerChances,
    rng: Mutex<Rng>,
    faults_on: Arc<AtomicBool>,
    history: Arc<History>,
    clock: Arc<crate::clock::Clock>,
    witness: Arc<Witness>,
}

enum Take {
    Delivery(u64, Message),
    Closed,
    Wait,
}

impl SharedBroker {
    pub fn new(
        chances: BrokerChances,
        rng: Rng,
        faults_on: Arc<AtomicBool>,
        history: Arc<History>,
        clock: Arc<crate::clock::Clock>,
        witness: Arc<Witness>,
    ) -> Arc<Self> {
        Arc::new(SharedBroker {
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            chances,
            rng: Mutex::new(rng),
            faults_on,
            history,
            clock,
            witness,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn chance(&self, p: f64) -> bool {
        p > 0.0
            && self.faults_on.load(Ordering::Relaxed)
            && self.rng.lock().unwrap_or_else(|e| e.into_inner()).chance(p)
    }

    fn confirm_delay(&self) -> Duration {
        match self.chances.confirm_ms {
            0 => Duration::ZERO,
            max => self
                .rng
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .millis(0, max),
        }
    }

    fn enqueue(&self, state: &mut State, message: Message) {
        let Some(platform) = platform_of(&message.routing_key) else {
            return;
        };
        state.ready.entry(platform).or_default().push_back(message);
        self.changed.notify_waiters();
    }

    /// A message handed out comes back (requeued, or its connection died): redelivered,
    /// or dead-lettered past the delivery limit.
    fn give_back(&self, state: &mut State, mut message: Message) {
        message.redelivered = true;
        message.returns += 1;
        if message.returns > self.chances.delivery_limit {
            state.dead_letters.push(DeadLettered {
                message,
                reason: "delivery limit".into(),
                class: None,
            });
            return;
        }
        let Some(platform) = platform_of(&message.routing_key) else {
            return;
        };
        let queue = state.ready.entry(platform).or_default();
        if self.chances.requeue_at_head {
            queue.push_front(message);
        } else {
            queue.push_back(message);
        }
        self.changed.notify_waiters();
    }

    /// A producer's publish: routed (and recorded as accepted) unless refused; a confirm
    /// lost leaves the message routed and the producer in doubt.
    pub fn producer_publish(
        &self,
        routing_key: &str,
        body: &[u8],
        published_at: SystemTime,
        signature: Option<String>,
    ) -> Result<(), BrokerError> {
        if let Some(reason) = self.blocked() {
            return Err(BrokerError::Unavailable(reason));
        }
        if self.chance(self.chances.refuse) {
            self.history
                .note("producer", || format!("publish {routing_key}: nacked"));
            return Err(BrokerError::NotConfirmed("nack".into()));
        }
        let message = Message {
            body: body.to_vec(),
            routing_key: routing_key.to_owned(),
            attempt: 1,
            waits: 0,
            redelivered: false,
            returns: 0,
            published_at,
            from_producers: true,
            signature,
        };
        let lost = self.chance(self.chances.confirm_lost);
        let mut state = self.state();
        state.accepted.push(message.clone());
        self.enqueue(&mut state, message);
        drop(state);
        if lost {
            return Err(BrokerError::Unavailable("no publisher confirm".into()));
        }
        Ok(())
    }

    /// The messages the broker took from producers and workers.
    pub fn accepted(&self) -> Vec<Message> {
        self.state().accepted.clone()
    }

    pub fn events(&self) -> Vec<Logged> {
        self.state().events.clone()
    }

    /// Events from index `from` on (for producers that watch the topic).
    pub fn events_since(&self, from: usize) -> Vec<Logged> {
        let state = self.state();
        state
            .events
            .get(from..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    pub fn dead_letters(&self) -> Vec<DeadLettered> {
        self.state().dead_letters.clone()
    }

    /// Moves every dead letter back to its work queue, as `provisioner redrive` does:
    /// republished through the producers' exchange with its first publish time.
    pub fn redrive(&self) -> usize {
        let mut state = self.state();
        let letters = std::mem::take(&mut state.dead_letters);
        let moved = letters.len();
        for letter in letters {
            let message = Message {
                attempt: 1,
                waits: 0,
                redelivered: false,
                returns: 0,
                from_producers: true,
                ..letter.message
            };
            self.enqueue(&mut state, message);
        }
        moved
    }

    /// Whether nothing is queued, handed out or parked.
    pub fn is_idle(&self) -> bool {
        let state = self.state();
        state.ready.values().all(VecDeque::is_empty)
            && state.unacked.is_empty()
            && state.delayed == 0
    }

    /// Why nothing is idle, in words (for a run that never quiesced).
    pub fn busy(&self) -> String {
        let state = self.state();
        let ready: usize = state.ready.values().map(VecDeque::len).sum();
        format!(
            "{ready} ready, {} unacknowledged, {} parked",
            state.unacked.len(),
            state.delayed
        )
    }

    /// Loses one ready message (`pick` chooses which): an operator's purge, or a broker
    /// that lost it. Returns its routing key.
    pub fn lose_a_message(&self, pick: u64) -> Option<String> {
        let mut state = self.state();
        let queue = state.ready.values_mut().find(|q| !q.is_empty())?;
        let index = (pick % queue.len() as u64) as usize;
        let message = queue.remove(index)?;
        let key = match provisioner_events::decode_request(&message.body) {
            Ok(request) => format!(
                "{} {} ({})",
                message.routing_key,
                request.request_id,
                &request.payload_hash()[..8]
            ),
            Err(_) => message.routing_key.clone(),
        };
        state.purged.push(message.body);
        Some(key)
    }

    /// The bodies of the messages lost from queues.
    pub fn purged(&self) -> Vec<Vec<u8>> {
        self.state().purged.clone()
    }

    /// Blocks publishing (a memory or disk alarm) until `until`.
    pub fn block_until(&self, until: Instant) {
        self.state().blocked_until = Some(until);
    }

    pub fn unblock(&self) {
        self.state().blocked_until = None;
    }

    fn blocked(&self) -> Option<String> {
        let until = self.state().blocked_until?;
        (until > Instant::now()).then(|| "the broker blocks publishing (memory alarm)".into())
    }

    /// The connection of `worker` dies: every delivery it holds comes back, its consumers
    /// end, its later settlements fail. It reconnects by itself on its next call.
    pub fn connection_died(&self, worker: &str) {
        self.witness.disrupted(worker);
        let mut state = self.state();
        let Some(connection) = state.connections.remove(worker) else {
            return;
        };
        let consumers: Vec<u64> = state
            .consumers
            .iter()
            .filter(|(_, c)| c.connection == connection)
            .map(|(id, _)| *id)
            .collect();
        for id in &consumers {
            if let Some(consumer) = state.consumers.get_mut(id) {
                consumer.closed = true;
            }
        }
        let tags: Vec<u64> = state
            .unacked
            .iter()
            .filter(|(_, u)| consumers.contains(&u.consumer))
            .map(|(tag, _)| *tag)
            .collect();
        let returned = tags.len();
        for tag in tags {
            if let Some(unacked) = state.unacked.remove(&tag) {
                self.give_back(&mut state, unacked.message);
            }
        }
        for id in consumers {
            state.consumers.remove(&id);
        }
        drop(state);
        self.changed.notify_waiters();
        self.history.note(worker, || {
            format!("broker connection died; {returned} deliveries come again")
        });
    }

    fn connection_of(&self, state: &mut State, worker: &str) -> u64 {
        if let Some(id) = state.connections.get(worker) {
            return *id;
        }
        state.next_id += 1;
        let id = state.next_id;
        state.connections.insert(worker.to_owned(), id);
        id
    }

    fn take(&self, consumer: u64) -> Take {
        let mut state = self.state();
        let Some(c) = state.consumers.get(&consumer) else {
            return Take::Closed;
        };
        if c.closed {
            return Take::Closed;
        }
        if c.cancelled || c.unacked >= c.prefetch {
            return Take::Wait;
        }
        let platform = c.platform;
        let Some(message) = state.ready.get_mut(&platform).and_then(VecDeque::pop_front) else {
            return Take::Wait;
        };
        state.next_id += 1;
        let tag = state.next_id;
        if let Some(c) = state.consumers.get_mut(&consumer) {
            c.unacked += 1;
        }
        state.unacked.insert(
            tag,
            Unacked {
                message: message.clone(),
                consumer,
            },
        );
        Take::Delivery(tag, message)
    }

    fn settle(
        self: &Arc<Self>,
        tag: u64,
        worker: &str,
        settlement: Settlement,
    ) -> (Result<(), BrokerError>, Option<Duration>) {
        let mut state = self.state();
        let Some(unacked) = state.unacked.remove(&tag) else {
            return (
                Err(BrokerError::Unavailable(
                    "the channel closed: the broker delivers it again".into(),
                )),
                None,
            );
        };
        if let Some(c) = state.consumers.get_mut(&unacked.consumer) {
            c.unacked = c.unacked.saturating_sub(1);
        }
        let consumer = unacked.consumer;
        let message = unacked.message;
        let mut hold = None;
        let what = format!("{settlement:?}");
        let result = match settlement {
            Settlement::Ack => Ok(()),
            Settlement::Requeue => {
                self.give_back(&mut state, message);
                Ok(())
            }
            Settlement::Retry {
                delay,
                attempt,
                waits,
            } => {
                if self.chance(self.chances.refuse) {
                    // The adapter holds it for its delay, then gives it back
                    // (`REFUSED_PARK_HOLD`): unacked meanwhile, so a connection that
                    // dies gives it back at once.
                    if let Some(c) = state.consumers.get_mut(&consumer) {
                        c.unacked += 1;
                    }
                    state.unacked.insert(tag, Unacked { message, consumer });
                    hold = Some(delay.min(provisioner_core::broker::REFUSED_PARK_HOLD));
                    Err(BrokerError::NotConfirmed(
                        "the delay queue refused the retry (nack)".into(),
                    ))
                } else {
                    state.delayed += 1;
                    let parked = Message {
                        attempt,
                        waits,
                        redelivered: false,
                        returns: 0,
                        from_producers: false,
                        ..message
                    };
                    let broker = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let mut state = broker.state();
                        state.delayed -= 1;
                        broker.enqueue(&mut state, parked);
                    });
                    Ok(())
                }
            }
            Settlement::DeadLetter { class, reason } => {
                if self.chance(self.chances.refuse) {
                    // The queue's own dead-lettering keeps it, without the reason.
                    state.dead_letters.push(DeadLettered {
                        message,
                        reason: "rejected".into(),
                        class: None,
                    });
                    Err(BrokerError::NotConfirmed(
                        "the dead-letter exchange refused it (nack)".into(),
                    ))
                } else {
                    state.dead_letters.push(DeadLettered {
                        message,
                        reason,
                        class: Some(class),
                    });
                    Ok(())
                }
            }
        };
        drop(state);
        self.changed.notify_waiters();
        self.history
            .note(worker, || format!("settle #{tag} {what} -> {result:?}"));
        (result, hold)
    }

    /// Gives back a delivery held after its park was refused, unless its connection died
    /// meanwhile (which gave it back already).
    fn give_back_held(&self, tag: u64) {
        let mut state = self.state();
        let Some(unacked) = state.unacked.remove(&tag) else {
            return;
        };
        if let Some(c) = state.consumers.get_mut(&unacked.consumer) {
            c.unacked = c.unacked.saturating_sub(1);
        }
        self.give_back(&mut state, unacked.message);
        drop(state);
        self.changed.notify_waiters();
    }
}

fn platform_of(routing_key: &str) -> Option<PlatformName> {
    PlatformName::parse(routing_key.split('.').next().unwrap_or_default())
}

/// One worker process's connection to the broker.
#[derive(Debug, Clone)]
pub struct BrokerView {
    process: Arc<Process>,
    shared: Arc<SharedBroker>,
    env: Arc<dyn Environment>,
}

impl BrokerView {
    pub fn new(
        process: Arc<Process>,
        shared: Arc<SharedBroker>,
        env: Arc<dyn Environment>,
    ) -> Self {
        BrokerView {
            process,
            shared,
            env,
        }
    }

    /// Publishes through this worker's connection: routed or not, and the confirm that
    /// says so (or never comes).
    async fn publish(
        &self,
        what: String,
        route: impl FnOnce(&SharedBroker, &mut State),
    ) -> Result<PendingConfirm, BrokerError> {
        self.process.boundary("publish").await;
        let shared = &self.shared;
        if let Some(reason) = shared.blocked() {
            shared
                .history
                .note(&self.process.name, || format!("publish {what}: blocked"));
            shared.witness.disrupted(&self.process.name);
            return Err(BrokerError::Unavailable(reason));
        }
        let refused = shared.chance(shared.chances.refuse);
        let lost = !refused && shared.chance(shared.chances.confirm_lost);
        if refused || lost {
            shared.witness.disrupted(&self.process.name);
        }
        {
            let mut state = shared.state();
            shared.connection_of(&mut state, &self.process.name);
            if !refused {
                route(shared, &mut state);
            }
        }
        shared.history.note(&self.process.name, || {
            let outcome = if refused {
                "nacked"
            } else if lost {
                "routed, confirm lost"
            } else {
                "routed"
            };
            format!("publish {what}: {outcome}")
        });
        let delay = if lost {
            PUBLISH_TIMEOUT
        } else {
            shared.confirm_delay()
        };
        let process = self.process.clone();
        Ok(Box::pin(async move {
            tokio::time::sleep(delay).await;
            process.boundary("confirm").await;
            if refused {
                Err(BrokerError::NotConfirmed("nack".into()))
            } else if lost {
                Err(BrokerError::Unavailable(format!(
                    "no publisher confirm within {} s",
                    PUBLISH_TIMEOUT.as_secs()
                )))
            } else {
                Ok(())
            }
        }))
    }

    async fn publish_message(
        &self,
        routing_key: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
        from_producers: bool,
    ) -> Result<(), BrokerError> {
        let message = Message {
            body: body.to_vec(),
            routing_key: routing_key.to_owned(),
            attempt: 1,
            waits: 0,
            redelivered: false,
            returns: 0,
            published_at: self.env.now(),
            from_producers,
            signature: headers
                .get(provisioner_core::signing::SIGNATURE_HEADER)
                .cloned(),
        };
        let id = provisioner_events::decode_request(body)
            .map(|r| r.request_id.to_string())
            .unwrap_or_default();
        let confirm = self
            .publish(format!("{routing_key} {id}"), |shared, state| {
                state.accepted.push(message.clone());
                shared.enqueue(state, message)
            })
            .await?;
        confirm.await
    }
}

struct SimSettle {
    tag: u64,
    shared: Arc<SharedBroker>,
    process: Arc<Process>,
}

#[async_trait]
impl Settle for SimSettle {
    async fn settle(
        self: Box<Self>,
        _delivery: DeliveryParts,
        settlement: Settlement,
    ) -> Result<(), BrokerError> {
        self.process.boundary("settle").await;
        let ack = settlement == Settlement::Ack;
        let (result, hold) = self.shared.settle(self.tag, &self.process.name, settlement);
        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
            self.shared.give_back_held(self.tag);
        }
        if result.is_err() {
            self.shared.witness.disrupted(&self.process.name);
        }
        if ack && result.is_ok() && self.shared.chance(self.shared.chances.ack_lost) {
            // The ack was written, and the connection died before the broker read it.
            self.shared.connection_died(&self.process.name);
            self.shared.history.note(&self.process.name, || {
                format!("the ack of #{} was lost with its connection", self.tag)
            });
        }
        result
    }
}

/// Ends the consumer when its worker drops the stream (basic.cancel): it hands out
/// nothing more; what it holds stays with it until settled or its connection dies.
struct ConsumerGuard {
    id: u64,
    shared: Arc<SharedBroker>,
}

impl Drop for ConsumerGuard {
    fn drop(&mut self) {
        if let Some(c) = self.shared.state().consumers.get_mut(&self.id) {
            c.cancelled = true;
        }
    }
}

#[async_trait]
impl Broker for BrokerView {
    async fn declare(&self, _platform: PlatformName) -> Result<(), BrokerError> {
        self.process.boundary("declare").await;
        Ok(())
    }

    async fn consume(
        &self,
        platform: PlatformName,
        prefetch: u16,
    ) -> Result<DeliveryStream, BrokerError> {
        self.process.boundary("consume").await;
        let shared = self.shared.clone();
        let id = {
            let mut state = shared.state();
            let connection = shared.connection_of(&mut state, &self.process.name);
            state.next_id += 1;
            let id = state.next_id;
            state.consumers.insert(
                id,
                Consumer {
                    worker: self.process.name.clone(),
                    connection,
                    platform,
                    prefetch: u32::from(prefetch.max(1)),
                    unacked: 0,
                    cancelled: false,
                    closed: false,
                },
            );
            id
        };
        self.shared
            .history
            .note(&self.process.name, || format!("consuming (consumer {id})"));
        let guard = ConsumerGuard {
            id,
            shared: shared.clone(),
        };
        let process = self.process.clone();
        let stream = futures_util::stream::unfold(
            (guard, process, false),
            |(guard, process, ended)| async move {
                if ended {
                    return None;
                }
                loop {
                    let shared = guard.shared.clone();
                    let notified = shared.changed.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    match guard.shared.take(guard.id) {
                        Take::Delivery(tag, message) => {
                            guard.shared.history.note(&process.name, || {
                                format!(
                                    "receive #{tag} {} {}{}",
                                    message.routing_key,
                                    provisioner_events::decode_request(&message.body)
                                        .map(|r| r.request_id.to_string())
                                        .unwrap_or_else(|_| "(undecodable)".into()),
                                    if message.redelivered {
                                        " (redelivered)"
                                    } else {
                                        ""
                                    }
                                )
                            });
                            process.boundary("receive").await;
                            let settler = Box::new(SimSettle {
                                tag,
                                shared: guard.shared.clone(),
                                process: process.clone(),
                            });
                            let delivery = Delivery::new(
                                message.body,
                                message.routing_key,
                                message.attempt,
                                message.redelivered,
                                settler,
                            )
                            .with_waits(message.waits)
                            .with_published_at(Some(message.published_at))
                            .with_signature(message.signature, message.from_producers);
                            return Some((Ok(delivery), (guard, process, false)));
                        }
                        Take::Closed => {
                            return Some((
                                Err(BrokerError::Unavailable("the connection closed".into())),
                                (guard, process, true),
                            ));
                        }
                        Take::Wait => notified.await,
                    }
                }
            },
        );
        Ok(stream.boxed())
    }

    async fn send_status(&self, event: &StatusEvent) -> Result<PendingConfirm, BrokerError> {
        let logged = Logged {
            at: self.shared.clock.elapsed(),
            by: self.process.name.clone(),
            event: event.clone(),
        };
        let what = format!(
            "status {} {} seq {}",
            event.request_id, event.state, event.seq
        );
        self.publish(what, move |_, state| state.events.push(logged))
            .await
    }

    async fn publish_request(
        &self,
        routing_key: &str,
        _request_id: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        self.publish_message(routing_key, body, &Default::default(), true)
            .await
    }

    async fn publish_request_with_headers(
        &self,
        routing_key: &str,
        _request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.publish_message(routing_key, body, headers, true).await
    }

    async fn publish_derived_request(
        &self,
        routing_key: &str,
        _request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.publish_message(routing_key, body, headers, false)
            .await
    }

    async fn subscribe_status(&self) -> Result<BoxStream<'static, StatusEvent>, BrokerError> {
        Ok(futures_util::stream::pending().boxed())
    }

    fn blocked(&self) -> Option<String> {
        self.shared.blocked()
    }
}
