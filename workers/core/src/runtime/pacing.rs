//! Pacing an attempt's platform call by the platform's API token buckets (see
//! [`crate::ratelimit`]): tokens reserved before the call, the wait slept under the lease,
//! and the platform's answer fed back into the buckets' rates.

use std::sync::Arc;
use std::time::Duration;

use provisioner_events::{ErrorClass, PlatformName, Request};
use tracing::{debug, warn};

use super::Worker;
use crate::platform::PlatformError;
use crate::ratelimit::{CallPacer, RateLimit, RateLimitSettings, TokenGrant};
use crate::store::StateStore;

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
        paced(&self.config.rate_limits, self.platform.rate_limits(request))
    }

    /// Reserves the call's tokens in every bucket. A store that cannot answer does not
    /// hold the work up: the platform's own throttling answer, retried, is the fallback.
    pub(super) async fn reserve_tokens(&self, limits: &[RateLimit]) -> Pacing {
        reserve_tokens(self.store.as_ref(), self.platform.name(), limits).await
    }

    /// The pacer this worker hands its platform (see [`CallPacer`]).
    pub(super) fn call_pacer(
        store: Arc<dyn StateStore>,
        platform: PlatformName,
        settings: RateLimitSettings,
    ) -> Arc<dyn CallPacer> {
        Arc::new(StorePacer {
            store,
            platform,
            settings,
        })
    }

    /// Feeds the platform's answer back into the buckets: a throttling answer halves
    /// their rates, any other gives some back. Off the request's path.
    pub(super) fn adapt_rates<T>(&self, limits: Vec<RateLimit>, result: &Result<T, PlatformError>) {
        let throttled = matches!(result, Err(e) if e.class == ErrorClass::Throttled);
        adapt_rates(self.store.clone(), self.platform.name(), limits, throttled);
    }
}

/// `limits` after the operator's overrides, paced at [`HEADROOM`] of their refill.
fn paced(settings: &RateLimitSettings, limits: Vec<RateLimit>) -> Vec<RateLimit> {
    let mut limits = settings.apply(limits);
    for limit in &mut limits {
        limit.refill_per_second *= HEADROOM;
    }
    limits
}

/// Reserves a call's tokens in every bucket. A store that cannot answer does not hold
/// the work up: the platform's own throttling answer, retried, is the fallback.
async fn reserve_tokens(
    store: &dyn StateStore,
    platform: PlatformName,
    limits: &[RateLimit],
) -> Pacing {
    let mut wait = Duration::ZERO;
    for limit in limits {
        match store
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

/// Feeds an answer back into the buckets, off the caller's path.
fn adapt_rates(
    store: Arc<dyn StateStore>,
    platform: PlatformName,
    limits: Vec<RateLimit>,
    throttled: bool,
) {
    if limits.is_empty() {
        return;
    }
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

/// The [`CallPacer`] of a worker: its store's buckets, its operator's settings.
struct StorePacer {
    store: Arc<dyn StateStore>,
    platform: PlatformName,
    settings: RateLimitSettings,
}

#[async_trait::async_trait]
impl CallPacer for StorePacer {
    async fn pace(&self, limits: Vec<RateLimit>) {
        let limits = paced(&self.settings, limits);
        loop {
            match reserve_tokens(self.store.as_ref(), self.platform, &limits).await {
                Pacing::Go(wait) => return tokio::time::sleep(wait).await,
                // A batch has no queue to wait in: it waits here, and keeps gathering.
                Pacing::Later(again) => tokio::time::sleep(again).await,
            }
        }
    }

    fn adapt(&self, limits: Vec<RateLimit>, throttled: bool) {
        adapt_rates(
            self.store.clone(),
            self.platform,
            paced(&self.settings, limits),
            throttled,
        );
    }
}
