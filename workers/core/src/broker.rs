//! The message broker as the runtime sees it: a stream of deliveries for a platform, a
//! way to settle each (ack, retry later, dead-letter, requeue), and confirmed publishing
//! of status events and requests.
//!
//! [`MemoryBroker`] implements it in process for the embedded mode and tests;
//! `amqp::AmqpBroker` implements it on RabbitMQ.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use provisioner_events::{ErrorClass, PlatformName, StatusEvent};
use tokio::sync::{broadcast, mpsc};

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The connection or channel is gone; reconnecting may help.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refused a publish (nack) or returned it as unroutable.
    #[error("broker did not take the message: {0}")]
    NotConfirmed(String),
    /// The topology or a declaration was refused; an operator must look.
    #[error("broker refused: {0}")]
    Refused(String),
}

/// How a delivery ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Done: remove it from the queue.
    Ack,
    /// Deliver it again after `delay`, without blocking the queue. `attempt` is the
    /// attempt the next delivery is (informational: the state store counts attempts);
    /// `waits` counts the times the message was parked without an attempt (the request
    /// was held, its target busy, the store away), which the runtime bounds.
    Retry {
        delay: Duration,
        attempt: u32,
        waits: u32,
    },
    /// It can never succeed: move it to the platform's dead-letter queue with the reason.
    DeadLetter { class: ErrorClass, reason: String },
    /// Give it back now (shutdown, a panic, lost contact with the status topic); bounded
    /// by the queue's delivery limit.
    Requeue,
}

/// How long at most a delivery whose park the broker refused is held before it is given
/// back (its delay, up to this): the pace of its redeliveries while the broker refuses,
/// short enough for a drain to wait for.
pub const REFUSED_PARK_HOLD: Duration = Duration::from_secs(10);

/// One message taken from a platform's queue. It must be settled exactly once; dropping
/// it unsettled leaves it to the broker to deliver again.
pub struct Delivery {
    pub body: Vec<u8>,
    pub routing_key: String,
    /// Which attempt this is, 1 for the first; counted by the runtime's own retries.
    pub attempt: u32,
    /// The broker delivered this message before (a consumer died or gave it back).
    pub redelivered: bool,
    /// How many times the runtime parked this message without an attempt.
    pub waits: u32,
    /// When the producer published it (the AMQP `timestamp` property), kept through
    /// retries; a message older than the state store's retention is not run again.
    pub published_at: Option<SystemTime>,
    /// The producer's trace context (`traceparent`, `tracestate`), if it sent one.
    pub trace: crate::trace::TraceHeaders,
    /// The message's signature header, if it has one (see [`crate::signing`]).
    pub signature: Option<String>,
    /// Whether it came through the producers' door (`provisioning.requests`), rather
    /// than from a worker (a fleet's member, a parked retry): what a deployment that
    /// signs requests verifies.
    pub from_producers: bool,
    /// The message may be a worker's own though it is verified as a producer's: the
    /// Lambda form, whose events name no exchange, on a message its own broker user
    /// published (a derived request, a parked retry) or from SQS (which names no
    /// publisher the broker vouched for). The workers' own ids and fields, and the
    /// binding of producers to tenants, are not applied to it.
    pub way_in_unknown: bool,
    /// The AMQP `message_id`: the request id by the contract, so a message whose body
    /// cannot be read (too big, not JSON) is still answered under it.
    pub message_id: Option<String>,
    /// The broker user that published it, when the message names one in `user_id`
    /// (RabbitMQ refuses a `user_id` other than the publisher's own).
    pub publisher: Option<String>,
    settler: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("routing_key", &self.routing_key)
            .field("attempt", &self.attempt)
            .field("redelivered", &self.redelivered)
            .field("waits", &self.waits)
            .field("bytes", &self.body.len())
            .finish()
    }
}

/// The broker-specific half of a delivery.
#[async_trait]
pub trait Settle: Send + Sync {
    async fn settle(
        self: Box<Self>,
        delivery: DeliveryParts,
        settlement: Settlement,
    ) -> Result<(), BrokerError>;
}

/// What a [`Settle`] gets back of its delivery.
#[derive(Debug)]
pub struct DeliveryParts {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub attempt: u32,
    pub waits: u32,
    pub published_at: Option<SystemTime>,
    /// Kept on a dead letter, so a redriven request is still signed.
    pub signature: Option<String>,
    /// Whether it came the producers' way (see [`Delivery::from_producers`]).
    pub from_producers: bool,
    /// See [`Delivery::way_in_unknown`].
    pub way_in_unknown: bool,
}

impl Delivery {
    pub fn new(
        body: Vec<u8>,
        routing_key: String,
        attempt: u32,
        redelivered: bool,
        settler: Box<dyn Settle>,
    ) -> Self {
        Delivery {
            body,
            routing_key,
            attempt: attempt.max(1),
            redelivered,
            waits: 0,
            published_at: None,
            trace: Default::default(),
            signature: None,
            from_producers: true,
            way_in_unknown: false,
            message_id: None,
            publisher: None,
            settler,
        }
    }

    /// The broker user the broker vouched for in the message's `user_id`.
    pub fn with_publisher(mut self, publisher: Option<String>) -> Self {
        self.publisher = publisher.filter(|user| !user.is_empty());
        self
    }

    /// The message's AMQP `message_id`.
    pub fn with_message_id(mut self, message_id: Option<String>) -> Self {
        self.message_id = message_id.filter(|id| !id.is_empty());
        self
    }

    /// See [`Delivery::way_in_unknown`].
    pub fn with_way_in_unknown(mut self) -> Self {
        self.way_in_unknown = true;
        self
    }

    /// The times it was parked before, from the message's headers.
    pub fn with_waits(mut self, waits: u32) -> Self {
        self.waits = waits;
        self
    }

    pub fn with_published_at(mut self, published_at: Option<SystemTime>) -> Self {
        self.published_at = published_at;
        self
    }

    /// The message's signature, and whether it came from producers.
    pub fn with_signature(mut self, signature: Option<String>, from_producers: bool) -> Self {
        self.signature = signature;
        self.from_producers = from_producers;
        self
    }

    /// The trace the message belongs to, from its headers.
    pub fn with_trace(mut self, trace: crate::trace::TraceHeaders) -> Self {
        self.trace = trace;
        self
    }

    pub async fn settle(self, settlement: Settlement) -> Result<(), BrokerError> {
        let parts = DeliveryParts {
            body: self.body,
            routing_key: self.routing_key,
            attempt: self.attempt,
            waits: self.waits,
            published_at: self.published_at,
            signature: self.signature,
            from_producers: self.from_producers,
            way_in_unknown: self.way_in_unknown,
        };
        self.settler.settle(parts, settlement).await
    }
}

pub type DeliveryStream = BoxStream<'static, Result<Delivery, BrokerError>>;

/// The broker's answer to a publish still on its way: resolves when the broker confirms
/// the message (or refuses it, or the confirm does not come in time).
pub type PendingConfirm = BoxFuture<'static, Result<(), BrokerError>>;

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Declares the exchanges and the platform's queues (idempotent).
    async fn declare(&self, platform: PlatformName) -> Result<(), BrokerError>;

    /// Deliveries of the platform's queue, at most `prefetch` unsettled at a time. The
    /// stream ends (or yields an error) when the connection is lost; call again.
    async fn consume(
        &self,
        platform: PlatformName,
        prefetch: u16,
    ) -> Result<DeliveryStream, BrokerError>;

    /// Publishes a status event and waits for the broker to confirm it.
    async fn publish_status(&self, event: &StatusEvent) -> Result<(), BrokerError> {
        self.send_status(event).await?.await
    }

    /// Publishes a status event without waiting for the confirm, which the returned future
    /// brings. Events sent through one broker reach the exchange in the order they were
    /// sent, so the runtime can go on working while an event is being confirmed and wait
    /// for it together with the next one.
    async fn send_status(&self, event: &StatusEvent) -> Result<PendingConfirm, BrokerError>;

    /// Publishes a request body (as the producer wrote it) and waits for the confirm.
    async fn publish_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), BrokerError>;

    /// Publishes a request with headers of its own (its signature). The default, for
    /// brokers without headers, publishes the body alone.
    async fn publish_request_with_headers(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let _ = headers;
        self.publish_request(routing_key, request_id, body).await
    }

    /// Publishes a request a worker derived from one it handles (a fleet's members, the
    /// teardown of an expired resource), with `headers` (its signature, in a deployment
    /// that signs). RabbitMQ takes it on the workers' own exchange,
    /// `provisioning.internal`, so a worker's broker user needs no right to publish on
    /// the producers' `provisioning.requests`. No default: through the producers' door a
    /// worker would refuse it (its id under '#', its `fleet_member` or `cause`).
    async fn publish_derived_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError>;

    /// Every status event published from now on.
    async fn subscribe_status(&self) -> Result<BoxStream<'static, StatusEvent>, BrokerError>;

    /// Why the broker refuses to take publishes right now (RabbitMQ's memory or disk
    /// alarm blocks publishing connections), if it does.
    fn blocked(&self) -> Option<String> {
        None
    }
}

/// A message waiting in a [`MemoryBroker`] queue.
#[derive(Debug, Clone)]
struct QueuedMessage {
    body: Vec<u8>,
    routing_key: String,
    attempt: u32,
    redelivered: bool,
    waits: u32,
    published_at: Option<SystemTime>,
    /// The request's signature header, as RabbitMQ would carry it.
    signature: Option<String>,
    /// Published by a producer, not by a worker (a derived request, a retry): what
    /// RabbitMQ tells apart by the exchange.
    from_producers: bool,
}

/// A dead-lettered message, kept for inspection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub class: ErrorClass,
    pub reason: String,
}

struct MemoryQueue {
    sender: mpsc::UnboundedSender<QueuedMessage>,
    receiver: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<QueuedMessage>>>,
}

struct MemoryInner {
    queues: Mutex<HashMap<PlatformName, MemoryQueue>>,
    status: broadcast::Sender<StatusEvent>,
    dead_letters: Mutex<Vec<DeadLetter>>,
}

/// An in-process broker with the semantics the runtime relies on: competing consumers on
/// a queue per platform, delayed retries, dead letters and a status topic.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<MemoryInner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        let (status, _) = broadcast::channel(4096);
        MemoryBroker {
            inner: Arc::new(MemoryInner {
                queues: Mutex::new(HashMap::new()),
                status,
                dead_letters: Mutex::new(Vec::new()),
            }),
        }
    }
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }

    fn queue(
        &self,
        platform: PlatformName,
    ) -> (
        mpsc::UnboundedSender<QueuedMessage>,
        Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<QueuedMessage>>>,
    ) {
        let mut queues = self.inner.queues.lock().unwrap_or_else(|e| e.into_inner());
        let queue = queues.entry(platform).or_insert_with(|| {
            let (sender, receiver) = mpsc::unbounded_channel();
            MemoryQueue {
                sender,
                receiver: Arc::new(tokio::sync::Mutex::new(receiver)),
            }
        });
        (queue.sender.clone(), queue.receiver.clone())
    }

    /// Messages dead-lettered so far.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner
            .dead_letters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues a request as if a producer had published it at `published_at` (tests of
    /// messages older than the store's retention).
    pub fn publish_request_at(
        &self,
        routing_key: &str,
        body: &[u8],
        published_at: SystemTime,
    ) -> Result<(), BrokerError> {
        self.publish_new(routing_key, body, published_at, None, true)
    }

    fn publish_new(
        &self,
        routing_key: &str,
        body: &[u8],
        published_at: SystemTime,
        signature: Option<String>,
        from_producers: bool,
    ) -> Result<(), BrokerError> {
        let platform = platform_of(routing_key)?;
        self.enqueue(
            platform,
            QueuedMessage {
                body: body.to_vec(),
                routing_key: routing_key.to_owned(),
                attempt: 1,
                redelivered: false,
                waits: 0,
                published_at: Some(published_at),
                signature,
                from_producers,
            },
        );
        Ok(())
    }

    fn enqueue(&self, platform: PlatformName, message: QueuedMessage) {
        let (sender, _) = self.queue(platform);
        // The receiver lives as long as the broker, so the send cannot fail.
        let _ = sender.send(message);
    }
}

fn platform_of(routing_key: &str) -> Result<PlatformName, BrokerError> {
    let name = routing_key.split('.').next().unwrap_or_default();
    PlatformName::parse(name).ok_or_else(|| {
        BrokerError::NotConfirmed(format!("no queue for routing key {routing_key:?}"))
    })
}

struct MemorySettle {
    broker: MemoryBroker,
}

#[async_trait]
impl Settle for MemorySettle {
    async fn settle(
        self: Box<Self>,
        delivery: DeliveryParts,
        settlement: Settlement,
    ) -> Result<(), BrokerError> {
        let platform = platform_of(&delivery.routing_key)?;
        match settlement {
            Settlement::Ack => {}
            Settlement::Retry {
                delay,
                attempt,
                waits,
            } => {
                let broker = self.broker.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    broker.enqueue(
                        platform,
                        QueuedMessage {
                            body: delivery.body,
                            routing_key: delivery.routing_key,
                            attempt,
                            redelivered: false,
                            waits,
                            published_at: delivery.published_at,
                            // A parked copy comes back the workers' way, as through
                            // RabbitMQ's delay queues.
                            signature: delivery.signature,
                            from_producers: false,
                        },
                    );
                });
            }
            Settlement::DeadLetter { class, reason } => {
                self.broker
                    .inner
                    .dead_letters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(DeadLetter {
                        body: delivery.body,
                        routing_key: delivery.routing_key,
                        class,
                        reason,
                    });
            }
            Settlement::Requeue => self.broker.enqueue(
                platform,
                QueuedMessage {
                    body: delivery.body,
                    routing_key: delivery.routing_key,
                    attempt: delivery.attempt,
                    redelivered: true,
                    waits: delivery.waits,
                    published_at: delivery.published_at,
                    signature: delivery.signature,
                    from_producers: delivery.from_producers,
                },
            ),
        }
        Ok(())
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn declare(&self, platform: PlatformName) -> Result<(), BrokerError> {
        self.queue(platform);
        Ok(())
    }

    async fn consume(
        &self,
        platform: PlatformName,
        _prefetch: u16,
    ) -> Result<DeliveryStream, BrokerError> {
        let (_, receiver) = self.queue(platform);
        let broker = self.clone();
        let deliveries = stream::unfold((receiver, broker), |(receiver, broker)| async move {
            let message = receiver.lock().await.recv().await?;
            let delivery = Delivery::new(
                message.body,
                message.routing_key,
                message.attempt,
                message.redelivered,
                Box::new(MemorySettle {
                    broker: broker.clone(),
                }),
            )
            .with_waits(message.waits)
            .with_published_at(message.published_at)
            .with_signature(message.signature, message.from_producers);
            Some((Ok(delivery), (receiver, broker)))
        });
        Ok(deliveries.boxed())
    }

    async fn send_status(&self, event: &StatusEvent) -> Result<PendingConfirm, BrokerError> {
        // No subscriber is not an error in process: nothing durable would have kept it.
        let _ = self.inner.status.send(event.clone());
        Ok(Box::pin(std::future::ready(Ok(()))))
    }

    async fn publish_request(
        &self,
        routing_key: &str,
        _request_id: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        self.publish_request_at(routing_key, body, SystemTime::now())
    }

    async fn publish_request_with_headers(
        &self,
        routing_key: &str,
        _request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let signature = headers.get(crate::signing::SIGNATURE_HEADER).cloned();
        self.publish_new(routing_key, body, SystemTime::now(), signature, true)
    }

    /// Like RabbitMQ's `provisioning.internal`: a worker's own request is not checked
    /// again as a producer's.
    async fn publish_derived_request(
        &self,
        routing_key: &str,
        _request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        let signature = headers.get(crate::signing::SIGNATURE_HEADER).cloned();
        self.publish_new(routing_key, body, SystemTime::now(), signature, false)
    }

    async fn subscribe_status(&self) -> Result<BoxStream<'static, StatusEvent>, BrokerError> {
        let receiver = self.inner.status.subscribe();
        Ok(stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(event) => return Some((event, receiver)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }
}
