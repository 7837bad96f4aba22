//! Fleet members launched in batches: one RunInstances for many members, the way
//! Karpenter batches its launches.
//!
//! A worker's concurrent member launches of one fleet join a batch
//! ([`provisioner_core::batch::Batcher`]). The batch waits for one token of EC2's
//! RunInstances request bucket (members keep joining meanwhile; each member's token of the
//! instance bucket was reserved by the runtime), looks up what its members launched
//! before, and launches the rest in one call with `MinCount` = `MaxCount` = their number.
//!
//! **Which instance is whose** is decided at launch and written on the instances, so a
//! crash anywhere after the call loses nothing: every instance carries the fleet's id
//! ([`FLEET_TAG`]) and the batch's members in launch order ([`MEMBERS_TAG`], e.g.
//! `,3,7,12,`); the instance with `AmiLaunchIndex` *k* is the *k*-th member's. Lookups
//! of a member (a retry, a takeover, a teardown, the reconciler) read the same tags, so
//! no tagging call follows the launch — 1,000 of them would cost more than the launches.
//!
//! **All or nothing per call.** `MinCount` = `MaxCount` makes EC2 launch the whole batch or
//! nothing, so no member is left half-assigned. When EC2 lacks the capacity for all of
//! them (`InsufficientInstanceCapacity`), or the account's vCPU quota would be passed
//! (`VcpuLimitExceeded`), the batch is split in two and each half tried again, down to
//! single members, whose error goes back to the member (a capacity error is retried like
//! any launch; a quota error ends the member, and the fleet's `min_count` decides).
//!
//! **Waiting for running** is also one call per batch: a DescribeInstances of all its
//! instances per poll, each member answered as soon as its own instance runs.
//!
//! **Teardowns** of members (a fleet's teardown, a rollback) batch the same way: one
//! lookup and one TerminateInstances for a batch's members, paced by the
//! TerminateInstances request bucket once.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_ec2::Client;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::{Filter, Instance, ResourceType, Tag, TagSpecification};
use provisioner_core::backoff::Backoff;
use provisioner_core::batch::{Batcher, Waiting};
use provisioner_core::cache::LookupCache;
use provisioner_core::{PacerSlot, PlatformError, RateLimit};
use provisioner_events::spec::aws_ec2::AwsEc2Spec;
use provisioner_events::{ErrorClass, Request};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::{LIVE_STATES, MANAGED_TAG, classify, instance_name, state_of, tag};

/// Tag naming the fleet a batch-launched instance belongs to.
pub const FLEET_TAG: &str = "provisioner:fleet-id";
/// Tag listing a batch's members in launch order: `,3,7,12,`.
pub const MEMBERS_TAG: &str = "provisioner:fleet-members";
/// The most members one RunInstances launches: their indices (up to `,999` each) must
/// fit one tag value of 256 characters.
pub const MAX_BATCH: usize = 50;
/// How long a batch gathers the launches arriving with its first one.
const GATHER: Duration = Duration::from_millis(50);
/// Instances per DescribeInstances while waiting for a batch to run.
const DESCRIBE_CHUNK: usize = 100;

/// A launch answered: the member's instance, running, or why not.
pub(crate) type Launched = Result<Instance, PlatformError>;

/// One member's launch, waiting in a batch.
#[derive(Debug)]
pub(crate) struct MemberLaunch {
    pub request: Request,
    pub index: u32,
}

/// What a batch's flush needs: the client, the region's buckets, the pacer.
#[derive(Clone)]
pub(crate) struct Launcher {
    pub client: Client,
    pub region: String,
    pub pacer: PacerSlot,
    /// Root device names of the images launched, looked up once each: a batch needs it
    /// for a root volume, and an image's never changes.
    pub root_devices: LookupCache<String, Option<String>>,
    /// vCPUs of the instance types asked for, looked up once each (tenants' `vcpus`
    /// quotas count them).
    pub vcpus: LookupCache<String, u64>,
}

impl std::fmt::Debug for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Launcher")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The batcher of a platform's member launches, keyed by what the members must share.
pub(crate) type LaunchBatcher = Batcher<String, MemberLaunch, Launched>;

pub(crate) fn launch_batcher(launcher: Launcher) -> LaunchBatcher {
    Batcher::new(MAX_BATCH, GATHER, move |_key, waiting| {
        let launcher = launcher.clone();
        async move { launcher.flush(waiting).await }
    })
}

/// A member's teardown answered: the instance terminated, or none was live.
pub(crate) type Terminated = Result<Option<Instance>, PlatformError>;

/// The batcher of a platform's member teardowns, keyed by fleet; items are member indices.
pub(crate) type TerminateBatcher = Batcher<String, u32, Terminated>;

pub(crate) fn terminate_batcher(launcher: Launcher) -> TerminateBatcher {
    Batcher::new(MAX_BATCH, GATHER, move |fleet: String, waiting| {
        let launcher = launcher.clone();
        async move { launcher.terminate(&fleet, waiting).await }
    })
}

/// What members must share to launch in one call: their fleet, spec and labels.
pub(crate) fn batch_key(request: &Request, fleet: &str) -> String {
    format!(
        "{fleet}\n{}\n{}",
        serde_json::to_string(&request.spec).unwrap_or_default(),
        serde_json::to_string(&request.labels).unwrap_or_default()
    )
}

/// `,3,7,12,`: the [`MEMBERS_TAG`] value of members launched in this order.
pub fn members_tag(indices: &[u32]) -> String {
    let mut value = String::from(",");
    for index in indices {
        value.push_str(&format!("{index},"));
    }
    value
}

/// The fleet and member index a [`members_tag`]-launched instance belongs to, from its
/// tags and launch index: `None` when it was not launched in a batch (or its tags are
/// not ours to read).
pub fn batch_member(instance: &Instance) -> Option<(String, u32)> {
    let fleet = tag(instance, FLEET_TAG)?;
    let members = tag(instance, MEMBERS_TAG)?;
    let position = usize::try_from(instance.ami_launch_index()?).ok()?;
    let index = members
        .split(',')
        .filter(|m| !m.is_empty())
        .nth(position)?
        .parse()
        .ok()?;
    Some((fleet.to_owned(), index))
}

/// A member id `<fleet>#<index>` split, or `None` for any other id.
pub fn member_parts(request_id: &str) -> Option<(&str, u32)> {
    provisioner_core::names::fleet_member_parts(request_id)
}

/// The `ClientToken` of a batch: the same for every worker that launches the same members
/// after the same failed instances, so real EC2 answers a lost call's retry with the
/// instances it made.
fn batch_token(fleet: &str, indices: &[u32], failed: &[String]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(fleet.as_bytes());
    hasher.update(members_tag(indices).as_bytes());
    for id in failed {
        hasher.update(b"#after#");
        hasher.update(id.as_bytes());
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("prov-batch-{}", &hex[..53])
}

/// EC2's RunInstances request bucket, which a batch's call draws on once.
pub(crate) fn run_instances_bucket(region: &str) -> RateLimit {
    RateLimit::new("RunInstances", region, 5.0, 2.0)
}

/// EC2's TerminateInstances request bucket, which a batch's call draws on once.
pub(crate) fn terminate_instances_bucket(region: &str) -> RateLimit {
    RateLimit::new("TerminateInstances", region, 50.0, 5.0)
}

impl Launcher {
    /// Waits for one token of the RunInstances request bucket.
    pub(crate) async fn pace_launch(&self) {
        self.pacer
            .pace(vec![run_instances_bucket(&self.region)])
            .await;
    }

    /// The root device name of `image_id`, from the cache or EC2.
    async fn root_device(&self, image_id: &str) -> Result<Option<String>, PlatformError> {
        self.root_devices
            .get_or_lookup(&image_id.to_owned(), || {
                crate::root_device(&self.client, &self.region, image_id)
            })
            .await
    }

    /// The default vCPUs of `instance_type`, from the cache or DescribeInstanceTypes.
    pub(crate) async fn vcpus(&self, instance_type: &str) -> Result<u64, PlatformError> {
        self.vcpus
            .get_or_lookup(&instance_type.to_owned(), || async {
                let output = self
                    .client
                    .describe_instance_types()
                    .instance_types(aws_sdk_ec2::types::InstanceType::from(instance_type))
                    .send()
                    .await
                    .map_err(|e| {
                        classify(&e, &format!("looking up instance type {instance_type}"))
                    })?;
                output
                    .instance_types()
                    .first()
                    .and_then(|t| t.v_cpu_info())
                    .and_then(|v| v.default_v_cpus())
                    .and_then(|n| u64::try_from(n).ok())
                    .ok_or_else(|| {
                        PlatformError::invalid(format!(
                            "instance type {instance_type} is not offered in {}",
                            self.region
                        ))
                    })
            })
            .await
    }

    /// Waits for one token of the TerminateInstances request bucket.
    pub(crate) async fn pace_terminate(&self) {
        self.pacer
            .pace(vec![terminate_instances_bucket(&self.region)])
            .await;
    }

    fn adapt(&self, throttled: bool) {
        self.pacer
            .adapt(vec![run_instances_bucket(&self.region)], throttled);
    }

    /// Terminates the live instances of a batch of `fleet`'s members in one call.
    async fn terminate(&self, fleet: &str, waiting: Vec<Waiting<u32, Terminated>>) {
        let indices: Vec<u32> = waiting.iter().map(|w| w.item).collect();
        let found = match self.members_instances(fleet, &indices).await {
            Ok(found) => found,
            Err(e) => {
                for member in waiting {
                    member.answer(Err(e.clone()));
                }
                return;
            }
        };
        let mut live: Vec<(Waiting<u32, Terminated>, Vec<Instance>)> = Vec::new();
        for member in waiting {
            let theirs: Vec<Instance> = found
                .get(&member.item)
                .into_iter()
                .flatten()
                .filter(|i| LIVE_STATES.contains(&state_of(i)))
                .cloned()
                .collect();
            if theirs.is_empty() {
                member.answer(Ok(None));
            } else {
                live.push((member, theirs));
            }
        }
        if live.is_empty() {
            return;
        }
        let ids: Vec<String> = live
            .iter()
            .flat_map(|(_, instances)| instances.iter().filter_map(|i| i.instance_id()))
            .map(str::to_owned)
            .collect();
        let result = self
            .client
            .terminate_instances()
            .set_instance_ids(Some(ids.clone()))
            .send()
            .await;
        let throttled = matches!(&result, Err(e) if classify(e, "").class == ErrorClass::Throttled);
        self.pacer
            .adapt(vec![terminate_instances_bucket(&self.region)], throttled);
        let outcome = match result {
            Ok(_) => {
                info!(
                    fleet,
                    terminated = ids.len(),
                    "terminated a batch of fleet members"
                );
                Ok(())
            }
            // One of them went meanwhile, and EC2 refuses the whole call for it: look
            // again on the members' next attempt.
            Err(e) if e.code().is_some_and(|c| c.starts_with("InvalidInstanceID")) => {
                Err(PlatformError::transient(format!(
                    "an instance of the batch was gone before its termination: {}",
                    classify(&e, "terminating a batch of members").message
                )))
            }
            Err(e) => Err(classify(
                &e,
                &format!("terminating {} instances of fleet {fleet}", ids.len()),
            )),
        };
        for (member, mut instances) in live {
            member.answer(outcome.clone().map(|()| Some(instances.swap_remove(0))));
        }
    }

    /// Carries out one batch: look up, launch what is missing, wait for all to run.
    async fn flush(&self, waiting: Vec<Waiting<MemberLaunch, Launched>>) {
        let Some(first) = waiting.first() else {
            return;
        };
        let request = first.item.request.clone();
        let fleet = match &request.fleet_member {
            Some(member) => member.fleet_request_id.to_string(),
            None => return answer_all(waiting, PlatformError::transient("not a fleet member")),
        };
        let spec = match crate::spec_of::<AwsEc2Spec>(&request) {
            Ok(spec) => spec,
            Err(e) => return answer_all(waiting, e),
        };
        let indices: Vec<u32> = waiting.iter().map(|w| w.item.index).collect();
        let found = match self.members_instances(&fleet, &indices).await {
            Ok(found) => found,
            Err(e) => return answer_all(waiting, e),
        };
        let mut running = Vec::new();
        let mut to_launch = Vec::new();
        for member in waiting {
            let theirs = found.get(&member.item.index);
            match theirs.and_then(|all| all.iter().find(|i| LIVE_STATES.contains(&state_of(i)))) {
                Some(live) => {
                    info!(
                        instance.id = live.instance_id().unwrap_or_default(),
                        member = member.item.index,
                        "found the member's instance launched before"
                    );
                    running.push((live.instance_id().unwrap_or_default().to_owned(), member));
                }
                None => {
                    let failed: Vec<String> = theirs
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.instance_id().map(str::to_owned))
                        .collect();
                    to_launch.push((member, failed));
                }
            }
        }
        if !to_launch.is_empty() {
            let root_device = match self.root_device(&spec.image_id).await {
                Ok(device) => device,
                Err(e) => {
                    return answer_all(
                        running
                            .into_iter()
                            .map(|(_, m)| m)
                            .chain(to_launch.into_iter().map(|(m, _)| m))
                            .collect(),
                        e,
                    );
                }
            };
            let launch = Launch {
                request: &request,
                spec: &spec,
                fleet: &fleet,
                root_device,
            };
            // The first call's token was taken before the batch closed.
            running.extend(self.launch(&launch, to_launch, true).await);
        }
        let timeout = spec
            .ready_timeout_seconds
            .map_or(crate::DEFAULT_READY_TIMEOUT, Duration::from_secs);
        self.wait_running(running, timeout).await;
    }

    /// Launches `members` in one call, or in halves when EC2 lacks the capacity for all;
    /// answers the members it could not launch and returns the rest with their instances.
    async fn launch<'a>(
        &'a self,
        launch: &'a Launch<'a>,
        members: Vec<(Waiting<MemberLaunch, Launched>, Vec<String>)>,
        paced: bool,
    ) -> Vec<(String, Waiting<MemberLaunch, Launched>)> {
        if !paced {
            self.pace_launch().await;
        }
        let members: Vec<_> = members.into_iter().filter(|(m, _)| !m.gone()).collect();
        if members.is_empty() {
            return Vec::new();
        }
        let indices: Vec<u32> = members.iter().map(|(m, _)| m.item.index).collect();
        let failed: Vec<String> = members
            .iter()
            .flat_map(|(_, f)| f.iter().cloned())
            .collect();
        let count = members.len() as i32;
        let token = batch_token(launch.fleet, &indices, &failed);
        let result = crate::run_instances_call(
            &self.client,
            launch.request,
            launch.spec,
            launch.root_device.clone(),
            token,
            count,
            batch_tags(launch.request, launch.spec, launch.fleet, &indices),
        )
        .send()
        .await
        .map_err(|e| {
            classify(
                &e,
                &format!(
                    "launching {count} × {} from {}",
                    launch.spec.instance_type, launch.spec.image_id
                ),
            )
        });
        self.adapt(matches!(&result, Err(e) if e.class == ErrorClass::Throttled));
        let output = match result {
            Ok(output) => output,
            // Capacity or the account's vCPU quota for all of them but maybe not for
            // fewer: halves, down to single members, so a fleet that partly fits gets
            // what fits (and `min_count` decides) instead of every member failing.
            Err(e)
                if matches!(e.class, ErrorClass::Capacity | ErrorClass::Quota)
                    && members.len() > 1 =>
            {
                warn!(error = %e, members = members.len(), "not enough capacity or quota for the whole batch; launching it in halves");
                let mut members = members;
                let second = members.split_off(members.len() / 2);
                let mut launched = Box::pin(self.launch(launch, members, false)).await;
                launched.extend(Box::pin(self.launch(launch, second, false)).await);
                return launched;
            }
            Err(e) => {
                answer_all(members.into_iter().map(|(m, _)| m).collect(), e);
                return Vec::new();
            }
        };
        let by_position: HashMap<usize, String> = output
            .instances()
            .iter()
            .enumerate()
            .filter_map(|(order, i)| {
                let position = i
                    .ami_launch_index()
                    .and_then(|p| usize::try_from(p).ok())
                    .unwrap_or(order);
                Some((position, i.instance_id()?.to_owned()))
            })
            .collect();
        info!(
            fleet = launch.fleet,
            launched = by_position.len(),
            members = members.len(),
            "launched a batch of fleet members"
        );
        let mut launched = Vec::new();
        for (position, (member, _)) in members.into_iter().enumerate() {
            match by_position.get(&position) {
                Some(id) => launched.push((id.clone(), member)),
                None => member.answer(Err(PlatformError::transient(format!(
                    "RunInstances answered without the instance at launch index {position}"
                )))),
            }
        }
        launched
    }

    /// Polls the batch's instances together until each runs (answered at once) or ends.
    async fn wait_running(
        &self,
        mut pending: Vec<(String, Waiting<MemberLaunch, Launched>)>,
        timeout: Duration,
    ) {
        let mut backoff = Backoff::new(timeout, Duration::from_millis(250), Duration::from_secs(5));
        loop {
            pending.retain(|(_, member)| !member.gone());
            if pending.is_empty() {
                return;
            }
            let ids: Vec<String> = pending.iter().map(|(id, _)| id.clone()).collect();
            let mut seen: HashMap<String, Instance> = HashMap::new();
            for chunk in ids.chunks(DESCRIBE_CHUNK) {
                // A filter, not InstanceIds: an id not yet visible (EC2 is eventually
                // consistent after a launch) is simply absent, not an error for all.
                let answer = self
                    .client
                    .describe_instances()
                    .filters(
                        Filter::builder()
                            .name("instance-id")
                            .set_values(Some(chunk.to_vec()))
                            .build(),
                    )
                    .send()
                    .await;
                match answer {
                    Ok(output) => {
                        for instance in output.reservations().iter().flat_map(|r| r.instances()) {
                            if let Some(id) = instance.instance_id() {
                                seen.insert(id.to_owned(), instance.clone());
                            }
                        }
                    }
                    Err(e) => {
                        let e = classify(&e, "describing a batch of launched instances");
                        if !e.retryable {
                            return answer_all(pending.into_iter().map(|(_, m)| m).collect(), e);
                        }
                        warn!(error = %e, "describing a batch failed; polling again");
                    }
                }
            }
            let mut still = Vec::new();
            let mut to_start = Vec::new();
            for (id, member) in pending {
                let Some(instance) = seen.remove(&id) else {
                    still.push((id, member));
                    continue;
                };
                match state_of(&instance) {
                    "running" => member.answer(Ok(instance)),
                    "terminated" | "shutting-down" => {
                        let reason = instance
                            .state_reason()
                            .and_then(|r| r.message())
                            .unwrap_or("no reason given");
                        member.answer(Err(PlatformError::retryable(
                            ErrorClass::Capacity,
                            format!(
                                "instance {id} was terminated before it was running ({reason})"
                            ),
                        )));
                    }
                    state => {
                        if state == "stopped" {
                            to_start.push(id.clone());
                        }
                        still.push((id, member));
                    }
                }
            }
            if !to_start.is_empty()
                && let Err(e) = self
                    .client
                    .start_instances()
                    .set_instance_ids(Some(to_start))
                    .send()
                    .await
            {
                warn!(error = %classify(&e, "starting stopped members"), "could not start stopped members; polling again");
            }
            pending = still;
            if pending.is_empty() {
                return;
            }
            if !backoff.wait().await {
                for (id, member) in pending {
                    member.answer(Err(PlatformError::permanent(
                        ErrorClass::Timeout,
                        format!(
                            "instance {id} was not running after {} s",
                            timeout.as_secs()
                        ),
                    )));
                }
                return;
            }
        }
    }

    /// Every instance, in any state, launched for the members `indices` of `fleet` (always
    /// in a batch, read from its tags): one DescribeInstances for a batch of up to 50.
    pub(crate) async fn members_instances(
        &self,
        fleet: &str,
        indices: &[u32],
    ) -> Result<HashMap<u32, Vec<Instance>>, PlatformError> {
        let mut found: HashMap<u32, Vec<Instance>> = HashMap::new();
        for instance in batch_instances(&self.client, fleet, indices, None).await? {
            if let Some((_, index)) = batch_member(&instance) {
                found.entry(index).or_default().push(instance);
            }
        }
        Ok(found)
    }
}

/// The instances batch-launched for members `indices` of `fleet`, in `states` (all when
/// `None`), each checked to be one of theirs by its launch index.
pub(crate) async fn batch_instances(
    client: &Client,
    fleet: &str,
    indices: &[u32],
    states: Option<&[&str]>,
) -> Result<Vec<Instance>, PlatformError> {
    let mut found = Vec::new();
    for chunk in indices.chunks(MAX_BATCH) {
        let mut describe = client
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{FLEET_TAG}"))
                    .values(fleet)
                    .build(),
            )
            .filters(
                Filter::builder()
                    .name(format!("tag:{MEMBERS_TAG}"))
                    .set_values(Some(chunk.iter().map(|i| format!("*,{i},*")).collect()))
                    .build(),
            );
        if let Some(states) = states {
            describe = describe.filters(
                Filter::builder()
                    .name("instance-state-name")
                    .set_values(Some(states.iter().map(|s| (*s).to_owned()).collect()))
                    .build(),
            );
        }
        let output = describe
            .send()
            .await
            .map_err(|e| classify(&e, "looking up the fleet members' instances"))?;
        for instance in output.reservations().iter().flat_map(|r| r.instances()) {
            // The filter matched the member anywhere in the list; the launch index says
            // whether this instance is the member's.
            let theirs = batch_member(instance)
                .is_some_and(|(f, index)| f == fleet && chunk.contains(&index));
            let in_state = states.is_none_or(|s| s.contains(&state_of(instance)));
            if theirs && in_state {
                found.push(instance.clone());
            }
        }
    }
    Ok(found)
}

/// What one batch's launches share.
struct Launch<'a> {
    request: &'a Request,
    spec: &'a AwsEc2Spec,
    fleet: &'a str,
    root_device: Option<String>,
}

/// A batch's tags: the labels, the spec's tags, a name for the fleet, and the marks that
/// say whose each instance is.
fn batch_tags(request: &Request, spec: &AwsEc2Spec, fleet: &str, indices: &[u32]) -> Vec<Tag> {
    let mut tags: BTreeMap<String, String> = request.labels.clone();
    tags.extend(spec.tags.clone());
    tags.insert("Name".into(), instance_name(fleet));
    tags.insert(MANAGED_TAG.into(), "true".into());
    tags.insert(FLEET_TAG.into(), fleet.to_owned());
    tags.insert(MEMBERS_TAG.into(), members_tag(indices));
    tags.into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

pub(crate) fn tag_specification(tags: Vec<Tag>) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(ResourceType::Instance)
        .set_tags(Some(tags))
        .build()
}

fn answer_all(waiting: Vec<Waiting<MemberLaunch, Launched>>, error: PlatformError) {
    for member in waiting {
        member.answer(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch_launched(fleet: &str, members: &[u32], launch_index: i32) -> Instance {
        Instance::builder()
            .ami_launch_index(launch_index)
            .tags(Tag::builder().key(FLEET_TAG).value(fleet).build())
            .tags(
                Tag::builder()
                    .key(MEMBERS_TAG)
                    .value(members_tag(members))
                    .build(),
            )
            .build()
    }

    #[test]
    fn an_instance_is_the_member_at_its_launch_index() {
        assert_eq!(members_tag(&[3, 7, 12]), ",3,7,12,");
        let fleet = "fleet-a";
        assert_eq!(
            batch_member(&batch_launched(fleet, &[3, 7, 12], 0)),
            Some((fleet.into(), 3))
        );
        assert_eq!(
            batch_member(&batch_launched(fleet, &[3, 7, 12], 2)),
            Some((fleet.into(), 12))
        );
        assert_eq!(
            batch_member(&batch_launched(fleet, &[3, 7, 12], 3)),
            None,
            "past the batch"
        );
        assert_eq!(
            batch_member(&Instance::builder().build()),
            None,
            "not batch-launched"
        );
    }

    #[test]
    fn a_full_batch_fits_one_tag_value() {
        let indices: Vec<u32> = (950..1000).collect();
        assert_eq!(indices.len(), MAX_BATCH);
        assert!(members_tag(&indices).len() <= 256);
    }

    #[test]
    fn member_ids_split_into_fleet_and_index() {
        assert_eq!(member_parts("fleet-a#12"), Some(("fleet-a", 12)));
        assert_eq!(member_parts("fleet-a#12.rollback"), None);
        assert_eq!(member_parts("fleet-a"), None);
        assert_eq!(member_parts("#3"), None);
    }

    #[test]
    fn batch_tokens_are_stable_short_and_change_after_a_failure() {
        let token = batch_token("fleet-a", &[1, 2], &[]);
        assert_eq!(token, batch_token("fleet-a", &[1, 2], &[]));
        assert_eq!(token.len(), 64);
        assert_ne!(token, batch_token("fleet-a", &[1, 3], &[]));
        assert_ne!(token, batch_token("fleet-a", &[1, 2], &["i-1".into()]));
    }
}
