//! Status events: every step of a request's life, as published to the status topic.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::request::Operation;

/// The life cycle states of the source documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    NotStarted,
    Starting,
    Running,
    Stopping,
    Stopped,
    Error,
    /// A `dry_run` request passed: the platform says it would succeed; nothing was done.
    Checked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::NotStarted => "not_started",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
            State::Error => "error",
            State::Checked => "checked",
        }
    }

    /// A state after which no further event comes for the request.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Running | State::Stopped | State::Error | State::Checked
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of failure an `error` event reports, so a producer can decide what to do
/// without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The request is malformed or its spec is refused; fix it and send a new request id.
    InvalidRequest,
    /// The request id was used before with a different payload, or the name is taken.
    Conflict,
    /// Something the request names (an image, a target) does not exist.
    NotFound,
    /// The worker's credentials or policy do not allow it.
    Permission,
    /// An account or project limit was hit.
    Quota,
    /// The platform has no capacity for it right now.
    Capacity,
    /// The platform asked us to slow down and retries ran out.
    Throttled,
    /// A passing fault (network, restart) outlasted the retries.
    Transient,
    /// The resource did not become ready in time, or the request's deadline passed.
    Timeout,
    /// The platform does not support this operation.
    Unsupported,
    /// A bug or unexpected answer in the worker; the message says what.
    Internal,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::InvalidRequest => "invalid_request",
            ErrorClass::Conflict => "conflict",
            ErrorClass::NotFound => "not_found",
            ErrorClass::Permission => "permission",
            ErrorClass::Quota => "quota",
            ErrorClass::Capacity => "capacity",
            ErrorClass::Throttled => "throttled",
            ErrorClass::Transient => "transient",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Unsupported => "unsupported",
            ErrorClass::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The failure carried by an `error` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorInfo {
    pub class: ErrorClass,
    /// What went wrong and what to do about it, for a person.
    pub message: String,
}

/// One network endpoint of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Endpoint {
    /// The port the service listens on inside the resource (container port).
    pub port: u16,
    /// Where it is reachable from the worker's side.
    pub host: String,
    pub host_port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
}

fn tcp() -> String {
    "tcp".into()
}

/// What was made, as far as it is known.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Resource {
    /// The platform's own id (container id, instance id, process id).
    pub id: String,
    /// The name the worker gave it, derived from the request id.
    pub name: String,
    /// The host or IP address it is reachable at, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    /// On a fleet's last event: every member, in index order. (A fleet has no platform id
    /// of its own: its `id` and `name` are its request id.)
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberResource>,
}

/// One member of a fleet, as the fleet's last event lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MemberResource {
    /// The member's own request id, `<fleet request id>#<index>`.
    pub request_id: String,
    pub index: u32,
    /// Where the member ended (`running`, `error`, or `stopped` when it was torn down).
    pub state: State,
    /// The platform's id of what the member made, when it made something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Why the member failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

/// How many of a fleet's members are in each state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct FleetCounts {
    /// Not begun yet (waiting in the queue, or for a rate limit or a worker).
    pub not_started: u32,
    pub starting: u32,
    pub running: u32,
    pub stopping: u32,
    pub stopped: u32,
    pub error: u32,
}

impl FleetCounts {
    /// Counts one member in `state` (`checked` counts as running).
    pub fn add(&mut self, state: State) {
        match state {
            State::NotStarted => self.not_started += 1,
            State::Starting => self.starting += 1,
            State::Running | State::Checked => self.running += 1,
            State::Stopping => self.stopping += 1,
            State::Stopped => self.stopped += 1,
            State::Error => self.error += 1,
        }
    }

    pub fn total(&self) -> u32 {
        self.not_started + self.starting + self.running + self.stopping + self.stopped + self.error
    }
}

/// What an event says about the fleet it belongs to: on a member's events, which member;
/// on the fleet's own events, how far its members are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FleetStatus {
    /// The fleet's request id (the event's own on the fleet's events).
    pub request_id: String,
    /// How many members the fleet has.
    pub count: u32,
    /// On a member's events: which member, from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u32>,
    /// On the fleet's events: how many members must run for it to succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_count: Option<u32>,
    /// On the fleet's events: how many members are in each state, out of `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<FleetCounts>,
}

/// A status event, as published to the `provisioning.status` exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "Provisioning status event")]
pub struct StatusEvent {
    pub schema_version: u32,
    /// The request this event is about (as the producer wrote it, even when rejected).
    pub request_id: String,
    /// Absent only when the message was so malformed that no operation could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    /// The platform name as the request gave it (`unknown` when it gave none).
    pub platform: String,
    pub state: State,
    /// Increases by one with every event of the request, across workers; order events by
    /// it. A rejection of a message that never became a request has `seq` 0.
    pub seq: u64,
    /// Which delivery attempt this event came from, starting at 1.
    pub attempt: u32,
    /// When the event was made (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    #[schemars(with = "String", extend("format" = "date-time"))]
    pub timestamp: OffsetDateTime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
    /// Present exactly when `state` is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The request's tenant, when it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Present when the event answers one message rather than reporting the request: the
    /// message was refused (invalid, a conflicting reuse of the request id, too old, or
    /// it waited too long for another worker). Such an event has `seq` 0 and is not the
    /// outcome of a request published under the same id with another body: a producer
    /// knows its own message by the SHA-256 of the body it published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected_message: Option<RejectedMessage>,
    /// Why the request was sent, when it said (its `cause`): e.g. a teardown the worker
    /// sent because its target expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// On the events of a fleet and of its members: which fleet, and how far it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStatus>,
}

/// The message an event answers, when it answers one message only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RejectedMessage {
    /// Lowercase hex SHA-256 of the message body exactly as it was published.
    pub body_sha256: String,
}

impl RejectedMessage {
    pub fn of(body: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        RejectedMessage {
            body_sha256: Sha256::digest(body)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        }
    }
}

impl StatusEvent {
    pub fn routing_key(&self) -> String {
        crate::status_routing_key(&self.platform, self.state)
    }

    /// Whether this event ends the request it names (not only one message of it).
    pub fn ends_request(&self) -> bool {
        self.state.is_terminal() && self.rejected_message.is_none()
    }

    /// Whether this event is the answer to the message with this body: a rejection of
    /// exactly that message, or any event of its request that is not about another
    /// message.
    pub fn answers(&self, body: &[u8]) -> bool {
        match &self.rejected_message {
            None => true,
            Some(rejected) => rejected.body_sha256 == RejectedMessage::of(body).body_sha256,
        }
    }
}
