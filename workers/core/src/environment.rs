//! What the runtime reads from the world besides its inputs: the wall clock and random
//! draws. In production both are the system's ([`SystemEnvironment`]); the simulator
//! (`sim/`) passes its own, a virtual clock and a generator seeded per run, so that one
//! seed replays one history exactly.
//!
//! Durations and leases are measured on tokio's clock (`tokio::time::Instant`), which a
//! paused runtime already makes virtual; this covers what tokio cannot: wall-clock
//! instants (deadlines, expiries, message ages, event timestamps), the backoff jitter and
//! the fence nonces.

use std::fmt;
use std::time::SystemTime;

use time::OffsetDateTime;

/// The wall clock and the random draws of a worker or a store.
pub trait Environment: Send + Sync + fmt::Debug + 'static {
    /// The wall clock now.
    fn now(&self) -> SystemTime;

    /// A uniformly distributed random number.
    fn random_u64(&self) -> u64;
}

impl dyn Environment {
    /// The wall clock now, as the events carry it.
    pub fn now_utc(&self) -> OffsetDateTime {
        OffsetDateTime::from(self.now())
    }

    /// A draw in `0.0 ..= 1.0` for a backoff's jitter.
    pub fn jitter(&self) -> f64 {
        // The top 53 bits: every value a f64 in [0, 1) can hold exactly.
        (self.random_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A fresh fence nonce: 128 random bits in hex, unique for good.
    pub fn nonce(&self) -> String {
        format!("{:016x}{:016x}", self.random_u64(), self.random_u64())
    }
}

/// The system's clock and the operating system's random numbers.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemEnvironment;

impl Environment for SystemEnvironment {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn random_u64(&self) -> u64 {
        rand::random()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fixed(u64);

    impl Environment for Fixed {
        fn now(&self) -> SystemTime {
            SystemTime::UNIX_EPOCH
        }
        fn random_u64(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn jitter_spans_zero_to_one_and_nonces_are_32_hex_digits() {
        let low: &dyn Environment = &Fixed(0);
        let high: &dyn Environment = &Fixed(u64::MAX);
        assert_eq!(low.jitter(), 0.0);
        assert!(high.jitter() < 1.0 && high.jitter() > 0.999_999);
        assert_eq!(low.nonce(), "0".repeat(32));
        let system: &dyn Environment = &SystemEnvironment;
        let nonce = system.nonce();
        assert_eq!(nonce.len(), 32);
        assert!(nonce.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(nonce, system.nonce());
    }
}
