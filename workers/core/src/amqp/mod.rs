//! The broker on RabbitMQ (AMQP 0-9-1, lapin).
//!
//! Topology, declared idempotently by every worker and producer:
//!
//! | name | kind | purpose |
//! |---|---|---|
//! | `provisioning.requests` | topic exchange | requests, key `<platform>.<operation>`; unroutable ones go to `provisioning.unrouted` |
//! | `provisioning.status` | topic exchange | status events, key `<platform>.<state>` |
//! | `provisioning.status.journal` | queue on `#` | keeps the latest events (bounded) so a status publish always has a route |
//! | `provisioning.<platform>` | quorum queue on `<platform>.*` | the work queue, with a delivery limit and a dead-letter exchange |
//! | `provisioning.dead-letter` | topic exchange | dead letters, into `provisioning.<platform>.dead-letter` |
//! | `provisioning.<platform>.delay.<N>s` | quorum queue, TTL N s | delayed retries: expired messages dead-letter back into the work queue, at least once |
//! | `provisioning.unrouted` | fanout exchange + queue | requests no queue was bound for |
//!
//! Delayed retries use fixed-TTL tier queues (1 s, 2 s, … 512 s) rather than per-message
//! TTLs, because RabbitMQ expires messages only at a queue's head: one long delay would
//! hold back every shorter one behind it. A delay is rounded onto the two nearest tiers at
//! random in proportion to its distance from each, which keeps the mean delay and the
//! spread of the jitter.
//!
//! Delay queues are quorum queues with at-least-once dead-lettering (and `reject-publish`
//! overflow, which that needs), so a parked retry is as durable as the request: it
//! survives a node's loss and cannot vanish between the delay queue and the work queue.
//! The work queue dead-letters the same way when a message passes its delivery limit.
//!
//! Every publish uses publisher confirms and `mandatory`; a nack or a return is an error,
//! and a confirm that does not come within `publish_timeout` is too (a broker under a
//! memory or disk alarm blocks publishers instead of refusing them). While the broker
//! blocks the connection, [`Broker::blocked`] says so and nothing is published.
//! Each delivery keeps its channel open until it is settled, so cancelling the consumer
//! (shutdown, reconnect) never hands back work that is still being done.
//! The connection is made lazily and made again after it drops.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::stream::{BoxStream, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};
use provisioner_events::{
    ErrorClass, PlatformName, REQUESTS_EXCHANGE, STATUS_EXCHANGE, StatusEvent,
};
use tokio::sync::Mutex;
use tracing::{debug, warn};

mod journal;
mod redrive;

pub use redrive::DeadLetterInfo;

use crate::broker::{
    Broker, BrokerError, Delivery, DeliveryParts, DeliveryStream, Settle, Settlement,
};

pub const DEAD_LETTER_EXCHANGE: &str = "provisioning.dead-letter";
pub const UNROUTED_EXCHANGE: &str = "provisioning.unrouted";
pub const UNROUTED_QUEUE: &str = "provisioning.unrouted";
pub const STATUS_JOURNAL_QUEUE: &str = "provisioning.status.journal";
/// Header carrying the runtime's attempt number (1-based).
pub const ATTEMPT_HEADER: &str = "x-provisioner-attempt";
/// Header keeping a retried message's original routing key (a retry travels by queue name).
pub const ROUTING_KEY_HEADER: &str = "x-provisioner-routing-key";
/// Header counting the times a message was parked without an attempt.
pub const WAITS_HEADER: &str = "x-provisioner-waits";
/// Headers of a dead letter: why it was refused, and the error class.
pub const REASON_HEADER: &str = "x-provisioner-reason";
pub const CLASS_HEADER: &str = "x-provisioner-error-class";

/// Routing key and message-id prefix of the probe that proves a status subscription
/// receives; probes are not status events and every reader skips them.
pub const PROBE_ROUTING_KEY: &str = "provisioner.subscription-probe";
const PROBE_PREFIX: &str = "subscription-probe-";
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Delay tiers of the retry queues, in seconds.
pub const RETRY_TIERS_S: [u64; 10] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512];

pub fn work_queue(platform: PlatformName) -> String {
    format!("provisioning.{platform}")
}

pub fn dead_letter_queue(platform: PlatformName) -> String {
    format!("provisioning.{platform}.dead-letter")
}

pub fn retry_queue(platform: PlatformName, tier_s: u64) -> String {
    format!("provisioning.{platform}.delay.{tier_s}s")
}

/// Picks the retry tier for `delay`: one of the two tiers around it, the upper one with a
/// probability growing linearly with the distance from the lower (`draw` in 0..1).
pub fn retry_tier(delay: Duration, draw: f64) -> u64 {
    let seconds = delay.as_secs_f64();
    let first = RETRY_TIERS_S[0];
    let last = RETRY_TIERS_S[RETRY_TIERS_S.len() - 1];
    if seconds <= first as f64 {
        return first;
    }
    if seconds >= last as f64 {
        return last;
    }
    for pair in RETRY_TIERS_S.windows(2) {
        let (low, high) = (pair[0] as f64, pair[1] as f64);
        if seconds <= high {
            let upper_probability = (seconds - low) / (high - low);
            return if draw < upper_probability {
                pair[1]
            } else {
                pair[0]
            };
        }
    }
    last
}

/// Broker settings beyond the URL.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    pub url: String,
    /// Shown in the management UI for this connection.
    pub connection_name: String,
    /// Deliveries of one message before the queue dead-letters it (crash loops, panics).
    pub delivery_limit: i32,
    /// How many status events the journal queue keeps (oldest dropped first).
    pub journal_max_length: i64,
    /// How long connecting (handshake and topology included) may take.
    pub connect_timeout: Duration,
    /// How long a publish may wait for the broker's confirm.
    pub publish_timeout: Duration,
}

impl AmqpConfig {
    pub fn new(url: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            connection_name: "provisioner".into(),
            delivery_limit: 10,
            journal_max_length: 10_000,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
        }
    }
}

struct Session {
    connection: Arc<Connection>,
    publisher: Channel,
}

struct Inner {
    config: AmqpConfig,
    session: Mutex<Option<Session>>,
}

/// The RabbitMQ [`Broker`].
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("connection_name", &self.inner.config.connection_name)
            .finish_non_exhaustive()
    }
}

fn unavailable(error: lapin::Error) -> BrokerError {
    use lapin::ErrorKind;
    match error.kind() {
        ErrorKind::ProtocolError(_) if error.is_amqp_soft_error() => {
            BrokerError::Refused(error.to_string())
        }
        _ => BrokerError::Unavailable(error.to_string()),
    }
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn header_u32(properties: &BasicProperties, name: &str) -> Option<u32> {
    let value = properties.headers().as_ref()?.inner().get(name)?;
    let number = match value {
        AMQPValue::LongLongInt(v) => *v,
        AMQPValue::LongInt(v) => i64::from(*v),
        AMQPValue::LongUInt(v) => i64::from(*v),
        AMQPValue::ShortInt(v) => i64::from(*v),
        AMQPValue::ShortUInt(v) => i64::from(*v),
        AMQPValue::ShortShortInt(v) => i64::from(*v),
        AMQPValue::ShortShortUInt(v) => i64::from(*v),
        _ => return None,
    };
    u32::try_from(number).ok()
}

fn header_string(properties: &BasicProperties, name: &str) -> Option<String> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn short(value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value.to_owned())
        .map_err(|_| BrokerError::Refused(format!("name over 255 bytes: {value:.40}…")))
}

impl AmqpBroker {
    /// Makes no connection yet; the first operation connects.
    pub fn new(config: AmqpConfig) -> Self {
        AmqpBroker {
            inner: Arc::new(Inner {
                config,
                session: Mutex::new(None),
            }),
        }
    }

    /// Connects now, so a bad URL or a broker that is down shows at start.
    pub async fn connect(config: AmqpConfig) -> Result<Self, BrokerError> {
        let broker = Self::new(config);
        broker.publisher().await?;
        Ok(broker)
    }

    async fn connection(&self) -> Result<(Arc<Connection>, Channel), BrokerError> {
        let connected = self.connect_session().await;
        self.forget_if_unavailable(connected).await
    }

    /// After the broker drops a connection, lapin may report it connected for a moment:
    /// whatever fails as unavailable makes the next call connect afresh.
    async fn forget_if_unavailable<T>(
        &self,
        result: Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        if matches!(result, Err(BrokerError::Unavailable(_))) {
            *self.inner.session.lock().await = None;
        }
        result
    }

    async fn connect_session(&self) -> Result<(Arc<Connection>, Channel), BrokerError> {
        let mut session = self.inner.session.lock().await;
        if let Some(current) = session.as_ref() {
            if current.connection.status().connected() && current.publisher.status().connected() {
                return Ok((current.connection.clone(), current.publisher.clone()));
            }
            debug!("AMQP connection lost; reconnecting");
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.inner.config.connection_name.clone().into());
        // A broker that is still booting can accept the TCP connection and never finish
        // the handshake; without a bound, a reconnecting worker would wait forever.
        let setup = async {
            let connection = Arc::new(
                Connection::connect(&self.inner.config.url, properties)
                    .await
                    .map_err(unavailable)?,
            );
            let publisher = connection.create_channel().await.map_err(unavailable)?;
            publisher
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .map_err(unavailable)?;
            declare_exchanges(&publisher, &self.inner.config).await?;
            Ok::<_, BrokerError>((connection, publisher))
        };
        let (connection, publisher) =
            tokio::time::timeout(self.inner.config.connect_timeout, setup)
                .await
                .map_err(|_| {
                    BrokerError::Unavailable(format!(
                        "no answer from the broker within {} s of connecting",
                        self.inner.config.connect_timeout.as_secs()
                    ))
                })??;
        *session = Some(Session {
            connection: connection.clone(),
            publisher: publisher.clone(),
        });
        Ok((connection, publisher))
    }

    async fn publisher(&self) -> Result<Channel, BrokerError> {
        Ok(self.connection().await?.1)
    }

    /// Publishes with `mandatory` and waits for the confirm; a nack or return is an error.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let published = self
            .publish_once(exchange, routing_key, body, properties)
            .await;
        self.forget_if_unavailable(published).await
    }

    async fn publish_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let (connection, channel) = self.connection().await?;
        if connection.status().blocked() {
            return Err(BrokerError::Unavailable(BLOCKED.into()));
        }
        let timeout = self.inner.config.publish_timeout;
        let confirmed = tokio::time::timeout(timeout, async {
            channel
                .basic_publish(
                    short(exchange)?,
                    short(routing_key)?,
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties,
                )
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)
        })
        .await;
        let confirm = match confirmed {
            Ok(confirm) => confirm?,
            Err(_) => {
                return Err(BrokerError::Unavailable(format!(
                    "no publisher confirm within {} s{}",
                    timeout.as_secs(),
                    if connection.status().blocked() {
                        format!(" ({BLOCKED})")
                    } else {
                        String::new()
                    }
                )));
            }
        };
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(BrokerError::NotConfirmed(format!(
                "exchange {exchange:?} has no queue bound for routing key {routing_key:?} ({} {})",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(BrokerError::NotConfirmed(format!(
                "the broker refused the message for {exchange:?} / {routing_key:?} (nack)"
            ))),
            Confirmation::NotRequested => Err(BrokerError::NotConfirmed(
                "publisher confirms are off on this channel".into(),
            )),
        }
    }

    /// Parks a message in the platform's delay queue nearest `delay`; it comes back to
    /// the work queue when the queue's TTL runs out, with its attempt, its count of waits
    /// and the time it was first published. The daemon settles a `Retry` with this; the
    /// Lambda form calls it for its queue events.
    pub async fn schedule_retry(
        &self,
        platform: PlatformName,
        letter: Letter<'_>,
        delay: Duration,
        waits: u32,
    ) -> Result<(), BrokerError> {
        let tier = retry_tier(delay, rand::random::<f64>());
        let mut headers = FieldTable::default();
        headers
            .insert(
                ATTEMPT_HEADER.into(),
                AMQPValue::LongInt(clamp_i32(letter.attempt)),
            )
            .insert(WAITS_HEADER.into(), AMQPValue::LongInt(clamp_i32(waits)))
            .insert(ROUTING_KEY_HEADER.into(), long_string(letter.routing_key));
        self.publish(
            "",
            &retry_queue(platform, tier),
            letter.body,
            persistent(letter.message_id, headers).with_timestamp(epoch_seconds(
                letter.published_at.unwrap_or_else(SystemTime::now),
            )),
        )
        .await
    }

    /// Puts a refused message on the dead-letter exchange with why it was refused.
    /// `routing_key` is the request's (`<platform>.<operation>`) or the work queue's name;
    /// both reach the platform's dead-letter queue.
    pub async fn dead_letter(
        &self,
        letter: Letter<'_>,
        class: ErrorClass,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let Letter {
            routing_key,
            body,
            message_id,
            attempt,
            published_at,
        } = letter;
        let mut headers = FieldTable::default();
        headers
            .insert(REASON_HEADER.into(), long_string(reason))
            .insert(CLASS_HEADER.into(), long_string(class.as_str()))
            .insert(
                ATTEMPT_HEADER.into(),
                AMQPValue::LongInt(clamp_i32(attempt)),
            );
        let mut properties = persistent(message_id, headers);
        if let Some(published_at) = published_at {
            properties = properties.with_timestamp(epoch_seconds(published_at));
        }
        self.publish(DEAD_LETTER_EXCHANGE, routing_key, body, properties)
            .await
    }

    /// Messages waiting in a queue, for tests and operators. Declares nothing.
    pub async fn queue_depth(&self, queue: &str) -> Result<u32, BrokerError> {
        let (connection, _) = self.connection().await?;
        // A passive declare of a missing queue closes its channel: use a throwaway one.
        let probe = connection.create_channel().await.map_err(unavailable)?;
        let declared = probe
            .queue_declare(
                short(queue)?,
                QueueDeclareOptions::default().passive(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)?;
        let _ = probe.close(200, "OK".into()).await;
        Ok(declared.message_count())
    }
}

async fn declare_exchanges(channel: &Channel, config: &AmqpConfig) -> Result<(), BrokerError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut requests_args = FieldTable::default();
    requests_args.insert("alternate-exchange".into(), long_string(UNROUTED_EXCHANGE));
    channel
        .exchange_declare(
            UNROUTED_EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    channel
        .queue_declare(
            UNROUTED_QUEUE.into(),
            QueueDeclareOptions::durable(),
            quorum_args(None, None),
        )
        .await
        .map_err(unavailable)?;
    channel
        .queue_bind(
            UNROUTED_QUEUE.into(),
            UNROUTED_EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    channel
        .exchange_declare(
            REQUESTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            requests_args,
        )
        .await
        .map_err(unavailable)?;
    channel
        .exchange_declare(
            STATUS_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    channel
        .exchange_declare(
            DEAD_LETTER_EXCHANGE.into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    let mut journal_args = FieldTable::default();
    journal_args
        .insert(
            "x-max-length".into(),
            AMQPValue::LongLongInt(config.journal_max_length),
        )
        .insert("x-overflow".into(), long_string("drop-head"));
    channel
        .queue_declare(
            STATUS_JOURNAL_QUEUE.into(),
            QueueDeclareOptions::durable(),
            journal_args,
        )
        .await
        .map_err(unavailable)?;
    channel
        .queue_bind(
            STATUS_JOURNAL_QUEUE.into(),
            STATUS_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(unavailable)?;
    Ok(())
}

fn quorum_args(delivery_limit: Option<i32>, dead_letter_exchange: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    if let Some(limit) = delivery_limit {
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(limit));
    }
    if let Some(exchange) = dead_letter_exchange {
        args.insert("x-dead-letter-exchange".into(), long_string(exchange));
        at_least_once(&mut args);
    }
    args
}

/// Dead-letters at least once: the message leaves the queue only when the target queue
/// confirmed it. RabbitMQ honours it only with `reject-publish` overflow.
fn at_least_once(args: &mut FieldTable) {
    args.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    )
    .insert("x-overflow".into(), long_string("reject-publish"));
}

/// Declares the work queue; one declared by an older version with other arguments is
/// used as it is, with a warning saying what it lacks.
async fn declare_work_queue(
    connection: &Connection,
    config: &AmqpConfig,
    work: &str,
) -> Result<Channel, BrokerError> {
    let channel = connection.create_channel().await.map_err(unavailable)?;
    let declared = channel
        .queue_declare(
            short(work)?,
            QueueDeclareOptions::durable(),
            quorum_args(Some(config.delivery_limit), Some(DEAD_LETTER_EXCHANGE)),
        )
        .await;
    match declared {
        Ok(_) => Ok(channel),
        Err(e) if e.is_amqp_soft_error() => {
            // The refusal closed that channel; the queue exists with other arguments.
            let channel = connection.create_channel().await.map_err(unavailable)?;
            channel
                .queue_declare(
                    short(work)?,
                    QueueDeclareOptions::default().passive(),
                    FieldTable::default(),
                )
                .await
                .map_err(|_| BrokerError::Refused(e.to_string()))?;
            warn!(
                queue = %work,
                error = %e,
                "the work queue was declared with other arguments (an older version?); using it as it is. It may lack at-least-once dead-lettering: set a policy with dead-letter-strategy=at-least-once and overflow=reject-publish, or recreate it when it is empty"
            );
            Ok(channel)
        }
        Err(e) => Err(unavailable(e)),
    }
}

async fn declare_platform(
    connection: &Connection,
    config: &AmqpConfig,
    platform: PlatformName,
) -> Result<(), BrokerError> {
    let work = work_queue(platform);
    let dead = dead_letter_queue(platform);
    let channel = declare_work_queue(connection, config, &work).await?;
    let channel = &channel;
    let bind = |queue: String, exchange: &'static str, key: String| async move {
        channel
            .queue_bind(
                short(&queue)?,
                exchange.into(),
                short(&key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(unavailable)
    };
    bind(work.clone(), REQUESTS_EXCHANGE, format!("{platform}.*")).await?;
    channel
        .queue_declare(
            short(&dead)?,
            QueueDeclareOptions::durable(),
            quorum_args(None, None),
        )
        .await
        .map_err(unavailable)?;
    bind(dead.clone(), DEAD_LETTER_EXCHANGE, format!("{platform}.#")).await?;
    // Messages that came back from a retry queue carry the work queue's name as their key.
    bind(dead, DEAD_LETTER_EXCHANGE, work.clone()).await?;
    for tier in RETRY_TIERS_S {
        let mut args = quorum_args(None, None);
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt((tier * 1000) as i64),
        )
        .insert("x-dead-letter-exchange".into(), long_string(""))
        .insert("x-dead-letter-routing-key".into(), long_string(&work));
        at_least_once(&mut args);
        channel
            .queue_declare(
                short(&retry_queue(platform, tier))?,
                QueueDeclareOptions::durable(),
                args,
            )
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// A message on its way to a delay queue or the dead letters, with what travels along.
#[derive(Debug, Clone, Copy)]
pub struct Letter<'a> {
    /// The request's routing key, or the work queue's name.
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub message_id: &'a str,
    /// The attempt it is at (the next one, for a retry).
    pub attempt: u32,
    /// When its producer published it.
    pub published_at: Option<SystemTime>,
}

impl<'a> Letter<'a> {
    /// The letter of a settled delivery.
    pub fn of(delivery: &'a DeliveryParts, message_id: &'a str) -> Self {
        Letter {
            routing_key: &delivery.routing_key,
            body: &delivery.body,
            message_id,
            attempt: delivery.attempt,
            published_at: delivery.published_at,
        }
    }
}

const BLOCKED: &str = "RabbitMQ blocks publishing on this connection (a memory or disk alarm); work resumes when the alarm clears";

fn clamp_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

fn epoch_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn persistent(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_headers(headers)
}

struct AmqpSettle {
    broker: AmqpBroker,
    acker: lapin::Acker,
    /// Keeps the delivery's channel open until it is settled: closing it would hand the
    /// delivery back to the broker while it is still being worked on.
    _channel: Channel,
    platform: PlatformName,
    message_id: String,
}

impl AmqpSettle {
    async fn nack(&self, requeue: bool) {
        if let Err(e) = self
            .acker
            .nack(BasicNackOptions {
                requeue,
                ..Default::default()
            })
            .await
        {
            warn!(error = %e, "nack failed; the broker redelivers when the channel closes");
        }
    }
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn settle(
        self: Box<Self>,
        delivery: DeliveryParts,
        settlement: Settlement,
    ) -> Result<(), BrokerError> {
        match settlement {
            Settlement::Ack => {}
            Settlement::Requeue => {
                self.nack(true).await;
                return Ok(());
            }
            Settlement::Retry {
                delay,
                attempt,
                waits,
            } => {
                let letter = Letter {
                    attempt,
                    ..Letter::of(&delivery, &self.message_id)
                };
                let published = self
                    .broker
                    .schedule_retry(self.platform, letter, delay, waits)
                    .await;
                if let Err(e) = published {
                    self.nack(true).await;
                    return Err(e);
                }
            }
            Settlement::DeadLetter { class, reason } => {
                let published = self
                    .broker
                    .dead_letter(Letter::of(&delivery, &self.message_id), class, &reason)
                    .await;
                if let Err(e) = published {
                    // The queue's own dead-lettering keeps it, without our reason.
                    self.nack(false).await;
                    return Err(e);
                }
            }
        }
        self.acker
            .ack(BasicAckOptions::default())
            .await
            .map_err(unavailable)
            .map(drop)
    }
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare(&self, platform: PlatformName) -> Result<(), BrokerError> {
        let result = async {
            let (connection, _) = self.connection().await?;
            // A refused declaration closes its channel: declare on channels of its own,
            // never on the publisher's.
            declare_platform(&connection, &self.inner.config, platform).await
        }
        .await;
        self.forget_if_unavailable(result).await
    }

    async fn consume(
        &self,
        platform: PlatformName,
        prefetch: u16,
    ) -> Result<DeliveryStream, BrokerError> {
        let result = async {
            let (connection, _) = self.connection().await?;
            let channel = connection.create_channel().await.map_err(unavailable)?;
            channel
                .basic_qos(prefetch.max(1), BasicQosOptions::default())
                .await
                .map_err(unavailable)?;
            let consumer = channel
                .basic_consume(
                    short(&work_queue(platform))?,
                    short(&self.inner.config.connection_name)?,
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            let broker = self.clone();
            // The channel lives as long as the stream: the closure owns a handle to it.
            let deliveries = consumer.map(move |item| {
                let delivery = item.map_err(unavailable)?;
                let properties = &delivery.properties;
                let attempt = header_u32(properties, ATTEMPT_HEADER).unwrap_or(1);
                let routing_key = header_string(properties, ROUTING_KEY_HEADER)
                    .unwrap_or_else(|| delivery.routing_key.as_str().to_owned());
                let message_id = properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default();
                let waits = header_u32(properties, WAITS_HEADER).unwrap_or(0);
                let published_at = properties
                    .timestamp()
                    .map(|seconds| UNIX_EPOCH + Duration::from_secs(seconds));
                let settle = AmqpSettle {
                    broker: broker.clone(),
                    acker: delivery.acker.clone(),
                    _channel: channel.clone(),
                    platform,
                    message_id,
                };
                Ok(Delivery::new(
                    delivery.data,
                    routing_key,
                    attempt,
                    delivery.redelivered,
                    Box::new(settle),
                )
                .with_waits(waits)
                .with_published_at(published_at))
            });
            Ok(deliveries.boxed())
        }
        .await;
        self.forget_if_unavailable(result).await
    }

    async fn publish_status(&self, event: &StatusEvent) -> Result<(), BrokerError> {
        let body = serde_json::to_vec(event).map_err(|e| BrokerError::Refused(e.to_string()))?;
        let message_id = format!("{}#{}", event.request_id, event.seq);
        self.publish(
            STATUS_EXCHANGE,
            &event.routing_key(),
            &body,
            persistent(&message_id, FieldTable::default()),
        )
        .await
    }

    async fn publish_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        // The timestamp lets a worker refuse a message older than the records it keeps.
        self.publish(
            REQUESTS_EXCHANGE,
            routing_key,
            body,
            persistent(request_id, FieldTable::default())
                .with_timestamp(epoch_seconds(SystemTime::now())),
        )
        .await
    }

    fn blocked(&self) -> Option<String> {
        let session = self.inner.session.try_lock().ok()?;
        let connection = &session.as_ref()?.connection;
        connection.status().blocked().then(|| BLOCKED.to_owned())
    }

    async fn subscribe_status(&self) -> Result<BoxStream<'static, StatusEvent>, BrokerError> {
        let result = async {
            let (connection, _) = self.connection().await?;
            let channel = connection.create_channel().await.map_err(unavailable)?;
            let queue = channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            channel
                .queue_bind(
                    queue.name().clone(),
                    STATUS_EXCHANGE.into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            let mut consumer = channel
                .basic_consume(
                    queue.name().clone(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(unavailable)?;
            // Prove the subscription hears the exchange before relying on it: a binding
            // made while the broker is still recovering a vhost can be listed yet route
            // nothing, and a watcher or `submit --wait` would then wait for ever.
            let probe_id = format!("{PROBE_PREFIX}{}", uuid::Uuid::new_v4().simple());
            self.publish_once(
                STATUS_EXCHANGE,
                PROBE_ROUTING_KEY,
                b"{}",
                BasicProperties::default().with_message_id(probe_id.as_str().into()),
            )
            .await?;
            let mut early = Vec::new();
            let heard = tokio::time::timeout(PROBE_TIMEOUT, async {
                while let Some(item) = consumer.next().await {
                    let delivery = item.map_err(unavailable)?;
                    let id = delivery.properties.message_id().as_ref().map(|id| id.as_str().to_owned());
                    if id.as_deref() == Some(probe_id.as_str()) {
                        return Ok(());
                    }
                    early.push(delivery);
                }
                Err(BrokerError::Unavailable("the subscription ended at once".into()))
            })
            .await;
            match heard {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(BrokerError::Unavailable(format!(
                        "the status subscription did not receive its probe within {} s (is the broker still starting?)",
                        PROBE_TIMEOUT.as_secs()
                    )));
                }
            }
            let decode = |delivery: lapin::message::Delivery| serde_json::from_slice::<StatusEvent>(&delivery.data).ok();
            let early: Vec<StatusEvent> = early.into_iter().filter_map(decode).collect();
            let events = futures_util::stream::iter(early).chain(
                consumer
                    .take_while(|item| std::future::ready(item.is_ok()))
                    .filter_map(move |item| {
                        let _keep_open = &channel;
                        // Probes (ours and other subscribers') are not status events.
                        std::future::ready(item.ok().and_then(decode))
                    }),
            );
            Ok(events.boxed())
        }
        .await;
        self.forget_if_unavailable(result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_tiers_round_stochastically_between_neighbours() {
        assert_eq!(retry_tier(Duration::from_millis(10), 0.0), 1);
        assert_eq!(retry_tier(Duration::from_secs(4), 0.99), 4);
        assert_eq!(retry_tier(Duration::from_secs(3), 0.49), 4);
        assert_eq!(retry_tier(Duration::from_secs(3), 0.51), 2);
        assert_eq!(retry_tier(Duration::from_secs(10_000), 0.5), 512);
        // The mean of the rounded delay is the delay itself.
        let draws = 1000;
        let mean: f64 = (0..draws)
            .map(|i| retry_tier(Duration::from_secs(5), (i as f64 + 0.5) / draws as f64) as f64)
            .sum::<f64>()
            / draws as f64;
        assert!((mean - 5.0).abs() < 0.05, "{mean}");
    }
}
