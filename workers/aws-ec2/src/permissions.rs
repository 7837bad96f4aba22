//! The EC2 worker's permission manifest: every IAM action it and `provisioner check`
//! call, and why. docs/aws-ec2.md's policy is [`iam_policy`] (a test compares them), the
//! Lambda template's role grants the same actions (scripts/lint-infra.sh), and the tests
//! against moto run the worker as an IAM user holding exactly this policy.

use provisioner_core::permissions::Permission;

/// Tags may be written only by the launch that makes the instance: an unconditioned
/// `ec2:CreateTags` could mark any instance `provisioner:managed` and so pass a Deny
/// guarding the instances the provisioner did not launch.
const AT_LAUNCH: &str = r#"{"StringEquals": {"ec2:CreateAction": "RunInstances"}}"#;

pub const PERMISSIONS: &[Permission] = &[
    Permission::anywhere(
        "ec2:RunInstances",
        "RunInstances: a provision's launch, a fleet's batches, and the same with DryRun for check mode",
    ),
    Permission::anywhere(
        "ec2:DescribeInstances",
        "DescribeInstances: the instance a request made, found by its ownership tags before a launch and after a crash; waiting for running; stop, start, reboot, teardown and describe targets; the reconciler's listing; provisioner check (DryRun)",
    ),
    Permission::anywhere(
        "ec2:DescribeImages",
        "DescribeImages: the image and its root device, checked before a launch; provisioner check (DryRun)",
    ),
    Permission::anywhere(
        "ec2:DescribeInstanceTypes",
        "DescribeInstanceTypes: the vCPUs a provision with a tenant holds of its quota",
    ),
    Permission::anywhere(
        "ec2:StartInstances",
        "StartInstances: start requests, and the same with DryRun",
    ),
    Permission::anywhere(
        "ec2:StopInstances",
        "StopInstances: stop requests, and the same with DryRun",
    ),
    Permission::anywhere(
        "ec2:RebootInstances",
        "RebootInstances: reboot requests, and the same with DryRun",
    ),
    Permission::anywhere(
        "ec2:TerminateInstances",
        "TerminateInstances: teardowns, removing what a failed provision or a rolled-back fleet made, an emulator's launch that ignored DryRun",
    ),
    Permission::anywhere(
        "ec2:CreateTags",
        "the ownership tags RunInstances sets at launch (TagSpecifications), granted only for that",
    )
    .when(AT_LAUNCH),
];

/// The IAM policy that grants exactly [`PERMISSIONS`].
pub fn iam_policy() -> serde_json::Value {
    provisioner_aws_common::iam_policy(PERMISSIONS)
}

#[cfg(test)]
mod tests {
    /// docs/aws-ec2.md's policy is the one generated from the manifest, so the two cannot
    /// drift: a right added to the code and not to the docs fails here.
    #[test]
    fn the_documented_policy_is_the_manifests() {
        let documented = provisioner_core::permissions::documented_json(
            include_str!("../../../docs/aws-ec2.md"),
            "\"Statement\"",
        );
        assert_eq!(
            documented,
            vec![super::iam_policy()],
            "regenerate it with `provisioner permissions --platform aws-ec2 --policy`"
        );
    }
}
