//! Requests: what producers publish, how they are decoded, and what makes one valid.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::Invalid;
use crate::SCHEMA_VERSION;
use crate::invalid::invalid;
pub use crate::platforms::PlatformName;

impl PlatformName {
    pub fn parse(name: &str) -> Option<PlatformName> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

impl fmt::Display for PlatformName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a request asks for. `provision` and `teardown` are served today; the others are
/// reserved so producers and the schema already know their names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Provision,
    Teardown,
    Start,
    Stop,
    Reboot,
    Describe,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Provision => "provision",
            Operation::Teardown => "teardown",
            Operation::Start => "start",
            Operation::Stop => "stop",
            Operation::Reboot => "reboot",
            Operation::Describe => "describe",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client-chosen request id: the idempotency key. 1 to 128 characters of ASCII letters,
/// digits, `.`, `_` and `-`, starting with a letter or digit, so every platform can derive
/// resource names and tags from it.
///
/// The workers name the members of a fleet `<fleet request id>#<index>` (and requests
/// about a member, such as its expiry's teardown, `<member id>.<purpose>`), so an id may
/// also hold one `#` followed by 1 to 4 digits and then more of the characters above.
/// A producer's own provision ids never contain `#`: it is kept for members.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(try_from = "String", into = "String")]
#[schemars(with = "RequestIdSchema")]
pub struct RequestId(String);

/// Schema stand-in for [`RequestId`] carrying its pattern.
#[derive(JsonSchema)]
#[schemars(transparent)]
#[allow(dead_code)]
struct RequestIdSchema(
    #[schemars(
        regex(
            pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(#([0-9]{1,4}|[a-z])[A-Za-z0-9._-]*)?$"
        ),
        length(max = 160)
    )]
    String,
);

impl RequestId {
    /// The longest id a producer may choose.
    pub const MAX_LEN: usize = 128;
    /// The longest id at all: a fleet member's, or a request the workers send about one.
    pub const MAX_MEMBER_LEN: usize = 160;

    pub fn new(id: impl Into<String>) -> Result<RequestId, Invalid> {
        let id = id.into();
        if id.is_empty() {
            return Err("request_id is empty".into());
        }
        let (base, member) = match id.split_once('#') {
            Some((base, member)) => (base, Some(member)),
            None => (id.as_str(), None),
        };
        if base.len() > Self::MAX_LEN {
            return Err(invalid!(
                "request_id is {} characters long; the limit is {}",
                base.len(),
                Self::MAX_LEN
            ));
        }
        if !id.as_bytes()[0].is_ascii_alphanumeric() {
            return Err(invalid!(
                "request_id {id:?} must start with a letter or digit"
            ));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if let Some(bad) = base.chars().find(|c| !allowed(*c)) {
            return Err(invalid!(
                "request_id {id:?} contains {bad:?}; allowed are ASCII letters, digits, '.', '_' and '-'"
            ));
        }
        if let Some(member) = member {
            // A member's index (`<fleet>#3`, `<fleet>#3.rollback`), or the purpose of a
            // request the workers send about one that is not a member (`<id>#expired`).
            let digits = member.chars().take_while(char::is_ascii_digit).count();
            let head_ok = match digits {
                0 => member.starts_with(|c: char| c.is_ascii_lowercase()),
                n => n <= 4,
            };
            let rest = &member[digits..];
            if !head_ok || !rest.chars().all(allowed) || id.len() > Self::MAX_MEMBER_LEN {
                return Err(invalid!(
                    "request_id {id:?}: '#' is kept for the workers' own requests: fleet members (<fleet id>#<index>) and what they send about a request (<id>#<purpose>), at most {} characters in all",
                    Self::MAX_MEMBER_LEN
                ));
            }
        }
        Ok(RequestId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The id of member `index` of the fleet this id names.
    pub fn member(&self, index: u32) -> RequestId {
        RequestId(format!("{}#{index}", self.0))
    }

    /// Whether this id is in the workers' own part of the id space (`#`): a fleet member,
    /// or a request the workers send about a request.
    pub fn is_member(&self) -> bool {
        self.0.contains('#')
    }
}

impl TryFrom<String> for RequestId {
    type Error = Invalid;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        RequestId::new(value)
    }
}

impl From<RequestId> for String {
    fn from(value: RequestId) -> String {
        value.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A provisioning request, as published to the `provisioning.requests` exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "Provisioning request")]
pub struct Request {
    /// Version of this format; this release reads and writes 1.
    pub schema_version: u32,
    /// Client-chosen id and idempotency key: the same id always means the same request.
    pub request_id: RequestId,
    pub operation: Operation,
    pub platform: PlatformName,
    /// The platform's parameters (see the per-platform spec schemas). Required for
    /// `provision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Map<String, serde_json::Value>>,
    /// For `teardown` (and the later start/stop/reboot/describe): the `request_id` of
    /// the provision request whose resource to act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_request_id: Option<RequestId>,
    /// Alternatively: the platform's own id of the resource (container id, instance id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_id: Option<String>,
    /// Free-form labels copied onto the resource where the platform supports them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Past this instant the request is not retried any more (RFC 3339).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub deadline: Option<OffsetDateTime>,
    /// Who the request is on behalf of; carried through to status events and logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Check mode: validate the request and ask the platform whether it would succeed
    /// (EC2's `DryRun`), creating and changing nothing. Ends in `checked` or `error`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// For `provision`: tear the resource down this many seconds after it is running
    /// (1 s to a year). Not together with `expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 31_536_000))]
    pub ttl_seconds: Option<u64>,
    /// For `provision`: tear the resource down at this instant (RFC 3339). A provision
    /// that would start after it makes nothing. Not together with `ttl_seconds`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    #[schemars(with = "Option<String>", extend("format" = "date-time"))]
    pub expires_at: Option<OffsetDateTime>,
    /// Why the request was sent, when a system sent it on someone's behalf (e.g. the
    /// teardown of an expired resource); copied onto the request's status events. At most
    /// 256 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub cause: Option<String>,
    /// For `provision`: how many identical resources to make, 1 to 1,000 (default 1).
    /// More than one makes a fleet: each member is its own request, `<request_id>#<i>`
    /// for `i` from 0, spread over the platform's workers, with its own status events;
    /// the fleet's events count its members by state and its last one lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub count: Option<u32>,
    /// For a fleet: how many members must be running for it to succeed, 1 to `count`
    /// (default `count`: all or nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub min_count: Option<u32>,
    /// For a fleet: what happens to its running members when fewer than `min_count` run
    /// (default `rollback`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_partial: Option<OnPartial>,
    /// Set by the workers on the requests they make for the members of a fleet: which
    /// fleet and which member. The member's `request_id` is `<fleet_request_id>#<index>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_member: Option<FleetMember>,
}

/// The most members a fleet may have.
pub const MAX_FLEET_SIZE: u32 = 1000;

/// What happens to a fleet's running members when fewer than `min_count` of them run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnPartial {
    /// Tear down every member: the fleet ends with nothing made (the default).
    #[default]
    Rollback,
    /// Keep the members that run; the fleet still ends in `error`, listing them.
    Keep,
}

/// Which fleet a request is a member of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FleetMember {
    /// The request id of the fleet (its provision, or a teardown of all its members).
    pub fleet_request_id: RequestId,
    /// Which member, from 0 to `count` - 1.
    pub index: u32,
    /// How many members the fleet has.
    pub count: u32,
}

/// The longest `ttl_seconds`: a year.
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;
const MAX_CAUSE_LEN: usize = 256;

/// What a teardown (or another operation on an existing resource) acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TeardownTarget {
    /// The resource made by this provision request.
    Request(RequestId),
    /// The platform's own resource id.
    Resource(String),
}

impl fmt::Display for TeardownTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TeardownTarget::Request(id) => write!(f, "request {id}"),
            TeardownTarget::Resource(id) => write!(f, "resource {id}"),
        }
    }
}

const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY_LEN: usize = 63;
const MAX_LABEL_VALUE_LEN: usize = 256;
const MAX_TENANT_LEN: usize = 128;
const MAX_RESOURCE_ID_LEN: usize = 256;

impl Request {
    /// Refuses what only the workers may send: an id under `#` (a fleet member's, or a
    /// request about a request: `<id>#expired`, `<F>#3.rollback`, `<id>#reconciled-…`),
    /// `fleet_member` and `cause`. A producer that took one first would meet the workers'
    /// own request with a conflict, and the expiry, rollback or reconcile would never
    /// happen; a forged `cause` would speak for the system on the status topic.
    pub fn check_from_producer(&self) -> Result<(), Invalid> {
        if self.request_id.as_str().contains('#') {
            return Err(invalid!(
                "request_id {:?} holds '#', which is kept for the requests the workers send themselves (fleet members, expiries, rollbacks, reconciles); choose an id of A-Z a-z 0-9 . _ -",
                self.request_id.as_str()
            ));
        }
        // A fleet's member (`<fleet>#<i>`) is a producer's to act on; a request the
        // workers send about a request (`<id>#expired`, `<F>#3.rollback`, …) is not: a
        // teardown naming one would tombstone it before the workers send it, and the
        // expiry, rollback or reconcile would wait for ever.
        if let Some(target) = &self.target_request_id
            && let Some((_, after)) = target.as_str().split_once('#')
            && (after.is_empty() || !after.chars().all(|c| c.is_ascii_digit()))
        {
            return Err(invalid!(
                "target_request_id {:?} names a request the workers send themselves (an expiry, a rollback, a reconcile), which no producer acts on; name the resource's own request id",
                target.as_str()
            ));
        }
        if self.fleet_member.is_some() {
            return Err(
                "\"fleet_member\" is set by the workers on the members of a fleet; to make several, set \"count\""
                    .into(),
            );
        }
        if self.cause.is_some() {
            return Err(
                "\"cause\" is set by the workers on the requests they send on someone's behalf (an expiry's teardown, a reconcile); leave it out"
                    .into(),
            );
        }
        Ok(())
    }

    /// Checks everything about a request that does not depend on the platform: the schema
    /// version, the fields each operation needs, label and id shapes.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(invalid!(
                "schema_version {} is not supported; this worker reads version {SCHEMA_VERSION}",
                self.schema_version
            ));
        }
        match self.operation {
            Operation::Provision => {
                if self.spec.is_none() {
                    return Err("a provision request needs a \"spec\" object with the platform's parameters".into());
                }
                if self.target_request_id.is_some() || self.resource_id.is_some() {
                    return Err("a provision request names no target_request_id or resource_id; those are for teardown".into());
                }
            }
            Operation::Teardown
            | Operation::Start
            | Operation::Stop
            | Operation::Reboot
            | Operation::Describe => {
                self.target()?;
            }
        }
        if let Some(resource_id) = &self.resource_id
            && (resource_id.is_empty()
                || resource_id.len() > MAX_RESOURCE_ID_LEN
                || resource_id
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace()))
        {
            return Err(invalid!(
                "resource_id {resource_id:?} must be 1 to {MAX_RESOURCE_ID_LEN} characters without spaces or control characters"
            ));
        }
        if self.labels.len() > MAX_LABELS {
            return Err(invalid!(
                "{} labels given; the limit is {MAX_LABELS}",
                self.labels.len()
            ));
        }
        for (key, value) in &self.labels {
            let key_ok = !key.is_empty()
                && key.len() <= MAX_LABEL_KEY_LEN
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
            if !key_ok {
                return Err(invalid!(
                    "label key {key:?} must be 1 to {MAX_LABEL_KEY_LEN} ASCII letters, digits, '.', '_', '-' or '/'"
                ));
            }
            if value.len() > MAX_LABEL_VALUE_LEN || value.chars().any(char::is_control) {
                return Err(invalid!(
                    "label {key:?} has a value over {MAX_LABEL_VALUE_LEN} bytes or with control characters"
                ));
            }
        }
        if (self.ttl_seconds.is_some() || self.expires_at.is_some())
            && self.operation != Operation::Provision
        {
            return Err(invalid!(
                "ttl_seconds and expires_at belong on a provision request; this is a {}",
                self.operation.as_str()
            ));
        }
        match (self.ttl_seconds, self.expires_at) {
            (Some(_), Some(_)) => {
                return Err(
                    "give ttl_seconds or expires_at, not both: one says how long after running, the other when".into(),
                );
            }
            (Some(ttl), None) if ttl == 0 || ttl > MAX_TTL_SECONDS => {
                return Err(invalid!(
                    "ttl_seconds {ttl}: a resource lives from 1 s to a year ({MAX_TTL_SECONDS} s)"
                ));
            }
            _ => {}
        }
        if let Some(cause) = &self.cause
            && (cause.is_empty()
                || cause.len() > MAX_CAUSE_LEN
                || cause.chars().any(char::is_control))
        {
            return Err(invalid!(
                "cause must be 1 to {MAX_CAUSE_LEN} bytes without control characters"
            ));
        }
        self.validate_fleet()?;
        if let Some(tenant) = &self.tenant
            && (tenant.is_empty()
                || tenant.len() > MAX_TENANT_LEN
                || tenant.chars().any(char::is_control))
        {
            return Err(invalid!(
                "tenant must be 1 to {MAX_TENANT_LEN} characters without control characters"
            ));
        }
        Ok(())
    }

    /// Checks `count`, `min_count`, `on_partial` and `fleet_member`.
    fn validate_fleet(&self) -> Result<(), Invalid> {
        let fleet_fields =
            self.count.is_some() || self.min_count.is_some() || self.on_partial.is_some();
        if fleet_fields && self.operation != Operation::Provision {
            return Err(invalid!(
                "count, min_count and on_partial belong on a provision request; this is a {} (a teardown of a fleet names the fleet's request id)",
                self.operation
            ));
        }
        let count = self.count.unwrap_or(1);
        if count == 0 || count > MAX_FLEET_SIZE {
            return Err(invalid!(
                "count {count}: a request makes 1 to {MAX_FLEET_SIZE} resources"
            ));
        }
        if let Some(min) = self.min_count
            && (min == 0 || min > count)
        {
            return Err(invalid!(
                "min_count {min} must be between 1 and count ({count})"
            ));
        }
        match &self.fleet_member {
            Some(member) => {
                if fleet_fields {
                    return Err("a fleet member is one resource: it takes no count, min_count or on_partial".into());
                }
                if member.count < 2 || member.count > MAX_FLEET_SIZE || member.index >= member.count
                {
                    return Err(invalid!(
                        "fleet_member index {} of {}: a fleet has 2 to {MAX_FLEET_SIZE} members, numbered from 0",
                        member.index,
                        member.count
                    ));
                }
                if member.fleet_request_id.is_member() {
                    return Err(
                        "a fleet member's fleet_request_id names a fleet, not a member".into(),
                    );
                }
                let expected = member.fleet_request_id.member(member.index);
                if self.request_id != expected {
                    return Err(invalid!(
                        "a fleet member's request_id is <fleet_request_id>#<index>, here {expected}, not {}",
                        self.request_id
                    ));
                }
            }
            None if self.operation == Operation::Provision && self.request_id.is_member() => {
                return Err(invalid!(
                    "request_id {}: '#' is kept for the members of fleets; choose an id without it",
                    self.request_id
                ));
            }
            None => {}
        }
        Ok(())
    }

    /// Whether this is a fleet's provision (more than one resource); a dry run checks
    /// one member's and is not.
    pub fn is_fleet(&self) -> bool {
        self.operation == Operation::Provision && !self.dry_run && self.count.unwrap_or(1) > 1
    }

    /// The fewest running members that make this fleet a success.
    pub fn fleet_min_count(&self) -> u32 {
        let count = self.count.unwrap_or(1);
        self.min_count.unwrap_or(count).min(count)
    }

    /// When the resource of this provision expires, given when it became running.
    pub fn expiry(&self, running_at: OffsetDateTime) -> Option<OffsetDateTime> {
        match (self.ttl_seconds, self.expires_at) {
            (Some(ttl), _) => Some(running_at + std::time::Duration::from_secs(ttl)),
            (None, at) => at,
        }
    }

    /// This provision request's spec, read as platform `S`'s and checked.
    pub fn spec_as<S: crate::spec::PlatformSpec>(&self) -> Result<S, Invalid> {
        let spec = self
            .spec
            .as_ref()
            .ok_or("a provision request needs a spec")?;
        crate::spec::read_spec(spec)
    }

    /// What a teardown-like request acts on: exactly one of `target_request_id` and
    /// `resource_id`.
    pub fn target(&self) -> Result<TeardownTarget, Invalid> {
        match (&self.target_request_id, &self.resource_id) {
            (Some(id), None) => Ok(TeardownTarget::Request(id.clone())),
            (None, Some(id)) => Ok(TeardownTarget::Resource(id.clone())),
            (None, None) => Err(invalid!(
                "a {} request needs \"target_request_id\" (the provision request's id) or \"resource_id\"",
                self.operation
            )),
            (Some(_), Some(_)) => Err(invalid!(
                "a {} request names either \"target_request_id\" or \"resource_id\", not both",
                self.operation
            )),
        }
    }

    /// SHA-256 over the canonical JSON of the request as this version understands it
    /// (keys sorted, unknown fields dropped). Two deliveries with the same request id and
    /// different hashes are a conflict.
    pub fn payload_hash(&self) -> String {
        let value = serde_json::to_value(self).expect("a Request always serializes");
        let mut canonical = Vec::new();
        write_canonical(&value, &mut canonical);
        let digest = Sha256::digest(&canonical);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn routing_key(&self) -> String {
        crate::request_routing_key(self.platform, self.operation)
    }
}

/// Serializes JSON with object keys in sorted order, whatever map type serde_json uses.
fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(
                    serde_json::Value::String(key.clone())
                        .to_string()
                        .as_bytes(),
                );
                out.push(b':');
                write_canonical(&map[key], out);
            }
            out.push(b'}');
        }
        serde_json::Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// The largest request body accepted (the size of an SQS message, too).
pub const MAX_BODY_BYTES: usize = 256 * 1024;
/// Bounds on the shape of any request's JSON, whatever its platform reads from it.
const MAX_DEPTH: usize = 16;
const MAX_STRING_BYTES: usize = 64 * 1024;
const MAX_ITEMS: usize = 1024;

/// Checks that no value of the request is deeper, longer or larger than any platform
/// needs, so nothing downstream works on hostile sizes. `path` names where, for the error.
fn check_shape(value: &serde_json::Value, path: &mut String, depth: usize) -> Result<(), Invalid> {
    use serde_json::Value;
    if depth > MAX_DEPTH {
        return Err(invalid!("{path} is nested deeper than {MAX_DEPTH} levels"));
    }
    let child = |path: &mut String, name: &str, value: &Value| {
        let len = path.len();
        path.push_str(name);
        let result = check_shape(value, path, depth + 1);
        path.truncate(len);
        result
    };
    match value {
        Value::String(text) if text.len() > MAX_STRING_BYTES => Err(invalid!(
            "{path} is a string of {} bytes; the limit is {MAX_STRING_BYTES}",
            text.len()
        )),
        Value::Array(items) => {
            if items.len() > MAX_ITEMS {
                return Err(invalid!(
                    "{path} has {} items; the limit is {MAX_ITEMS}",
                    items.len()
                ));
            }
            items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| child(path, &format!("[{i}]"), item))
        }
        Value::Object(map) => {
            if map.len() > MAX_ITEMS {
                return Err(invalid!(
                    "{path} has {} keys; the limit is {MAX_ITEMS}",
                    map.len()
                ));
            }
            map.iter().try_for_each(|(key, item)| {
                if key.len() > 256 {
                    return Err(invalid!(
                        "{path} has a key of {} bytes; the limit is 256",
                        key.len()
                    ));
                }
                child(path, &format!(".{key}"), item)
            })
        }
        _ => Ok(()),
    }
}

/// Why a message could not be accepted as a request. It keeps whatever could still be read
/// (the request id, the platform, the operation) so the rejection can be reported on the
/// status topic under the producer's own id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DecodeError {
    pub message: String,
    /// The `request_id` as it appeared, when it was a string.
    pub request_id: Option<String>,
    /// The `platform` as it appeared, when it was a string.
    pub platform: Option<String>,
    /// The `operation`, when it was a known one.
    pub operation: Option<Operation>,
}

/// Reads and validates one message body. Malformed JSON, missing or unknown fields' values,
/// bad ids and unsupported versions all give a [`DecodeError`] a person can act on.
pub fn decode_request(body: &[u8]) -> Result<Request, DecodeError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(DecodeError {
            message: format!(
                "the message is {} bytes; a request is at most {MAX_BODY_BYTES}",
                body.len()
            ),
            request_id: None,
            platform: None,
            operation: None,
        });
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| DecodeError {
        message: format!("the message is not valid JSON: {e}"),
        request_id: None,
        platform: None,
        operation: None,
    })?;
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
    let readable = |message: String| DecodeError {
        message,
        request_id: field("request_id"),
        platform: field("platform"),
        operation: value
            .get("operation")
            .and_then(|v| serde_json::from_value(v.clone()).ok()),
    };
    if !value.is_object() {
        return Err(readable("a request is a JSON object".into()));
    }
    check_shape(&value, &mut String::from("request"), 0).map_err(|e| readable(e.0))?;
    if let Some(platform) = field("platform")
        && PlatformName::parse(&platform).is_none()
    {
        let known: Vec<&str> = PlatformName::ALL.iter().map(|p| p.as_str()).collect();
        return Err(readable(format!(
            "unknown platform {platform:?}; known platforms: {}",
            known.join(", ")
        )));
    }
    let request: Request = serde_json::from_value(value.clone()).map_err(|e| {
        readable(format!(
            "invalid request: {}",
            crate::invalid::without_values(&e.to_string())
        ))
    })?;
    request.validate().map_err(|e| readable(e.0))?;
    Ok(request)
}
