//! Redrive: moving a platform's dead letters back into its work queue, after whatever
//! refused them was fixed (a worker policy, a missing image, a bug).
//!
//! Each message is published again with its original routing key (read from its body, or
//! the work queue's name for one that does not decode) and publish time, without the
//! dead letter's reason headers, and only then acknowledged in the dead-letter queue: at
//! least once, never lost. A dry run looks at the same messages and gives every one back.
//! What happens to a redriven message is the request's record's business: a request that
//! finished answers with its stored outcome, one that never ran runs now.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::FieldTable;
use provisioner_events::{PlatformName, REQUESTS_EXCHANGE};

use super::publish::{VIA_REQUESTS_HEADER, epoch_seconds, persistent};
use super::{
    AmqpBroker, BrokerError, CLASS_HEADER, INTERNAL_EXCHANGE, REASON_HEADER, dead_letter_queue,
    header_string, long_string, short, unavailable, work_queue,
};
use crate::signing::SIGNATURE_HEADER;

/// One dead letter as a person reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterInfo {
    /// The request id, when the body has a readable one.
    pub request_id: Option<String>,
    /// Where it goes back to: the request's routing key, or the work queue.
    pub routing_key: String,
    pub class: Option<String>,
    pub reason: Option<String>,
}

impl AmqpBroker {
    /// Moves up to `limit` of `platform`'s dead letters back to its work queue (or, with
    /// `dry_run`, only lists them). Returns what it moved or would move.
    pub async fn redrive(
        &self,
        platform: PlatformName,
        dry_run: bool,
        limit: usize,
    ) -> Result<Vec<DeadLetterInfo>, BrokerError> {
        let (connection, _) = self.connection().await?;
        let channel = connection.create_channel().await.map_err(unavailable)?;
        let queue = dead_letter_queue(platform);
        let mut moved = Vec::new();
        let mut held_back = Vec::new();
        while moved.len() < limit {
            let Some(message) = channel
                .basic_get(short(&queue)?, BasicGetOptions::default())
                .await
                .map_err(unavailable)?
            else {
                break;
            };
            let delivery = message.delivery;
            let body_request: Option<serde_json::Value> =
                serde_json::from_slice(&delivery.data).ok();
            let field = |name: &str| {
                body_request
                    .as_ref()
                    .and_then(|v| v.get(name))
                    .and_then(|v| v.as_str())
                    .map(str::to_owned)
            };
            let request_id = field("request_id");
            let routing_key = match (field("platform"), field("operation")) {
                (Some(p), Some(op)) if p == platform.as_str() => {
                    provisioner_events::request_routing_key(
                        platform,
                        serde_json::from_value(serde_json::json!(op))
                            .unwrap_or(provisioner_events::Operation::Provision),
                    )
                }
                _ => work_queue(platform),
            };
            let info = DeadLetterInfo {
                request_id: request_id.clone(),
                routing_key: routing_key.clone(),
                class: header_string(&delivery.properties, CLASS_HEADER),
                reason: header_string(&delivery.properties, REASON_HEADER),
            };
            if dry_run {
                held_back.push(delivery.acker.clone());
                moved.push(info);
                continue;
            }
            let published_at = delivery
                .properties
                .timestamp()
                .map(|s| UNIX_EPOCH + Duration::from_secs(s))
                .unwrap_or_else(SystemTime::now);
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned())
                .or(request_id.clone())
                .unwrap_or_default();
            // The signature and the trace travel on; the dead letter's reasons do not.
            let mut headers = FieldTable::default();
            for name in [
                SIGNATURE_HEADER,
                crate::trace::TRACEPARENT,
                crate::trace::TRACESTATE,
            ] {
                if let Some(value) = header_string(&delivery.properties, name) {
                    headers.insert(name.into(), long_string(&value));
                }
            }
            // Published as the operator's user (every message names its publisher): a
            // deployment binding broker users to tenants (TENANTS) knows who redrove it.
            let properties =
                persistent(&message_id, headers).with_timestamp(epoch_seconds(published_at));
            // A request the workers sent themselves (a fleet's member, an expiry's
            // teardown: what a producer may not send) goes back their way, or a worker
            // would refuse it as a producer's. Never one that came the producers' way
            // (refused for exactly that, by a worker or, past the delivery limit, by the
            // broker): redriving a forgery must not make it a worker's.
            let from_producers = delivery.properties.headers().as_ref().is_some_and(|h| {
                h.inner().contains_key(VIA_REQUESTS_HEADER)
                    || header_string(&delivery.properties, "x-first-death-exchange").as_deref()
                        == Some(REQUESTS_EXCHANGE)
            });
            let derived = !from_producers
                && provisioner_events::decode_request(&delivery.data)
                    .is_ok_and(|request| request.check_from_producer().is_err());
            let published = if routing_key == work_queue(platform) {
                self.publish("", &routing_key, &delivery.data, properties)
                    .await
            } else if derived {
                self.publish(INTERNAL_EXCHANGE, &routing_key, &delivery.data, properties)
                    .await
            } else {
                self.publish(REQUESTS_EXCHANGE, &routing_key, &delivery.data, properties)
                    .await
            };
            if let Err(e) = published {
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                return Err(e);
            }
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(unavailable)?;
            moved.push(info);
        }
        for acker in held_back {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .map_err(unavailable)?;
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok(moved)
    }
}
