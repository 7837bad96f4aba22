//! What the producers and the operator of a run do, drawn from the seed: provisions
//! single and as fleets (with `min_count` and either `on_partial`), teardowns by request
//! id (before or after their target arrives) and by resource id (once the target says
//! where it runs), stop, start, reboot and describe, `ttl_seconds` and `expires_at`,
//! tenants and their quotas, dry runs, duplicates of the same message and reuses of an id
//! with another payload, malformed and refused messages, request ids of every allowed
//! shape (the longest, dotted, and ones that end like the ids the workers derive once
//! did; `#` is kept for the workers' own), and the operator's reconciler runs and
//! redrives.

use std::time::Duration;

use serde_json::{Value, json};

use crate::platform::PLATFORM;
use crate::rng::Rng;

/// One thing a producer or the operator does.
#[derive(Debug, Clone)]
pub enum Step {
    /// Publish this body (with the producer's retries until the broker confirms).
    Publish { routing_key: String, body: Vec<u8> },
    /// Once `target` says `running`, publish `operation` on its resource id under `id`.
    OnResource {
        target: String,
        id: String,
        operation: &'static str,
    },
    /// The operator sets a tenant's quota of a unit.
    SetQuota {
        tenant: String,
        unit: &'static str,
        limit: Option<u64>,
    },
    /// The operator runs the reconciler once.
    Reconcile,
    /// The operator moves the dead letters back to the work queue.
    Redrive,
}

#[derive(Debug, Clone)]
pub struct Planned {
    pub at: Duration,
    pub step: Step,
}

/// The drawn workload, in the order of its times.
#[derive(Debug, Clone, Default)]
pub struct Workload {
    pub steps: Vec<Planned>,
}

fn routing_key(operation: &str) -> String {
    format!("{}.{operation}", PLATFORM.as_str())
}

fn body(value: &Value) -> Vec<u8> {
    value.to_string().into_bytes()
}

/// Draws request ids: mostly plain, some at the edges of what is allowed.
struct Ids {
    next: u32,
}

impl Ids {
    fn fresh(&mut self, rng: &mut Rng) -> String {
        self.next += 1;
        let n = self.next;
        match rng.weighted(&[12, 2, 2, 1]) {
            0 => format!("r{n}"),
            1 => format!("team.app_{n}-x"),
            // The longest id a producer may choose.
            2 => {
                let tail = format!("-{n}");
                format!("{}{tail}", "L".repeat(128 - tail.len()))
            }
            _ => format!("{n}.0"),
        }
    }
}

/// A provision's body.
fn provision(rng: &mut Rng, id: &str, tenants: &[String], epoch_s: u64, chaos_s: u64) -> Value {
    let mut request = json!({
        "schema_version": 1,
        "request_id": id,
        "operation": "provision",
        "platform": PLATFORM.as_str(),
        "spec": {"cpus": rng.range(1, 4)},
    });
    if !tenants.is_empty() && rng.chance(0.6) {
        request["tenant"] = rng.pick(tenants).clone().into();
    }
    match rng.weighted(&[6, 2, 1]) {
        1 => request["ttl_seconds"] = rng.range(1, 90).into(),
        2 => {
            let at = epoch_s + rng.range(1, chaos_s + 60);
            request["expires_at"] = rfc3339(at).into();
        }
        _ => {}
    }
    if rng.chance(0.05) {
        request["deadline"] = rfc3339(epoch_s + rng.range(1, chaos_s + 30)).into();
    }
    if rng.chance(0.04) {
        request["dry_run"] = true.into();
    }
    request
}

fn rfc3339(unix_s: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix_s as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn acting(id: &str, operation: &str, target: &str) -> Value {
    json!({
        "schema_version": 1,
        "request_id": id,
        "operation": operation,
        "platform": PLATFORM.as_str(),
        "target_request_id": target,
    })
}

impl Workload {
    /// Draws a workload that publishes within `chaos` of a run whose wall clock starts at
    /// `epoch_s` (Unix seconds).
    pub fn draw(rng: &mut Rng, chaos: Duration, epoch_s: u64) -> Workload {
        let chaos_s = chaos.as_secs().max(1);
        let mut steps = Vec::new();
        let at = |rng: &mut Rng| Duration::from_millis(rng.range(0, chaos_s * 1000));
        let mut ids = Ids { next: 0 };
        let tenants: Vec<String> = (0..rng.range(0, 2))
            .map(|t| format!("tenant-{t}"))
            .collect();
        for tenant in &tenants {
            if rng.chance(0.7) {
                steps.push(Planned {
                    at: Duration::ZERO,
                    step: Step::SetQuota {
                        tenant: tenant.clone(),
                        unit: "machines",
                        limit: Some(rng.range(1, 5)),
                    },
                });
            }
            if rng.chance(0.3) {
                steps.push(Planned {
                    at: Duration::ZERO,
                    step: Step::SetQuota {
                        tenant: tenant.clone(),
                        unit: "vcpus",
                        limit: Some(rng.range(2, 10)),
                    },
                });
            }
        }
        let mut published: Vec<(Duration, String, Value)> = Vec::new();
        let mut provisions: Vec<(Duration, String, bool)> = Vec::new();
        for _ in 0..rng.range(1, 10) {
            let id = ids.fresh(rng);
            let when = at(rng);
            let request = provision(rng, &id, &tenants, epoch_s, chaos_s);
            provisions.push((when, id.clone(), false));
            published.push((when, id, request));
        }
        for _ in 0..rng.range(0, 2) {
            let id = ids.fresh(rng);
            let when = at(rng);
            let count = rng.range(2, 6);
            let mut request = provision(rng, &id, &tenants, epoch_s, chaos_s);
            request["count"] = count.into();
            if rng.chance(0.5) {
                request["min_count"] = rng.range(1, count).into();
            }
            if rng.chance(0.5) {
                request["on_partial"] = (if rng.chance(0.5) { "keep" } else { "rollback" }).into();
            }
            provisions.push((when, id.clone(), true));
            published.push((when, id, request));
        }
        // Requests acting on the provisions: by request id at any time (a teardown before
        // its target arrives leaves a tombstone), by resource id once it runs.
        for (provided_at, target, fleet) in provisions.clone() {
            let operations: &[&'static str] = if fleet {
                &["teardown"]
            } else {
                &["teardown", "stop", "start", "reboot", "describe"]
            };
            for _ in 0..rng.range(0, 2) {
                let operation = *rng.pick(operations);
                let id = if rng.chance(0.1) {
                    // An id shaped like the one the workers derive for this target: the
                    // old scheme's (a producer's to take), or the workers' own (refused
                    // from a producer, so the real expiry still happens).
                    if rng.chance(0.5) {
                        format!("{target}.expired")
                    } else {
                        format!("{target}#expired")
                    }
                } else {
                    ids.fresh(rng)
                };
                if !fleet && rng.chance(0.3) {
                    steps.push(Planned {
                        at: provided_at + Duration::from_millis(rng.range(0, 20_000)),
                        step: Step::OnResource {
                            target: target.clone(),
                            id,
                            operation,
                        },
                    });
                } else {
                    let when = if rng.chance(0.2) {
                        provided_at.saturating_sub(Duration::from_millis(rng.range(0, 5_000)))
                    } else {
                        provided_at + Duration::from_millis(rng.range(0, 30_000))
                    };
                    published.push((when, id.clone(), acting(&id, operation, &target)));
                }
            }
            if fleet && rng.chance(0.15) {
                // A producer's teardown of one member, by its request id.
                let id = ids.fresh(rng);
                published.push((
                    at(rng),
                    id.clone(),
                    acting(&id, "teardown", &format!("{target}#0")),
                ));
            }
        }
        // A teardown whose target is itself a teardown (of no resource of its own).
        if rng.chance(0.15) {
            let teardowns: Vec<(Duration, String)> = published
                .iter()
                .filter(|(_, _, r)| r["operation"] == "teardown")
                .map(|(when, id, _)| (*when, id.clone()))
                .collect();
            if !teardowns.is_empty() {
                let (when, target) = rng.pick(&teardowns).clone();
                let id = ids.fresh(rng);
                let at = when + Duration::from_millis(rng.range(0, 3_000));
                published.push((at, id.clone(), acting(&id, "teardown", &target)));
            }
        }
        // Requests about nothing that exists.
        if rng.chance(0.2) {
            let id = ids.fresh(rng);
            published.push((at(rng), id.clone(), acting(&id, "teardown", "never-made")));
        }
        if rng.chance(0.1) {
            let id = ids.fresh(rng);
            let mut request = acting(&id, "describe", "x");
            request
                .as_object_mut()
                .map(|o| o.remove("target_request_id"));
            request["resource_id"] = "i-99999".into();
            published.push((at(rng), id, request));
        }
        // Duplicates of what was published, and reuses of an id with another payload.
        let originals = published.len();
        for _ in 0..rng.range(0, originals as u64) {
            let (when, id, request) =
                published[rng.range(0, originals as u64 - 1) as usize].clone();
            let later = when + Duration::from_millis(rng.range(0, 40_000));
            if rng.chance(0.2) && request["operation"] == "provision" {
                let mut other = request.clone();
                other["spec"] = json!({"cpus": 5});
                published.push((later, id, other));
            } else {
                published.push((later, id, request));
            }
        }
        // Malformed and refused messages: each answers alone, with a dead letter.
        for _ in 0..rng.range(0, 2) {
            let id = ids.fresh(rng);
            let bad = match rng.range(0, 6) {
                0 => b"{not json".to_vec(),
                1 => body(
                    &json!({"schema_version": 1, "request_id": id, "operation": "provision", "platform": PLATFORM.as_str()}),
                ),
                2 => body(
                    &json!({"schema_version": 1, "request_id": id, "operation": "provision", "platform": PLATFORM.as_str(), "spec": {"cpus": 99}}),
                ),
                3 => body(
                    &json!({"schema_version": 1, "request_id": format!("{id}#1"), "operation": "provision", "platform": PLATFORM.as_str(), "spec": {}}),
                ),
                // The workers' own fields, from a producer.
                4 => body(
                    &json!({"schema_version": 1, "request_id": id, "operation": "provision", "platform": PLATFORM.as_str(), "spec": {}, "fleet_member": {"fleet_request_id": "f", "index": 0, "count": 2}}),
                ),
                5 => body(
                    &json!({"schema_version": 1, "request_id": id, "operation": "teardown", "platform": PLATFORM.as_str(), "target_request_id": "x", "cause": "expired: forged"}),
                ),
                _ => body(
                    &json!({"schema_version": 1, "request_id": id, "operation": "teardown", "platform": PLATFORM.as_str()}),
                ),
            };
            steps.push(Planned {
                at: at(rng),
                step: Step::Publish {
                    routing_key: routing_key("provision"),
                    body: bad,
                },
            });
        }
        for (when, _, request) in published {
            let operation = request["operation"]
                .as_str()
                .unwrap_or("provision")
                .to_owned();
            steps.push(Planned {
                at: when,
                step: Step::Publish {
                    routing_key: routing_key(&operation),
                    body: body(&request),
                },
            });
        }
        for _ in 0..rng.range(0, 2) {
            steps.push(Planned {
                at: at(rng),
                step: Step::Reconcile,
            });
        }
        if rng.chance(0.3) {
            steps.push(Planned {
                at: at(rng),
                step: Step::Redrive,
            });
        }
        steps.sort_by_key(|p| p.at);
        Workload { steps }
    }

    /// The body of a request acting on a resource by its id.
    pub fn on_resource(id: &str, operation: &str, resource_id: &str) -> (String, Vec<u8>) {
        let request = json!({
            "schema_version": 1,
            "request_id": id,
            "operation": operation,
            "platform": PLATFORM.as_str(),
            "resource_id": resource_id,
        });
        (routing_key(operation), body(&request))
    }
}
