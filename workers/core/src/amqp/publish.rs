//! Confirmed publishing: every publish is `mandatory` with a publisher confirm due within
//! `publish_timeout`; a nack, a return or a late confirm is an error. Also the two places
//! a settled message goes besides the ack: a delay tier and the dead letters.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection};
use provisioner_events::{ErrorClass, PlatformName};

use super::{
    ATTEMPT_HEADER, AmqpBroker, CLASS_HEADER, DEAD_LETTER_EXCHANGE, DELAY_EXCHANGE, REASON_HEADER,
    ROUTING_KEY_HEADER, WAITS_HEADER, long_string, retry_queue, retry_tier, short, unavailable,
};
use crate::broker::{BrokerError, DeliveryParts, PendingConfirm};
use crate::signing::SIGNATURE_HEADER;

impl AmqpBroker {
    /// Publishes with `mandatory` and waits for the confirm; a nack or return is an error.
    pub(super) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        self.send(exchange, routing_key, body, properties)
            .await?
            .await
    }

    /// Publishes with `mandatory` and returns once the message is on the channel, with
    /// the future of its confirm; a nack or return is an error. The confirm is due within
    /// `publish_timeout` of sending.
    pub(super) async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, BrokerError> {
        let sent = self
            .send_once(exchange, routing_key, body, properties)
            .await;
        let confirm = self.forget_if_unavailable(sent).await?;
        let broker = self.clone();
        Ok(Box::pin(async move {
            let confirmed = confirm.await;
            broker.forget_if_unavailable(confirmed).await
        }))
    }

    pub(super) async fn send_once(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<impl Future<Output = Result<(), BrokerError>> + use<>, BrokerError> {
        let (connection, channel) = self.connection().await?;
        if connection.status().blocked() {
            return Err(BrokerError::Unavailable(BLOCKED.into()));
        }
        let timeout = self.inner.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let no_confirm = move |connection: &Connection| {
            BrokerError::Unavailable(format!(
                "no publisher confirm within {} s{}",
                timeout.as_secs(),
                if connection.status().blocked() {
                    format!(" ({BLOCKED})")
                } else {
                    String::new()
                }
            ))
        };
        // Whatever is published while a traced span works names it as its parent.
        let mut properties = super::with_current_trace(properties);
        // Every message says which broker user published it; RabbitMQ refuses a user_id
        // other than the connection's, so a reader can believe it: subscribers judge
        // status events by it, a worker binds producers to tenants by it, and the Lambda
        // form tells its own messages from producers' by it.
        if properties.user_id().is_none() && !self.inner.login_user.is_empty() {
            properties = properties.with_user_id(self.inner.login_user.as_str().into());
        }
        let sent = tokio::time::timeout_at(
            deadline,
            channel.basic_publish(
                short(exchange)?,
                short(routing_key)?,
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            ),
        )
        .await;
        let confirm = match sent {
            Ok(sent) => sent.map_err(unavailable)?,
            Err(_) => return Err(no_confirm(&connection)),
        };
        let exchange = exchange.to_owned();
        let routing_key = routing_key.to_owned();
        Ok(async move {
            // A confirm that came while the caller worked is taken even past the deadline:
            // the timeout looks at the confirm first.
            let confirmed = match tokio::time::timeout_at(deadline, confirm).await {
                Ok(confirmed) => confirmed.map_err(unavailable)?,
                Err(_) => return Err(no_confirm(&connection)),
            };
            match confirmed {
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
        })
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
        // The Lambda form verifies a message whatever its way in: a parked copy keeps
        // its signature (and, above, the routing key it covers).
        if let Some(signature) = letter.signature {
            headers.insert(SIGNATURE_HEADER.into(), long_string(signature));
        }
        self.publish(
            DELAY_EXCHANGE,
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
            signature,
            via_requests,
        } = letter;
        let mut headers = FieldTable::default();
        headers
            .insert(REASON_HEADER.into(), long_string(reason))
            .insert(CLASS_HEADER.into(), long_string(class.as_str()))
            .insert(
                ATTEMPT_HEADER.into(),
                AMQPValue::LongInt(clamp_i32(attempt)),
            );
        // A redriven request is verified again: it keeps its signature.
        if let Some(signature) = signature {
            headers.insert(SIGNATURE_HEADER.into(), long_string(signature));
        }
        // A producer's message: redriven, it goes back the producers' way, however much
        // it looks like one the workers send (that is why it was refused).
        if via_requests {
            headers.insert(VIA_REQUESTS_HEADER.into(), AMQPValue::Boolean(true));
        }
        let mut properties = persistent(message_id, headers);
        if let Some(published_at) = published_at {
            properties = properties.with_timestamp(epoch_seconds(published_at));
        }
        self.publish(DEAD_LETTER_EXCHANGE, routing_key, body, properties)
            .await
    }
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
    /// Its producer's signature, if it had one.
    pub signature: Option<&'a str>,
    /// It came through `provisioning.requests` (a producer's message, known to be).
    pub via_requests: bool,
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
            signature: delivery.signature.as_deref(),
            via_requests: delivery.from_producers && !delivery.way_in_unknown,
        }
    }
}

/// Set on a dead letter that came through `provisioning.requests`.
pub(super) const VIA_REQUESTS_HEADER: &str = "x-provisioner-via-requests";

pub(super) const BLOCKED: &str = "RabbitMQ blocks publishing on this connection (a memory or disk alarm); work resumes when the alarm clears";

pub(super) fn clamp_i32(value: u32) -> i32 {
    i32::try_from(value).unwrap_or(i32::MAX)
}

pub(super) fn epoch_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(super) fn persistent(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_message_id(message_id.into())
        .with_headers(headers)
}
