//! The oracle: what a workload published, what the system said and what it left behind,
//! and the verdict on every request id.
//!
//! Every message the broker confirmed is *accepted* and must be answered: the body the
//! state store holds for its id by exactly one terminal outcome of the request, any other
//! body under that id by a refusal naming it (`rejected_message`). Then:
//!
//! - **lost**: an accepted message without an answer, or a request that says `running`
//!   whose resource is not there;
//! - **duplicated**: two different terminal outcomes for one request, or more than one
//!   resource for one request id;
//! - **leaked**: a resource of a request that ended in `error` or was refused, or of a
//!   target whose teardown said `stopped`;
//! - **unexpected**: a resource or an event that no published message explains;
//! - **in progress**: a record still being worked on once everything is quiet.
//!
//! All must be empty: [`Verdict::assert_clean`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use provisioner_core::StateStore;
use provisioner_core::redis_store::RedisStore;
use provisioner_events::{
    Operation, PlatformName, RejectedMessage, State, StatusEvent, decode_request,
};

/// One message as the workload published it.
#[derive(Debug, Clone)]
struct Sent {
    body: Vec<u8>,
    /// The payload hash of the request it decodes to, if it decodes.
    payload_hash: Option<String>,
    operation: Option<Operation>,
    target: Option<String>,
    /// Whose records its id names (request ids are one platform's).
    platform: Option<PlatformName>,
}

/// Events by the request id they name.
fn by_request(events: &[StatusEvent]) -> HashMap<&str, Vec<&StatusEvent>> {
    let mut by_id: HashMap<&str, Vec<&StatusEvent>> = HashMap::new();
    for event in events {
        by_id
            .entry(event.request_id.as_str())
            .or_default()
            .push(event);
    }
    by_id
}

/// Everything a workload published and the broker confirmed, by request id.
#[derive(Debug, Default)]
pub struct Ledger {
    sent: BTreeMap<String, Vec<Sent>>,
    copies: usize,
}

impl Ledger {
    /// Records a confirmed message. `request_id` is the id as the producer wrote it.
    pub fn accepted(&mut self, request_id: &str, body: &[u8]) {
        self.copies += 1;
        let decoded = decode_request(body).ok();
        let sent = Sent {
            body: body.to_vec(),
            payload_hash: decoded.as_ref().map(|r| r.payload_hash()),
            operation: decoded.as_ref().map(|r| r.operation),
            target: decoded
                .as_ref()
                .and_then(|r| r.target_request_id.as_ref().map(|t| t.to_string())),
            platform: decoded.as_ref().map(|r| r.platform),
        };
        let bodies = self.sent.entry(request_id.to_owned()).or_default();
        if !bodies.iter().any(|b| b.body == sent.body) {
            bodies.push(sent);
        }
    }

    pub fn ids(&self) -> impl Iterator<Item = &String> {
        self.sent.keys()
    }

    /// Whether every accepted message has an answer among `events` (the moment to judge).
    pub fn all_answered(&self, events: &[StatusEvent]) -> bool {
        let by_id = by_request(events);
        self.sent.iter().all(|(id, bodies)| {
            let ours = by_id.get(id.as_str()).map_or(&[][..], Vec::as_slice);
            let request_ended = ours.iter().any(|e| e.ends_request());
            bodies.iter().all(|sent| {
                request_ended && sent.payload_hash.is_some()
                    || ours.iter().any(|e| {
                        e.rejected_message
                            .as_ref()
                            .is_some_and(|r| *r == RejectedMessage::of(&sent.body))
                    })
            })
        })
    }
}

/// The verdict on a run.
#[derive(Debug, Default)]
pub struct Verdict {
    pub messages: usize,
    pub requests: usize,
    /// Terminal outcomes by kind (`running`, `stopped`, `error/conflict`, `refused/…`).
    pub outcomes: BTreeMap<String, usize>,
    pub lost: Vec<String>,
    pub duplicated: Vec<String>,
    pub leaked: Vec<String>,
    pub unexpected: Vec<String>,
    pub in_progress: Vec<String>,
}

impl Verdict {
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.leaked.is_empty()
            && self.unexpected.is_empty()
            && self.in_progress.is_empty()
    }

    #[track_caller]
    pub fn assert_clean(&self) {
        assert!(self.is_clean(), "the oracle found faults:\n{self}");
        eprintln!("oracle: {self}");
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} messages, {} requests; outcomes {:?}; lost {}, duplicated {}, leaked {}, unexpected {}, in progress {}",
            self.messages,
            self.requests,
            self.outcomes,
            self.lost.len(),
            self.duplicated.len(),
            self.leaked.len(),
            self.unexpected.len(),
            self.in_progress.len()
        )?;
        for (what, list) in [
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("leaked", &self.leaked),
            ("unexpected", &self.unexpected),
            ("in progress", &self.in_progress),
        ] {
            for item in list.iter().take(20) {
                write!(f, "\n  {what}: {item}")?;
            }
        }
        Ok(())
    }
}

/// Judges a run: the ledger, every event seen on the status topic, the resources that
/// exist now by request id, and the state store of the run.
pub async fn judge(
    ledger: &Ledger,
    events: &[StatusEvent],
    resources: &HashMap<String, Vec<String>>,
    store: &RedisStore,
) -> Verdict {
    let mut verdict = Verdict {
        messages: ledger.copies,
        requests: ledger.sent.len(),
        ..Verdict::default()
    };
    let by_id = by_request(events);
    // The requests whose resource a `stopped` teardown says is gone.
    let mut torn_down: BTreeSet<String> = BTreeSet::new();
    for (id, bodies) in &ledger.sent {
        let ours = by_id.get(id.as_str()).cloned().unwrap_or_default();
        let record = read(store, platform_of(bodies), id).await;
        if record
            .as_ref()
            .is_some_and(|r| r.result.is_none() && r.payload_hash.is_some())
        {
            verdict.in_progress.push(id.clone());
        }
        let held_hash = record.as_ref().and_then(|r| r.payload_hash.clone());
        // Distinct terminal outcomes of the request itself.
        let outcomes: BTreeSet<(String, Option<String>, Option<String>)> = ours
            .iter()
            .filter(|e| e.ends_request())
            .map(|e| {
                (
                    e.state.to_string(),
                    e.error.as_ref().map(|x| x.class.to_string()),
                    e.resource.as_ref().map(|r| r.id.clone()),
                )
            })
            .collect();
        if outcomes.len() > 1 {
            verdict.duplicated.push(format!(
                "{id}: {} different outcomes {outcomes:?}",
                outcomes.len()
            ));
        }
        for sent in bodies {
            let is_the_request = sent.payload_hash.is_some() && sent.payload_hash == held_hash;
            let refused = ours.iter().find(|e| {
                e.rejected_message
                    .as_ref()
                    .is_some_and(|r| *r == RejectedMessage::of(&sent.body))
            });
            match (is_the_request, outcomes.iter().next(), refused) {
                (true, Some((state, class, _)), _) => {
                    let kind = match class {
                        Some(class) => format!("{state}/{class}"),
                        None => state.to_string(),
                    };
                    *verdict.outcomes.entry(kind).or_default() += 1;
                    if state == State::Stopped.as_str()
                        && sent.operation == Some(Operation::Teardown)
                        && let Some(target) = &sent.target
                    {
                        torn_down.insert(target.clone());
                    }
                }
                (_, _, Some(refusal)) => {
                    let class = refusal.error.as_ref().map(|e| e.class.to_string());
                    *verdict
                        .outcomes
                        .entry(format!("refused/{}", class.unwrap_or_default()))
                        .or_default() += 1;
                }
                _ => verdict.lost.push(format!(
                    "{id}: a message ({}) has no answer",
                    sent.operation
                        .map_or("undecodable".into(), |o| o.to_string())
                )),
            }
        }
    }
    for (id, bodies) in &ledger.sent {
        let Some(held) = read(store, platform_of(bodies), id).await else {
            continue;
        };
        let is_provision = bodies.iter().any(|b| {
            b.operation == Some(Operation::Provision) && b.payload_hash == held.payload_hash
        });
        if !is_provision {
            continue;
        }
        let made = resources.get(id.as_str()).map_or(&[][..], Vec::as_slice);
        if made.len() > 1 {
            verdict
                .duplicated
                .push(format!("{id}: {} resources {made:?}", made.len()));
        }
        let ended = held.result.as_ref().map(|r| r.state);
        if torn_down.contains(id) {
            if !made.is_empty() {
                verdict.leaked.push(format!(
                    "{id}: {made:?} still exist after its teardown said stopped"
                ));
            }
        } else if ended == Some(State::Error) {
            if !made.is_empty() {
                verdict
                    .leaked
                    .push(format!("{id}: {made:?} exist behind its error"));
            }
        } else if ended == Some(State::Running) {
            let said = held
                .result
                .as_ref()
                .and_then(|r| r.resource.as_ref())
                .map(|r| r.id.clone());
            if made.is_empty() {
                verdict
                    .lost
                    .push(format!("{id}: says running on {said:?}, which is gone"));
            } else if let Some(said) = said
                && !made
                    .iter()
                    .any(|m| m.starts_with(&said) || said.starts_with(m.as_str()))
            {
                verdict
                    .duplicated
                    .push(format!("{id}: says {said} but {made:?} exist"));
            }
        }
    }
    for (id, made) in resources {
        if !ledger.sent.contains_key(id) && !made.is_empty() {
            verdict.unexpected.push(format!(
                "resources {made:?} of request {id:?} nobody published"
            ));
        }
    }
    for id in by_id.keys() {
        if !ledger.sent.contains_key(*id) {
            verdict
                .unexpected
                .push(format!("events for request {id:?} nobody published"));
        }
    }
    verdict
}

/// The platform whose records a request id names: the one its copies were sent to
/// (Docker for a copy that never decoded; it has no record anywhere).
fn platform_of(bodies: &[Sent]) -> PlatformName {
    bodies
        .iter()
        .find_map(|b| b.platform)
        .unwrap_or(PlatformName::Docker)
}

/// A record, read again while the store is reconnecting (a test may have restarted it).
async fn read(
    store: &RedisStore,
    platform: PlatformName,
    id: &str,
) -> Option<provisioner_core::store::RequestRecord> {
    let store = store.for_platform(platform);
    let mut tries = 0;
    loop {
        match store.get(id).await {
            Ok(record) => return record,
            Err(e) if e.is_unavailable() && tries < 20 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => panic!("reading the store: {e}"),
        }
    }
}
