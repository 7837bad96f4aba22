//! The GCP workers' permission manifests: every IAM permission the `gcp-compute` and
//! `gcp-cloud-run` workers and `provisioner check` use, where it must be granted, and
//! why; and the predefined roles docs/gcp.md tells an operator to grant, with the
//! permissions of theirs the workers rely on. A test checks every manifest permission is
//! in a documented role at its scope, and the fake GCP server grants exactly those
//! roles' permissions and refuses every other call with the API's own 403.
//!
//! Permissions per method: <https://cloud.google.com/compute/docs/reference/rest/v1/instances/insert>
//! (and the other methods' pages), <https://cloud.google.com/compute/docs/instances/create-start-instance#required-permissions>,
//! <https://cloud.google.com/run/docs/reference/iam/permissions>,
//! <https://cloud.google.com/run/docs/securing/service-identity#deploying>.
//! Roles: <https://cloud.google.com/iam/docs/understanding-roles>.

use provisioner_core::permissions::Permission;

/// Granted on the project (a role binding in its IAM policy).
pub const PROJECT: &str = "project";
/// Granted on the service account the Cloud Run services run as.
pub const RUNTIME_SERVICE_ACCOUNT: &str = "runtime service account";

pub const COMPUTE_PERMISSIONS: &[Permission] = &[
    Permission::at(
        "compute.instances.create",
        PROJECT,
        "instances.insert, and bulkInsert for a fleet's batches",
    ),
    Permission::at(
        "compute.disks.create",
        PROJECT,
        "the boot disk each insert makes from the spec's image",
    ),
    Permission::at(
        "compute.images.useReadOnly",
        PROJECT,
        "booting from an image of the project (public images grant it to everyone)",
    ),
    Permission::at(
        "compute.subnetworks.use",
        PROJECT,
        "placing the instance's interface in the network or subnetwork",
    ),
    Permission::at(
        "compute.subnetworks.useExternalIp",
        PROJECT,
        "an external address, for specs with public_ip",
    ),
    Permission::at(
        "compute.instances.setMetadata",
        PROJECT,
        "the metadata set at insert: the request id item the worker finds its instance by, and the spec's items",
    ),
    Permission::at(
        "compute.instances.setLabels",
        PROJECT,
        "the labels set at insert: the managed label and the request's",
    ),
    Permission::at(
        "compute.instances.setTags",
        PROJECT,
        "the network tags set at insert, for specs with network_tags",
    ),
    Permission::at(
        "compute.instances.get",
        PROJECT,
        "the instance a request made, read by name before an insert and after a crash; the wait for RUNNING; teardown, describe and power targets",
    ),
    Permission::at(
        "compute.instances.list",
        PROJECT,
        "aggregated and zone lists by label and name: the reconciler, fleet members, provisioner check",
    ),
    Permission::at(
        "compute.instances.delete",
        PROJECT,
        "teardowns and removing what a failed provision made",
    ),
    Permission::at("compute.instances.start", PROJECT, "start requests"),
    Permission::at("compute.instances.stop", PROJECT, "stop requests"),
    Permission::at("compute.instances.reset", PROJECT, "reboot requests"),
    Permission::at(
        "compute.zoneOperations.get",
        PROJECT,
        "polling the zone operation every mutation answers",
    ),
    Permission::at(
        "compute.machineTypes.get",
        PROJECT,
        "the vCPUs of a machine type, which a provision with a tenant holds of its quota",
    ),
];

pub const CLOUD_RUN_PERMISSIONS: &[Permission] = &[
    Permission::at("run.services.create", PROJECT, "creating the service"),
    Permission::at(
        "run.services.get",
        PROJECT,
        "the service a request made, read by name before a create and after a crash; the wait for Ready; teardown and describe targets",
    ),
    Permission::at(
        "run.services.list",
        PROJECT,
        "the reconciler's listing of each served region; provisioner check",
    ),
    Permission::at(
        "run.services.delete",
        PROJECT,
        "teardowns and removing what a failed provision made",
    ),
    Permission::at(
        "iam.serviceAccounts.actAs",
        RUNTIME_SERVICE_ACCOUNT,
        "deploying a service that runs as that account (run.admin alone is refused)",
    ),
];

/// A predefined role the docs tell an operator to grant, where, and the permissions of
/// it the workers rely on (the role holds more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocumentedRole {
    pub role: &'static str,
    pub scope: &'static str,
    pub permissions: &'static [&'static str],
}

pub const COMPUTE_ROLES: &[DocumentedRole] = &[DocumentedRole {
    role: "roles/compute.instanceAdmin.v1",
    scope: PROJECT,
    permissions: &[
        "compute.instances.create",
        "compute.disks.create",
        "compute.images.useReadOnly",
        "compute.subnetworks.use",
        "compute.subnetworks.useExternalIp",
        "compute.instances.setMetadata",
        "compute.instances.setLabels",
        "compute.instances.setTags",
        "compute.instances.get",
        "compute.instances.list",
        "compute.instances.delete",
        "compute.instances.start",
        "compute.instances.stop",
        "compute.instances.reset",
        "compute.zoneOperations.get",
        "compute.machineTypes.get",
    ],
}];

pub const CLOUD_RUN_ROLES: &[DocumentedRole] = &[
    DocumentedRole {
        role: "roles/run.admin",
        scope: PROJECT,
        permissions: &[
            "run.services.create",
            "run.services.get",
            "run.services.list",
            "run.services.delete",
            "run.operations.get",
            "run.locations.list",
        ],
    },
    DocumentedRole {
        role: "roles/iam.serviceAccountUser",
        scope: RUNTIME_SERVICE_ACCOUNT,
        permissions: &["iam.serviceAccounts.actAs", "iam.serviceAccounts.get"],
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// Every permission a worker uses is granted by a role its docs name, at the scope
    /// the docs grant that role; and docs/gcp.md names each role.
    #[test]
    fn the_documented_roles_grant_the_manifests() {
        let docs = include_str!("../../../docs/gcp.md");
        for (manifest, roles) in [
            (COMPUTE_PERMISSIONS, COMPUTE_ROLES),
            (CLOUD_RUN_PERMISSIONS, CLOUD_RUN_ROLES),
        ] {
            for permission in manifest {
                assert!(
                    roles.iter().any(|r| r.scope == permission.scope
                        && r.permissions.contains(&permission.action)),
                    "{} is granted by no documented role at the {}",
                    permission.action,
                    permission.scope
                );
            }
            for role in roles {
                assert!(
                    docs.contains(role.role),
                    "docs/gcp.md does not name {}",
                    role.role
                );
            }
        }
    }
}
