//! Fleet members made in bulk: one `instances.bulkInsert` for many members, which
//! Compute Engine counts as one request against the project's rate quota.
//!
//! A worker's concurrent member provisions of one fleet (same spec, labels and zone) join
//! a batch ([`provisioner_core::batch::Batcher`]). The batch waits for one token of the
//! project's mutation bucket (members keep joining meanwhile), looks its members'
//! instances up by name in one list call, and makes the missing ones in one bulk insert
//! with `count` = `minCount` = their number: all or nothing, so no member is left
//! half-made. When the zone lacks the capacity for all of them (`ZONE_RESOURCE_POOL_EXHAUSTED`
//! in the operation, or `503 insufficientCapacity` at once), or the region's CPU quota
//! would be passed (`quotaExceeded`), the batch is split in two and each half tried again,
//! down to single members, whose error goes back to the member (capacity is retried like
//! any insert; quota ends the member, and the fleet's `min_count` decides). A worker
//! keeps at most [`MAX_BULK_IN_FLIGHT`] bulk operations running, Compute Engine's limit.
//!
//! **Which instance is whose.** Every member's instance has its member's name
//! ([`instance_name`] of `<fleet>#<i>`), given in `perInstanceProperties`. A bulk insert's
//! properties are the same for all its instances, so instead of the request-id metadata
//! item of a single insert they carry the fleet's id ([`FLEET_KEY`]) and the batch's
//! members ([`MEMBERS_KEY`], `,3,7,12,`): the member whose name the instance has is its
//! owner ([`request_of`]). Lookups, teardown, describe, `owned` and the reconciler all
//! read it so; no per-instance call follows the insert.
//!
//! **Replays.** The bulk insert is keyed by a `requestId` derived from the fleet and its
//! members, so a lost answer's retry, or another worker retrying the same batch, gets the
//! first operation back (a failed one is walked past, as for single inserts). Members
//! whose instance already exists (an earlier attempt made it) are found by the lookup and
//! never inserted again; a name taken meanwhile fails the bulk insert as a conflict, and
//! its members look again on their next attempt.
//!
//! **Waiting for running** is one list call per batch per poll, each member answered as
//! soon as its own instance runs.

use std::collections::HashMap;
use std::time::Duration;

use google_cloud_compute_v1::model::{
    BulkInsertInstanceResource, BulkInsertInstanceResourcePerInstanceProperties, Instance,
    InstanceProperties, Metadata, instance, metadata,
};
use google_cloud_gax::options::RequestOptionsBuilder;
use provisioner_core::backoff::Backoff;
use provisioner_core::batch::{Batcher, Waiting};
use provisioner_core::{PacerSlot, PlatformError, RateLimit};
use provisioner_events::spec::gcp::GcpComputeSpec;
use provisioner_events::{ErrorClass, FleetMember, Request, RequestId, State};
use tracing::{info, warn};

use super::{
    ComputePlatform, DEFAULT_READY_TIMEOUT, instance_name, last_segment, metadata_item, state_of,
};
use crate::{REQUEST_ID_KEY, classify};

/// Metadata item naming the fleet a bulk-made instance belongs to.
pub const FLEET_KEY: &str = "provisioner-fleet-id";
/// Metadata item listing a bulk insert's members: `,3,7,12,`.
pub const MEMBERS_KEY: &str = "provisioner-fleet-members";
/// The most members one bulk insert makes: the names of a batch are looked up in one
/// list filter, which stays well within a URL's length at 50.
pub const MAX_BULK: usize = 50;
/// The least a batch waits for its bulk insert's operation, whatever its deadline.
const MIN_OPERATION_WAIT: Duration = Duration::from_secs(60);
/// Bulk inserts one worker keeps in flight at most. Compute Engine answers `403
/// rateLimitExceeded` to a project with more than 10 bulk operations running at once
/// (https://cloud.google.com/compute/docs/troubleshooting/troubleshooting-bulk-vm-creation):
/// a limit on operations in flight, not on the rate of calls, so it is kept by waiting
/// for one to finish, never by slowing every mutation down.
pub(crate) const MAX_BULK_IN_FLIGHT: usize = 10;

/// How long a batch gathers the inserts arriving with its first one.
const GATHER: Duration = Duration::from_millis(50);

/// Compute Engine's mutation quota (`Queries`, 1,500 a minute per project) as a bucket.
pub(crate) fn mutations_bucket(project: &str) -> RateLimit {
    RateLimit::new("Queries", project, 750.0, 12.5)
}

/// Compute Engine's read quota (1,500 a minute per project) as a bucket.
pub(crate) fn reads_bucket(project: &str) -> RateLimit {
    RateLimit::new("ReadRequests", project, 750.0, 12.5)
}

/// One member's insert, waiting in a batch.
#[derive(Debug)]
pub(crate) struct MemberInsert {
    request: Request,
    index: u32,
}

/// A member's insert answered: its instance, running, or why not.
pub(crate) type Made = Result<Instance, PlatformError>;

/// The batcher of a platform's member inserts, keyed by what the members must share.
pub(crate) type BulkBatcher = Batcher<String, MemberInsert, Made>;

/// Batches flushed by `platform` (a copy without a batcher of its own).
pub(crate) fn batcher(platform: ComputePlatform) -> BulkBatcher {
    Batcher::new(MAX_BULK, GATHER, move |_key, waiting| {
        let platform = platform.clone();
        async move { platform.flush(waiting).await }
    })
}

/// A fleet member's instance, running: made in a bulk insert with the member's
/// neighbours on this worker, or found where an earlier attempt made it.
pub(crate) async fn insert_member(
    batcher: &BulkBatcher,
    request: &Request,
    member: &FleetMember,
    zone: &str,
    pacer: PacerSlot,
    project: &str,
) -> Made {
    // What members must share to be made in one call: fleet, zone, spec and labels.
    let key = format!(
        "{}\n{zone}\n{}\n{}",
        member.fleet_request_id,
        serde_json::to_string(&request.spec).unwrap_or_default(),
        serde_json::to_string(&request.labels).unwrap_or_default()
    );
    let bucket = mutations_bucket(project);
    let insert = MemberInsert {
        request: request.clone(),
        index: member.index,
    };
    batcher
        .submit(key, insert, async move {
            pacer.pace(vec![bucket]).await;
        })
        .await
        .unwrap_or_else(|e| Err(PlatformError::transient(e.to_string())))
}

/// `,3,7,12,`: the [`MEMBERS_KEY`] value of a bulk insert of these members.
pub fn members_value(indices: &[u32]) -> String {
    let mut value = String::from(",");
    for index in indices {
        value.push_str(&format!("{index},"));
    }
    value
}

/// The request an instance was made for: its request-id metadata item, or, for a
/// bulk-made member, the member of its batch whose name it has. `None` for an instance
/// that names no request (never touched).
pub fn request_of(instance: &Instance) -> Option<String> {
    if let Some(id) = metadata_item(instance, REQUEST_ID_KEY) {
        return Some(id.to_owned());
    }
    let fleet = RequestId::new(metadata_item(instance, FLEET_KEY)?).ok()?;
    let name = instance.name.as_deref()?;
    metadata_item(instance, MEMBERS_KEY)?
        .split(',')
        .filter_map(|index| index.parse::<u32>().ok())
        .map(|index| fleet.member(index).to_string())
        .find(|member| instance_name(member) == name)
}

/// A list filter matching instances of these names.
fn names_filter(names: &[String]) -> String {
    match names {
        [one] => format!("name = \"{one}\""),
        _ => names
            .iter()
            .map(|name| format!("(name = \"{name}\")"))
            .collect::<Vec<_>>()
            .join(" OR "),
    }
}

impl ComputePlatform {
    /// The instances of `zone` with one of `names`, by name.
    async fn named(
        &self,
        zone: &str,
        names: &[String],
    ) -> Result<HashMap<String, Instance>, PlatformError> {
        let mut found = HashMap::new();
        for chunk in names.chunks(MAX_BULK) {
            let mut page_token = String::new();
            loop {
                let page = self
                    .client
                    .list()
                    .set_project(&self.settings.project)
                    .set_zone(zone)
                    .set_filter(names_filter(chunk))
                    .set_page_token(&page_token)
                    .send()
                    .await
                    .map_err(|e| {
                        classify(
                            &e,
                            &format!("looking up {} instances in {zone}", chunk.len()),
                        )
                    })?;
                for instance in page.items {
                    if let Some(name) = instance.name.clone() {
                        found.insert(name, instance);
                    }
                }
                match page.next_page_token.filter(|t| !t.is_empty()) {
                    Some(token) => page_token = token,
                    None => break,
                }
            }
        }
        Ok(found)
    }

    /// Carries out one batch: look up, insert what is missing, wait for all to run.
    async fn flush(&self, waiting: Vec<Waiting<MemberInsert, Made>>) {
        let Some(first) = waiting.first() else {
            return;
        };
        let request = first.item.request.clone();
        let Some(fleet) = request
            .fleet_member
            .as_ref()
            .map(|m| m.fleet_request_id.clone())
        else {
            return answer_all(waiting, PlatformError::transient("not a fleet member"));
        };
        let spec = match provisioner_core::platform::spec_of::<GcpComputeSpec>(&request) {
            Ok(spec) => spec,
            Err(e) => return answer_all(waiting, e),
        };
        let zone = match self.zone(&spec) {
            Ok(zone) => zone,
            Err(e) => return answer_all(waiting, e),
        };
        let deadline = tokio::time::Instant::now()
            + spec
                .ready_timeout_seconds
                .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let names: Vec<String> = waiting
            .iter()
            .map(|w| instance_name(w.item.request.request_id.as_str()))
            .collect();
        let found = match self.named(&zone, &names).await {
            Ok(found) => found,
            Err(e) => return answer_all(waiting, e),
        };
        let mut made = Vec::new();
        let mut missing = Vec::new();
        for (member, name) in waiting.into_iter().zip(names) {
            let id = member.item.request.request_id.to_string();
            match found.get(&name) {
                None => missing.push(member),
                Some(existing) if request_of(existing).as_deref() != Some(id.as_str()) => {
                    member.answer(Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!(
                            "instance {zone}/{name} exists and was not made for request {id}; it was left alone"
                        ),
                    )));
                }
                Some(existing) if state_of(existing.status.as_ref()) == State::Stopped => {
                    member.answer(Err(PlatformError::permanent(
                        ErrorClass::Conflict,
                        format!(
                            "instance {zone}/{name} of request {id} exists but is stopped; send a start request"
                        ),
                    )));
                }
                Some(_) => {
                    info!(instance = %name, zone = %zone, "found the member's instance made before");
                    made.push((name, member));
                }
            }
        }
        let bulk = Bulk {
            request: &request,
            spec: &spec,
            zone: &zone,
            fleet: &fleet,
            deadline,
        };
        // The first call's token was drawn before the batch closed.
        made.extend(self.bulk_insert(&bulk, missing, true).await);
        self.wait_members_running(&zone, made, deadline).await;
    }

    /// Inserts `members` in one bulk insert, or in halves when the zone lacks the
    /// capacity for all; answers the members it could not make and returns the rest with
    /// their instance names.
    async fn bulk_insert(
        &self,
        bulk: &Bulk<'_>,
        members: Vec<Waiting<MemberInsert, Made>>,
        paced: bool,
    ) -> Vec<(String, Waiting<MemberInsert, Made>)> {
        if !paced {
            self.pacer
                .pace(vec![mutations_bucket(&self.settings.project)])
                .await;
        }
        let members: Vec<_> = members.into_iter().filter(|m| !m.gone()).collect();
        if members.is_empty() {
            return Vec::new();
        }
        let indices: Vec<u32> = members.iter().map(|m| m.item.index).collect();
        let names: Vec<String> = members
            .iter()
            .map(|m| instance_name(m.item.request.request_id.as_str()))
            .collect();
        let count = i64::try_from(members.len()).unwrap_or(i64::MAX);
        let body = BulkInsertInstanceResource::new()
            .set_count(count)
            .set_min_count(count)
            .set_instance_properties(bulk.properties(&indices))
            .set_per_instance_properties(names.iter().map(|name| {
                (
                    name.clone(),
                    BulkInsertInstanceResourcePerInstanceProperties::new(),
                )
            }));
        let doing = format!(
            "making {count} × {} instances of fleet {} in {}",
            bulk.spec.machine_type, bulk.fleet, bulk.zone
        );
        let seed = format!("bulk:{}:{}", bulk.fleet, members_value(&indices));
        // Held until the operation is done: the in-flight limit counts operations.
        let _in_flight = self.bulk_in_flight.clone().acquire_owned().await;
        let sent = self
            .send_keyed(&seed, |key| {
                self.client
                    .bulk_insert()
                    .set_project(&self.settings.project)
                    .set_zone(bulk.zone)
                    .set_request_id(key)
                    .set_body(body.clone())
                    // Safe to resend: a replayed requestId answers the first operation.
                    .with_idempotency(true)
                    // But not by the client: a bulk insert's refusals (a zone out of
                    // capacity, a quota, the operations in flight) are answered by
                    // splitting the batch or waiting, which the client's resends of the
                    // same call would only delay; a lost answer is resent by the
                    // member's next attempt under the same requestId.
                    .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
                    .send()
            })
            .await;
        let result = match sent {
            Ok(op) => {
                // The batch's deadline, but never less than a minute: a bulk insert
                // cut short would leave its members with nothing said of their instances.
                let left = bulk
                    .deadline
                    .saturating_duration_since(tokio::time::Instant::now())
                    .max(MIN_OPERATION_WAIT);
                self.wait_operation(bulk.zone, op, &doing, left).await
            }
            Err(e) => Err(classify(&e, &doing)),
        };
        drop(_in_flight);
        // A bulk insert refused for its rate is refused for the bulk operations in flight
        // (other workers' too: the limit is the project's); this worker's calls stay
        // within the mutation bucket, whose rate is not the one to lower.
        if !matches!(&result, Err(e) if e.class == ErrorClass::Throttled) {
            self.pacer
                .adapt(vec![mutations_bucket(&self.settings.project)], false);
        }
        match result {
            Ok(()) => {
                info!(fleet = %bulk.fleet, made = members.len(), zone = bulk.zone, "made a batch of fleet members");
                names.into_iter().zip(members).collect()
            }
            // Capacity or the region's CPU quota for all of them but maybe not for fewer:
            // halves, down to single members, so a fleet that partly fits gets what
            // fits (and its `min_count` decides).
            Err(e)
                if matches!(e.class, ErrorClass::Capacity | ErrorClass::Quota)
                    && members.len() > 1 =>
            {
                warn!(error = %e, members = members.len(), "not enough capacity or quota for the whole batch; making it in halves");
                let mut first = members;
                let second = first.split_off(first.len() / 2);
                let mut made = Box::pin(self.bulk_insert(bulk, first, false)).await;
                made.extend(Box::pin(self.bulk_insert(bulk, second, false)).await);
                made
            }
            // A member's name was taken since the lookup (another attempt at it made it):
            // each member looks again on its next attempt and finds its instance.
            Err(e) if e.class == ErrorClass::Conflict => {
                answer_all(
                    members,
                    PlatformError::transient(format!(
                        "an instance of the batch exists already; looking again: {}",
                        e.message
                    )),
                );
                Vec::new()
            }
            Err(e) => {
                answer_all(members, e);
                Vec::new()
            }
        }
    }

    /// Polls the batch's instances together until each runs (answered at once), is gone,
    /// or the deadline passes.
    async fn wait_members_running(
        &self,
        zone: &str,
        mut pending: Vec<(String, Waiting<MemberInsert, Made>)>,
        deadline: tokio::time::Instant,
    ) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let mut backoff = Backoff::new(left, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            pending.retain(|(_, member)| !member.gone());
            if pending.is_empty() {
                return;
            }
            let names: Vec<String> = pending.iter().map(|(name, _)| name.clone()).collect();
            let mut seen = match self.named(zone, &names).await {
                Ok(seen) => seen,
                Err(e) => {
                    return answer_all(pending.into_iter().map(|(_, m)| m).collect(), e);
                }
            };
            let mut still = Vec::new();
            for (name, member) in pending {
                match seen.remove(&name) {
                    Some(instance) if instance.status == Some(instance::Status::Running) => {
                        member.answer(Ok(instance));
                    }
                    Some(instance) => still.push((name, member, instance.status)),
                    None => member.answer(Err(PlatformError::permanent(
                        ErrorClass::NotFound,
                        format!(
                            "instance {zone}/{name} disappeared while the worker waited for it"
                        ),
                    ))),
                }
            }
            if still.is_empty() {
                return;
            }
            if !backoff.wait().await {
                for (name, member, status) in still {
                    member.answer(Err(PlatformError::permanent(
                        ErrorClass::Timeout,
                        format!(
                            "instance {zone}/{name} is {status:?}, not Running, after {} s",
                            left.as_secs()
                        ),
                    )));
                }
                return;
            }
            pending = still
                .into_iter()
                .map(|(name, member, _)| (name, member))
                .collect();
        }
    }
}

/// What every bulk insert of a batch shares.
struct Bulk<'a> {
    request: &'a Request,
    spec: &'a GcpComputeSpec,
    zone: &'a str,
    fleet: &'a RequestId,
    deadline: tokio::time::Instant,
}

impl Bulk<'_> {
    /// The instances' properties: those of a single insert, with the fleet's marks in
    /// place of the request-id item, and the machine type by name (a bulk insert takes no
    /// URL there).
    fn properties(&self, indices: &[u32]) -> InstanceProperties {
        let single = ComputePlatform::instance(self.request, self.spec, self.zone, "");
        let mut items: Vec<metadata::Items> = single
            .metadata
            .map(|m| m.items)
            .unwrap_or_default()
            .into_iter()
            .filter(|item| item.key.as_deref() != Some(REQUEST_ID_KEY))
            .collect();
        items.push(
            metadata::Items::new()
                .set_key(FLEET_KEY)
                .set_value(self.fleet.as_str()),
        );
        items.push(
            metadata::Items::new()
                .set_key(MEMBERS_KEY)
                .set_value(members_value(indices)),
        );
        let mut properties = InstanceProperties::new()
            .set_machine_type(last_segment(&self.spec.machine_type))
            .set_disks(single.disks)
            .set_network_interfaces(single.network_interfaces)
            .set_labels(single.labels)
            .set_metadata(Metadata::new().set_items(items));
        if let Some(tags) = single.tags {
            properties = properties.set_tags(tags);
        }
        properties
    }
}

fn answer_all(waiting: Vec<Waiting<MemberInsert, Made>>, error: PlatformError) {
    for member in waiting {
        member.answer(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn made_in_bulk(fleet: &str, members: &str, name: &str) -> Instance {
        Instance::new().set_name(name).set_metadata(
            Metadata::new().set_items([
                metadata::Items::new().set_key(FLEET_KEY).set_value(fleet),
                metadata::Items::new()
                    .set_key(MEMBERS_KEY)
                    .set_value(members),
            ]),
        )
    }

    #[test]
    fn a_bulk_made_instance_belongs_to_the_member_whose_name_it_has() {
        let members = members_value(&[3, 7, 12]);
        assert_eq!(members, ",3,7,12,");
        let seven = made_in_bulk("batch-a", &members, &instance_name("batch-a#7"));
        assert_eq!(request_of(&seven).as_deref(), Some("batch-a#7"));
        // A name no member of the batch has, or marks of another fleet: nobody's.
        let stranger = made_in_bulk("batch-a", &members, &instance_name("batch-a#8"));
        assert_eq!(request_of(&stranger), None);
        let other = made_in_bulk("batch-b", &members, &instance_name("batch-a#7"));
        assert_eq!(request_of(&other), None);
        // A single insert's item wins.
        let single = Instance::new().set_name("x").set_metadata(
            Metadata::new().set_items([metadata::Items::new()
                .set_key(REQUEST_ID_KEY)
                .set_value("web-1")]),
        );
        assert_eq!(request_of(&single).as_deref(), Some("web-1"));
    }

    #[test]
    fn names_filters_match_one_or_many_names() {
        assert_eq!(names_filter(&["a".into()]), "name = \"a\"");
        assert_eq!(
            names_filter(&["a".into(), "b".into()]),
            "(name = \"a\") OR (name = \"b\")"
        );
    }
}
