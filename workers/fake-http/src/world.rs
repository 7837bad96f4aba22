//! The state side of the in-test API servers: the lock each fake keeps its world behind,
//! and the parts of that world every fake keeps the same way beside its protocol's
//! objects (queued faults, the calls seen, the reads that time readiness). What a fault
//! is, which call it matches and what an object looks like stay with each fake.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::Call;

/// A fake's world, owned jointly by the handler serving calls (on the runtime's tasks)
/// and by the test that arranges it and reads it back. Shared here because every fake
/// needs the same thing: handlers are synchronous (see [`crate::spawn`]), so one mutex
/// around the whole world keeps each call atomic against the test's reads.
pub struct Shared<W>(Arc<Mutex<W>>);

impl<W> Shared<W> {
    pub fn new(world: W) -> Self {
        Shared(Arc::new(Mutex::new(world)))
    }

    /// The world, locked for one call or one look by the test.
    ///
    /// A poisoned lock is taken all the same: it means a handler panicked mid-call, and
    /// that panic is already printed by its task. Panicking again on every later call and
    /// in every accessor the test uses would bury the first report under copies of
    /// "poisoned", while the test still fails on the answer it did not get.
    pub fn lock(&self) -> MutexGuard<'_, W> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// By hand: derived, these would require `W: Clone` and `W: Default` (a clone must share
// the world, not copy it).
impl<W> Clone for Shared<W> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<W: Default> Default for Shared<W> {
    fn default() -> Self {
        Shared::new(W::default())
    }
}

impl<W: fmt::Debug> fmt::Debug for Shared<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The mutex's own `Debug` only tries the lock, so printing a fake while a call
        // holds its world cannot deadlock.
        f.debug_tuple("Shared").field(&self.0).finish()
    }
}

/// Faults a test queued to replace a fake's normal behaviour: an HTTP error for the next
/// matching call, an operation that will end failed. Each is used once, and a call takes
/// the oldest one it matches, so a test can queue several for different calls in the
/// order it expects them. Shared because every fake queues its faults this way; the
/// fault's shape and the rule it matches by are the fake's.
#[derive(Debug)]
pub struct FaultQueue<F>(VecDeque<F>);

// By hand: derived, it would require `F: Default`.
impl<F> Default for FaultQueue<F> {
    fn default() -> Self {
        FaultQueue(VecDeque::new())
    }
}

impl<F> FaultQueue<F> {
    pub fn push(&mut self, fault: F) {
        self.0.push_back(fault);
    }

    /// Removes and returns the oldest queued fault that `matches` accepts, leaving the
    /// others queued for the calls they were meant for.
    pub fn take_first(&mut self, matches: impl FnMut(&F) -> bool) -> Option<F> {
        let at = self.0.iter().position(matches)?;
        self.0.remove(at)
    }
}

/// The calls a fake has seen, in order, as request lines (`METHOD path?query`), so a test
/// can check what a client sent and how often (a retry, a replay, nothing at all) and not
/// only what came of it. Shared so every fake writes the same lines; a fake records a
/// call before anything else, faulted or not.
#[derive(Debug, Default)]
pub struct CallLog(Vec<String>);

impl CallLog {
    pub fn record(&mut self, call: &Call) {
        self.0
            .push(format!("{} {}?{}", call.method, call.path, call.query));
    }

    /// Every request line so far, in order.
    pub fn lines(&self) -> Vec<String> {
        self.0.clone()
    }

    /// How many calls there have been.
    pub fn count(&self) -> usize {
        self.0.len()
    }
}

/// How often each object has been read since it was made (or last changed state). The
/// fakes use it as their clock: what a controller or provider would finish in the
/// background is finished on the object's `ready_after_reads`-th read, so a test is timed
/// by its client's polls rather than by wall time. Shared because every fake times its
/// objects so.
#[derive(Debug)]
pub struct ReadCounts<K>(HashMap<K, u32>);

// By hand: derived, it would require `K: Default`.
impl<K> Default for ReadCounts<K> {
    fn default() -> Self {
        ReadCounts(HashMap::new())
    }
}

impl<K: Eq + Hash> ReadCounts<K> {
    /// Counts one more read of `key`; answers how many there have been, this one included.
    pub fn read(&mut self, key: K) -> u32 {
        let reads = self.0.entry(key).or_insert(0);
        *reads += 1;
        *reads
    }

    /// Starts `key`'s count again, when its object is made anew or changes state and its
    /// readiness must be waited for again.
    pub fn restart<Q>(&mut self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.0.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_takes_the_oldest_fault_it_matches_and_leaves_the_rest() {
        let mut faults = FaultQueue::default();
        faults.push(("a", 1));
        faults.push(("b", 2));
        faults.push(("a", 3));
        assert_eq!(faults.take_first(|f| f.0 == "a"), Some(("a", 1)));
        assert_eq!(faults.take_first(|f| f.0 == "c"), None);
        assert_eq!(faults.take_first(|f| f.0 == "a"), Some(("a", 3)));
        assert_eq!(faults.take_first(|_| true), Some(("b", 2)));
        assert_eq!(faults.take_first(|_| true), None);
    }

    #[test]
    fn reads_count_from_one_and_start_again_when_restarted() {
        let mut reads = ReadCounts::default();
        assert_eq!(reads.read("x"), 1);
        assert_eq!(reads.read("x"), 2);
        assert_eq!(reads.read("y"), 1);
        reads.restart(&"x");
        assert_eq!(reads.read("x"), 1);
    }

    #[test]
    fn a_poisoned_world_is_still_served() {
        let world = Shared::new(0_u32);
        let poisoner = world.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock();
            panic!("a handler panicking mid-call");
        })
        .join();
        *world.lock() += 1;
        assert_eq!(*world.lock(), 1);
    }
}
