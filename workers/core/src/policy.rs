//! What happens after a failure: a pure function of the error, the attempt, the retry
//! policy, the clock and a jitter draw, so it can be tested exhaustively.

use std::time::Duration;

use provisioner_events::{ErrorClass, ErrorInfo};
use time::OffsetDateTime;

use crate::platform::PlatformError;

/// Bounds on retrying one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt (before jitter); doubles with every attempt.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(300),
        }
    }
}

/// What to do with a request whose attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Try again after `delay`, as attempt `attempt + 1`.
    Retry { delay: Duration },
    /// Stop: the request ends in `error` with this.
    Fail(ErrorInfo),
}

/// Exponential backoff with "equal jitter": half the capped exponential delay is fixed,
/// the other half drawn by `jitter` (0.0 ..= 1.0), so retries of many requests that failed
/// together spread out but never come back sooner than half the nominal delay.
pub fn backoff(policy: &RetryPolicy, attempt: u32, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let nominal = policy
        .base_delay
        .saturating_mul(1u32 << exponent)
        .min(policy.max_delay);
    let jitter = jitter.clamp(0.0, 1.0);
    nominal / 2 + nominal.mul_f64(jitter / 2.0)
}

/// Decides between retrying and failing for good after `attempt` (1-based) failed.
pub fn decide(
    error: &PlatformError,
    attempt: u32,
    policy: &RetryPolicy,
    now: OffsetDateTime,
    deadline: Option<OffsetDateTime>,
    jitter: f64,
) -> Decision {
    if !error.retryable {
        return Decision::Fail(ErrorInfo {
            class: error.class,
            message: error.message.clone(),
        });
    }
    if attempt >= policy.max_attempts {
        return Decision::Fail(ErrorInfo {
            class: error.class,
            message: format!("{} (gave up after {attempt} attempts)", error.message),
        });
    }
    let mut delay = backoff(policy, attempt, jitter);
    if let Some(asked) = error.retry_after {
        delay = delay.max(asked);
    }
    if let Some(deadline) = deadline
        && now + delay >= deadline
    {
        return Decision::Fail(ErrorInfo {
            class: ErrorClass::Timeout,
            message: format!(
                "the request's deadline {} leaves no time for another attempt; last error: {}",
                deadline
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_else(|_| deadline.to_string()),
                error.message
            ),
        });
    }
    Decision::Retry { delay }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-21 10:00 UTC);

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        }
    }

    #[test]
    fn backoff_doubles_and_caps_with_jitter_in_the_upper_half() {
        let p = policy();
        assert_eq!(backoff(&p, 1, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(&p, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&p, 2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(&p, 3, 0.5), Duration::from_secs(3));
        assert_eq!(backoff(&p, 5, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(&p, 60, 1.0), Duration::from_secs(10), "no overflow");
        assert_eq!(
            backoff(&p, 1, 7.0),
            Duration::from_secs(1),
            "jitter clamped"
        );
    }

    #[test]
    fn every_error_class_is_decided_by_retryability_attempts_and_deadline() {
        let classes = [
            ErrorClass::InvalidRequest,
            ErrorClass::Conflict,
            ErrorClass::NotFound,
            ErrorClass::Permission,
            ErrorClass::Quota,
            ErrorClass::Capacity,
            ErrorClass::Throttled,
            ErrorClass::Transient,
            ErrorClass::Timeout,
            ErrorClass::Unsupported,
            ErrorClass::Internal,
        ];
        let p = policy();
        for class in classes {
            for retryable in [false, true] {
                for attempt in 1..=6 {
                    for deadline in [
                        None,
                        Some(NOW + time::Duration::seconds(1)),
                        Some(NOW + time::Duration::hours(1)),
                    ] {
                        let error = PlatformError {
                            class,
                            retryable,
                            message: "boom".into(),
                            retry_after: None,
                        };
                        let decision = decide(&error, attempt, &p, NOW, deadline, 1.0);
                        let delay = backoff(&p, attempt, 1.0);
                        let expected = if !retryable {
                            Decision::Fail(ErrorInfo {
                                class,
                                message: "boom".into(),
                            })
                        } else if attempt >= p.max_attempts {
                            Decision::Fail(ErrorInfo {
                                class,
                                message: format!("boom (gave up after {attempt} attempts)"),
                            })
                        } else if deadline.is_some_and(|d| NOW + delay >= d) {
                            match &decision {
                                Decision::Fail(info) => {
                                    assert_eq!(info.class, ErrorClass::Timeout);
                                    assert!(info.message.contains("deadline"), "{}", info.message);
                                    assert!(info.message.ends_with("boom"), "{}", info.message);
                                }
                                other => panic!("{class:?} attempt {attempt}: {other:?}"),
                            }
                            continue;
                        } else {
                            Decision::Retry { delay }
                        };
                        assert_eq!(
                            decision, expected,
                            "{class:?} retryable={retryable} attempt={attempt} deadline={deadline:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_platform_asking_to_wait_longer_is_honoured() {
        let mut error = PlatformError::retryable(ErrorClass::Throttled, "slow down");
        error.retry_after = Some(Duration::from_secs(30));
        assert_eq!(
            decide(&error, 1, &policy(), NOW, None, 0.0),
            Decision::Retry {
                delay: Duration::from_secs(30)
            }
        );
    }
}
