//! The ECS worker's permission manifest: every IAM action it and `provisioner check`
//! call, and why. docs/aws-ecs.md's policy is [`iam_policy`] (a test compares them), the
//! Lambda template's role grants the same actions (scripts/lint-infra.sh), and the tests
//! against moto run the worker as an IAM user holding exactly this policy.

use provisioner_core::permissions::Permission;

/// Task and execution roles may be handed to ECS tasks only.
const TO_TASKS: &str = r#"{"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}"#;

pub const PERMISSIONS: &[Permission] = &[
    Permission::anywhere(
        "ecs:RunTask",
        "RunTask: a provision's task and a fleet's batches",
    ),
    Permission::anywhere(
        "ecs:TagResource",
        "the tags RunTask sets at launch (ECS authorizes tag-on-create as TagResource), and tagging a batch's tasks with their members",
    ),
    Permission::anywhere(
        "ecs:ListTasks",
        "ListTasks: the task a request started, found by its startedBy token before RunTask and after a crash; the reconciler's listing",
    ),
    Permission::anywhere(
        "ecs:DescribeTasks",
        "DescribeTasks: waiting for RUNNING (and HEALTHY), reading the task's address, checking its ownership tags, teardown and describe targets",
    ),
    Permission::anywhere(
        "ecs:StopTask",
        "StopTask: teardowns and removing what a failed provision made",
    ),
    Permission::anywhere(
        "ecs:ListClusters",
        "ListClusters: the reconciler walks every cluster; provisioner check",
    ),
    Permission::anywhere(
        "ecs:DescribeTaskDefinition",
        "DescribeTaskDefinition: the named definition's CPU (for a tenant's quota) and the inline container's definition, found before it is registered again",
    ),
    Permission::anywhere(
        "ecs:RegisterTaskDefinition",
        "RegisterTaskDefinition: an inline container's definition, once per content",
    ),
    Permission::at(
        "iam:PassRole",
        "arn:aws:iam::*:role/*",
        "task definitions with a task or execution role (narrow the resource to those roles)",
    )
    .when(TO_TASKS),
];

/// The IAM policy that grants exactly [`PERMISSIONS`].
pub fn iam_policy() -> serde_json::Value {
    provisioner_aws_common::iam_policy(PERMISSIONS)
}

#[cfg(test)]
mod tests {
    /// docs/aws-ecs.md's policy is the one generated from the manifest, so the two cannot
    /// drift: a right added to the code and not to the docs fails here.
    #[test]
    fn the_documented_policy_is_the_manifests() {
        let documented = provisioner_core::permissions::documented_json(
            include_str!("../../../docs/aws-ecs.md"),
            "\"Statement\"",
        );
        assert_eq!(
            documented,
            vec![super::iam_policy()],
            "regenerate it with `provisioner permissions --platform aws-ecs --policy`"
        );
    }
}
