//! Virtual time. tokio's paused clock drives every timer and lease; this adds the wall
//! clock on top of it: a fixed epoch plus the virtual time elapsed, plus the jumps the
//! faults make, plus each worker's own skew. The store's clock (Redis's `TIME`) is the
//! same wall clock without a worker's skew.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use provisioner_core::Environment;
use tokio::time::Instant;

use crate::rng::Rng;

/// The run's wall clock.
#[derive(Debug)]
pub struct Clock {
    start: Instant,
    epoch: SystemTime,
    /// Milliseconds the wall clock was moved by jumps so far.
    jumped_ms: Mutex<i64>,
}

impl Clock {
    /// A clock whose wall time starts at 2030-01-01T00:00:00Z, now.
    pub fn new() -> Arc<Self> {
        Arc::new(Clock {
            start: Instant::now(),
            epoch: SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000),
            jumped_ms: Mutex::new(0),
        })
    }

    /// Virtual time since the run began.
    pub fn elapsed(&self) -> Duration {
        Instant::now() - self.start
    }

    /// The wall clock, `skew_ms` off.
    pub fn wall(&self, skew_ms: i64) -> SystemTime {
        let base = self.epoch + self.elapsed();
        let offset = *self.jumped_ms.lock().unwrap_or_else(|e| e.into_inner()) + skew_ms;
        if offset >= 0 {
            base + Duration::from_millis(offset as u64)
        } else {
            base - Duration::from_millis(offset.unsigned_abs())
        }
    }

    /// Moves every wall clock by `ms` (an NTP step, a VM restored from a snapshot).
    pub fn jump(&self, ms: i64) {
        *self.jumped_ms.lock().unwrap_or_else(|e| e.into_inner()) += ms;
    }

    /// The wall time at the run's start (for the workload's `expires_at` and deadlines).
    pub fn epoch(&self) -> SystemTime {
        self.epoch
    }
}

/// The environment of one worker (or of the store): the run's wall clock with its own
/// skew, and its own stream of random numbers.
#[derive(Debug)]
pub struct SimEnvironment {
    clock: Arc<Clock>,
    skew_ms: i64,
    rng: Mutex<Rng>,
}

impl SimEnvironment {
    pub fn new(clock: Arc<Clock>, skew_ms: i64, rng: Rng) -> Arc<Self> {
        Arc::new(SimEnvironment {
            clock,
            skew_ms,
            rng: Mutex::new(rng),
        })
    }
}

impl Environment for SimEnvironment {
    fn now(&self) -> SystemTime {
        self.clock.wall(self.skew_ms)
    }

    fn random_u64(&self) -> u64 {
        self.rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_u64()
    }
}
