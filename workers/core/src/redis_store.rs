//! The state store on Redis. Each request is one hash, `<prefix><platform>:req:<request_id>`,
//! and every transition is one Lua script, so claims, renewals and fenced writes are atomic.
//! Lease times come from the Redis server's clock (`TIME`), never from the workers', so
//! clock skew between worker hosts cannot shorten or stretch a lease.
//!
//! Fields: `hash` (payload; absent while only a tombstone exists), `owner`, `nonce`,
//! `lease_until` (ms), `fence`, `seq`, `attempts`, `state`, `route` (the routing key it
//! was claimed under), `result` (the terminal event's JSON), `tombstone` (the teardown
//! that removes its resource; `tombstone_also`, comma-separated, the other teardowns
//! that tombstoned it meanwhile, each keeping it in place should the holder fail and lift
//! its part), `actor`, `actor_nonce`, `actor_until` (the request acting
//! on its resource), `acts_on` (a teardown's: the request whose resource it removes),
//! `handed` (released in good order, until the next claim), `updated_ms`. Finished records and tombstones expire after the
//! retention period; records in progress never expire and are indexed by lease end in
//! the sorted set `<prefix><platform>:inflight`, so abandoned ones can be found.
//!
//! Key layout (version 2). Everything a platform's workers keep lives under
//! `<prefix><platform>:` — records, fleets, schedules (`expiries:<name>`), API buckets,
//! turns, each request's quota reservation — so a Redis user limited to that pattern
//! (`provisioner redis-users`) works, and holding it reaches no other platform's work.
//! Request ids are therefore one platform's. Only the tenants' ledger is shared:
//! `<prefix>quota:<tenant>` (limits, written by the operator, read by workers),
//! `<prefix>quota-holders:<tenant>` (the set of `<platform>:<request id>` holding a
//! machine) and `<prefix>quota-used:<tenant>` (the other units). Version 1 kept
//! everything under `<prefix>` directly; `provisioner migrate-store` moves it.
//!
//! The guarantees assume a Redis that keeps what it acknowledged: append-only with
//! `appendfsync everysec` (at most a second of writes lost in a crash). A lost record is
//! survived — the nonce in every fence refuses a zombie's writes — but a request whose
//! record was lost after it finished may run again if its message is redelivered.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use provisioner_events::{PlatformName, State, StatusEvent};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::ratelimit::{RateLimit, TokenGrant};
use crate::store::{
    Actor, Claim, ClaimRequest, DEFAULT_TENANT, Fence, MACHINES, QuotaCost, QuotaGrant, QuotaUsage,
    Reaped, Release, Renewal, RequestRecord, StateStore, StoreError, TargetGrant, UnitUsage,
};

pub use crate::store::DEFAULT_RETENTION;

const NOW_MS: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

/// The holder check of every fenced script: ARGV[1] fence, ARGV[2] nonce. Answers
/// {-2} when the record is gone and {-1} when another holds it.
const HOLDER: &str = r#"
local holder = redis.call('HMGET', KEYS[1], 'fence', 'nonce')
if not holder[1] then return {-2} end
if holder[1] ~= ARGV[1] or holder[2] ~= ARGV[2] then return {-1} end
"#;

/// KEYS record, index; ARGV hash, owner, nonce, lease_ms, working_state, route, id.
/// Returns {'claimed', fence, seq, attempts, takeover, tombstone, handed_over} |
/// {'done', result} | {'held', remaining_ms, owner} | {'conflict'}.
const CLAIM: &str = r#"
local rec = redis.call('HMGET', KEYS[1], 'hash', 'result', 'owner', 'lease_until', 'tombstone',
  'actor', 'actor_until', 'handed', 'nonce')
local existed = rec[1] ~= false and rec[1] ~= ''
if existed then
  if rec[1] ~= ARGV[1] then return {'conflict'} end
  if rec[2] then return {'done', rec[2]} end
  if rec[9] == ARGV[3] then
    local again = redis.call('HMGET', KEYS[1], 'fence', 'seq', 'attempts')
    local lease_until = now + tonumber(ARGV[4])
    redis.call('HSET', KEYS[1], 'lease_until', tostring(lease_until))
    redis.call('ZADD', KEYS[2], lease_until, ARGV[7])
    local takeover = (tonumber(again[1]) or 0) > 1
    return {'claimed', again[1], again[2], again[3], takeover and '1' or '0', rec[5] or '', '0'}
  end
  local lease_until = tonumber(rec[4]) or 0
  if lease_until > now then return {'held', tostring(lease_until - now), rec[3] or ''} end
end
if not rec[5] and rec[6] and rec[6] ~= '' then
  local actor_until = tonumber(rec[7]) or 0
  if actor_until > now then return {'held', tostring(actor_until - now), rec[6]} end
end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local lease_until = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'owner', ARGV[2], 'nonce', ARGV[3],
  'lease_until', tostring(lease_until), 'state', ARGV[5], 'route', ARGV[6], 'updated_ms', tostring(now))
redis.call('PERSIST', KEYS[1])
redis.call('ZADD', KEYS[2], lease_until, ARGV[7])
if rec[8] then redis.call('HDEL', KEYS[1], 'handed') end
return {'claimed', tostring(fence), tostring(seq), tostring(attempts), existed and '1' or '0', rec[5] or '',
  rec[8] and '1' or '0'}
"#;

/// KEYS record, index; ARGV fence, nonce, lease_ms, id. Returns {1} | {3, tombstone}.
const RENEW: &str = r#"
local lease_until = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], 'lease_until', tostring(lease_until))
local rec = redis.call('HMGET', KEYS[1], 'tombstone', 'result')
if not rec[2] then redis.call('ZADD', KEYS[2], lease_until, ARGV[4]) end
if rec[1] and not rec[2] then return {3, rec[1]} end
return {1}
"#;

/// KEYS record; ARGV fence, nonce. Returns {1, seq}: the seq reserved.
const NEXT_SEQ: &str = r#"
return {1, tostring(redis.call('HINCRBY', KEYS[1], 'seq', 1))}
"#;

/// Refills an API token bucket (KEYS[1]) up to now at its rate: sets `tokens`, `rate`.
/// ARGV[1] capacity, ARGV[2] the default (highest) rate.
const REFILL: &str = r#"
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'rate')
local capacity = tonumber(ARGV[1])
local max_rate = tonumber(ARGV[2])
local rate = tonumber(bucket[3]) or max_rate
if rate > max_rate then rate = max_rate end
local tokens = tonumber(bucket[1]) or capacity
local ts = tonumber(bucket[2]) or now
if now > ts then tokens = tokens + (now - ts) * rate / 1000 end
if tokens > capacity then tokens = capacity end
"#;

/// KEYS bucket; ARGV capacity, max rate, cost, max_wait_ms. Returns {0, 0} now,
/// {1, wait_ms} reserved, {-1, wait_ms} not reserved.
const TAKE_TOKENS: &str = r#"
local after = tokens - tonumber(ARGV[3])
local grant = 0
local wait = 0
if after < 0 then
  wait = math.ceil(-after * 1000 / rate)
  if wait > tonumber(ARGV[4]) then
    grant = -1
    after = tokens
  else
    grant = 1
  end
end
redis.call('HSET', KEYS[1], 'tokens', tostring(after), 'ts', tostring(now), 'rate', tostring(rate))
redis.call('PEXPIRE', KEYS[1], 86400000)
return {grant, tostring(wait)}
"#;

/// KEYS bucket; ARGV capacity, max rate, floor, throttled ('1' or '0'). Returns {1}.
const ADAPT_RATE: &str = r#"
if ARGV[4] == '1' then
  rate = math.max(tonumber(ARGV[3]), rate / 2)
  if tokens > 0 then tokens = 0 end
else
  if rate >= max_rate then return {1} end
  rate = math.min(max_rate, rate + max_rate / 20)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now), 'rate', tostring(rate))
redis.call('PEXPIRE', KEYS[1], 86400000)
return {1}
"#;

/// KEYS record, index, the platform's ends outbox; ARGV fence, nonce, state, result_json,
/// seq, retention_ms, id, grace_ms. Returns {1} | {-3, tombstone}.
const COMPLETE: &str = r#"
if redis.call('HGET', KEYS[1], 'result') == ARGV[4] then return {1} end
local tombstone = redis.call('HGET', KEYS[1], 'tombstone')
local route = redis.call('HGET', KEYS[1], 'route') or ''
if tombstone and ARGV[3] ~= 'error' and string.sub(route, -10) == '.provision' then
  return {-3, tombstone}
end
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0
if tonumber(ARGV[5]) > seq then seq = tonumber(ARGV[5]) end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'result', ARGV[4], 'lease_until', '0', 'owner', '',
  'seq', tostring(seq), 'updated_ms', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZREM', KEYS[2], ARGV[7])
redis.call('ZADD', KEYS[3], tostring(now + tonumber(ARGV[8])), ARGV[7])
return {1}
"#;

/// KEYS record, index; ARGV fence, nonce, how (`failed` | `failed-unsent` | `untried` |
/// `handed`), id. Returns {1}.
const RELEASE: &str = r#"
redis.call('HSET', KEYS[1], 'lease_until', tostring(now), 'updated_ms', tostring(now))
redis.call('ZADD', KEYS[2], now, ARGV[4])
local refund = ARGV[3] == 'untried' or ARGV[3] == 'handed'
if refund and (tonumber(redis.call('HGET', KEYS[1], 'attempts')) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)
end
if (ARGV[3] == 'untried' or ARGV[3] == 'failed-unsent')
    and (tonumber(redis.call('HGET', KEYS[1], 'seq')) or 0) > 0 then
  redis.call('HINCRBY', KEYS[1], 'seq', -1)
end
if refund then
  redis.call('HSET', KEYS[1], 'handed', '1')
else
  redis.call('HDEL', KEYS[1], 'handed')
end
return {1}
"#;

/// KEYS target record, actor's record; ARGV actor, actor_nonce, lease_ms, tombstone,
/// retention_ms, target id. A teardown's own record keeps the target it tombstoned
/// (`acts_on`). Returns {'granted'} | {'busy', remaining_ms, by}.
const ACT_ON: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'state', 'not_started', 'updated_ms', tostring(now))
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
end
local rec = redis.call('HMGET', KEYS[1], 'hash', 'result', 'owner', 'lease_until', 'tombstone',
  'actor', 'actor_until')
if ARGV[4] == '1' then
  if not rec[5] then
    redis.call('HSET', KEYS[1], 'tombstone', ARGV[1])
  elseif rec[5] ~= ARGV[1] then
    -- Another teardown's tombstone: this one joins it, so it stays if that one fails.
    local also = redis.call('HGET', KEYS[1], 'tombstone_also') or ''
    if not string.find(',' .. also .. ',', ',' .. ARGV[1] .. ',', 1, true) then
      redis.call('HSET', KEYS[1], 'tombstone_also', also == '' and ARGV[1] or (also .. ',' .. ARGV[1]))
    end
  end
end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], 'acts_on', ARGV[6])
end
if rec[1] and rec[1] ~= '' and not rec[2] then
  local lease_until = tonumber(rec[4]) or 0
  if lease_until > now then return {'busy', tostring(lease_until - now), rec[3] or ''} end
end
if rec[6] and rec[6] ~= '' and rec[6] ~= ARGV[1] then
  local actor_until = tonumber(rec[7]) or 0
  if actor_until > now then return {'busy', tostring(actor_until - now), rec[6]} end
end
redis.call('HSET', KEYS[1], 'actor', ARGV[1], 'actor_nonce', ARGV[2],
  'actor_until', tostring(now + tonumber(ARGV[3])))
return {'granted'}
"#;

/// KEYS target record; ARGV actor, actor_nonce, lease_ms. Returns 1 | -1.
const RENEW_ACT: &str = r#"
local rec = redis.call('HMGET', KEYS[1], 'actor', 'actor_nonce')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], 'actor_until', tostring(now + tonumber(ARGV[3])))
return 1
"#;

/// KEYS target record; ARGV actor, actor_nonce, resource_state ('' for none). Returns 1 | 0.
const END_ACT: &str = r#"
local rec = redis.call('HMGET', KEYS[1], 'actor', 'actor_nonce')
if rec[1] ~= ARGV[1] or rec[2] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'actor', 'actor_nonce', 'actor_until')
if ARGV[3] ~= '' and redis.call('HEXISTS', KEYS[1], 'result') == 1 then
  redis.call('HSET', KEYS[1], 'state', ARGV[3], 'updated_ms', tostring(now))
end
return 1
"#;

/// KEYS target record; ARGV teardown id. Takes the teardown out of the tombstone: the
/// tombstone goes only when no other teardown joined it (`tombstone_also`); else the
/// next of them holds it. Returns 1 when the teardown was part of it.
const LIFT_TOMBSTONE: &str = r#"
local holder = redis.call('HGET', KEYS[1], 'tombstone')
local also = redis.call('HGET', KEYS[1], 'tombstone_also') or ''
local rest = {}
local joined = false
for id in string.gmatch(also, '[^,]+') do
  if id == ARGV[1] then joined = true else table.insert(rest, id) end
end
if holder == ARGV[1] then
  if #rest > 0 then
    redis.call('HSET', KEYS[1], 'tombstone', table.remove(rest, 1))
  else
    redis.call('HDEL', KEYS[1], 'tombstone')
  end
elseif not joined then
  return 0
end
if #rest > 0 then
  redis.call('HSET', KEYS[1], 'tombstone_also', table.concat(rest, ','))
else
  redis.call('HDEL', KEYS[1], 'tombstone_also')
end
return 1
"#;

/// KEYS index; ARGV idle_ms, platform, limit, the platform's key prefix. Returns request
/// ids. The index is the platform's own; it is still read page by page, oldest first,
/// until `limit` records of the platform's routes are found or 10,000 entries were looked
/// at, so a backlog of entries that are no longer in progress cannot hide the rest.
const STALE: &str = r#"
local cutoff = tostring(now - tonumber(ARGV[1]))
local limit = tonumber(ARGV[3])
local page = math.max(limit * 10, 100)
local found = {}
local offset = 0
local looked = 0
while #found < limit and looked < 10000 do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', offset, page)
  if #ids == 0 then break end
  local kept = 0
  for _, id in ipairs(ids) do
    looked = looked + 1
    local rec = redis.call('HMGET', ARGV[4] .. 'req:' .. id, 'route', 'result')
    local route = rec[1]
    if not route or rec[2] then
      -- Gone, or ended (a late release or renewal of its holder put it back).
      redis.call('ZREM', KEYS[1], id)
    else
      kept = kept + 1
      if string.sub(route, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. '.' then
        table.insert(found, id)
        if #found >= limit then break end
      end
    end
  end
  offset = offset + kept
end
return found
"#;

/// KEYS expiries; ARGV limit, retry_ms. Returns {id, due_ms, id, due_ms, ...}: the due
/// entries, each moved `retry_ms` later so that no other caller takes it meanwhile.
const TAKE_DUE: &str = r#"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tostring(now), 'WITHSCORES',
  'LIMIT', 0, tonumber(ARGV[1]))
for i = 1, #due, 2 do
  redis.call('ZADD', KEYS[1], tostring(now + tonumber(ARGV[2])), due[i])
end
return due
"#;

/// KEYS holders (set: the machines), holder (string: its tenant), the tenant's used
/// units (hash), holder's cost (hash), the request's record; ARGV holder name
/// (`<platform>:<request id>`), tenant, fence, nonce, the limit of machines ('' for
/// none), then unit, amount and limit ('' for none) triples. The limits are read before
/// (they are the operator's, and a worker's Redis user may only read them). Returns
/// {'1'}, {'0', unit, limit, used, wanted}, {'missing'} or {'fenced'}.
const RESERVE_QUOTA: &str = r#"
local holder = redis.call('HMGET', KEYS[5], 'fence', 'nonce')
if not holder[1] then return {'missing'} end
if holder[1] ~= ARGV[3] or holder[2] ~= ARGV[4] then return {'fenced'} end
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return {'1'} end
local used = redis.call('SCARD', KEYS[1])
if ARGV[5] ~= '' and used + 1 > tonumber(ARGV[5]) then
  return {'0', 'machines', ARGV[5], tostring(used), '1'}
end
for i = 6, #ARGV, 3 do
  local unit, wanted, l = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local u = tonumber(redis.call('HGET', KEYS[3], unit) or '0')
  if l ~= '' and u + wanted > tonumber(l) then
    return {'0', unit, l, tostring(u), tostring(wanted)}
  end
end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
for i = 6, #ARGV, 3 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('HSET', KEYS[4], ARGV[i], ARGV[i + 1])
end
return {'1'}
"#;

/// KEYS holder (string), holder's cost (hash); ARGV key prefix, holder name.
const RELEASE_QUOTA: &str = r#"
local tenant = redis.call('GET', KEYS[1])
if not tenant then return 0 end
redis.call('SREM', ARGV[1] .. 'quota-holders:' .. tenant, ARGV[2])
local cost = redis.call('HGETALL', KEYS[2])
for i = 1, #cost, 2 do
  redis.call('HINCRBY', ARGV[1] .. 'quota-used:' .. tenant, cost[i], -tonumber(cost[i + 1]))
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"#;

/// KEYS record, index; ARGV idle_ms, owner, nonce, lease_ms, id.
/// Returns {} | {'reaped', fence, seq, route, attempts}.
const REAP: &str = r#"
local rec = redis.call('HMGET', KEYS[1], 'hash', 'result', 'lease_until', 'route', 'attempts')
if not rec[1] or rec[1] == '' or rec[2] then
  redis.call('ZREM', KEYS[2], ARGV[5])
  return {}
end
if (tonumber(rec[3]) or 0) + tonumber(ARGV[1]) > now then return {} end
local fence = redis.call('HINCRBY', KEYS[1], 'fence', 1)
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local lease_until = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'owner', ARGV[2], 'nonce', ARGV[3], 'lease_until', tostring(lease_until),
  'updated_ms', tostring(now))
redis.call('ZADD', KEYS[2], lease_until, ARGV[5])
return {'reaped', tostring(fence), tostring(seq), rec[4] or '', rec[5] or '0'}
"#;

#[derive(Clone)]
struct Scripts {
    claim: Script,
    renew: Script,
    complete: Script,
    release: Script,
    act_on: Script,
    renew_act: Script,
    end_act: Script,
    lift_tombstone: Script,
    stale: Script,
    reap: Script,
    take_due: Script,
    reserve_quota: Script,
    release_quota: Script,
    next_seq: Script,
    take_tokens: Script,
    adapt_rate: Script,
}

impl Scripts {
    fn new() -> Self {
        let script = |body: &str| Script::new(&format!("{NOW_MS}{body}"));
        let fenced = |body: &str| Script::new(&format!("{NOW_MS}{HOLDER}{body}"));
        Scripts {
            claim: script(CLAIM),
            renew: fenced(RENEW),
            complete: fenced(COMPLETE),
            release: fenced(RELEASE),
            act_on: script(ACT_ON),
            renew_act: script(RENEW_ACT),
            end_act: script(END_ACT),
            lift_tombstone: Script::new(LIFT_TOMBSTONE),
            stale: script(STALE),
            take_due: script(TAKE_DUE),
            reserve_quota: Script::new(RESERVE_QUOTA),
            release_quota: Script::new(RELEASE_QUOTA),
            reap: script(REAP),
            next_seq: fenced(NEXT_SEQ),
            take_tokens: script(&format!("{REFILL}{TAKE_TOKENS}")),
            adapt_rate: script(&format!("{REFILL}{ADAPT_RATE}")),
        }
    }
}

/// The Redis [`StateStore`].
#[derive(Clone)]
pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    /// The platform whose keys this store reaches, and their prefix
    /// (`<prefix><platform>:`); `None` until [`RedisStore::for_platform`].
    platform: Option<String>,
    space: Option<String>,
    retention: Duration,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("platform", &self.platform)
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
                    | redis::ServerErrorKind::ReadOnly
            )
        )
        || error.code() == Some("BUSY")
    {
        StoreError::Unavailable(error.to_string())
    } else {
        StoreError::Corrupt(error.to_string())
    }
}

fn millis(duration: Duration) -> String {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .to_string()
}

/// One reply of a fenced script: a status code and maybe a text.
#[derive(Debug)]
struct Reply(i64, Option<String>);

impl redis::FromRedisValue for Reply {
    fn from_redis_value(value: redis::Value) -> Result<Self, redis::ParsingError> {
        let mut items: Vec<redis::Value> = redis::FromRedisValue::from_redis_value(value)?;
        let text = if items.len() > 1 {
            Some(redis::FromRedisValue::from_redis_value(items.remove(1))?)
        } else {
            None
        };
        let code = match items.into_iter().next() {
            Some(code) => redis::FromRedisValue::from_redis_value(code)?,
            None => return Err("an empty reply".into()),
        };
        Ok(Reply(code, text))
    }
}

impl RedisStore {
    /// Connects (with retries) to `url`. Keys start with `prefix` (e.g. `provisioner:`);
    /// finished records are kept for `retention`.
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
            platform: None,
            space: None,
            retention,
            scripts: Scripts::new(),
        })
    }

    /// The same connection, reaching `platform`'s keys (`<prefix><platform>:…`) and the
    /// shared quota keys. A worker's store is always one platform's: its Redis user may
    /// be limited to that platform's keys (see `provisioner redis-users`), so one
    /// platform's credentials cannot read or plant another's records.
    pub fn for_platform(&self, platform: PlatformName) -> RedisStore {
        let mut scoped = self.clone();
        scoped.platform = Some(platform.as_str().to_owned());
        scoped.space = Some(format!("{}{platform}:", self.prefix));
        scoped
    }

    /// The prefix every key of this deployment starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The key prefix of this store's platform: `<prefix><platform>:`.
    fn space(&self) -> Result<&str, StoreError> {
        self.space.as_deref().ok_or_else(|| {
            StoreError::Corrupt(
                "this store is not scoped to a platform (RedisStore::for_platform); it reaches only the shared quota keys".into(),
            )
        })
    }

    fn key(&self, request_id: &str) -> Result<String, StoreError> {
        Ok(format!("{}req:{request_id}", self.space()?))
    }

    /// A fleet's request, as JSON (sealed by the runtime when signing is on).
    fn fleet_key(&self, request_id: &str) -> Result<String, StoreError> {
        Ok(format!("{}fleet:{request_id}", self.space()?))
    }

    /// An API token bucket: a hash of `tokens`, `ts` (ms) and `rate`.
    fn bucket_key(&self, key: &str) -> Result<String, StoreError> {
        Ok(format!("{}ratelimit:{key}", self.space()?))
    }

    fn handed_on_key(&self, key: &str) -> Result<String, StoreError> {
        Ok(format!("{}handed-on:{key}", self.space()?))
    }

    fn turn_key(&self, key: &str) -> Result<String, StoreError> {
        Ok(format!("{}turn:{key}", self.space()?))
    }

    /// The platform's records in progress, scored by lease end.
    fn index(&self) -> Result<String, StoreError> {
        Ok(format!("{}inflight", self.space()?))
    }

    /// A tenant's quota: a hash with its `limit` (machines) and `limit:<unit>`. Shared by
    /// every platform; only the operator writes it.
    fn quota_key(&self, tenant: &str) -> String {
        format!("{}quota:{tenant}", self.prefix)
    }

    /// The holders (`<platform>:<request id>`) of one of a tenant's machines. Shared.
    fn quota_holders(&self, tenant: &str) -> String {
        format!("{}quota-holders:{tenant}", self.prefix)
    }

    /// What a tenant holds of each unit beyond machines: a hash unit → amount. Shared.
    fn quota_used(&self, tenant: &str) -> String {
        format!("{}quota-used:{tenant}", self.prefix)
    }

    /// A request's name among its tenant's holders: request ids are one platform's.
    fn holder_name(&self, request_id: &str) -> Result<String, StoreError> {
        let platform = self.platform.as_deref().unwrap_or_default();
        self.space()?;
        Ok(format!("{platform}:{request_id}"))
    }

    /// Which tenant a request's reservation counts against.
    fn quota_holder(&self, request_id: &str) -> Result<String, StoreError> {
        Ok(format!("{}quota-holder:{request_id}", self.space()?))
    }

    /// What a request's reservation costs, unit by unit.
    fn quota_holder_cost(&self, request_id: &str) -> Result<String, StoreError> {
        Ok(format!("{}quota-holder-cost:{request_id}", self.space()?))
    }

    /// The sorted set of a schedule (expiries, fleets to coordinate, ends to publish),
    /// scored by when each entry is due (ms since the Unix epoch).
    fn expiries(&self, schedule: &str) -> Result<String, StoreError> {
        Ok(format!("{}expiries:{schedule}", self.space()?))
    }

    /// Refuses to run on a store that still holds work in the layout of version 1 (keys
    /// directly under the prefix): this platform's workers would not see it, and a
    /// request in progress, an expiry or a fleet there would be forgotten. A Redis user
    /// limited to the platform's keys cannot look (`NOPERM`): such a user is made for
    /// version 2, after the migration.
    pub async fn check_layout(&self) -> Result<(), StoreError> {
        let platform = self.platform.as_deref().unwrap_or_default();
        self.space()?;
        let old = [
            format!("{}inflight", self.prefix),
            format!("{}expiries:{platform}", self.prefix),
            format!("{}expiries:{platform}/fleets", self.prefix),
            format!("{}expiries:{platform}/ends", self.prefix),
        ];
        let mut connection = self.connection.clone();
        let mut pipe = redis::pipe();
        for key in &old {
            pipe.exists(key);
        }
        match pipe.query_async::<Vec<bool>>(&mut connection).await {
            Ok(found) => match old.iter().zip(found).find(|(_, there)| *there) {
                Some((key, _)) => Err(StoreError::Corrupt(format!(
                    "the store holds work in the key layout of version 1 ({key}); run `provisioner migrate-store` once, as a Redis user that reaches every key under {:?}, then start the workers",
                    self.prefix
                ))),
                None => Ok(()),
            },
            Err(e) if e.code() == Some("NOPERM") => Ok(()),
            Err(e) => Err(classify(e)),
        }
    }

    /// Moves a store of key layout version 1 (everything directly under the prefix) to
    /// version 2 (each platform's under `<prefix><platform>:`): records, fleets (sealed
    /// with `keys` when the deployment signs), the in-progress index, schedules and
    /// quota reservations. Safe to run again, and on an empty store. Run it with the
    /// workers stopped, as a user that reaches every key under the prefix. API buckets,
    /// turns and the Lambda's hand-on marks are short-lived and left to expire.
    pub async fn migrate_from_v1(
        &self,
        keys: Option<&crate::signing::SigningKeys>,
    ) -> Result<Migration, StoreError> {
        let mut connection = self.connection.clone();
        let prefix = self.prefix.as_str();
        let mut report = Migration::default();
        let space = |platform: &str| format!("{prefix}{platform}:");
        let platform_of_route = |route: &str| {
            let name = route.split('.').next().unwrap_or_default();
            PlatformName::ALL
                .into_iter()
                .find(|p| p.as_str() == name)
                .map(|p| p.as_str().to_owned())
        };
        // Records first: each says its platform by the route it was claimed under; a
        // record made only to carry a tombstone (a teardown that came first) by its
        // teardown's, or the actor's.
        let record_keys = scan(&mut connection, &format!("{prefix}req:*")).await?;
        let mut routes: HashMap<String, Option<String>> = HashMap::new();
        for key in &record_keys {
            let id = &key[prefix.len() + "req:".len()..];
            let route: Option<String> = connection.hget(key, "route").await.map_err(classify)?;
            routes.insert(id.to_owned(), route.as_deref().and_then(platform_of_route));
        }
        let mut platform_of: HashMap<String, String> = HashMap::new();
        for key in &record_keys {
            let id = &key[prefix.len() + "req:".len()..];
            let found = match routes.get(id).cloned().flatten() {
                Some(platform) => Some(platform),
                None => {
                    let (tombstone, actor): (Option<String>, Option<String>) = redis::cmd("HMGET")
                        .arg(key)
                        .arg("tombstone")
                        .arg("actor")
                        .query_async(&mut connection)
                        .await
                        .map_err(classify)?;
                    [tombstone, actor]
                        .into_iter()
                        .flatten()
                        .find_map(|other| routes.get(&other).cloned().flatten())
                }
            };
            let Some(platform) = found else {
                report.left.push(key.clone());
                continue;
            };
            move_key(
                &mut connection,
                key,
                &format!("{}req:{id}", space(&platform)),
                &mut report,
            )
            .await?;
            platform_of.insert(id.to_owned(), platform);
        }
        // An id whose v1 record is gone by now (moved by an earlier, interrupted run): its
        // platform is the one whose space holds its record.
        let platform_of_id = async |connection: &mut ConnectionManager,
                                    id: &str|
               -> Result<Option<String>, StoreError> {
            if let Some(platform) = platform_of.get(id) {
                return Ok(Some(platform.clone()));
            }
            for platform in PlatformName::ALL {
                let there: bool = connection
                    .exists(format!("{}req:{id}", space(platform.as_str())))
                    .await
                    .map_err(classify)?;
                if there {
                    return Ok(Some(platform.as_str().to_owned()));
                }
            }
            Ok(None)
        };
        // Fleets: kept only if each is the request its record ran (same id, platform and
        // payload), so a fleet planted in the old store is not sealed into the new one;
        // sealed at the time it was first kept (its expiry tells), so sealing anew does
        // not make it live longer.
        for key in scan(&mut connection, &format!("{prefix}fleet:*")).await? {
            let id = key[prefix.len() + "fleet:".len()..].to_owned();
            let Some(json): Option<String> = connection.get(&key).await.map_err(classify)? else {
                continue;
            };
            let Some(platform) = platform_of_id(&mut connection, &id).await? else {
                report
                    .left
                    .push(format!("{key} (no record says its platform)"));
                continue;
            };
            let body = crate::signing::unsealed_body(&json);
            let space_of = space(&platform);
            let recorded: Option<String> = connection
                .hget(format!("{space_of}req:{id}"), "hash")
                .await
                .map_err(classify)?;
            let kept = serde_json::from_str::<provisioner_events::Request>(body)
                .ok()
                .filter(|r| {
                    r.request_id.as_str() == id
                        && r.platform.as_str() == platform
                        && r.validate().is_ok()
                        && recorded.as_deref() == Some(r.payload_hash().as_str())
                });
            if kept.is_none() {
                report
                    .left
                    .push(format!("{key} (not the request its record ran)"));
                continue;
            }
            // A fleet kept without an expiry (none should be) has no age to tell: it is
            // sealed now and given the retention, so it still ends.
            let ttl: i64 = connection.pttl(&key).await.map_err(classify)?;
            let (lived, ttl) = match u64::try_from(ttl) {
                Ok(left) => (
                    self.retention.saturating_sub(Duration::from_millis(left)),
                    left,
                ),
                Err(_) => (
                    Duration::ZERO,
                    u64::try_from(self.retention.as_millis()).unwrap_or(u64::MAX),
                ),
            };
            let stored = match keys {
                Some(keys) => keys.seal(
                    &format!("fleet {platform}/{id}"),
                    body,
                    SystemTime::now() - lived,
                ),
                None => body.to_owned(),
            };
            let mut set = redis::cmd("SET");
            set.arg(format!("{space_of}fleet:{id}"))
                .arg(stored)
                .arg("NX");
            set.arg("PX").arg(ttl.max(1));
            let written: Option<String> =
                set.query_async(&mut connection).await.map_err(classify)?;
            if written.is_none() {
                report.left.push(format!("{key} (its new place is taken)"));
                continue;
            }
            connection.del::<_, ()>(&key).await.map_err(classify)?;
            report.moved += 1;
        }
        // The in-progress index, split by platform; an entry leaves the old index only
        // once it is in its platform's.
        let index = format!("{prefix}inflight");
        let entries: Vec<(String, f64)> = connection
            .zrange_withscores(&index, 0, -1)
            .await
            .map_err(classify)?;
        for (id, score) in entries {
            match platform_of_id(&mut connection, &id).await? {
                Some(platform) => {
                    connection
                        .zadd::<_, _, _, ()>(format!("{}inflight", space(&platform)), &id, score)
                        .await
                        .map_err(classify)?;
                    connection
                        .zrem::<_, _, ()>(&index, &id)
                        .await
                        .map_err(classify)?;
                }
                None => report
                    .left
                    .push(format!("{index} entry {id} (no record says its platform)")),
            }
        }
        // Schedules are named after their platform (`<platform>`, `<platform>/fleets`,
        // `<platform>/ends`).
        for key in scan(&mut connection, &format!("{prefix}expiries:*")).await? {
            let name = &key[prefix.len() + "expiries:".len()..];
            let Some(platform) = platform_of_route(name.split('/').next().unwrap_or_default())
            else {
                report.left.push(key.clone());
                continue;
            };
            move_key(
                &mut connection,
                &key,
                &format!("{}expiries:{name}", space(&platform)),
                &mut report,
            )
            .await?;
        }
        // Quota reservations: the holder's keys go to its platform, and the tenant's set
        // names it `<platform>:<id>`.
        for (kind, pattern) in [
            ("quota-holder", "quota-holder:*"),
            ("quota-holder-cost", "quota-holder-cost:*"),
        ] {
            for key in scan(&mut connection, &format!("{prefix}{pattern}")).await? {
                let id = key[prefix.len() + kind.len() + 1..].to_owned();
                match platform_of_id(&mut connection, &id).await? {
                    Some(platform) => {
                        move_key(
                            &mut connection,
                            &key,
                            &format!("{}{kind}:{id}", space(&platform)),
                            &mut report,
                        )
                        .await?
                    }
                    None => report.left.push(key.clone()),
                }
            }
        }
        for key in scan(&mut connection, &format!("{prefix}quota-holders:*")).await? {
            let members: Vec<String> = connection.smembers(&key).await.map_err(classify)?;
            for member in members.into_iter().filter(|m| !m.contains(':')) {
                match platform_of_id(&mut connection, &member).await? {
                    Some(platform) => {
                        connection
                            .sadd::<_, _, ()>(&key, format!("{platform}:{member}"))
                            .await
                            .map_err(classify)?;
                        connection
                            .srem::<_, _, ()>(&key, &member)
                            .await
                            .map_err(classify)?;
                    }
                    None => report.left.push(format!(
                        "{key} member {member} (no record says its platform)"
                    )),
                }
            }
        }
        Ok(report)
    }

    /// Runs a fenced script on the record and its index: ARGV fence, nonce, then `args`.
    async fn fenced(
        &self,
        script: &Script,
        request_id: &str,
        fence: &Fence,
        args: &[String],
    ) -> Result<Reply, StoreError> {
        self.fenced_with(script, request_id, fence, &[], args).await
    }

    /// [`fenced`](Self::fenced), with keys of its own after the record's and the index's.
    async fn fenced_with(
        &self,
        script: &Script,
        request_id: &str,
        fence: &Fence,
        keys: &[String],
        args: &[String],
    ) -> Result<Reply, StoreError> {
        let mut connection = self.connection.clone();
        let mut invocation = script.key(self.key(request_id)?);
        invocation.key(self.index()?);
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(fence.counter.to_string()).arg(&fence.nonce);
        for arg in args {
            invocation.arg(arg);
        }
        let reply: Reply = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        match reply.0 {
            -2 => Err(StoreError::Missing(request_id.to_owned())),
            -1 => Err(StoreError::Fenced(fence.clone())),
            -3 => Err(StoreError::TornDown(reply.1.unwrap_or_default())),
            _ => Ok(reply),
        }
    }
}

/// The Redis users of a least-privilege deployment under `prefix`, as the arguments of
/// `ACL SETUSER` (`provisioner redis-users` prints them for `redis-cli`):
///
/// - `provisioner-worker-<platform>`, one per platform: its platform's keys
///   (`~<prefix><platform>:*`), the tenants' shared ledger of holdings
///   (`quota-holders:*`, `quota-used:*`) and, read only, their limits (`%R~…quota:*`,
///   Redis 7). Holding it reaches no other platform's records, fleets or schedules.
/// - `provisioner-operator`: every key under the prefix (the CLI's `status`, `quota set`,
///   `migrate-store`).
///
/// Commands: everything but `@dangerous` (`KEYS`, `FLUSHALL`, `CONFIG`, `DEBUG`, …),
/// and for the workers not `SCAN` or `RANDOMKEY`, which would name other platforms'
/// keys. No channels. Neither sets a password nor turns a user on: run `ACL SETUSER
/// <user> on >PASSWORD` once; running these lines again changes the rules only, never
/// a password (no `reset`).
pub fn acl_users(prefix: &str) -> Vec<Vec<String>> {
    let rules = |name: String, keys: Vec<String>, extra: &[&str]| {
        let mut args = vec![
            name,
            "resetkeys".into(),
            "resetchannels".into(),
            "-@all".into(),
        ];
        args.extend(keys);
        args.extend(["+@all".into(), "-@dangerous".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let mut users: Vec<Vec<String>> = PlatformName::ALL
        .into_iter()
        .map(|platform| {
            rules(
                format!("provisioner-worker-{platform}"),
                vec![
                    format!("~{prefix}{platform}:*"),
                    format!("~{prefix}quota-holders:*"),
                    format!("~{prefix}quota-used:*"),
                    format!("%R~{prefix}quota:*"),
                ],
                &["-scan", "-randomkey"],
            )
        })
        .collect();
    users.push(rules(
        "provisioner-operator".into(),
        vec![format!("~{prefix}*")],
        &[],
    ));
    users
}

/// What [`RedisStore::migrate_from_v1`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Migration {
    /// Keys moved to their platform's space.
    pub moved: usize,
    /// Keys whose platform nothing tells, left where they are (named for a person to
    /// look at).
    pub left: Vec<String>,
}

/// Every key matching `pattern`, by `SCAN` (never `KEYS`, which blocks the server).
async fn scan(
    connection: &mut ConnectionManager,
    pattern: &str,
) -> Result<Vec<String>, StoreError> {
    let mut cursor: u64 = 0;
    let mut found = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(connection)
            .await
            .map_err(classify)?;
        found.extend(keys);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// Renames `from` to `to` (its expiry kept), unless `to` exists already: then `from`
/// is left, and named in the report.
async fn move_key(
    connection: &mut ConnectionManager,
    from: &str,
    to: &str,
    report: &mut Migration,
) -> Result<(), StoreError> {
    let moved: bool = redis::cmd("RENAMENX")
        .arg(from)
        .arg(to)
        .query_async(connection)
        .await
        .map_err(classify)?;
    if moved {
        report.moved += 1;
    } else {
        report
            .left
            .push(format!("{from} (its new place {to} is taken)"));
    }
    Ok(())
}

fn parse<T: std::str::FromStr>(value: Option<&String>, what: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    value
        .ok_or_else(|| StoreError::Corrupt(format!("store answer lacks {what}")))?
        .parse()
        .map_err(|e| StoreError::Corrupt(format!("store answer {what}: {e}")))
}

/// A record as `HGETALL` gave it (`None` when empty), read at `now_ms` (the store's clock).
fn record_of(
    request_id: &str,
    fields: &HashMap<String, String>,
    now_ms: u64,
) -> Result<Option<RequestRecord>, StoreError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let number = |name: &str| {
        fields
            .get(name)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let state = fields
        .get("state")
        .and_then(|s| parse_state(s))
        .ok_or_else(|| StoreError::Corrupt(format!("record of {request_id} has no valid state")))?;
    let result = match fields.get("result") {
        Some(json) => Some(
            serde_json::from_str(json)
                .map_err(|e| StoreError::Corrupt(format!("stored result of {request_id}: {e}")))?,
        ),
        None => None,
    };
    let lease_until = number("lease_until");
    let actor_until = number("actor_until");
    Ok(Some(RequestRecord {
        state,
        owner: fields.get("owner").filter(|o| !o.is_empty()).cloned(),
        fence: number("fence"),
        seq: number("seq"),
        attempts: u32::try_from(number("attempts")).unwrap_or(u32::MAX),
        payload_hash: fields.get("hash").filter(|h| !h.is_empty()).cloned(),
        lease_remaining: (lease_until > now_ms)
            .then(|| Duration::from_millis(lease_until - now_ms)),
        result,
        torn_down_by: fields.get("tombstone").cloned(),
        actor: fields
            .get("actor")
            .filter(|a| !a.is_empty() && actor_until > now_ms)
            .cloned(),
        acts_on: fields.get("acts_on").cloned(),
    }))
}

fn parse_state(text: &str) -> Option<State> {
    serde_json::from_value(serde_json::Value::String(text.to_owned())).ok()
}

#[async_trait]
impl StateStore for RedisStore {
    async fn claim(&self, claim: ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let mut connection = self.connection.clone();
        let answer: Vec<String> = self
            .scripts
            .claim
            .key(self.key(claim.request_id)?)
            .key(self.index()?)
            .arg(claim.payload_hash)
            .arg(claim.owner)
            .arg(claim.nonce)
            .arg(millis(claim.lease))
            .arg(claim.working_state.as_str())
            .arg(claim.routing_key)
            .arg(claim.request_id)
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        match answer.first().map(String::as_str) {
            Some("claimed") => Ok(Claim::Claimed {
                fence: Fence {
                    counter: parse(answer.get(1), "fence")?,
                    nonce: claim.nonce.to_owned(),
                },
                seq: parse(answer.get(2), "seq")?,
                attempt: parse(answer.get(3), "attempts")?,
                takeover: answer.get(4).map(String::as_str) == Some("1"),
                torn_down_by: answer.get(5).filter(|t| !t.is_empty()).cloned(),
                handed_over: answer.get(6).map(String::as_str) == Some("1"),
            }),
            Some("done") => {
                let json = answer.get(1).map(String::as_str).unwrap_or_default();
                let event: StatusEvent = serde_json::from_str(json).map_err(|e| {
                    StoreError::Corrupt(format!("stored result is not a status event: {e}"))
                })?;
                Ok(Claim::Done(Box::new(event)))
            }
            Some("held") => Ok(Claim::Held {
                remaining: Duration::from_millis(parse(answer.get(1), "remaining")?),
                owner: answer.get(2).cloned().unwrap_or_default(),
            }),
            Some("conflict") => Ok(Claim::Conflict),
            other => Err(StoreError::Corrupt(format!(
                "unexpected claim answer {other:?}"
            ))),
        }
    }

    async fn renew(
        &self,
        request_id: &str,
        fence: &Fence,
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let args = [millis(lease), request_id.to_owned()];
        let reply = self
            .fenced(&self.scripts.renew, request_id, fence, &args)
            .await?;
        Ok(match reply {
            Reply(3, Some(by)) => Renewal::Cancelled { by },
            _ => Renewal::Renewed,
        })
    }

    async fn complete(
        &self,
        request_id: &str,
        fence: &Fence,
        event: &StatusEvent,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(event).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let args = [
            event.state.as_str().to_owned(),
            json,
            event.seq.to_string(),
            millis(self.retention),
            request_id.to_owned(),
            millis(crate::store::ENDS_GRACE),
        ];
        let outbox = self.expiries(&crate::store::ends_outbox(&event.platform))?;
        self.fenced_with(&self.scripts.complete, request_id, fence, &[outbox], &args)
            .await
            .map(drop)
    }

    async fn release(
        &self,
        request_id: &str,
        fence: &Fence,
        release: Release,
    ) -> Result<(), StoreError> {
        let how = match release {
            Release::Failed => "failed",
            Release::FailedUnsent => "failed-unsent",
            Release::Untried => "untried",
            Release::HandedOver => "handed",
        };
        let args = [how.to_owned(), request_id.to_owned()];
        self.fenced(&self.scripts.release, request_id, fence, &args)
            .await
            .map(drop)
    }

    async fn act_on(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
        tombstone: bool,
    ) -> Result<TargetGrant, StoreError> {
        let mut connection = self.connection.clone();
        let answer: Vec<String> = self
            .scripts
            .act_on
            .key(self.key(target)?)
            .key(self.key(actor.request_id)?)
            .arg(actor.request_id)
            .arg(actor.nonce)
            .arg(millis(lease))
            .arg(if tombstone { "1" } else { "0" })
            .arg(millis(self.retention))
            .arg(target)
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        match answer.first().map(String::as_str) {
            Some("granted") => Ok(TargetGrant::Granted),
            Some("busy") => Ok(TargetGrant::Busy {
                remaining: Duration::from_millis(parse(answer.get(1), "remaining")?),
                by: answer.get(2).cloned().unwrap_or_default(),
            }),
            other => Err(StoreError::Corrupt(format!(
                "unexpected act_on answer {other:?}"
            ))),
        }
    }

    async fn renew_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let answer: i64 = self
            .scripts
            .renew_act
            .key(self.key(target)?)
            .arg(actor.request_id)
            .arg(actor.nonce)
            .arg(millis(lease))
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        if answer == 1 {
            Ok(())
        } else {
            Err(StoreError::Fenced(Fence {
                counter: 0,
                nonce: actor.nonce.to_owned(),
            }))
        }
    }

    async fn lift_tombstone(&self, target: &str, teardown: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .scripts
            .lift_tombstone
            .key(self.key(target)?)
            .arg(teardown)
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn end_act(
        &self,
        target: &str,
        actor: Actor<'_>,
        resource_state: Option<State>,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: i64 = self
            .scripts
            .end_act
            .key(self.key(target)?)
            .arg(actor.request_id)
            .arg(actor.nonce)
            .arg(resource_state.map(State::as_str).unwrap_or_default())
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn stale(
        &self,
        platform: &str,
        idle: Duration,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let mut connection = self.connection.clone();
        self.scripts
            .stale
            .key(self.index()?)
            .arg(millis(idle))
            .arg(platform)
            .arg(limit.max(1))
            .arg(self.space()?)
            .invoke_async(&mut connection)
            .await
            .map_err(classify)
    }

    async fn reap(
        &self,
        request_id: &str,
        idle: Duration,
        owner: &str,
        nonce: &str,
        lease: Duration,
    ) -> Result<Option<Reaped>, StoreError> {
        let mut connection = self.connection.clone();
        let answer: Vec<String> = self
            .scripts
            .reap
            .key(self.key(request_id)?)
            .key(self.index()?)
            .arg(millis(idle))
            .arg(owner)
            .arg(nonce)
            .arg(millis(lease))
            .arg(request_id)
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        if answer.first().map(String::as_str) != Some("reaped") {
            return Ok(None);
        }
        Ok(Some(Reaped {
            fence: Fence {
                counter: parse(answer.get(1), "fence")?,
                nonce: nonce.to_owned(),
            },
            seq: parse(answer.get(2), "seq")?,
            routing_key: answer.get(3).cloned().unwrap_or_default(),
            attempts: parse(answer.get(4), "attempts")?,
        }))
    }

    async fn get(&self, request_id: &str) -> Result<Option<RequestRecord>, StoreError> {
        let ids = [request_id.to_owned()];
        Ok(self.get_many(&ids).await?.pop().flatten())
    }

    async fn get_many(
        &self,
        request_ids: &[String],
    ) -> Result<Vec<Option<RequestRecord>>, StoreError> {
        let mut connection = self.connection.clone();
        let mut records = Vec::with_capacity(request_ids.len());
        // One round trip per few hundred records: a fleet's coordinator reads all its
        // members every poll.
        for chunk in request_ids.chunks(256) {
            let mut pipe = redis::pipe();
            pipe.cmd("TIME");
            for id in chunk {
                pipe.hgetall(self.key(id)?);
            }
            let (time, all): ((u64, u64), Vec<HashMap<String, String>>) = {
                let mut replies: Vec<redis::Value> =
                    pipe.query_async(&mut connection).await.map_err(classify)?;
                let time = redis::FromRedisValue::from_redis_value(replies.remove(0))
                    .map_err(|e| StoreError::Corrupt(format!("TIME answer: {e}")))?;
                let all = replies
                    .into_iter()
                    .map(redis::FromRedisValue::from_redis_value)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| StoreError::Corrupt(format!("record answer: {e}")))?;
                (time, all)
            };
            let now_ms = time.0 * 1000 + time.1 / 1000;
            for (id, fields) in chunk.iter().zip(all) {
                records.push(record_of(id, &fields, now_ms)?);
            }
        }
        Ok(records)
    }

    async fn next_seq(&self, request_id: &str, fence: &Fence) -> Result<u64, StoreError> {
        let mut connection = self.connection.clone();
        let reply: Reply = self
            .scripts
            .next_seq
            .key(self.key(request_id)?)
            .arg(fence.counter.to_string())
            .arg(&fence.nonce)
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        match reply {
            Reply(-2, _) => Err(StoreError::Missing(request_id.to_owned())),
            Reply(-1, _) => Err(StoreError::Fenced(fence.clone())),
            Reply(_, seq) => parse(seq.as_ref(), "seq"),
        }
    }

    async fn take_tokens(
        &self,
        key: &str,
        limit: &RateLimit,
        max_wait: Duration,
    ) -> Result<TokenGrant, StoreError> {
        let mut connection = self.connection.clone();
        let reply: Reply = self
            .scripts
            .take_tokens
            .key(self.bucket_key(key)?)
            .arg(limit.capacity)
            .arg(limit.refill_per_second)
            .arg(limit.cost)
            .arg(max_wait.as_millis() as u64)
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        let wait = Duration::from_millis(parse(reply.1.as_ref(), "wait")?);
        Ok(match reply.0 {
            0 => TokenGrant::Now,
            1 => TokenGrant::After(wait),
            _ => TokenGrant::Later(wait.saturating_sub(max_wait / 2)),
        })
    }

    async fn adapt_rate(
        &self,
        key: &str,
        limit: &RateLimit,
        throttled: bool,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let _: Reply = self
            .scripts
            .adapt_rate
            .key(self.bucket_key(key)?)
            .arg(limit.capacity)
            .arg(limit.refill_per_second)
            .arg(limit.floor())
            .arg(if throttled { "1" } else { "0" })
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn put_fleet(&self, request_id: &str, request_json: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(self.fleet_key(request_id)?)
            .arg(request_json)
            .arg("PX")
            .arg(self.retention.as_millis().max(1) as u64)
            .query_async::<()>(&mut connection)
            .await
            .map_err(classify)
    }

    async fn fleet(&self, request_id: &str) -> Result<Option<String>, StoreError> {
        let mut connection = self.connection.clone();
        connection
            .get(self.fleet_key(request_id)?)
            .await
            .map_err(classify)
    }

    async fn remember_handed_on(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        redis::cmd("SET")
            .arg(self.handed_on_key(key)?)
            .arg(1)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async::<()>(&mut connection)
            .await
            .map_err(classify)
    }

    async fn was_handed_on(&self, key: &str) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        connection
            .exists(self.handed_on_key(key)?)
            .await
            .map_err(classify)
    }

    async fn take_turn(&self, key: &str, hold: Duration) -> Result<bool, StoreError> {
        let mut connection = self.connection.clone();
        let taken: Option<String> = redis::cmd("SET")
            .arg(self.turn_key(key)?)
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(hold.as_millis().max(1) as u64)
            .query_async(&mut connection)
            .await
            .map_err(classify)?;
        Ok(taken.is_some())
    }

    async fn schedule_expiry(
        &self,
        platform: &str,
        request_id: &str,
        at: SystemTime,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        let due_ms = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        connection
            .zadd::<_, _, _, ()>(self.expiries(platform)?, request_id, due_ms)
            .await
            .map_err(classify)
    }

    async fn take_due_expiries(
        &self,
        platform: &str,
        limit: usize,
        retry_in: Duration,
    ) -> Result<Vec<(String, SystemTime)>, StoreError> {
        let mut connection = self.connection.clone();
        let due: Vec<(String, f64)> = self
            .scripts
            .take_due
            .key(self.expiries(platform)?)
            .arg(limit.max(1))
            .arg(millis(retry_in))
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        Ok(due
            .into_iter()
            .map(|(id, due_ms)| {
                let at = SystemTime::UNIX_EPOCH + Duration::from_millis(due_ms.max(0.0) as u64);
                (id, at)
            })
            .collect())
    }

    async fn cancel_expiry(&self, platform: &str, request_id: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        connection
            .zrem::<_, _, ()>(self.expiries(platform)?, request_id)
            .await
            .map_err(classify)
    }

    async fn reserve_quota(
        &self,
        tenant: &str,
        request_id: &str,
        fence: &Fence,
        cost: &QuotaCost,
    ) -> Result<QuotaGrant, StoreError> {
        let mut connection = self.connection.clone();
        type Hash = HashMap<String, u64>;
        let (own, default): (Hash, Hash) = redis::pipe()
            .hgetall(self.quota_key(tenant))
            .hgetall(self.quota_key(DEFAULT_TENANT))
            .query_async(&mut connection)
            .await
            .map_err(classify)?;
        let limit_of = |field: &str| {
            own.get(field)
                .or_else(|| default.get(field))
                .map_or_else(String::new, u64::to_string)
        };
        let mut invocation = self.scripts.reserve_quota.prepare_invoke();
        invocation
            .key(self.quota_holders(tenant))
            .key(self.quota_holder(request_id)?)
            .key(self.quota_used(tenant))
            .key(self.quota_holder_cost(request_id)?)
            .key(self.key(request_id)?)
            .arg(self.holder_name(request_id)?)
            .arg(tenant)
            .arg(fence.counter.to_string())
            .arg(&fence.nonce)
            .arg(limit_of("limit"));
        for (unit, amount) in cost.iter().filter(|(unit, _)| unit.as_str() != MACHINES) {
            invocation
                .arg(unit)
                .arg(*amount)
                .arg(limit_of(&format!("limit:{unit}")));
        }
        let answer: Vec<String> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(classify)?;
        let number = |i: usize| answer.get(i).and_then(|n| n.parse().ok()).unwrap_or(0);
        Ok(match answer.first().map(String::as_str) {
            Some("1") => QuotaGrant::Granted,
            Some("missing") => return Err(StoreError::Missing(request_id.to_owned())),
            Some("fenced") => return Err(StoreError::Fenced(fence.clone())),
            _ => QuotaGrant::Exceeded {
                unit: answer
                    .get(1)
                    .cloned()
                    .unwrap_or_else(|| MACHINES.to_owned()),
                limit: number(2),
                used: number(3),
                wanted: number(4),
            },
        })
    }

    async fn release_quota(&self, request_id: &str) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        self.scripts
            .release_quota
            .key(self.quota_holder(request_id)?)
            .key(self.quota_holder_cost(request_id)?)
            .arg(&self.prefix)
            .arg(self.holder_name(request_id)?)
            .invoke_async::<u8>(&mut connection)
            .await
            .map(drop)
            .map_err(classify)
    }

    async fn set_quota(
        &self,
        tenant: &str,
        unit: &str,
        limit: Option<u64>,
    ) -> Result<(), StoreError> {
        let mut connection = self.connection.clone();
        // Machines keep the field they always had; other units are `limit:<unit>`.
        let field = if unit == MACHINES {
            "limit".to_owned()
        } else {
            format!("limit:{unit}")
        };
        match limit {
            Some(limit) => {
                connection
                    .hset::<_, _, _, ()>(self.quota_key(tenant), field, limit)
                    .await
            }
            None => {
                connection
                    .hdel::<_, _, ()>(self.quota_key(tenant), field)
                    .await
            }
        }
        .map_err(classify)
    }

    async fn quota(&self, tenant: &str) -> Result<QuotaUsage, StoreError> {
        let mut connection = self.connection.clone();
        type Hash = std::collections::HashMap<String, u64>;
        let (own, default, used, units_used): (Hash, Hash, u64, Hash) = redis::pipe()
            .hgetall(self.quota_key(tenant))
            .hgetall(self.quota_key(DEFAULT_TENANT))
            .scard(self.quota_holders(tenant))
            .hgetall(self.quota_used(tenant))
            .query_async(&mut connection)
            .await
            .map_err(classify)?;
        let limit_of = |field: &str| own.get(field).or_else(|| default.get(field)).copied();
        let mut names: std::collections::BTreeSet<&str> = own
            .keys()
            .chain(default.keys())
            .filter_map(|field| field.strip_prefix("limit:"))
            .collect();
        names.extend(units_used.keys().map(String::as_str));
        let units = names
            .into_iter()
            .filter(|unit| *unit != MACHINES)
            .map(|unit| {
                (
                    unit.to_owned(),
                    UnitUsage {
                        limit: limit_of(&format!("limit:{unit}")),
                        used: units_used.get(unit).copied().unwrap_or(0),
                    },
                )
            })
            .collect();
        Ok(QuotaUsage {
            limit: limit_of("limit"),
            used,
            units,
        })
    }
}
