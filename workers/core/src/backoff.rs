//! Polling with doubling pauses under a deadline: what every platform does while it waits
//! for a resource to reach a state, and the health checks while they wait for an answer.

use std::time::Duration;

use tokio::time::Instant;

/// Pauses between polls, doubling from `first` up to `max`, until `timeout` from creation
/// would pass.
#[derive(Debug)]
pub struct Backoff {
    deadline: Instant,
    pause: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(timeout: Duration, first: Duration, max: Duration) -> Self {
        Backoff {
            deadline: Instant::now() + timeout,
            pause: first,
            max,
        }
    }

    /// Sleeps before the next poll and answers `true`, or answers `false` at once when the
    /// pause would end past the deadline: the caller gives up with its own message.
    pub async fn wait(&mut self) -> bool {
        if Instant::now() + self.pause > self.deadline {
            return false;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(self.max);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pauses_double_up_to_the_cap_and_stop_at_the_deadline() {
        let start = Instant::now();
        let mut backoff = Backoff::new(
            Duration::from_millis(1000),
            Duration::from_millis(100),
            Duration::from_millis(300),
        );
        let mut waits = Vec::new();
        while backoff.wait().await {
            // Rounded to the pause grid; a loaded machine adds milliseconds, not 50.
            waits.push((start.elapsed().as_millis() + 50) / 100 * 100);
        }
        // 100, +200, +300, +300 = 900; another 300 would pass the 1000 ms deadline.
        assert_eq!(waits, vec![100, 300, 600, 900]);
        assert!(
            start.elapsed() < Duration::from_millis(1000),
            "gave up before sleeping past it"
        );
    }
}
