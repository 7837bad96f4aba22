//! Pacing an attempt's platform call by the platform's API token buckets (see
//! [`crate::ratelimit`]): tokens reserved before the call, the wait slept under the lease,
//! and the platform's answer fed back into the buckets' rates.

use std::time::Duration;

use provisioner_events::{ErrorClass, Request};
use tracing::{debug, warn};

use super::Worker;
use crate::platform::PlatformError;
use crate::ratelimit::{RateLimit, TokenGrant};

/// The longest an attempt holds its claim waiting for its tokens; tokens further ahead
/// are not reserved and the message waits in the queue instead.
pub(super) const MAX_PACE: Duration = Duration::from_secs(30);

/// The share of a bucket's refill rate the workers use. A call reaches the cloud a
/// little after its tokens were reserved, and not always equally late: two calls spaced
/// exactly one refill apart when reserved may arrive closer than that and find the
/// cloud's bucket a fraction short. A tenth of headroom absorbs that jitter.
pub(super) const HEADROOM: f64 = 0.9;

/// What the buckets said.
pub(super) enum Pacing {
    /// Tokens are ours: call after this wait (zero: at once).
    Go(Duration),
    /// Not reserved: try again after about this long.
    Later(Duration),
}

impl Worker {
    /// The buckets `request`'s call draws on, after the operator's overrides, paced at
    /// [`HEADROOM`] of their refill.
    pub(super) fn rate_limits_of(&self, request: &Request) -> Vec<RateLimit> {
        let mut limits = self
            .config
            .rate_limits
            .apply(self.platform.rate_limits(request));
        for limit in &mut limits {
            limit.refill_per_second *= HEADROOM;
        }
        limits
    }

    /// Reserves the call's tokens in every bucket. A store that cannot answer does not
    /// hold the work up: the platform's own throttling answer, retried, is the fallback.
    pub(super) async fn reserve_tokens(&self, limits: &[RateLimit]) -> Pacing {
        let platform = self.platform.name();
        let mut wait = Duration::ZERO;
        for limit in limits {
            match self
                .store
                .take_tokens(&limit.key(platform.as_str()), limit, MAX_PACE)
                .await
            {
                Ok(TokenGrant::Now) => {}
                Ok(TokenGrant::After(after)) => wait = wait.max(after),
                Ok(TokenGrant::Later(again)) => return Pacing::Later(again),
                Err(e) => {
                    warn!(error = %e, bucket = %limit.action, "could not reserve API tokens; calling unpaced")
                }
            }
        }
        if !wait.is_zero() {
            debug!(
                wait_ms = wait.as_millis() as u64,
                "paced by the platform's rate limits"
            );
        }
        Pacing::Go(wait)
    }

    /// Feeds the platform's answer back into the buckets: a throttling answer halves
    /// their rates, any other gives some back. Off the request's path.
    pub(super) fn adapt_rates<T>(&self, limits: Vec<RateLimit>, result: &Result<T, PlatformError>) {
        if limits.is_empty() {
            return;
        }
        let throttled = matches!(result, Err(e) if e.class == ErrorClass::Throttled);
        let store = self.store.clone();
        let platform = self.platform.name();
        tokio::spawn(async move {
            for limit in limits {
                if let Err(e) = store
                    .adapt_rate(&limit.key(platform.as_str()), &limit, throttled)
                    .await
                {
                    debug!(error = %e, "could not adapt an API bucket's rate");
                }
            }
        });
    }
}
