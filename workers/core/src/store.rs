//! The state store: one idempotency record per request id, with a lease and a fencing
//! token, so a duplicate never runs twice, a crashed worker's request is taken over, and a
//! worker that lost its lease cannot overwrite the new holder's work.
//!
//! [`StateStore`] is implemented by [`MemoryStore`] (embedded mode, unit tests) and by
//! `redis_store::RedisStore`; both pass the same conformance tests (`tests/store.rs`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use provisioner_events::{State, StatusEvent};
use tokio::time::Instant;

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker now holds the request with this fencing token. `seq` is the last status
    /// sequence number used so far (0 for a new request); `takeover` is true when an
    /// earlier holder's lease had expired or been released.
    Claimed {
        fence: u64,
        seq: u64,
        takeover: bool,
    },
    /// The request finished before: here is its terminal event, to publish again.
    Done(Box<StatusEvent>),
    /// Another worker holds a live lease for this long still.
    Held { remaining: Duration, owner: String },
    /// The request id was used before with a different payload.
    Conflict,
}

/// What the store knows of a request, for `provisioner status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub state: State,
    pub owner: Option<String>,
    pub fence: u64,
    pub seq: u64,
    /// Time left on the current holder's lease, if it is live.
    pub lease_remaining: Option<Duration>,
    pub result: Option<StatusEvent>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A newer holder took the request over: this worker's write was refused.
    #[error("fenced off: the request was taken over by another worker (token {0} is stale)")]
    Fenced(u64),
    /// The request's record is gone (a store that lost data); the request must be
    /// claimed again.
    #[error("the record of request {0} is gone from the state store")]
    Missing(String),
    /// The store could not be reached or answered late; worth retrying.
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    /// The store answered something this version does not understand.
    #[error("state store error: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// Parameters of a claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub request_id: &'a str,
    pub payload_hash: &'a str,
    pub owner: &'a str,
    pub lease: Duration,
    /// The state recorded while the request is worked on (`starting`, `stopping`).
    pub working_state: State,
}

#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Atomically: create the record, or report it done / held / conflicting, or take it
    /// over (new fencing token) when the holder's lease has expired.
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError>;

    /// Extends the lease of the holder of `fence`.
    async fn renew(&self, request_id: &str, fence: u64, lease: Duration) -> Result<(), StoreError>;

    /// The next status sequence number, for the holder of `fence` only.
    async fn next_seq(&self, request_id: &str, fence: u64) -> Result<u64, StoreError>;

    /// Records the terminal event and ends the lease, for the holder of `fence` only.
    async fn complete(
        &self,
        request_id: &str,
        fence: u64,
        event: &StatusEvent,
    ) -> Result<(), StoreError>;

    /// Ends the lease early so a scheduled retry can claim at once.
    async fn release(&self, request_id: &str, fence: u64) -> Result<(), StoreError>;

    /// Records the state of a finished request's resource after another request acted on
    /// it (a teardown, stop or start naming it); the request's own result stays as it was.
    async fn mark_resource_state(&self, request_id: &str, state: State) -> Result<(), StoreError>;

    async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError>;
}

#[derive(Debug, Clone)]
struct MemoryRecord {
    payload_hash: String,
    owner: String,
    lease_until: Instant,
    fence: u64,
    seq: u64,
    state: State,
    result: Option<StatusEvent>,
}

/// The state store of the embedded mode and of unit tests: the same semantics as Redis,
/// on a mutex.
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<HashMap<String, MemoryRecord>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_record<T>(
        &self,
        request_id: &str,
        fence: u64,
        f: impl FnOnce(&mut MemoryRecord) -> T,
    ) -> Result<T, StoreError> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        match records.get_mut(request_id) {
            Some(record) if record.fence == fence => Ok(f(record)),
            Some(_) => Err(StoreError::Fenced(fence)),
            None => Err(StoreError::Missing(request_id.to_owned())),
        }
    }
}

#[async_trait]
impl StateStore for MemoryStore {
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        let existing = records.get(claim.request_id).cloned();
        if let Some(record) = &existing {
            if record.payload_hash != claim.payload_hash {
                return Ok(Claim::Conflict);
            }
            if let Some(result) = &record.result {
                return Ok(Claim::Done(Box::new(result.clone())));
            }
            if record.lease_until > now {
                return Ok(Claim::Held {
                    remaining: record.lease_until - now,
                    owner: record.owner.clone(),
                });
            }
        }
        let (fence, seq) = existing.as_ref().map_or((1, 0), |r| (r.fence + 1, r.seq));
        records.insert(
            claim.request_id.to_owned(),
            MemoryRecord {
                payload_hash: claim.payload_hash.to_owned(),
                owner: claim.owner.to_owned(),
                lease_until: now + claim.lease,
                fence,
                seq,
                state: claim.working_state,
                result: None,
            },
        );
        Ok(Claim::Claimed {
            fence,
            seq,
            takeover: existing.is_some(),
        })
    }

    async fn renew(&self, request_id: &str, fence: u64, lease: Duration) -> Result<(), StoreError> {
        self.with_record(request_id, fence, |r| {
            r.lease_until = Instant::now() + lease
        })
    }

    async fn next_seq(&self, request_id: &str, fence: u64) -> Result<u64, StoreError> {
        self.with_record(request_id, fence, |r| {
            r.seq += 1;
            r.seq
        })
    }

    async fn complete(
        &self,
        request_id: &str,
        fence: u64,
        event: &StatusEvent,
    ) -> Result<(), StoreError> {
        self.with_record(request_id, fence, |r| {
            r.state = event.state;
            r.result = Some(event.clone());
            r.lease_until = Instant::now();
            r.owner.clear();
        })
    }

    async fn release(&self, request_id: &str, fence: u64) -> Result<(), StoreError> {
        self.with_record(request_id, fence, |r| r.lease_until = Instant::now())
    }

    async fn mark_resource_state(&self, request_id: &str, state: State) -> Result<(), StoreError> {
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(record) = records.get_mut(request_id)
            && record.result.is_some()
        {
            record.state = state;
        }
        Ok(())
    }

    async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let now = Instant::now();
        let records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        Ok(records.get(request_id).map(|r| RequestRecord {
            state: r.state,
            owner: (!r.owner.is_empty()).then(|| r.owner.clone()),
            fence: r.fence,
            seq: r.seq,
            lease_remaining: (r.lease_until > now).then(|| r.lease_until - now),
            result: r.result.clone(),
        }))
    }
}
