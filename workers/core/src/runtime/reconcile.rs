//! Finding and removing what no record explains. A worker can die between a platform's
//! create call and anything the store learns of it, a teardown can fail half-way, a
//! resource can be made by hand with our marks: each leaves a resource that runs
//! unaccounted for. The reconciler lists what the platform holds with the provisioner's
//! ownership marks ([`Platform::owned`](crate::Platform::owned)), compares each with the
//! record of the request it names, and sends the teardown of what the records do not
//! explain: no record at all, a provision that ended in `error` (which must leave
//! nothing), or one a teardown tombstoned that is still there.
//!
//! It is careful in the ways an operator needs: a resource younger than `min_age` is
//! never judged (it may be a create whose record is being written), every verdict is
//! looked at a second time after a pause before anything is done, at most `max_removals`
//! go per run, and `dry_run` only reports. Removal is an ordinary teardown request of the
//! resource by its id (`<id>#reconciled-<resource hash>`, with a `cause` saying why), so it goes through
//! the queue with its tombstone, fencing and status events, and a second copy of it is a
//! duplicate.

use std::time::Duration;

use provisioner_events::TeardownTarget;
use serde::Serialize;
use tracing::{info, warn};

use super::Worker;
use crate::platform::{Owned, PlatformError};
use crate::store::RequestRecord;

/// How careful a reconciliation is.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    /// Resources younger than this are left alone (10 minutes by default).
    pub min_age: Duration,
    /// The pause before the second look at each verdict.
    pub second_look_after: Duration,
    /// At most this many teardowns per run.
    pub max_removals: usize,
    /// Only report; send nothing.
    pub dry_run: bool,
}

impl Default for ReconcileOptions {
    fn default() -> Self {
        ReconcileOptions {
            min_age: Duration::from_secs(600),
            second_look_after: Duration::from_secs(5),
            max_removals: 20,
            dry_run: false,
        }
    }
}

/// What the reconciler decided about one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A record explains it.
    Kept,
    /// Younger than `min_age`: not judged.
    TooYoung,
    /// No record explains it, and its teardown was sent.
    Removed,
    /// No record explains it; `dry_run`, or past `max_removals`, so nothing was sent.
    WouldRemove,
    /// The second look disagreed with the first (the record or the resource changed).
    ChangedMeanwhile,
}

/// One decision, as `provisioner reconcile` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct ReconcileDecision {
    pub resource_id: String,
    pub request_id: String,
    pub verdict: Verdict,
    /// Why, in words.
    pub reason: String,
    /// The teardown request sent, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teardown: Option<String>,
}

/// The request id of the teardown the reconciler sends for one resource of
/// `request_id`: `<request_id>#reconciled-<8 hex of the resource id>`, so two resources
/// leaked under one request id (a launch that ran twice) each get their own teardown,
/// and the same resource always the same one.
pub fn reconcile_teardown_id(request_id: &str, resource_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let resource: String = Sha256::digest(resource_id.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    crate::names::follow_up_request_id(request_id, &format!("reconciled-{resource}"))
}

/// Why the record does not explain a resource of its request, or `None` when it does.
fn unexplained(record: Option<&RequestRecord>) -> Option<String> {
    let Some(record) = record else {
        return Some(
            "no record of its request: made outside the provisioner's flow, or its record expired"
                .into(),
        );
    };
    if record.actor.is_some() {
        return None; // A teardown or another operation is at work on it right now.
    }
    if let Some(by) = &record.torn_down_by {
        return Some(format!("torn down by {by}, yet still here"));
    }
    match &record.result {
        Some(event) if event.error.is_some() => Some(format!(
            "its provision ended in error ({}), which leaves nothing behind",
            event
                .error
                .as_ref()
                .map(|e| e.class.as_str())
                .unwrap_or("error")
        )),
        Some(_) => None,
        None if record.payload_hash.is_some() => None, // in progress
        None => Some("its record holds no request".into()),
    }
}

impl Worker {
    /// One reconciliation of this worker's platform: every resource with our marks,
    /// judged against its record, and the teardown sent of what none explains.
    pub async fn reconcile(
        &self,
        options: &ReconcileOptions,
    ) -> Result<Vec<ReconcileDecision>, PlatformError> {
        let owned = self.platform.owned().await?;
        let now = self.env.now();
        let mut decisions = Vec::new();
        let mut suspects: Vec<(Owned, String)> = Vec::new();
        for item in owned {
            let age = item
                .created
                .and_then(|at| now.duration_since(at).ok())
                .unwrap_or_default();
            let decision = |verdict, reason: String| ReconcileDecision {
                resource_id: item.resource.id.clone(),
                request_id: item.request_id.to_string(),
                verdict,
                reason,
                teardown: None,
            };
            if item.created.is_none() || age < options.min_age {
                decisions.push(decision(
                    Verdict::TooYoung,
                    format!(
                        "made {} s ago, under the minimum age of {} s",
                        age.as_secs(),
                        options.min_age.as_secs()
                    ),
                ));
                continue;
            }
            let record = self.record_of(&item).await?;
            match unexplained(record.as_ref()) {
                None => decisions.push(decision(Verdict::Kept, "its record explains it".into())),
                Some(reason) => suspects.push((item, reason)),
            }
        }
        if suspects.is_empty() {
            return Ok(decisions);
        }
        // The second look: the record may have been written meanwhile, the resource
        // removed by its own teardown.
        tokio::time::sleep(options.second_look_after).await;
        let still_there = self.platform.owned().await?;
        let mut removed = 0;
        for (item, reason) in suspects {
            let mut decision = ReconcileDecision {
                resource_id: item.resource.id.clone(),
                request_id: item.request_id.to_string(),
                verdict: Verdict::ChangedMeanwhile,
                reason: reason.clone(),
                teardown: None,
            };
            let present = still_there
                .iter()
                .any(|o| o.resource.id == item.resource.id);
            let record = self.record_of(&item).await?;
            let second = unexplained(record.as_ref());
            if !present || second.as_deref() != Some(reason.as_str()) {
                decision.reason = format!(
                    "first look: {reason}; second look: {}",
                    if present {
                        second.unwrap_or_else(|| "its record explains it".into())
                    } else {
                        "gone".into()
                    }
                );
                decisions.push(decision);
                continue;
            }
            if options.dry_run || removed >= options.max_removals {
                decision.verdict = Verdict::WouldRemove;
                decisions.push(decision);
                continue;
            }
            let teardown_id = reconcile_teardown_id(item.request_id.as_str(), &item.resource.id);
            // By the resource's own id: a leak need not carry the name its request id
            // derives, and the runtime still serializes with (and tombstones) the request
            // the marks name.
            let target = TeardownTarget::Resource(item.resource.id.clone());
            let cause = format!(
                "reconciled: {} ({}) {reason}",
                item.resource.id, item.resource.name
            );
            match self.send_teardown(&teardown_id, &target, cause, None).await {
                Ok(()) => {
                    info!(resource = %item.resource.id, request.id = %item.request_id, %reason, "unexplained; teardown sent");
                    decision.verdict = Verdict::Removed;
                    decision.teardown = Some(teardown_id);
                    removed += 1;
                }
                Err(e) => {
                    warn!(resource = %item.resource.id, error = %e, "could not send the teardown of an unexplained resource");
                    decision.verdict = Verdict::WouldRemove;
                    decision.reason = format!("{reason}; sending its teardown failed: {e}");
                }
            }
            decisions.push(decision);
        }
        Ok(decisions)
    }

    /// The record of the request `item`'s marks name.
    async fn record_of(&self, item: &Owned) -> Result<Option<RequestRecord>, PlatformError> {
        self.store.get(item.request_id.as_str()).await.map_err(|e| {
            PlatformError::transient(format!("reading the record of {}: {e}", item.request_id))
        })
    }

    /// One reconciliation, if it is this worker's turn for a run every `every` (the
    /// platform's workers take turns: two runs at once would each send the teardowns of
    /// the same resources). Answers the teardowns it sent, or `None` when it was another
    /// worker's turn. A turn lasts the period, and at least a run (its second look, and
    /// a minute for the listing and the teardowns), so runs never overlap.
    pub(super) async fn reconcile_in_turn(
        &self,
        every: Duration,
        options: &ReconcileOptions,
    ) -> Result<Option<usize>, String> {
        let turn = format!("reconcile:{}", self.platform.name());
        let hold = every.max(options.second_look_after + Duration::from_secs(60));
        let ours = self
            .store
            .take_turn(&turn, hold)
            .await
            .map_err(|e| format!("could not take the reconciler's turn: {e}"))?;
        if !ours {
            return Ok(None);
        }
        let decisions = self.reconcile(options).await.map_err(|e| e.to_string())?;
        Ok(Some(
            decisions
                .iter()
                .filter(|d| d.verdict == Verdict::Removed)
                .count(),
        ))
    }

    /// Reconciles every `every`, for as long as the worker runs, in turn with the
    /// platform's other workers.
    pub(super) async fn reconcile_forever(&self, every: Duration, options: ReconcileOptions) {
        loop {
            tokio::time::sleep(every).await;
            match self.reconcile_in_turn(every, &options).await {
                Ok(Some(removed)) if removed > 0 => info!(removed, "reconciled"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "could not reconcile"),
            }
        }
    }
}
