//! Answers a platform looks up once and keeps: what never changes for its key (an image's
//! root device, a machine type's vCPUs), so a fleet of 1,000 asks the cloud once, not
//! 1,000 times.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// A map of looked-up answers, shared by clones. Failed look-ups are not kept.
#[derive(Debug)]
pub struct LookupCache<K, V> {
    answers: Arc<Mutex<HashMap<K, V>>>,
}

impl<K, V> Clone for LookupCache<K, V> {
    fn clone(&self) -> Self {
        LookupCache {
            answers: self.answers.clone(),
        }
    }
}

impl<K, V> Default for LookupCache<K, V> {
    fn default() -> Self {
        LookupCache {
            answers: Arc::default(),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> LookupCache<K, V> {
    /// The answer for `key`: kept from before, or `lookup`'s, kept when it succeeds.
    /// Concurrent first look-ups of one key may each ask; they get the same answer.
    pub async fn get_or_lookup<E, Fut>(&self, key: &K, lookup: impl FnOnce() -> Fut) -> Result<V, E>
    where
        Fut: Future<Output = Result<V, E>>,
    {
        if let Some(kept) = self.get(key) {
            return Ok(kept);
        }
        let answer = lookup().await?;
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), answer.clone());
        Ok(answer)
    }

    /// The answer kept for `key`, if any.
    pub fn get(&self, key: &K) -> Option<V> {
        self.answers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_is_looked_up_once_and_a_failure_not_kept() {
        let cache: LookupCache<String, u32> = LookupCache::default();
        let key = "t3.micro".to_owned();
        let failed: Result<u32, &str> = cache.get_or_lookup(&key, || async { Err("down") }).await;
        assert_eq!(failed, Err("down"));
        assert_eq!(cache.get(&key), None, "a failure is asked again");
        let first: Result<u32, &str> = cache.get_or_lookup(&key, || async { Ok(2) }).await;
        assert_eq!(first, Ok(2));
        let kept: Result<u32, &str> = cache
            .clone()
            .get_or_lookup(&key, || async { panic!("asked twice") })
            .await;
        assert_eq!(kept, Ok(2));
    }
}
