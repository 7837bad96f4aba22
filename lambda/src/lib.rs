//! The workers as an AWS Lambda function: each invocation's queue messages go through the
//! very [`Worker::handle`] the daemon uses (decode, validate, claim in Redis, status events,
//! the platform call, the fenced terminal record), and only *settling* differs:
//!
//! | the core's settlement | Amazon MQ for RabbitMQ event | SQS event |
//! |---|---|---|
//! | ack | done | done |
//! | retry after a delay | parked in the platform's RabbitMQ delay queue, done | sent back to its queue as a new message, delayed, with its counts (see [`sqs`]), done |
//! | dead letter (rejected) | published to `provisioning.dead-letter` with the reason, done | the same, then deleted from SQS |
//! | give back (the broker down) | the invocation fails, so the event source delivers the batch again | reported in `batchItemFailures` |
//!
//! When a RabbitMQ batch comes again after a failed invocation, the messages the function
//! already handed on (done, parked, dead-lettered) are recognised by their body and
//! headers, remembered in Redis for an hour, and not handled a second time, whichever
//! instance (warm or cold) gets the batch.
//! On SQS a parked message is a new message, so only failed or timed-out invocations
//! count toward the queue's `maxReceiveCount`; the attempt a message carries is its
//! parked attempt plus the receives beyond the first.
//!
//! The lease and every platform call are bounded by the invocation's remaining time, so a
//! function that times out leaves a lease that soon expires and another invocation takes
//! the request over.
//!
//! A **scheduled event** (an EventBridge rule's `Scheduled Event`, e.g. every minute)
//! runs the background work a daemon worker does all the time ([`Worker::keep_house`]):
//! the teardowns of what expired, ending abandoned records, the reconciler when
//! `RECONCILE_EVERY_SECONDS` is set, and the fleets' coordination until the invocation's
//! time is up, so a deployment of functions alone needs no daemon worker.

pub mod emf;
pub mod sqs;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_lambda_events::event::rabbitmq::RabbitMqEvent;
use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
use base64::Engine;
use futures_util::StreamExt;
use provisioner_core::amqp::{
    ATTEMPT_HEADER, AmqpBroker, Letter, ROUTING_KEY_HEADER, WAITS_HEADER, work_queue,
};
use provisioner_core::broker::{BrokerError, Delivery, DeliveryParts, Settle, Settlement};
use provisioner_core::runtime::{Worker, WorkerConfig};
use provisioner_core::signing::SIGNATURE_HEADER;
use provisioner_core::store::StateStore;
use provisioner_core::{Broker, Housekeeping, Platform};
use provisioner_events::{PlatformName, RejectedMessage};
use tracing::{info, warn};

use crate::sqs::{
    ATTEMPT_ATTRIBUTE, Attributes, Carried, PUBLISHED_AT_ATTRIBUTE, Parked, SqsParker,
    WAITS_ATTRIBUTE,
};

/// Time kept back from the invocation's deadline to settle and answer.
const SETTLE_MARGIN: Duration = Duration::from_secs(5);

/// The time an invocation ending at `deadline` has left to work: what remains less the
/// time kept to settle and answer.
fn working_time(deadline: SystemTime) -> Duration {
    deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(SETTLE_MARGIN)
}

/// Where an invocation's messages came from; it decides how they are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    RabbitMq,
    Sqs,
}

/// One queue message of an event, in the form the core handles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// SQS's message id (what `batchItemFailures` names), or the message's position.
    pub id: String,
    pub body: Vec<u8>,
    pub routing_key: String,
    pub attempt: u32,
    pub redelivered: bool,
    /// Times the message was parked without an attempt (RabbitMQ's header, SQS's
    /// message attribute).
    pub waits: u32,
    /// When the request was first published (SQS: the first copy's `SentTimestamp`).
    pub published_at: Option<SystemTime>,
    /// SQS: the queue's ARN, where a retry is parked.
    pub queue_arn: Option<String>,
    /// SQS: the record's message attributes, carried onto a parked copy.
    pub attributes: Attributes,
    /// The producer's W3C trace headers (RabbitMQ headers, or SQS message attributes of
    /// the same names), so the worker's spans and events join its trace.
    pub trace: provisioner_core::trace::TraceHeaders,
    /// The request's signature (the RabbitMQ header, or the SQS message attribute of the
    /// same name), verified when the deployment signs.
    pub signature: Option<String>,
    /// Amazon MQ: the broker user that published it (`basicProperties.userId`, which the
    /// broker checks against the publisher's connection). SQS: none.
    pub publisher: Option<String>,
}

/// The routing key a message was published with, which its signature covers. Amazon MQ
/// and SQS events do not carry it: a parked retry names it in a header, and a request
/// for this platform was published as `<platform>.<operation>` (how producers route,
/// and what `provisioner submit` and the workers use). Anything else is routed by the
/// work queue's name, where its dead letter finds the platform's queue too.
fn published_routing_key(
    retry_header: Option<String>,
    body: &[u8],
    platform: PlatformName,
) -> String {
    if let Some(routing_key) = retry_header {
        return routing_key;
    }
    let request: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let operation =
        serde_json::from_value::<provisioner_events::Operation>(request["operation"].clone());
    match operation {
        Ok(operation) if request["platform"] == platform.as_str() => {
            provisioner_events::request_routing_key(platform, operation)
        }
        _ => work_queue(platform),
    }
}

/// The W3C trace headers among a message's headers or attributes.
fn trace_of(lookup: impl Fn(&str) -> Option<String>) -> provisioner_core::trace::TraceHeaders {
    [
        provisioner_core::trace::TRACEPARENT,
        provisioner_core::trace::TRACESTATE,
    ]
    .into_iter()
    .filter_map(|name| Some((name.to_owned(), lookup(name)?)))
    .collect()
}

/// Whether an invocation's payload is a scheduled event (EventBridge's `Scheduled Event`,
/// as a rule with a schedule delivers it): the function's housekeeping round.
pub fn is_scheduled(payload: &serde_json::Value) -> bool {
    payload.get("detail-type").and_then(|t| t.as_str()) == Some("Scheduled Event")
}

/// Reads an invocation's payload: an Amazon MQ for RabbitMQ event or an SQS event.
pub fn parse_event(
    payload: &serde_json::Value,
    platform: PlatformName,
) -> Result<(Source, Vec<Message>), String> {
    if payload.get("rmqMessagesByQueue").is_some() {
        let event: RabbitMqEvent = serde_json::from_value(payload.clone())
            .map_err(|e| format!("not an Amazon MQ for RabbitMQ event: {e}"))?;
        let mut messages = Vec::new();
        // Sorted by queue name so a batch is handled in the same order every time.
        let mut queues: Vec<_> = event.messages_by_queue.into_iter().collect();
        queues.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, queue) in queues {
            for message in queue {
                let data = message.data.unwrap_or_default();
                // A body that is not base64 is handed on as it came: the core rejects it
                // with a reason and it is dead-lettered, not lost.
                let body = base64::engine::general_purpose::STANDARD
                    .decode(&data)
                    .unwrap_or_else(|_| data.into_bytes());
                let headers = &message.basic_properties.headers;
                let routing_key = published_routing_key(
                    header_text(headers.get(ROUTING_KEY_HEADER)),
                    &body,
                    platform,
                );
                messages.push(Message {
                    id: messages.len().to_string(),
                    body,
                    routing_key,
                    signature: header_text(headers.get(SIGNATURE_HEADER)),
                    publisher: message.basic_properties.user_id.clone(),
                    attempt: header_u32(headers.get(ATTEMPT_HEADER)).unwrap_or(1).max(1),
                    redelivered: message.redelivered,
                    waits: header_u32(headers.get(WAITS_HEADER)).unwrap_or(0),
                    published_at: None,
                    queue_arn: None,
                    attributes: HashMap::new(),
                    trace: trace_of(|name| header_text(headers.get(name))),
                });
            }
        }
        return Ok((Source::RabbitMq, messages));
    }
    if payload.get("Records").is_some() {
        let event: SqsEvent = serde_json::from_value(payload.clone())
            .map_err(|e| format!("not an SQS event: {e}"))?;
        let messages = event
            .records
            .into_iter()
            .enumerate()
            .map(|(i, record)| {
                let number = |value: Option<&String>| value.and_then(|n| n.parse::<u64>().ok());
                let receives = number(record.attributes.get("ApproximateReceiveCount"))
                    .unwrap_or(1)
                    .max(1);
                let attributes: Attributes = record
                    .message_attributes
                    .iter()
                    .filter_map(|(name, attribute)| {
                        let data_type = attribute.data_type.clone()?;
                        let value = match (&attribute.string_value, &attribute.binary_value) {
                            (Some(text), _) => Carried::Text(text.clone()),
                            (None, Some(bytes)) => Carried::Binary(bytes.to_vec()),
                            (None, None) => return None,
                        };
                        Some((name.clone(), (data_type, value)))
                    })
                    .collect();
                let counted = |name: &str| match attributes.get(name) {
                    Some((_, Carried::Text(text))) => text.parse::<u64>().ok(),
                    _ => None,
                };
                // A parked copy says which attempt it comes back for; every receive past
                // the first is an invocation that failed or timed out with it.
                let attempt = counted(ATTEMPT_ATTRIBUTE)
                    .unwrap_or(1)
                    .max(1)
                    .saturating_add(receives - 1);
                let published_ms = counted(PUBLISHED_AT_ATTRIBUTE)
                    .or_else(|| number(record.attributes.get("SentTimestamp")));
                let body = record.body.unwrap_or_default().into_bytes();
                Message {
                    id: record.message_id.unwrap_or_else(|| i.to_string()),
                    routing_key: published_routing_key(None, &body, platform),
                    body,
                    signature: match attributes.get(SIGNATURE_HEADER) {
                        Some((_, Carried::Text(text))) => Some(text.clone()),
                        _ => None,
                    },
                    publisher: None,
                    attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
                    redelivered: receives > 1,
                    waits: counted(WAITS_ATTRIBUTE)
                        .map_or(0, |w| u32::try_from(w).unwrap_or(u32::MAX)),
                    published_at: published_ms.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                    queue_arn: record.event_source_arn,
                    trace: trace_of(|name| match attributes.get(name) {
                        Some((_, Carried::Text(text))) => Some(text.clone()),
                        _ => None,
                    }),
                    attributes,
                }
            })
            .collect();
        return Ok((Source::Sqs, messages));
    }
    Err("the event is neither an Amazon MQ for RabbitMQ event (rmqMessagesByQueue), an SQS event (Records) nor a scheduled event (detail-type \"Scheduled Event\")".into())
}

fn header_u32(value: Option<&serde_json::Value>) -> Option<u32> {
    value?
        .as_u64()
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Amazon MQ writes string headers as `{"bytes": [..]}` and numbers as numbers.
fn header_text(value: Option<&serde_json::Value>) -> Option<String> {
    match value? {
        serde_json::Value::String(text) => Some(text.clone()),
        serde_json::Value::Object(map) => {
            let bytes: Vec<u8> = map
                .get("bytes")?
                .as_array()?
                .iter()
                .map(|b| b.as_u64().map(|b| b as u8))
                .collect::<Option<_>>()?;
            String::from_utf8(bytes).ok()
        }
        _ => None,
    }
}

/// How one message ended, from the event source's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemOutcome {
    /// Finished or handed on (retry tier, dead letter): the source may forget it.
    Done,
    /// The source must deliver it again.
    Again(String),
}

/// Settles a message of an event the way the table in the module doc says.
struct LambdaSettle {
    broker: Arc<AmqpBroker>,
    platform: PlatformName,
    source: Source,
    message_id: String,
    outcome: Arc<Mutex<Option<ItemOutcome>>>,
    /// SQS: where a retry is parked, and what the message carried.
    sqs: Option<Arc<SqsParker>>,
    queue_arn: Option<String>,
    attributes: Attributes,
}

#[async_trait]
impl Settle for LambdaSettle {
    async fn settle(
        self: Box<Self>,
        delivery: DeliveryParts,
        settlement: Settlement,
    ) -> Result<(), BrokerError> {
        let result = match (&settlement, self.source) {
            (Settlement::Ack, _) => Ok(ItemOutcome::Done),
            (Settlement::Requeue, _) => Ok(ItemOutcome::Again("given back".into())),
            (
                Settlement::Retry {
                    delay,
                    attempt,
                    waits,
                },
                Source::Sqs,
            ) => Ok(self.park_on_sqs(&delivery, *delay, *attempt, *waits).await),
            (
                Settlement::Retry {
                    delay,
                    attempt,
                    waits,
                },
                Source::RabbitMq,
            ) => self
                .broker
                .schedule_retry(
                    self.platform,
                    Letter {
                        attempt: *attempt,
                        ..Letter::of(&delivery, &self.message_id)
                    },
                    *delay,
                    *waits,
                )
                .await
                .map(|()| ItemOutcome::Done),
            (Settlement::DeadLetter { class, reason }, _) => self
                .broker
                .dead_letter(Letter::of(&delivery, &self.message_id), *class, reason)
                .await
                .map(|()| ItemOutcome::Done),
        };
        let (outcome, error) = match result {
            Ok(outcome) => (outcome, None),
            Err(e) => (ItemOutcome::Again(e.to_string()), Some(e)),
        };
        if let Ok(mut slot) = self.outcome.lock() {
            *slot = Some(outcome);
        }
        error.map_or(Ok(()), Err)
    }
}

impl LambdaSettle {
    /// Parks a retry on its SQS queue as a new message; when that cannot be done, SQS
    /// gets the message back and delivers it again after its visibility timeout.
    async fn park_on_sqs(
        &self,
        delivery: &DeliveryParts,
        delay: Duration,
        attempt: u32,
        waits: u32,
    ) -> ItemOutcome {
        let (Some(parker), Some(queue_arn)) = (&self.sqs, &self.queue_arn) else {
            return ItemOutcome::Again(format!(
                "retry wanted in {} ms; SQS delivers it again after the visibility timeout",
                delay.as_millis()
            ));
        };
        let parked = Parked {
            queue_arn,
            body: &delivery.body,
            attributes: &self.attributes,
            delay,
            attempt,
            waits,
            published_at: delivery.published_at,
        };
        match parker.park(&parked).await {
            Ok(()) => {
                info!(
                    attempt,
                    waits,
                    delay_ms = delay.as_millis() as u64,
                    "parked on SQS"
                );
                ItemOutcome::Done
            }
            Err(why) => ItemOutcome::Again(format!(
                "could not park the retry on SQS ({why}); SQS delivers it again after the visibility timeout"
            )),
        }
    }
}

/// The function's state across invocations: one platform client, broker connection and
/// store, as a warm Lambda keeps them.
pub struct Handler {
    platform: Arc<dyn Platform>,
    store: Arc<dyn StateStore>,
    broker: Arc<AmqpBroker>,
    config: WorkerConfig,
    /// Parks SQS retries as new messages; without it they go back to SQS as failures.
    sqs: Option<Arc<SqsParker>>,
    /// Where each invocation's metrics go as CloudWatch EMF lines (see [`emf`]); none:
    /// not written.
    metrics_namespace: Option<String>,
}

/// How long a handed-on RabbitMQ message is remembered in the store. Amazon MQ delivers a
/// failed invocation's batch again within seconds to minutes; an hour covers throttled
/// functions too, while each key costs Redis about a hundred bytes.
const HANDED_ON_MEMORY: Duration = Duration::from_secs(3600);

/// A RabbitMQ message's identity across deliveries of its batch: its body, and the attempt
/// and waits its headers carry (a parked copy of the same body is another message).
fn handed_on_key(body_sha256: &str, message: &Message) -> String {
    format!(
        "{body_sha256}:{}:{}:{}",
        message.routing_key, message.attempt, message.waits
    )
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("platform", &self.platform.name())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What an invocation answers.
#[derive(Debug)]
pub enum Answer {
    /// Every message is done (RabbitMQ events have no partial failure).
    Done,
    /// Some RabbitMQ message must come again: fail the invocation so the batch is
    /// redelivered.
    RedeliverBatch(String),
    Sqs(SqsBatchResponse),
    /// A scheduled event's round of housekeeping, and what it did. What it could not do
    /// comes due again for the next round, so it never fails the invocation.
    Housekeeping(Housekeeping),
}

impl Handler {
    pub fn new(
        platform: Arc<dyn Platform>,
        store: Arc<dyn StateStore>,
        broker: Arc<AmqpBroker>,
        config: WorkerConfig,
    ) -> Self {
        Handler {
            platform,
            store,
            broker,
            config,
            sqs: None,
            metrics_namespace: None,
        }
    }

    /// Writes each invocation's metrics as CloudWatch EMF lines in `namespace`.
    pub fn with_metrics_namespace(mut self, namespace: impl Into<String>) -> Self {
        self.metrics_namespace = Some(namespace.into());
        self
    }

    /// Parks the retries of SQS messages with `parker` (see [`sqs`]).
    pub fn with_sqs(mut self, parker: SqsParker) -> Self {
        self.sqs = Some(Arc::new(parker));
        self
    }

    /// The worker configuration for an invocation ending at `deadline`: its lease and
    /// platform calls end before the function is stopped.
    pub fn config_until(&self, deadline: SystemTime) -> WorkerConfig {
        let remaining = working_time(deadline).max(Duration::from_secs(1));
        WorkerConfig {
            lease: self.config.lease.min(remaining),
            operation_timeout: self.config.operation_timeout.min(remaining),
            store_retry_budget: self.config.store_retry_budget.min(remaining / 2),
            ..self.config.clone()
        }
    }

    /// Handles one invocation's messages, `prefetch` at a time.
    pub async fn invoke(
        &self,
        payload: &serde_json::Value,
        deadline: SystemTime,
    ) -> Result<Answer, String> {
        let platform = self.platform.name();
        if is_scheduled(payload) {
            return Ok(Answer::Housekeeping(self.keep_house(deadline).await));
        }
        let (source, messages) = parse_event(payload, platform)?;
        let worker = Arc::new(Worker::new(
            self.platform.clone(),
            self.store.clone(),
            self.broker.clone() as Arc<dyn Broker>,
            self.config_until(deadline),
        ));
        info!(?source, messages = messages.len(), "invocation");
        let outcomes: Vec<(String, ItemOutcome)> = futures_util::stream::iter(messages)
            .map(|message| {
                let worker = worker.clone();
                let broker = self.broker.clone();
                let sqs = self.sqs.clone();
                async move {
                    let handed_on = (source == Source::RabbitMq).then(|| {
                        handed_on_key(&RejectedMessage::of(&message.body).body_sha256, &message)
                    });
                    if let Some(key) = handed_on.as_deref().filter(|_| message.redelivered) {
                        match self.store.was_handed_on(key).await {
                            Ok(true) => {
                                info!(message = %message.id, "already handed on; not again");
                                return (message.id, ItemOutcome::Done);
                            }
                            Ok(false) => {}
                            // The request's own record still answers a finished request.
                            Err(why) => warn!(message = %message.id, %why, "cannot tell whether the message was handed on; handling it"),
                        }
                    }
                    let slot = Arc::new(Mutex::new(None));
                    let settle = LambdaSettle {
                        broker,
                        platform,
                        source,
                        message_id: format!("lambda-{}", uuid::Uuid::new_v4().simple()),
                        outcome: slot.clone(),
                        sqs,
                        queue_arn: message.queue_arn,
                        attributes: message.attributes,
                    };
                    let id = message.id.clone();
                    // On Amazon MQ every message names its publisher: the function's own
                    // (the requests it derives, its parked retries) are a worker's; any
                    // other user's are a producer's, held to what a producer may send. An
                    // SQS message names nobody the broker vouched for.
                    let own = source == Source::RabbitMq
                        && message.publisher.as_deref() == Some(self.broker.login_user());
                    let publisher = message.publisher.clone();
                    let delivery = Delivery::new(
                        message.body,
                        message.routing_key,
                        message.attempt,
                        message.redelivered,
                        Box::new(settle),
                    )
                    .with_waits(message.waits)
                    .with_published_at(message.published_at)
                    .with_trace(message.trace)
                    // Verified whatever its way in, when the deployment signs: an event
                    // does not say which exchange a message came through.
                    .with_signature(message.signature, true)
                    .with_publisher(publisher);
                    let delivery = if source == Source::Sqs || own {
                        delivery.with_way_in_unknown()
                    } else {
                        delivery
                    };
                    worker.handle(delivery).await;
                    let outcome = slot
                        .lock()
                        .ok()
                        .and_then(|mut slot| slot.take())
                        .unwrap_or_else(|| ItemOutcome::Again("not settled".into()));
                    if let Some(key) = handed_on.filter(|_| outcome == ItemOutcome::Done)
                        && let Err(why) =
                            self.store.remember_handed_on(&key, HANDED_ON_MEMORY).await
                    {
                        warn!(message = %id, %why, "could not remember that the message was handed on");
                    }
                    (id, outcome)
                }
            })
            .buffer_unordered(usize::from(self.config.prefetch.max(1)))
            .collect()
            .await;
        let again: Vec<(String, String)> = outcomes
            .into_iter()
            .filter_map(|(id, outcome)| match outcome {
                ItemOutcome::Done => None,
                ItemOutcome::Again(why) => Some((id, why)),
            })
            .collect();
        for (id, why) in &again {
            warn!(message = %id, %why, "message goes back to its source");
        }
        self.write_metrics(&worker);
        Ok(match source {
            Source::Sqs => {
                let mut response = SqsBatchResponse::default();
                response.batch_item_failures = again
                    .into_iter()
                    .map(|(id, _)| {
                        let mut failure = BatchItemFailure::default();
                        failure.item_identifier = id;
                        failure
                    })
                    .collect();
                Answer::Sqs(response)
            }
            Source::RabbitMq if again.is_empty() => Answer::Done,
            Source::RabbitMq => Answer::RedeliverBatch(format!(
                "{} of the batch's messages must be delivered again: {}",
                again.len(),
                again
                    .iter()
                    .map(|(id, why)| format!("#{id}: {why}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        })
    }
}

impl Handler {
    /// A scheduled event's round: the daemon's background work, until the invocation's
    /// deadline (less the time to answer).
    pub async fn keep_house(&self, deadline: SystemTime) -> Housekeeping {
        let config = self.config_until(deadline);
        let remaining = working_time(deadline);
        let until = tokio::time::Instant::now() + remaining;
        let worker = Arc::new(Worker::new(
            self.platform.clone(),
            self.store.clone(),
            self.broker.clone() as Arc<dyn Broker>,
            config,
        ));
        info!(
            remaining_ms = remaining.as_millis() as u64,
            "scheduled invocation: housekeeping"
        );
        let done = worker.keep_house(until).await;
        self.write_metrics(&worker);
        done
    }

    /// Writes the invocation's metrics as CloudWatch EMF lines, when the function does.
    fn write_metrics(&self, worker: &Worker) {
        if let Some(namespace) = &self.metrics_namespace {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            // On stdout, apart from the logs (stderr): CloudWatch reads both.
            for line in emf::lines(&worker.metrics().encode(), namespace, now_ms) {
                println!("{line}");
            }
        }
    }
}

/// The deadline of an invocation, from the runtime's milliseconds since the epoch.
pub fn deadline_from_millis(deadline_ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(deadline_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rabbitmq_events_decode_base64_bodies_and_read_retry_headers() {
        let body = br#"{"schema_version":1}"#;
        let payload = serde_json::json!({
            "eventSource": "aws:rmq",
            "rmqMessagesByQueue": {"provisioning.aws-ec2::/": [
                {"basicProperties": {"contentType": "application/json", "contentEncoding": null,
                    "headers": {"x-provisioner-attempt": 3, "x-provisioner-routing-key": {"bytes": [97, 119, 115, 45, 101, 99, 50, 46, 112, 114, 111, 118, 105, 115, 105, 111, 110]},
                        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
                    "deliveryMode": 2, "priority": 0, "correlationId": null, "replyTo": null,
                    "messageId": null, "type": null, "appId": null, "clusterId": null, "bodySize": 20},
                 "redelivered": true,
                 "data": base64::engine::general_purpose::STANDARD.encode(body)},
                {"basicProperties": {"contentType": null, "contentEncoding": null, "headers": {},
                    "deliveryMode": 2, "priority": 0, "correlationId": null, "replyTo": null,
                    "messageId": null, "type": null, "appId": null, "clusterId": null, "bodySize": 3},
                 "redelivered": false, "data": "%%%"}
            ]}
        });
        let (source, messages) = parse_event(&payload, PlatformName::AwsEc2).expect("event");
        assert_eq!(source, Source::RabbitMq);
        assert_eq!(messages[0].body, body);
        assert_eq!(messages[0].attempt, 3);
        assert_eq!(messages[0].routing_key, "aws-ec2.provision");
        assert!(messages[0].redelivered);
        assert_eq!(
            messages[1].body, b"%%%",
            "kept as it came, for the dead letter"
        );
        assert_eq!(messages[1].attempt, 1);
        assert_eq!(
            messages[1].routing_key, "provisioning.aws-ec2",
            "no request to read a routing key from"
        );
        assert_eq!(
            messages[0].trace.get("traceparent").map(String::as_str),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            "the producer's trace goes on"
        );
        assert!(messages[1].trace.is_empty());
    }

    #[test]
    fn sqs_events_count_receives_as_attempts() {
        let payload = serde_json::json!({"Records": [{
            "messageId": "m-1", "receiptHandle": "h", "body": "{}", "eventSource": "aws:sqs",
            "attributes": {"ApproximateReceiveCount": "4"}, "messageAttributes": {}
        }]});
        let (source, messages) = parse_event(&payload, PlatformName::AwsEcs).expect("event");
        assert_eq!(source, Source::Sqs);
        assert_eq!(messages[0].id, "m-1");
        assert_eq!(messages[0].attempt, 4);
        assert!(messages[0].redelivered);
    }

    #[test]
    fn a_parked_sqs_copy_carries_its_counts_and_first_publish_time() {
        let payload = serde_json::json!({"Records": [{
            "messageId": "m-2", "receiptHandle": "h", "body": "{}", "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:provisioning-aws-ec2",
            "attributes": {"ApproximateReceiveCount": "2", "SentTimestamp": "1800000000000"},
            "messageAttributes": {
                "provisioner-attempt": {"stringValue": "3", "dataType": "Number"},
                "provisioner-waits": {"stringValue": "5", "dataType": "Number"},
                "provisioner-published-at": {"stringValue": "1700000000000", "dataType": "Number"},
                "traceparent": {"stringValue": "00-ab-cd-01", "dataType": "String"},
                "blob": {"binaryValue": "AAE=", "dataType": "Binary"}
            }
        }]});
        let (_, messages) = parse_event(&payload, PlatformName::AwsEc2).expect("event");
        let message = &messages[0];
        // Parked for attempt 3, then one invocation failed with it.
        assert_eq!(message.attempt, 4);
        assert_eq!(message.waits, 5);
        assert_eq!(
            message.published_at,
            Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000))
        );
        assert_eq!(
            message.queue_arn.as_deref(),
            Some("arn:aws:sqs:us-east-1:123456789012:provisioning-aws-ec2")
        );
        assert_eq!(
            message.attributes.get("traceparent"),
            Some(&("String".to_owned(), Carried::Text("00-ab-cd-01".to_owned())))
        );
        assert_eq!(
            message.attributes.get("blob"),
            Some(&("Binary".to_owned(), Carried::Binary(vec![0, 1])))
        );
        assert_eq!(
            message.trace.get("traceparent").map(String::as_str),
            Some("00-ab-cd-01"),
            "the producer's trace goes on"
        );
    }

    /// Neither event carries the routing key a signature covers: a request for this
    /// platform gives it (`<platform>.<operation>`), and the signature comes along.
    #[test]
    fn a_signed_request_keeps_its_signature_and_the_routing_key_it_covers() {
        let request = |platform: &str| {
            serde_json::json!({"schema_version": 1, "request_id": "r", "operation": "teardown",
                "platform": platform, "target_request_id": "t"})
            .to_string()
        };
        let bytes = |text: &str| serde_json::json!({"bytes": text.as_bytes()});
        let rabbit = |body: String| {
            serde_json::json!({"basicProperties": {"headers": {
                    "x-provisioner-signature": bytes("key=k1,t=1,v1=ab")},
                    "contentType": "application/json", "contentEncoding": null, "deliveryMode": 2,
                    "priority": 0, "correlationId": null, "replyTo": null, "messageId": null,
                    "type": null, "appId": null, "clusterId": null, "bodySize": body.len()},
                "redelivered": false,
                "data": base64::engine::general_purpose::STANDARD.encode(body)})
        };
        let payload = serde_json::json!({"eventSource": "aws:rmq", "rmqMessagesByQueue": {
            "provisioning.aws-ec2::/": [rabbit(request("aws-ec2")), rabbit(request("docker"))]}});
        let (_, messages) = parse_event(&payload, PlatformName::AwsEc2).expect("event");
        assert_eq!(messages[0].routing_key, "aws-ec2.teardown");
        assert_eq!(messages[0].signature.as_deref(), Some("key=k1,t=1,v1=ab"));
        assert_eq!(
            messages[1].routing_key, "provisioning.aws-ec2",
            "another platform's request is not given a key it was not published with"
        );

        let payload = serde_json::json!({"Records": [{
            "messageId": "m-3", "receiptHandle": "h", "body": request("aws-ecs"),
            "eventSource": "aws:sqs", "attributes": {"ApproximateReceiveCount": "1"},
            "messageAttributes": {"x-provisioner-signature":
                {"stringValue": "key=k1,t=1,v1=cd", "dataType": "String"}}
        }]});
        let (_, messages) = parse_event(&payload, PlatformName::AwsEcs).expect("event");
        assert_eq!(messages[0].routing_key, "aws-ecs.teardown");
        assert_eq!(messages[0].signature.as_deref(), Some("key=k1,t=1,v1=cd"));
    }

    #[test]
    fn other_events_are_refused_with_a_reason() {
        let error = parse_event(&serde_json::json!({"detail": {}}), PlatformName::AwsEc2)
            .expect_err("not a queue event");
        assert!(error.contains("rmqMessagesByQueue"), "{error}");
    }
}
