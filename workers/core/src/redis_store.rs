//! The state store on Redis. Each request is one hash, `<prefix>req:<request_id>`, and
//! every transition is one Lua script, so claims, renewals and fenced writes are atomic.
//! Lease times come from the Redis server's clock (`TIME`), never from the workers', so
//! clock skew between worker hosts cannot shorten or stretch a lease.
//!
//! Fields: `hash` (payload), `owner`, `lease_until` (ms), `fence`, `seq`, `state`,
//! `result` (the terminal event's JSON), `updated_ms`. Finished records expire after the
//! retention period; until then a request id cannot be reused.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use provisioner_events::{State, StatusEvent};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::store::{Claim, ClaimRequest, RequestRecord, StateStore, StoreError};

const NOW_MS: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// KEYS[1] record; ARGV payload_hash, owner, lease_ms, working_state.
/// Returns {'claimed', fence, seq, takeover} | {'done', result} | {'held', remaining_ms, owner} | {'conflict'}.
const CLAIM: &str = r#"
local rec = redis.call('HMGET', KEYS[1], 'hash', 'result', 'owner', 'lease_until', 'seq')
local existed = rec[1] ~= false
if existed then
  if rec[1] ~= ARGV[1] then return {'conflict'} end
  if rec[2] then return {'done', rec[2]} end
  local lease_until = tonumber(rec[4]) or 0
  if lease_until > now then return {'held', tostring(lease_until - now), rec[3] or ''} end
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'owner', ARGV[2],
  'lease_until', tostring(now + tonumber(ARGV[3])), 'state', ARGV[4], 'updated_ms', tostring(now))
redis.call('PERSIST', KEYS[1])
return {'claimed', tostring(fence), rec[5] or '0', existed and '1' or '0'}
"#;

/// Fenced scripts answer -1 when fenced off and -2 when the record is gone.
/// KEYS[1]; ARGV fence, lease_ms. Returns 1.
const RENEW: &str = r#"
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return -2 end
if fence ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'lease_until', tostring(now + tonumber(ARGV[2])))
return 1
"#;

/// KEYS[1]; ARGV fence. Returns the next seq.
const NEXT_SEQ: &str = r#"
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return -2 end
if fence ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'updated_ms', tostring(now))
return redis.call('HINCRBY', KEYS[1], 'seq', 1)
"#;

/// KEYS[1]; ARGV fence, state, result_json, retention_ms. Returns 1.
const COMPLETE: &str = r#"
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return -2 end
if fence ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'result', ARGV[3], 'lease_until', '0', 'owner', '',
  'updated_ms', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// KEYS[1]; ARGV fence. Returns 1.
const RELEASE: &str = r#"
local fence = redis.call('HGET', KEYS[1], 'fence')
if not fence then return -2 end
if fence ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'lease_until', '0', 'updated_ms', tostring(now))
return 1
"#;

/// KEYS[1]; ARGV state. Only a finished record changes.
const MARK: &str = r#"
if redis.call('HEXISTS', KEYS[1], 'result') == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_ms', tostring(now))
return 1
"#;

struct Scripts {
    claim: Script,
    renew: Script,
    next_seq: Script,
    complete: Script,
    release: Script,
    mark: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{NOW_MS}{body}"));
        Scripts {
            claim: script(CLAIM),
            renew: script(RENEW),
            next_seq: script(NEXT_SEQ),
            complete: script(COMPLETE),
            release: script(RELEASE),
            mark: script(MARK),
        }
    }
}

/// The Redis [`StateStore`].
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    retention: Duration,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

fn classify(error: redis::RedisError) -> StoreError {
    if error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || matches!(
            error.kind(),
            redis::ErrorKind::Server(
                redis::ServerErrorKind::BusyLoading
                    | redis::ServerErrorKind::TryAgain
                    | redis::ServerErrorKind::MasterDown
            )
        )
        || error.code() == Some("BUSY")
    {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Corrupt(error.to_string())
    }
}

/// Default retention of finished records: a week, long enough for any redelivery.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl RedisStore {
    /// Connects (with retries) to `url`. Keys start with `prefix` (e.g. `provisioner:`).
    pub async fn connect(url: &str, prefix: &str, retention: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Corrupt(format!("invalid REDIS_URL {url:?}: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(classify)?;
        Ok(RedisStore {
            connection,
            prefix: prefix.to_owned(),
            retention,
            scripts: Scripts::new(),
        })
    }

    fn key(&self, request_id: &str) -> String {
        format!("{}req:{request_id}", self.prefix)
    }

    async fn fenced(
        &self,
        script: &Script,
        request_id: &str,
        fence: u64,
        args: &[String],
    ) -> Result<i64, StoreError> {
        let mut connection = self.connection.clone();
        let mut invocation = script.key(self.key(request_id));
        invocation.arg(fence.to_string());
        for arg in args {
            invocation.arg(arg);
        }
        let answer: i64 = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        match answer {
            -2 => return Err(StoreError::Missing(request_id.to_owned())),
            answer if answer <= 0 => return Err(StoreError::Fenced(fence)),
            _ => {}
        }
        Ok(answer)
    }
}

fn parse_u64(value: Option<&String>, what: &str) -> Result<u64, StoreError> {
    value
        .ok_or_else(|| StoreError::Corrupt(format!("claim answer lacks {what}")))?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("claim answer {what}: {e}")))
}

#[async_trait]
impl StateStore for RedisStore {
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let mut connection = self.connection.clone();
        let answer: Vec<String> = self
            .scripts
            .claim
            .key(self.key(claim.request_id))
            .arg(claim.payload_hash)
            .arg(claim.owner)
            .arg(claim.lease.as_millis() as u64)
            .arg(claim.working_state.as_str())
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        match answer.first().map(String::as_str) {
            Some("claimed") => Ok(Claim::Claimed {
                fence: parse_u64(answer.get(1), "fence")?,
                seq: parse_u64(answer.get(2), "seq")?,
                takeover: answer.get(3).map(String::as_str) == Some("1"),
            }),
            Some("done") => {
                let json = answer.get(1).map(String::as_str).unwrap_or_default();
                let event: StatusEvent = serde_json::from_str(json).map_err(|e| {
                    StoreError::Corrupt(format!("stored result is not a status event: {e}"))
                })?;
                Ok(Claim::Done(Box::new(event)))
            }
            Some("held") => Ok(Claim::Held {
                remaining: Duration::from_millis(parse_u64(answer.get(1), "remaining")?),
                owner: answer.get(2).cloned().unwrap_or_default(),
            }),
            Some("conflict") => Ok(Claim::Conflict),
            other => Err(StoreError::Corrupt(format!(
                "unexpected claim answer {other:?}"
            ))),
        }
    }

    async fn renew(&self, request_id: &str, fence: u64, lease: Duration) -> Result<(), StoreError> {
        self.fenced(
            &self.scripts.renew,
            request_id,
            fence,
            &[(lease.as_millis() as u64).to_string()],
        )
        .await
        .map(drop)
    }

    async fn next_seq(&self, request_id: &str, fence: u64) -> Result<u64, StoreError> {
        self.fenced(&self.scripts.next_seq, request_id, fence, &[])
            .await
            .map(|seq| seq as u64)
    }

    async fn complete(
        &self,
        request_id: &str,
        fence: u64,
        event: &StatusEvent,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let args = [
            event.state.as_str().to_owned(),
            json,
            (self.retention.as_millis() as u64).to_string(),
        ];
        self.fenced(&self.scripts.complete, request_id, fence, &args)
            .await
            .map(drop)
    }

    async fn release(&self, request_id: &str, fence: u64) -> Result<(), StoreError> {
        self.fenced(&self.scripts.release, request_id, fence, &[])
            .await
            .map(drop)
    }

    async fn mark_resource_state(&self, request_id: &str, state: State) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .scripts
            .mark
            .key(self.key(request_id))
            .arg(state.as_str())
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let mut connection = self.connection.clone();
        let fields: HashMap<String, String> = connection
            .hgetall(self.key(request_id))
            .await
            .map_err(classify)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let time: (u64, u64) = redis::cmd("TIME")
            .query_async(&mut connection)
            .await
            .map_err(classify)?;
        let now_ms = time.0 * 1000 + time.1 / 1000;
        let number = |name: &str| {
            fields
                .get(name)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let state = fields
            .get("state")
            .and_then(|s| {
                serde_json::from_value::<State>(serde_json::Value::String(s.clone())).ok()
            })
            .ok_or_else(|| {
                StoreError::Corrupt(format!("record of {request_id} has no valid state"))
            })?;
        let result =
            match fields.get("result") {
                Some(json) => Some(serde_json::from_str(json).map_err(|e| {
                    StoreError::Corrupt(format!("stored result of {request_id}: {e}"))
                })?),
                None => None,
            };
        let lease_until = number("lease_until");
        Ok(Some(RequestRecord {
            state,
            owner: fields.get("owner").filter(|o| !o.is_empty()).cloned(),
            fence: number("fence"),
            seq: number("seq"),
            lease_remaining: (lease_until > now_ms)
                .then(|| Duration::from_millis(lease_until - now_ms)),
            result,
        }))
    }
}
