//! Rate limits of the platforms' APIs, shared by every worker and Lambda through the state
//! store, so a burst of requests becomes a paced stream instead of a storm of throttling
//! errors and spent retries.
//!
//! A platform names the token buckets each call of a request draws on
//! ([`Platform::rate_limits`](crate::Platform::rate_limits)): the cloud's own buckets,
//! with its documented size and refill rate as defaults (EC2's RunInstances bucket of 5
//! refilling 2 a second, and its resource bucket of 1,000 instances refilling 2 a
//! second). Before the call the runtime *reserves* its tokens in the store (a Lua script
//! over a hash per bucket, keyed by platform, scope and action): the answer is "go now",
//! "go after this wait" (the tokens are the caller's; it sleeps under its lease), or "too
//! far ahead" (nothing reserved; the message is parked without spending an attempt).
//! Reserving instead of asking again keeps callers in the order they came and never lets
//! two of them take the same refill.
//!
//! The rate adapts (additive increase, multiplicative decrease): a throttling answer from
//! the platform halves the bucket's refill rate, down to a tenth of its default, and every
//! call that was not throttled gives back a twentieth of the default, up to the default.
//! Operators override a bucket's figures, or turn pacing off, with [`RateLimitSettings`].

use std::collections::HashMap;
use std::time::Duration;

/// One token bucket a call draws on.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// The bucket's name, the API action and what it counts: `RunInstances` (requests),
    /// `RunInstances.instances` (resources). Overrides name it.
    pub action: String,
    /// Where the bucket applies: the account or project and region it is per, e.g.
    /// `us-east-1`. Workers of one scope share it.
    pub scope: String,
    /// Tokens the bucket holds when full: the burst.
    pub capacity: f64,
    /// Tokens added per second, at most (the adaptive rate stays at or under it).
    pub refill_per_second: f64,
    /// Tokens this call takes.
    pub cost: f64,
}

impl RateLimit {
    pub fn new(action: &str, scope: &str, capacity: f64, refill_per_second: f64) -> Self {
        RateLimit {
            action: action.to_owned(),
            scope: scope.to_owned(),
            capacity,
            refill_per_second,
            cost: 1.0,
        }
    }

    pub fn costing(mut self, cost: f64) -> Self {
        self.cost = cost;
        self
    }

    /// The bucket's key in the store, under `platform`.
    pub fn key(&self, platform: &str) -> String {
        format!("{platform}:{}:{}", self.scope, self.action)
    }

    /// The lowest rate a run of throttling answers brings the bucket to.
    pub fn floor(&self) -> f64 {
        self.refill_per_second / 10.0
    }
}

/// The answer to a reservation of tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenGrant {
    /// Taken: call now.
    Now,
    /// Reserved: call after this wait.
    After(Duration),
    /// Not reserved: the next tokens are further ahead than the caller will wait; ask
    /// again after about this long.
    Later(Duration),
}

/// How the operator configured pacing: on (the default) with the platforms' default
/// buckets, some of them overridden, or off.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitSettings {
    pub off: bool,
    /// `action` → (capacity, refill per second).
    pub overrides: HashMap<String, (f64, f64)>,
}

impl RateLimitSettings {
    /// Reads `RATE_LIMITS`: `off`, or a comma-separated list of
    /// `<action>=<capacity>/<refill per second>`, e.g. `RunInstances=10/4`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("off") {
            return Ok(RateLimitSettings {
                off: true,
                overrides: HashMap::new(),
            });
        }
        let mut overrides = HashMap::new();
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let parsed = item.split_once('=').and_then(|(action, figures)| {
                let (capacity, refill) = figures.split_once('/')?;
                let capacity: f64 = capacity.trim().parse().ok()?;
                let refill: f64 = refill.trim().parse().ok()?;
                let sane = |v: f64| v.is_finite() && v > 0.0 && v <= 1e9;
                (sane(capacity) && sane(refill) && !action.trim().is_empty())
                    .then(|| (action.trim().to_owned(), (capacity, refill)))
            });
            match parsed {
                Some((action, figures)) => {
                    overrides.insert(action, figures);
                }
                None => {
                    return Err(format!(
                        "RATE_LIMITS item {item:?} is not <action>=<capacity>/<refill per second> with positive numbers (e.g. RunInstances=10/4), and the whole is not \"off\""
                    ));
                }
            }
        }
        Ok(RateLimitSettings {
            off: false,
            overrides,
        })
    }

    /// The buckets to draw on, after the operator's word.
    pub fn apply(&self, limits: Vec<RateLimit>) -> Vec<RateLimit> {
        if self.off {
            return Vec::new();
        }
        limits
            .into_iter()
            .map(|mut limit| {
                if let Some((capacity, refill)) = self.overrides.get(&limit.action) {
                    limit.capacity = *capacity;
                    limit.refill_per_second = *refill;
                }
                limit
            })
            .collect()
    }
}

/// Paces the calls a platform makes on its own account, beyond the one the runtime paced
/// for a request: a batch's single launch for many members
/// ([`crate::batch::Batcher`]). The runtime hands every platform one
/// ([`Platform::use_pacer`](crate::Platform::use_pacer)); it draws on the same buckets in
/// the store as every worker and Lambda, with the operator's overrides and headroom.
#[async_trait::async_trait]
pub trait CallPacer: Send + Sync {
    /// Waits until the tokens of `limits` are reserved: at once, after the bucket's wait,
    /// or, when they are further ahead than a caller would wait, after asking again.
    async fn pace(&self, limits: Vec<RateLimit>);

    /// Feeds a call's answer back into the buckets' rates (see the module's doc).
    fn adapt(&self, limits: Vec<RateLimit>, throttled: bool);
}

/// Where a platform keeps the runtime's pacer once the worker hands it over
/// ([`Platform::use_pacer`](crate::Platform::use_pacer)), for the calls its batches make
/// on their own (one RunInstances, RunTask or bulkInsert for many members). Before a
/// pacer is handed over (a platform used outside a worker), pacing does nothing.
#[derive(Clone, Default)]
pub struct PacerSlot(std::sync::Arc<std::sync::RwLock<Option<std::sync::Arc<dyn CallPacer>>>>);

impl std::fmt::Debug for PacerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacerSlot")
            .field("set", &self.current().is_some())
            .finish()
    }
}

impl PacerSlot {
    /// Keeps `pacer` for every clone of this slot.
    pub fn set(&self, pacer: std::sync::Arc<dyn CallPacer>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(pacer);
    }

    fn current(&self) -> Option<std::sync::Arc<dyn CallPacer>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a token of each of `limits` (at once without a pacer).
    pub async fn pace(&self, limits: Vec<RateLimit>) {
        if let Some(pacer) = self.current() {
            pacer.pace(limits).await;
        }
    }

    /// Feeds a call's answer back into the rates of `limits`.
    pub fn adapt(&self, limits: Vec<RateLimit>, throttled: bool) {
        if let Some(pacer) = self.current() {
            pacer.adapt(limits, throttled);
        }
    }
}

/// The bucket arithmetic both stores share (Redis runs the same steps in Lua): refill
/// since `last_ms` at `rate`, then take `cost`, reserving into the negative when the
/// caller will wait up to `max_wait_ms`. Returns the new token count and the grant.
pub fn reserve(
    tokens: f64,
    last_ms: u64,
    now_ms: u64,
    capacity: f64,
    rate: f64,
    cost: f64,
    max_wait_ms: u64,
) -> (f64, TokenGrant) {
    let elapsed = now_ms.saturating_sub(last_ms) as f64 / 1000.0;
    let tokens = (tokens + elapsed * rate).min(capacity);
    let after = tokens - cost;
    if after >= 0.0 {
        return (after, TokenGrant::Now);
    }
    let wait_ms = (-after * 1000.0 / rate).ceil() as u64;
    if wait_ms > max_wait_ms {
        let again = Duration::from_millis(wait_ms - max_wait_ms / 2);
        return (tokens, TokenGrant::Later(again));
    }
    (after, TokenGrant::After(Duration::from_millis(wait_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_gives_its_burst_then_spaces_callers_by_its_rate() {
        let (mut tokens, mut last) = (5.0, 0);
        let mut grants = Vec::new();
        for _ in 0..8 {
            let (left, grant) = reserve(tokens, last, 0, 5.0, 2.0, 1.0, 10_000);
            (tokens, last) = (left, 0);
            grants.push(grant);
        }
        assert!(grants[..5].iter().all(|g| *g == TokenGrant::Now));
        assert_eq!(
            grants[5..],
            [
                TokenGrant::After(Duration::from_millis(500)),
                TokenGrant::After(Duration::from_millis(1000)),
                TokenGrant::After(Duration::from_millis(1500)),
            ]
        );
        // Too far ahead: nothing is reserved.
        let (left, grant) = reserve(tokens, last, 0, 5.0, 2.0, 1.0, 1_000);
        assert_eq!(left, tokens);
        assert!(matches!(grant, TokenGrant::Later(_)));
        // Time refills it, never past its capacity.
        let (left, grant) = reserve(tokens, 0, 60_000, 5.0, 2.0, 1.0, 0);
        assert_eq!((left, grant), (4.0, TokenGrant::Now));
    }

    #[test]
    fn settings_read_overrides_or_off_and_refuse_nonsense() {
        let settings = RateLimitSettings::parse("RunInstances=10/4, RunTask=100/40").expect("ok");
        let limits = settings.apply(vec![
            RateLimit::new("RunInstances", "us-east-1", 5.0, 2.0),
            RateLimit::new("TerminateInstances", "us-east-1", 50.0, 5.0),
        ]);
        assert_eq!(
            (limits[0].capacity, limits[0].refill_per_second),
            (10.0, 4.0)
        );
        assert_eq!(
            (limits[1].capacity, limits[1].refill_per_second),
            (50.0, 5.0)
        );
        assert!(
            RateLimitSettings::parse("off")
                .expect("off")
                .apply(limits)
                .is_empty()
        );
        assert_eq!(
            RateLimitSettings::parse("").expect("empty"),
            RateLimitSettings::default()
        );
        for bad in [
            "RunInstances",
            "RunInstances=5",
            "x=0/1",
            "x=1/-2",
            "=1/1",
            "x=nan/1",
        ] {
            assert!(RateLimitSettings::parse(bad).is_err(), "{bad}");
        }
    }
}
