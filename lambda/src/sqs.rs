//! Parking a retry on SQS the way the RabbitMQ delay tiers park one: the message goes
//! back to its queue as a *new* message, delayed, with its attempt and wait counts in
//! message attributes, and the original is reported done.
//!
//! Reporting the original in `batchItemFailures` instead would make every wait (for a
//! lease another worker holds, for a target's provision) spend one of the queue's
//! `maxReceiveCount` receives, ignore the retry policy's backoff (SQS redelivers after the
//! visibility timeout), and past that count SQS would move the request to its own
//! dead-letter queue without a terminal event. Parked as a new message, receives only grow
//! when an invocation fails or times out, the worker's own bounds (`MAX_ATTEMPTS`, the
//! waits bound) end the request with a reason, and `maxReceiveCount` only guards against a
//! message that crashes every function.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::DisplayErrorContext;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::MessageAttributeValue;
use tokio::sync::Mutex;

/// A parked request's attempt count (the attempt it comes back for).
pub const ATTEMPT_ATTRIBUTE: &str = "provisioner-attempt";
/// Times a request was parked without an attempt (waiting for another holder).
pub const WAITS_ATTRIBUTE: &str = "provisioner-waits";
/// When the request was first published (milliseconds since the epoch), so a parked copy
/// keeps the age the retention check reads.
pub const PUBLISHED_AT_ATTRIBUTE: &str = "provisioner-published-at";

/// SQS delays a message by at most 15 minutes.
const MAX_DELAY: Duration = Duration::from_secs(900);
/// SQS takes at most 10 message attributes.
const MAX_ATTRIBUTES: usize = 10;

/// A message attribute's value, carried onto a parked copy as it came.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carried {
    Text(String),
    Binary(Vec<u8>),
}

/// A message's attributes by name: data type and value.
pub type Attributes = HashMap<String, (String, Carried)>;

/// A message to park again: its body, what it carried, and its counts.
#[derive(Debug, Clone)]
pub struct Parked<'a> {
    /// The queue's ARN (the record's `eventSourceARN`).
    pub queue_arn: &'a str,
    pub body: &'a [u8],
    /// The record's own attributes, carried over.
    pub attributes: &'a Attributes,
    pub delay: Duration,
    pub attempt: u32,
    pub waits: u32,
    pub published_at: Option<SystemTime>,
}

/// Sends parked messages back to their SQS queue.
#[derive(Debug)]
pub struct SqsParker {
    client: Client,
    /// Queue URLs by ARN, asked once per queue.
    urls: Mutex<HashMap<String, String>>,
}

impl SqsParker {
    pub fn new(client: Client) -> Self {
        SqsParker {
            client,
            urls: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `parked` back to its queue, delayed. A FIFO queue cannot delay one message,
    /// so it is refused here and the caller hands the message back to SQS instead.
    pub async fn park(&self, parked: &Parked<'_>) -> Result<(), String> {
        let (account, name) = queue_of_arn(parked.queue_arn)?;
        if name.ends_with(".fifo") {
            return Err(format!(
                "{name} is a FIFO queue, which cannot delay one message"
            ));
        }
        let url = self.url(parked.queue_arn, account, name).await?;
        let body = std::str::from_utf8(parked.body)
            .map_err(|_| "the body is not UTF-8, which SQS cannot carry".to_owned())?;
        let mut send = self
            .client
            .send_message()
            .queue_url(&url)
            .message_body(body)
            .delay_seconds(delay_seconds(parked.delay));
        for (name, value) in attributes_of(parked)? {
            send = send.message_attributes(name, value);
        }
        send.send().await.map_err(|e| {
            format!(
                "sending the message back to {name}: {}",
                DisplayErrorContext(&e)
            )
        })?;
        Ok(())
    }

    async fn url(&self, arn: &str, account: &str, name: &str) -> Result<String, String> {
        let mut urls = self.urls.lock().await;
        if let Some(url) = urls.get(arn) {
            return Ok(url.clone());
        }
        let answer = self
            .client
            .get_queue_url()
            .queue_name(name)
            .queue_owner_aws_account_id(account)
            .send()
            .await
            .map_err(|e| format!("looking up the URL of {name}: {}", DisplayErrorContext(&e)))?;
        let url = answer
            .queue_url
            .ok_or_else(|| format!("SQS answered no URL for {name}"))?;
        urls.insert(arn.to_owned(), url.clone());
        Ok(url)
    }
}

/// The account and queue name of an SQS queue ARN (`arn:aws:sqs:<region>:<account>:<name>`).
pub fn queue_of_arn(arn: &str) -> Result<(&str, &str), String> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    match parts.as_slice() {
        ["arn", _, "sqs", _, account, name] if !account.is_empty() && !name.is_empty() => {
            Ok((account, name))
        }
        _ => Err(format!("{arn:?} is not an SQS queue ARN")),
    }
}

/// Whole seconds, rounded up (a retry never comes early), at most SQS's 15 minutes.
fn delay_seconds(delay: Duration) -> i32 {
    let seconds = delay.min(MAX_DELAY).as_secs_f64().ceil();
    seconds as i32
}

/// The message attributes of a parked copy: the original's, then the counts.
fn attributes_of(parked: &Parked<'_>) -> Result<Vec<(String, MessageAttributeValue)>, String> {
    let ours = [
        (ATTEMPT_ATTRIBUTE, parked.attempt.to_string()),
        (WAITS_ATTRIBUTE, parked.waits.to_string()),
    ]
    .into_iter()
    .chain(parked.published_at.map(|at| {
        let millis = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        (PUBLISHED_AT_ATTRIBUTE, millis.to_string())
    }));
    let mut attributes: Vec<(String, MessageAttributeValue)> = Vec::new();
    for (name, value) in ours {
        let value = MessageAttributeValue::builder()
            .data_type("Number")
            .string_value(value)
            .build()
            .map_err(|e| e.to_string())?;
        attributes.push((name.to_owned(), value));
    }
    let mut carried: Vec<_> = parked
        .attributes
        .iter()
        .filter(|(name, _)| !attributes.iter().any(|(ours, _)| ours == *name))
        .collect();
    carried.sort_by(|a, b| a.0.cmp(b.0));
    if attributes.len() + carried.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "the message carries {} attributes; with the worker's {} it would pass SQS's {MAX_ATTRIBUTES}",
            carried.len(),
            attributes.len()
        ));
    }
    for (name, (data_type, value)) in carried {
        let value = match value {
            Carried::Text(text) => MessageAttributeValue::builder().string_value(text),
            Carried::Binary(bytes) => {
                MessageAttributeValue::builder().binary_value(Blob::new(bytes.clone()))
            }
        }
        .data_type(data_type)
        .build()
        .map_err(|e| e.to_string())?;
        attributes.push((name.clone(), value));
    }
    Ok(attributes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_arns_name_the_account_and_queue() {
        assert_eq!(
            queue_of_arn("arn:aws:sqs:eu-west-1:123456789012:provisioning-aws-ec2"),
            Ok(("123456789012", "provisioning-aws-ec2"))
        );
        assert!(queue_of_arn("arn:aws:sns:eu-west-1:123456789012:topic").is_err());
        assert!(queue_of_arn("provisioning-aws-ec2").is_err());
    }

    #[test]
    fn delays_round_up_to_whole_seconds_within_sqs_limit() {
        assert_eq!(delay_seconds(Duration::ZERO), 0);
        assert_eq!(delay_seconds(Duration::from_millis(300)), 1);
        assert_eq!(delay_seconds(Duration::from_secs(2)), 2);
        assert_eq!(delay_seconds(Duration::from_secs(3600)), 900);
    }

    #[test]
    fn the_counts_replace_the_originals_and_other_attributes_are_carried() {
        let original = HashMap::from([
            (
                WAITS_ATTRIBUTE.to_owned(),
                ("Number".to_owned(), Carried::Text("1".to_owned())),
            ),
            (
                "traceparent".to_owned(),
                ("String".to_owned(), Carried::Text("00-ab-cd-01".to_owned())),
            ),
            (
                "blob".to_owned(),
                ("Binary".to_owned(), Carried::Binary(vec![0, 1])),
            ),
        ]);
        let parked = Parked {
            queue_arn: "arn:aws:sqs:us-east-1:000000000000:q",
            body: b"{}",
            attributes: &original,
            delay: Duration::from_secs(1),
            attempt: 3,
            waits: 2,
            published_at: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
        };
        let attributes: HashMap<String, MessageAttributeValue> = attributes_of(&parked)
            .expect("attributes")
            .into_iter()
            .collect();
        let text = |name: &str| attributes[name].string_value.clone().unwrap_or_default();
        assert_eq!(text(ATTEMPT_ATTRIBUTE), "3");
        assert_eq!(text(WAITS_ATTRIBUTE), "2");
        assert_eq!(text(PUBLISHED_AT_ATTRIBUTE), "1700000000123");
        assert_eq!(text("traceparent"), "00-ab-cd-01");
        assert_eq!(
            attributes["blob"]
                .binary_value
                .as_ref()
                .map(|b| b.as_ref().to_vec()),
            Some(vec![0, 1])
        );
        assert_eq!(attributes.len(), 5);
    }

    #[test]
    fn too_many_attributes_are_refused_rather_than_dropped() {
        let original: Attributes = (0..9)
            .map(|i| {
                (
                    format!("a{i}"),
                    ("String".to_owned(), Carried::Text("v".into())),
                )
            })
            .collect();
        let parked = Parked {
            queue_arn: "arn:aws:sqs:us-east-1:000000000000:q",
            body: b"{}",
            attributes: &original,
            delay: Duration::from_secs(1),
            attempt: 1,
            waits: 1,
            published_at: None,
        };
        assert!(attributes_of(&parked).is_err());
    }
}
