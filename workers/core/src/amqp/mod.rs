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
//!
//! The parts: this file (names, configuration, the [`Broker`] implementation), `session`
//! (the connection and its publishing channel), `topology` (the topology, described
//! once: declared, or written out as RabbitMQ definitions), `publish` (confirmed
//! publishing, delay tiers, dead letters), `consume` (deliveries and their settlement),
//! `subscribe` (status subscriptions), `journal` and `redrive` (operator reads of the
//! journal and the dead letters). Whatever is published from a traced span carries its
//! W3C trace context (see [`crate::trace`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Connection};
use provisioner_events::{PlatformName, REQUESTS_EXCHANGE, STATUS_EXCHANGE, StatusEvent};
use tokio::sync::Mutex;

mod consume;
mod journal;
mod policies;
mod publish;
mod redrive;
mod session;
mod subscribe;
mod topology;

pub use policies::ManagementApi;
pub use publish::Letter;
pub use redrive::DeadLetterInfo;
pub use topology::{Topology, access_definitions, definitions};

use crate::broker::{Broker, BrokerError, DeliveryStream, PendingConfirm};
use publish::{BLOCKED, epoch_seconds, persistent};

pub const DEAD_LETTER_EXCHANGE: &str = "provisioning.dead-letter";
/// Where workers publish the requests they derive (fleet members, expiry teardowns):
/// bound to every work queue like `provisioning.requests`, but written only by workers.
pub const INTERNAL_EXCHANGE: &str = "provisioning.internal";
/// Where workers park retries: each delay queue is bound by its own name. Not the
/// default exchange, whose write right would reach every queue.
pub const DELAY_EXCHANGE: &str = "provisioning.delay";
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
    /// Where to put the queue policies in place (`RABBITMQ_MANAGEMENT_URL`).
    pub management_api: ManagementApi,
    /// How long connecting (handshake and topology included) may take.
    pub connect_timeout: Duration,
    /// How long a publish may wait for the broker's confirm.
    pub publish_timeout: Duration,
    /// Whose status events a subscriber believes (`STATUS_PUBLISHERS`), by the broker
    /// user RabbitMQ vouches for in a message's `user_id`; see [`StatusTrust`].
    pub status_publishers: Vec<String>,
}

impl AmqpConfig {
    pub fn new(url: impl Into<String>) -> Self {
        AmqpConfig {
            url: url.into(),
            connection_name: "provisioner".into(),
            delivery_limit: 10,
            journal_max_length: 10_000,
            management_api: ManagementApi::Derived,
            connect_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            status_publishers: DEFAULT_STATUS_PUBLISHERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }
}

/// The broker users whose status events a subscriber believes by default: the shipped
/// definitions' worker user of the event's platform, and the operator.
pub const DEFAULT_STATUS_PUBLISHERS: [&str; 2] =
    ["provisioner-worker-{platform}", "provisioner-operator"];

/// The broker user a URL logs in as (`guest` when it names none, as the client does).
pub(super) fn login_user(url: &str) -> String {
    url.parse::<AMQPUri>()
        .map(|uri| uri.authority.userinfo.username)
        .unwrap_or_default()
}

/// Which status events a subscriber believes. RabbitMQ checks a message's `user_id`
/// property against the user of the connection that published it and refuses the
/// message when they differ, so `user_id` says who published an event; every worker sets
/// it. An event is believed when:
///
/// - it is not under the probe's routing key (a producer may publish the probe, so a
///   probe is never an event, whatever its body);
/// - its routing key is the one its body gives (`<platform>.<state>`): the broker's
///   topic permissions, which let each worker user publish only its own platform's
///   keys, then bind the body too;
/// - its `user_id` is one of `publishers` (`{platform}` standing for the event's
///   platform, `prefix*` matching by prefix), or the subscriber's own user (a
///   deployment where one user does everything, as in development).
///
/// Anything else is dropped with a warning: a forged `running` cannot end anyone's
/// `submit --wait`.
#[derive(Debug, Clone)]
pub struct StatusTrust {
    pub own_user: String,
    pub publishers: Vec<String>,
}

impl StatusTrust {
    /// The event in a message, or why it is not believed.
    pub fn check(
        &self,
        routing_key: &str,
        user_id: Option<&str>,
        body: &[u8],
    ) -> Result<StatusEvent, String> {
        if routing_key == PROBE_ROUTING_KEY {
            return Err("a subscription probe, not an event".into());
        }
        let event: StatusEvent =
            serde_json::from_slice(body).map_err(|e| format!("not a status event: {e}"))?;
        if event.routing_key() != routing_key {
            return Err(format!(
                "published under routing key {routing_key:?}, but its body is a {} event of platform {:?}",
                event.state, event.platform
            ));
        }
        let Some(user) = user_id else {
            return Err("published without a user_id, so nobody vouches for who sent it".into());
        };
        let trusted = user == self.own_user
            || self.publishers.iter().any(|pattern| {
                crate::allow::matches(&pattern.replace("{platform}", &event.platform), user)
            });
        if trusted {
            Ok(event)
        } else {
            Err(format!(
                "published by broker user {user:?}, who is not a status publisher for platform {:?} (STATUS_PUBLISHERS)",
                event.platform
            ))
        }
    }
}

struct Session {
    connection: Arc<Connection>,
    publisher: Channel,
}

struct Inner {
    /// The broker user this client logs in as: the `user_id` of what it publishes.
    login_user: String,
    config: AmqpConfig,
    session: Mutex<Option<Session>>,
}

/// The RabbitMQ [`Broker`].
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

impl AmqpBroker {
    /// The broker user this client logs in as, which every message it publishes names
    /// in `user_id`.
    pub fn login_user(&self) -> &str {
        &self.inner.login_user
    }

    /// Which status events this client believes.
    pub fn status_trust(&self) -> StatusTrust {
        StatusTrust {
            own_user: self.inner.login_user.clone(),
            publishers: self.inner.config.status_publishers.clone(),
        }
    }
}

/// The status event of a delivery, when its publisher is believed; warns of one that
/// is not (a forgery, or a publisher missing from `STATUS_PUBLISHERS`).
fn believed(trust: &StatusTrust, delivery: &lapin::message::Delivery) -> Option<StatusEvent> {
    let user_id = delivery.properties.user_id().as_ref().map(|u| u.as_str());
    match trust.check(delivery.routing_key.as_str(), user_id, &delivery.data) {
        Ok(event) => Some(event),
        Err(why) => {
            if delivery.routing_key.as_str() != PROBE_ROUTING_KEY {
                tracing::warn!(routing_key = %delivery.routing_key, %why, "a message on the status exchange is not believed; ignored");
            }
            None
        }
    }
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

fn header_table(
    headers: &std::collections::BTreeMap<String, String>,
) -> Result<FieldTable, BrokerError> {
    let mut table = FieldTable::default();
    for (name, value) in headers {
        table.insert(short(name)?, long_string(value));
    }
    Ok(table)
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

/// The W3C trace headers of a message (`traceparent`, `tracestate`), as strings.
fn trace_headers(properties: &BasicProperties) -> crate::trace::TraceHeaders {
    [crate::trace::TRACEPARENT, crate::trace::TRACESTATE]
        .into_iter()
        .filter_map(|name| Some((name.to_owned(), header_string(properties, name)?)))
        .collect()
}

/// Adds the current span's trace headers to a message's, unless it names its own trace.
fn with_current_trace(properties: BasicProperties) -> BasicProperties {
    let trace = crate::trace::current_headers();
    if trace.is_empty() {
        return properties;
    }
    let mut headers = properties.headers().clone().unwrap_or_default();
    if headers.inner().contains_key(crate::trace::TRACEPARENT) {
        return properties;
    }
    for (name, value) in trace {
        headers.insert(name.into(), long_string(&value));
    }
    properties.with_headers(headers)
}

fn short(value: &str) -> Result<ShortString, BrokerError> {
    ShortString::try_new(value.to_owned())
        .map_err(|_| BrokerError::Refused(format!("name over 255 bytes: {value:.40}…")))
}

#[async_trait]
impl Broker for AmqpBroker {
    async fn declare(&self, platform: PlatformName) -> Result<(), BrokerError> {
        let result = async {
            let (connection, _) = self.connection().await?;
            // A refused declaration closes its channel: declare on channels of its own,
            // never on the publisher's.
            topology::declare_platform(&connection, &self.inner.config, platform).await
        }
        .await;
        self.forget_if_unavailable(result).await
    }

    async fn consume(
        &self,
        platform: PlatformName,
        prefetch: u16,
    ) -> Result<DeliveryStream, BrokerError> {
        self.consume_platform(platform, prefetch).await
    }

    async fn send_status(&self, event: &StatusEvent) -> Result<PendingConfirm, BrokerError> {
        let body = serde_json::to_vec(event).map_err(|e| BrokerError::Refused(e.to_string()))?;
        let message_id = format!("{}#{}", event.request_id, event.seq);
        // Sent with this connection's user in `user_id`, which the broker checks: how a
        // subscriber knows a worker published the event (see `StatusTrust`).
        self.send(
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
        self.publish_request_with_headers(routing_key, request_id, body, &Default::default())
            .await
    }

    async fn publish_request_with_headers(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        // The timestamp lets a worker refuse a message older than the records it keeps.
        self.publish(
            REQUESTS_EXCHANGE,
            routing_key,
            body,
            persistent(request_id, header_table(headers)?)
                .with_timestamp(epoch_seconds(SystemTime::now())),
        )
        .await
    }

    async fn publish_derived_request(
        &self,
        routing_key: &str,
        request_id: &str,
        body: &[u8],
        headers: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), BrokerError> {
        self.publish(
            INTERNAL_EXCHANGE,
            routing_key,
            body,
            persistent(request_id, header_table(headers)?)
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
        self.subscribe().await
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
