//! Merging concurrent calls into one: the [`Batcher`] a platform uses where its API takes
//! many resources in one call (EC2's RunInstances with a count, ECS's RunTask `count`).
//!
//! Callers [`submit`](Batcher::submit) an item under a key (what must be alike for the
//! items to share a call, e.g. one fleet's launch). The first item of a key opens a
//! batch and starts its flush as a task of its own: it gathers for a short window (and
//! whatever else its flush waits for first, such as the API's rate limit), then takes
//! every item that joined, up to the batch's size, and answers each. Later items open the
//! next batch. The flush runs apart from every caller, so a caller that gives up (its
//! lease lost, its request cancelled) neither strands the others nor stops their call;
//! the flush sees it gone ([`Waiting::gone`]) and can leave its item out.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

/// One caller waiting on a batch: its item and where its answer goes.
pub struct Waiting<I, O> {
    pub item: I,
    answer: oneshot::Sender<O>,
}

impl<I: std::fmt::Debug, O> std::fmt::Debug for Waiting<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting")
            .field("item", &self.item)
            .field("gone", &self.gone())
            .finish()
    }
}

impl<I, O> Waiting<I, O> {
    /// Answers the caller (nothing happens when it has gone).
    pub fn answer(self, output: O) {
        let _ = self.answer.send(output);
    }

    /// Whether the caller stopped waiting: its item need not be carried out.
    pub fn gone(&self) -> bool {
        self.answer.is_closed()
    }
}

/// What a batch of items is carried out with: every item of the batch, to be answered.
pub type Flush<K, I, O> =
    Arc<dyn Fn(K, Vec<Waiting<I, O>>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A batch still taking items.
struct Open<I, O> {
    id: u64,
    waiting: Vec<Waiting<I, O>>,
}

struct Batches<K, I, O> {
    open: HashMap<K, Open<I, O>>,
    /// Batches that filled up before their flush took them, by id.
    full: HashMap<u64, Vec<Waiting<I, O>>>,
    next_id: u64,
}

/// Merges concurrent items of the same key into batches of at most `max` items.
pub struct Batcher<K, I, O> {
    batches: Arc<Mutex<Batches<K, I, O>>>,
    max: usize,
    gather: Duration,
    flush: Flush<K, I, O>,
}

impl<K, I, O> std::fmt::Debug for Batcher<K, I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max", &self.max)
            .field("gather", &self.gather)
            .finish_non_exhaustive()
    }
}

/// The batch's flush ended without answering the item (it panicked or was dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batch this call joined ended without answering it")]
pub struct Unanswered;

impl<K, I, O> Batcher<K, I, O>
where
    K: Eq + Hash + Clone + Send + 'static,
    I: Send + 'static,
    O: Send + 'static,
{
    /// Batches of at most `max` items, gathered for `gather` before `pace` (awaited by the
    /// flush task before it takes its items: items keep joining meanwhile) and `flush`.
    pub fn new<F, Fut>(max: usize, gather: Duration, flush: F) -> Self
    where
        F: Fn(K, Vec<Waiting<I, O>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Batcher {
            batches: Arc::new(Mutex::new(Batches {
                open: HashMap::new(),
                full: HashMap::new(),
                next_id: 0,
            })),
            max: max.max(1),
            gather,
            flush: Arc::new(move |key, waiting| Box::pin(flush(key, waiting))),
        }
    }

    /// Joins `item` to the open batch of `key` (opening one if there is none) and waits
    /// for its answer. `before_take` runs in the flush task after the gathering window,
    /// before the batch is closed: a wait there (a rate limit) lets more items join.
    pub async fn submit<P>(&self, key: K, item: I, before_take: P) -> Result<O, Unanswered>
    where
        P: Future<Output = ()> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        let waiting = Waiting { item, answer };
        let opened = {
            let mut batches = self.batches.lock().unwrap_or_else(|e| e.into_inner());
            let batches = &mut *batches;
            match batches.open.get_mut(&key) {
                Some(open) => {
                    open.waiting.push(waiting);
                    if open.waiting.len() >= self.max {
                        // Full: the next item opens another batch; this one waits for
                        // its flush to take it.
                        let full = batches.open.remove(&key).expect("the batch just seen");
                        batches.full.insert(full.id, full.waiting);
                    }
                    None
                }
                None => {
                    let id = batches.next_id;
                    batches.next_id += 1;
                    let open = Open {
                        id,
                        waiting: vec![waiting],
                    };
                    if self.max == 1 {
                        batches.full.insert(id, open.waiting);
                    } else {
                        batches.open.insert(key.clone(), open);
                    }
                    Some(id)
                }
            }
        };
        if let Some(id) = opened {
            let (batches, flush, gather) = (self.batches.clone(), self.flush.clone(), self.gather);
            tokio::spawn(async move {
                tokio::time::sleep(gather).await;
                before_take.await;
                let waiting = {
                    let mut batches = batches.lock().unwrap_or_else(|e| e.into_inner());
                    match batches.full.remove(&id) {
                        Some(waiting) => waiting,
                        None => match batches.open.get(&key) {
                            Some(open) if open.id == id => batches
                                .open
                                .remove(&key)
                                .map(|o| o.waiting)
                                .unwrap_or_default(),
                            _ => Vec::new(),
                        },
                    }
                };
                let waiting: Vec<_> = waiting.into_iter().filter(|w| !w.gone()).collect();
                if !waiting.is_empty() {
                    flush(key, waiting).await;
                }
            });
        }
        answered.await.map_err(|_| Unanswered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Doubling = (
        Arc<Batcher<&'static str, u32, u32>>,
        Arc<Mutex<Vec<Vec<u32>>>>,
    );

    /// A batcher whose flush records each batch's items and answers each with its double.
    fn doubling(max: usize) -> Doubling {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let batcher = Batcher::new(
            max,
            Duration::from_millis(20),
            move |_key, waiting: Vec<Waiting<u32, u32>>| {
                let record = record.clone();
                async move {
                    record
                        .lock()
                        .expect("record")
                        .push(waiting.iter().map(|w| w.item).collect());
                    for w in waiting {
                        let double = w.item * 2;
                        w.answer(double);
                    }
                }
            },
        );
        (Arc::new(batcher), seen)
    }

    #[tokio::test]
    async fn concurrent_items_of_a_key_share_a_batch_up_to_its_size() {
        let (batcher, seen) = doubling(3);
        let calls = (1..=7).map(|i| {
            let batcher = batcher.clone();
            async move { batcher.submit("fleet", i, async {}).await }
        });
        let answers = futures_util::future::join_all(calls).await;
        assert_eq!(
            answers,
            (1..=7).map(|i| Ok(i * 2)).collect::<Vec<_>>(),
            "every caller gets its own answer"
        );
        let mut batches = seen.lock().expect("seen").clone();
        batches.sort();
        assert_eq!(batches, vec![vec![1, 2, 3], vec![4, 5, 6], vec![7]]);
    }

    #[tokio::test]
    async fn keys_never_share_a_batch() {
        let (batcher, seen) = doubling(10);
        let (a, b) = tokio::join!(
            batcher.submit("a", 1, async {}),
            batcher.submit("b", 2, async {})
        );
        assert_eq!((a, b), (Ok(2), Ok(4)));
        assert_eq!(seen.lock().expect("seen").len(), 2);
    }

    #[tokio::test]
    async fn items_join_while_the_flush_waits_before_taking() {
        let (batcher, seen) = doubling(10);
        let first = {
            let batcher = batcher.clone();
            tokio::spawn(async move {
                batcher
                    .submit("fleet", 1, tokio::time::sleep(Duration::from_millis(200)))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Past the gathering window, but the flush still waits for its rate limit.
        assert_eq!(batcher.submit("fleet", 2, async {}).await, Ok(4));
        assert_eq!(first.await.expect("first"), Ok(2));
        assert_eq!(*seen.lock().expect("seen"), vec![vec![1, 2]]);
    }

    #[tokio::test]
    async fn a_caller_that_gave_up_is_left_out_and_the_rest_are_answered() {
        let flushed = Arc::new(AtomicUsize::new(0));
        let counted = flushed.clone();
        let batcher = Arc::new(Batcher::new(
            10,
            Duration::from_millis(50),
            move |_key: (), waiting: Vec<Waiting<u32, u32>>| {
                counted.fetch_add(waiting.len(), Ordering::SeqCst);
                async move {
                    for w in waiting {
                        let item = w.item;
                        w.answer(item);
                    }
                }
            },
        ));
        let quitter = {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit((), 1, async {}).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        quitter.abort();
        assert_eq!(batcher.submit((), 2, async {}).await, Ok(2));
        assert_eq!(
            flushed.load(Ordering::SeqCst),
            1,
            "only the one still waiting"
        );
    }

    #[tokio::test]
    async fn a_flush_that_drops_its_items_is_an_error_not_a_hang() {
        let batcher: Batcher<(), u32, u32> = Batcher::new(
            4,
            Duration::ZERO,
            |_key, waiting: Vec<Waiting<u32, u32>>| {
                drop(waiting);
                async {}
            },
        );
        assert_eq!(batcher.submit((), 1, async {}).await, Err(Unanswered));
    }
}
