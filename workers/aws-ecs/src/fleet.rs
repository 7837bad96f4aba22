//! Fleet members started in batches: one RunTask with `count` (up to 10, ECS's most) for
//! several members of a fleet.
//!
//! A worker's concurrent member launches of one fleet join a batch
//! ([`provisioner_core::batch::Batcher`]), which waits for one token of the RunTask
//! bucket and starts the members that have no task yet in one call.
//!
//! **Finding a member's task.** Members are grouped by index (0–9, 10–19, …) and a batch
//! only holds members of one group, so a group's tasks share one `startedBy`
//! ([`group_token`]) and one ListTasks finds all of them. Each task of a batch carries the
//! batch's members ([`MEMBERS_TAG`]: the batch's id and the member indices in order); the
//! call's tasks sorted by ARN are its members in that order. Right after the call every
//! task is tagged with its member's request id as any task is, which is what every later
//! lookup reads; a worker that died between the call and the tagging leaves tasks a
//! retry still finds by the batch's members and the ARN order, and tags then.
//! ECS has no batch call to stop tasks: member teardowns are one StopTask each.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use aws_sdk_ecs::Client;
use aws_sdk_ecs::types::{DesiredStatus, Tag, Task};
use provisioner_core::batch::{Batcher, Waiting};
use provisioner_core::{PacerSlot, PlatformError, RateLimit};
use provisioner_events::Request;
use provisioner_events::spec::aws_ecs::AwsEcsSpec;
use tracing::{info, warn};

use crate::{
    MANAGED_TAG, REQUEST_TAG, classify, classify_failure, hex_digest, last_status,
    request_tag_value, request_token, tag,
};

/// Tag naming the fleet a batch-started task belongs to.
pub const FLEET_TAG: &str = "provisioner:fleet-id";
/// Tag holding a batch's id and its members in start order: `3f9a…/.3.7.12.`.
pub const MEMBERS_TAG: &str = "provisioner:fleet-members";
/// The most tasks one RunTask starts, and so the size of a group of members.
pub const MAX_BATCH: u32 = 10;
/// How long a batch gathers the launches arriving with its first one.
const GATHER: Duration = Duration::from_millis(50);

/// The members of groups' tasks, looked up once each: (cluster, fleet, group) → task
/// ARN → member index.
pub(crate) type GroupAssignments = HashMap<(String, String, u32), HashMap<String, u32>>;

/// A launch answered: the member's task (not yet running), or why there is none.
pub(crate) type Started = Result<Task, PlatformError>;

/// One member's launch, waiting in a batch.
#[derive(Debug)]
pub(crate) struct MemberRun {
    pub request: Request,
    pub index: u32,
    /// The task definition the members run (registered by the member for inline
    /// containers).
    pub definition: String,
}

/// What a batch needs: the client, the region's buckets, the pacer.
#[derive(Clone)]
pub(crate) struct Runner {
    pub client: Client,
    pub region: String,
    pub pacer: PacerSlot,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

pub(crate) type RunBatcher = Batcher<String, MemberRun, Started>;

pub(crate) fn run_batcher(runner: Runner) -> RunBatcher {
    Batcher::new(MAX_BATCH as usize, GATHER, move |_key, waiting| {
        let runner = runner.clone();
        async move { runner.flush(waiting).await }
    })
}

/// The group of member `index`: the members a batch may hold together.
pub fn group_of(index: u32) -> u32 {
    index / MAX_BATCH
}

/// The `startedBy` of every task of a fleet's group.
pub fn group_token(fleet: &str, group: u32) -> String {
    request_token(&format!("{fleet}#group-{group}"))
}

/// What members must share to start in one call: fleet, group, definition, spec, labels.
pub(crate) fn batch_key(run: &MemberRun, fleet: &str) -> String {
    format!(
        "{fleet}\n{}\n{}\n{}\n{}",
        group_of(run.index),
        run.definition,
        serde_json::to_string(&run.request.spec).unwrap_or_default(),
        serde_json::to_string(&run.request.labels).unwrap_or_default()
    )
}

/// The [`MEMBERS_TAG`] value of a batch `batch` starting `indices` in this order.
pub fn members_tag(batch: &str, indices: &[u32]) -> String {
    let mut value = format!("{batch}/.");
    for index in indices {
        value.push_str(&format!("{index}."));
    }
    value
}

/// The member indices a [`members_tag`] value lists, in order.
fn members_of(value: &str) -> Option<Vec<u32>> {
    let (_, list) = value.split_once('/')?;
    list.split('.')
        .filter(|m| !m.is_empty())
        .map(|m| m.parse().ok())
        .collect()
}

/// Which member of `fleet` each task is: its request tag, or else its batch's members
/// zipped with the batch's tasks sorted by ARN. The flag says the task has its tag.
pub fn assign(fleet: &str, tasks: &[Task]) -> Vec<(u32, Task, bool)> {
    let member_of_tag = |task: &Task| {
        crate::tagged_request_id(task).and_then(|id| {
            provisioner_core::names::fleet_member_parts(&id)
                .filter(|(f, _)| *f == fleet)
                .map(|(_, index)| index)
        })
    };
    let fleet_value = request_tag_value(fleet);
    let mut assigned = Vec::new();
    let mut batches: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
    for task in tasks {
        match tag(task, MEMBERS_TAG) {
            Some(batch) if tag(task, FLEET_TAG) == Some(fleet_value.as_str()) => {
                batches.entry(batch).or_default().push(task);
            }
            _ => {
                if let Some(index) = member_of_tag(task) {
                    assigned.push((index, task.clone(), true));
                }
            }
        }
    }
    // Every task of a batch, tagged or not, keeps its place in the ARN order.
    for (batch, mut tasks) in batches {
        let Some(members) = members_of(batch) else {
            continue;
        };
        tasks.sort_by_key(|t| t.task_arn().unwrap_or_default().to_owned());
        for (index, task) in members.into_iter().zip(tasks) {
            match member_of_tag(task) {
                Some(tagged) => assigned.push((tagged, task.clone(), true)),
                None => assigned.push((index, task.clone(), false)),
            }
        }
    }
    assigned
}

fn task_tags(request: &Request, spec: &AwsEcsSpec, fleet: &str, members: &str) -> Vec<Tag> {
    let mut tags: BTreeMap<String, String> = request.labels.clone();
    tags.extend(spec.tags.clone());
    tags.insert(MANAGED_TAG.into(), "true".into());
    tags.insert(FLEET_TAG.into(), request_tag_value(fleet));
    tags.insert(MEMBERS_TAG.into(), members.to_owned());
    tags.into_iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// ECS's RunTask bucket, which a batch's call draws on once.
pub(crate) fn run_task_bucket(region: &str) -> RateLimit {
    RateLimit::new("RunTask", region, 100.0, 40.0)
}

impl Runner {
    /// Waits for one token of the RunTask bucket.
    pub(crate) async fn pace_run(&self) {
        self.pacer.pace(vec![run_task_bucket(&self.region)]).await;
    }

    /// Every task of `fleet`'s group `group` in `cluster`, running or stopped.
    async fn group_tasks(
        &self,
        cluster: &str,
        fleet: &str,
        group: u32,
    ) -> Result<Vec<Task>, PlatformError> {
        let token = group_token(fleet, group);
        let mut arns = Vec::new();
        for status in [DesiredStatus::Running, DesiredStatus::Stopped] {
            let mut next = None;
            loop {
                let page = self
                    .client
                    .list_tasks()
                    .cluster(cluster)
                    .started_by(&token)
                    .desired_status(status.clone())
                    .set_next_token(next)
                    .send()
                    .await
                    .map_err(|e| {
                        classify(&e, &format!("looking up the fleet's tasks in {cluster}"))
                    })?;
                arns.extend(page.task_arns().iter().cloned());
                next = page.next_token().map(str::to_owned);
                if next.is_none() {
                    break;
                }
            }
        }
        let mut tasks = Vec::new();
        for chunk in arns.chunks(100) {
            let output = self
                .client
                .describe_tasks()
                .cluster(cluster)
                .set_tasks(Some(chunk.to_vec()))
                .include(aws_sdk_ecs::types::TaskField::Tags)
                .send()
                .await
                .map_err(|e| classify(&e, &format!("describing the fleet's tasks in {cluster}")))?;
            tasks.extend(output.tasks().iter().cloned());
        }
        Ok(tasks)
    }

    /// Tags `task` with member `index`'s request id; a failure leaves it found by its
    /// batch's members, and the next lookup tries again.
    async fn tag_member(&self, fleet: &str, index: u32, task: &Task) {
        let Some(arn) = task.task_arn() else {
            return;
        };
        let tagged = self
            .client
            .tag_resource()
            .resource_arn(arn)
            .tags(
                Tag::builder()
                    .key(REQUEST_TAG)
                    .value(request_tag_value(&format!("{fleet}#{index}")))
                    .build(),
            )
            .send()
            .await;
        if let Err(e) = tagged {
            warn!(error = %classify(&e, "tagging a member's task"), task.arn = arn, "could not tag a member's task; it is still found by its batch");
        }
    }

    /// The live tasks of member `index` of `fleet` in `cluster` (tagging any found by its
    /// batch alone).
    pub(crate) async fn member_tasks(
        &self,
        cluster: &str,
        fleet: &str,
        index: u32,
    ) -> Result<Vec<Task>, PlatformError> {
        let tasks = self.group_tasks(cluster, fleet, group_of(index)).await?;
        let mut live = Vec::new();
        for (member, task, tagged) in assign(fleet, &tasks) {
            if member != index || last_status(&task) == "STOPPED" {
                continue;
            }
            if !tagged {
                self.tag_member(fleet, index, &task).await;
            }
            live.push(task);
        }
        Ok(live)
    }

    /// The member request a batch-started task belongs to when it has no request tag yet
    /// (its worker died between RunTask and the tagging): read from its batch's marks and
    /// place among the group's tasks, as a retry of the member reads it. `None` for a
    /// task that is no batch's. `groups` keeps each group's assignment once looked up,
    /// so the untagged tasks of one group (up to a batch's ten) cost one lookup.
    pub(crate) async fn untagged_member(
        &self,
        cluster: &str,
        task: &Task,
        groups: &mut GroupAssignments,
    ) -> Result<Option<String>, PlatformError> {
        let (Some(fleet), Some(members)) = (tag(task, FLEET_TAG), tag(task, MEMBERS_TAG)) else {
            return Ok(None);
        };
        let Some(group) = members_of(members)
            .and_then(|m| m.first().copied())
            .map(group_of)
        else {
            return Ok(None);
        };
        let arn = task.task_arn().unwrap_or_default();
        let key = (cluster.to_owned(), fleet.to_owned(), group);
        if !groups.contains_key(&key) {
            let tasks = self.group_tasks(cluster, fleet, group).await?;
            let assigned = assign(fleet, &tasks)
                .into_iter()
                .filter_map(|(index, t, _)| Some((t.task_arn()?.to_owned(), index)))
                .collect();
            groups.insert(key.clone(), assigned);
        }
        Ok(groups[&key].get(arn).and_then(|index| {
            provisioner_events::RequestId::new(fleet)
                .ok()
                .map(|f| f.member(*index).to_string())
        }))
    }

    /// Carries out one batch: look up the group, start what is missing in one call.
    async fn flush(&self, waiting: Vec<Waiting<MemberRun, Started>>) {
        let Some(first) = waiting.first() else {
            return;
        };
        let request = first.item.request.clone();
        let definition = first.item.definition.clone();
        let group = group_of(first.item.index);
        let Some(fleet) = request
            .fleet_member
            .as_ref()
            .map(|m| m.fleet_request_id.to_string())
        else {
            return answer_all(waiting, PlatformError::transient("not a fleet member"));
        };
        let spec = match crate::spec_of::<AwsEcsSpec>(&request) {
            Ok(spec) => spec,
            Err(e) => return answer_all(waiting, e),
        };
        let tasks = match self.group_tasks(&spec.cluster, &fleet, group).await {
            Ok(tasks) => tasks,
            Err(e) => return answer_all(waiting, e),
        };
        let mut found: HashMap<u32, Vec<(Task, bool)>> = HashMap::new();
        for (index, task, tagged) in assign(&fleet, &tasks) {
            found.entry(index).or_default().push((task, tagged));
        }
        let mut to_start = Vec::new();
        let mut failed = Vec::new();
        for member in waiting {
            let theirs = found.remove(&member.item.index).unwrap_or_default();
            match theirs.iter().find(|(t, _)| last_status(t) != "STOPPED") {
                Some((task, tagged)) => {
                    info!(
                        task.arn = task.task_arn().unwrap_or_default(),
                        member = member.item.index,
                        "found the member's task started before"
                    );
                    if !tagged {
                        self.tag_member(&fleet, member.item.index, task).await;
                    }
                    member.answer(Ok(task.clone()));
                }
                None => {
                    failed.extend(
                        theirs
                            .iter()
                            .filter_map(|(t, _)| t.task_arn().map(str::to_owned)),
                    );
                    to_start.push(member);
                }
            }
        }
        let to_start: Vec<_> = to_start.into_iter().filter(|m| !m.gone()).collect();
        if to_start.is_empty() {
            return;
        }
        let indices: Vec<u32> = to_start.iter().map(|m| m.item.index).collect();
        let token = batch_token(&fleet, &indices, &failed);
        let members = members_tag(&token[5..21], &indices);
        let call = crate::run_task_call(
            &self.client,
            &spec,
            &definition,
            indices.len() as i32,
            &token,
            &group_token(&fleet, group),
            task_tags(&request, &spec, &fleet, &members),
        );
        let call = match call {
            Ok(call) => call,
            Err(e) => return answer_all(to_start, e),
        };
        let result = call.send().await.map_err(|e| {
            classify(
                &e,
                &format!(
                    "running {} × {definition} in cluster {}",
                    indices.len(),
                    spec.cluster
                ),
            )
        });
        let throttled =
            matches!(&result, Err(e) if e.class == provisioner_events::ErrorClass::Throttled);
        self.pacer
            .adapt(vec![run_task_bucket(&self.region)], throttled);
        let output = match result {
            Ok(output) => output,
            Err(e) => return answer_all(to_start, e),
        };
        let mut started: Vec<Task> = output.tasks().to_vec();
        started.sort_by_key(|t| t.task_arn().unwrap_or_default().to_owned());
        info!(
            fleet,
            started = started.len(),
            members = to_start.len(),
            "started a batch of fleet members"
        );
        let mut shortfall = match output.failures().first() {
            Some(failure) => classify_failure(
                failure.reason().unwrap_or("unknown"),
                failure.detail().unwrap_or_default(),
            ),
            None => PlatformError::transient(
                "RunTask started fewer tasks than asked, naming no failure",
            ),
        };
        // A partial placement (RunTask's `failures[]` beside the tasks it started): the
        // members left out are retried. Their next batch holds fewer members than this
        // one, so its clientToken is new and ECS places it afresh instead of answering
        // this call's failure again. A batch of which nothing started keeps its token
        // for its members' next try, so its failure stands (as for one task).
        if !started.is_empty() && shortfall.class == provisioner_events::ErrorClass::Capacity {
            shortfall.retryable = true;
            shortfall.message = format!(
                "{} (left out of a partial placement: retried in a batch of its own)",
                shortfall.message
            );
        }
        let mut started = started.into_iter();
        for member in to_start {
            match started.next() {
                Some(task) => {
                    self.tag_member(&fleet, member.item.index, &task).await;
                    member.answer(Ok(task));
                }
                None => member.answer(Err(shortfall.clone())),
            }
        }
    }
}

/// The `clientToken` of a batch: the same for every worker that starts the same members
/// after the same stopped tasks.
fn batch_token(fleet: &str, indices: &[u32], failed: &[String]) -> String {
    let mut text = format!("{fleet}{}", members_tag("", indices));
    for arn in failed {
        text.push_str("#after#");
        text.push_str(arn);
    }
    format!("prov-{}", &hex_digest(&text)[..59])
}

fn answer_all(waiting: Vec<Waiting<MemberRun, Started>>, error: PlatformError) {
    for member in waiting {
        member.answer(Err(error.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(arn: &str, tags: &[(&str, &str)]) -> Task {
        let mut task = Task::builder().task_arn(arn).last_status("RUNNING");
        for (k, v) in tags {
            task = task.tags(Tag::builder().key(*k).value(*v).build());
        }
        task.build()
    }

    #[test]
    fn a_batchs_tasks_in_arn_order_are_its_members_until_tagged() {
        let members = members_tag("b1", &[3, 7, 12]);
        assert_eq!(members, "b1/.3.7.12.");
        let fleet = [(FLEET_TAG, "f"), (MEMBERS_TAG, members.as_str())];
        let tasks = vec![
            task("arn:c", &fleet),
            task("arn:a", &fleet),
            task(
                "arn:b",
                &[
                    (FLEET_TAG, "f"),
                    (MEMBERS_TAG, members.as_str()),
                    (REQUEST_TAG, "f:7"),
                ],
            ),
            task("arn:z", &[(REQUEST_TAG, "other:1")]),
        ];
        let mut assigned: Vec<(u32, String, bool)> = assign("f", &tasks)
            .into_iter()
            .map(|(i, t, tagged)| (i, t.task_arn().unwrap_or_default().to_owned(), tagged))
            .collect();
        assigned.sort();
        // The tagged task is 7's by its tag, and keeps its place: the others are 3 and 12.
        assert_eq!(
            assigned,
            vec![
                (3, "arn:a".into(), false),
                (7, "arn:b".into(), true),
                (12, "arn:c".into(), false)
            ]
        );
    }

    #[test]
    fn untagged_tasks_of_a_batch_zip_with_its_members_by_arn() {
        let members = members_tag("b1", &[3, 7, 12]);
        let fleet = [(FLEET_TAG, "f"), (MEMBERS_TAG, members.as_str())];
        let tasks = vec![
            task("arn:c", &fleet),
            task("arn:a", &fleet),
            task("arn:b", &fleet),
        ];
        let mut assigned: Vec<(u32, String)> = assign("f", &tasks)
            .into_iter()
            .map(|(i, t, _)| (i, t.task_arn().unwrap_or_default().to_owned()))
            .collect();
        assigned.sort();
        assert_eq!(
            assigned,
            vec![
                (3, "arn:a".into()),
                (7, "arn:b".into()),
                (12, "arn:c".into())
            ]
        );
    }

    #[test]
    fn groups_hold_ten_members_and_tokens_fit_started_by() {
        assert_eq!((group_of(0), group_of(9), group_of(10)), (0, 0, 1));
        assert_ne!(group_token("f", 0), group_token("f", 1));
        assert_eq!(group_token("f", 0).len(), 64);
        assert_eq!(batch_token("f", &[1, 2], &[]).len(), 64);
        assert_ne!(
            batch_token("f", &[1, 2], &[]),
            batch_token("f", &[1, 2], &["arn:x".into()])
        );
        // The members tag of a full batch of 3-digit indices fits a tag value.
        let indices: Vec<u32> = (990..1000).collect();
        assert!(members_tag(&"0".repeat(16), &indices).len() <= 256);
    }
}
