//! The Azure workers' permission manifests: every ARM action the `azure-vm` and
//! `azure-container-instances` workers and `provisioner check` use, the scope it must be
//! granted at, and why. The custom roles docs/azure.md shows are [`roles`] (a test
//! compares them), the fake ARM server grants exactly these at these scopes by default
//! and refuses the rest with `403 AuthorizationFailed`, and each worker's preflight
//! asks ARM for the resource group's actions of its manifest.
//!
//! Action names: <https://learn.microsoft.com/azure/role-based-access-control/permissions/compute>,
//! `…/permissions/networking`, `…/permissions/containers` and
//! `…/permissions/management-and-governance`.

use provisioner_core::permissions::Permission;

/// Granted by a role assignment on the worker's resource group.
pub const RESOURCE_GROUP: &str = "resource group";
/// Granted by a role assignment on the subscription: resources that belong to no group.
pub const SUBSCRIPTION: &str = "subscription";
/// Granted on the virtual network of the subnets the specs name (the resource group
/// covers it when the network is there).
pub const SUBNET: &str = "subnet's virtual network";

const READ_GROUP: Permission = Permission::at(
    "Microsoft.Resources/subscriptions/resourceGroups/read",
    RESOURCE_GROUP,
    "provisioner check reads the resource group",
);
const READ_PERMISSIONS: Permission = Permission::at(
    "Microsoft.Authorization/permissions/read",
    RESOURCE_GROUP,
    "provisioner check reads the worker's effective actions on the resource group",
);

pub const VM_PERMISSIONS: &[Permission] = &[
    READ_GROUP,
    READ_PERMISSIONS,
    Permission::at(
        "Microsoft.Compute/virtualMachines/read",
        RESOURCE_GROUP,
        "the VM a request made, found by name before a create and after a crash; teardown, describe and power targets; the reconciler's listing",
    ),
    Permission::at(
        "Microsoft.Compute/virtualMachines/instanceView/read",
        RESOURCE_GROUP,
        "the VM's power state: the wait for running after a create or start, stopped after a deallocate",
    ),
    Permission::at(
        "Microsoft.Compute/virtualMachines/write",
        RESOURCE_GROUP,
        "creating the VM",
    ),
    Permission::at(
        "Microsoft.Compute/virtualMachines/delete",
        RESOURCE_GROUP,
        "teardowns and removing what a failed provision made",
    ),
    Permission::at(
        "Microsoft.Compute/virtualMachines/start/action",
        RESOURCE_GROUP,
        "start requests",
    ),
    Permission::at(
        "Microsoft.Compute/virtualMachines/deallocate/action",
        RESOURCE_GROUP,
        "stop requests (deallocated, so the VM is no longer billed)",
    ),
    Permission::at(
        "Microsoft.Compute/virtualMachines/restart/action",
        RESOURCE_GROUP,
        "reboot requests",
    ),
    Permission::at(
        "Microsoft.Compute/disks/delete",
        RESOURCE_GROUP,
        "the OS disk, deleted with its VM (deleteOption Delete)",
    ),
    Permission::at(
        "Microsoft.Network/networkInterfaces/read",
        RESOURCE_GROUP,
        "the VM's network interface, found by name before a create and read for its address",
    ),
    Permission::at(
        "Microsoft.Network/networkInterfaces/write",
        RESOURCE_GROUP,
        "creating the VM's network interface",
    ),
    Permission::at(
        "Microsoft.Network/networkInterfaces/delete",
        RESOURCE_GROUP,
        "removing a network interface whose VM was never made",
    ),
    Permission::at(
        "Microsoft.Network/networkInterfaces/join/action",
        RESOURCE_GROUP,
        "attaching the network interface to the VM it is created with",
    ),
    Permission::at(
        "Microsoft.Network/virtualNetworks/subnets/join/action",
        SUBNET,
        "placing the network interface in the spec's subnet",
    ),
    Permission::at(
        "Microsoft.Compute/locations/vmSizes/read",
        SUBSCRIPTION,
        "the cores of a VM size, which a provision with a tenant holds of its quota",
    ),
];

pub const ACI_PERMISSIONS: &[Permission] = &[
    READ_GROUP,
    READ_PERMISSIONS,
    Permission::at(
        "Microsoft.ContainerInstance/containerGroups/read",
        RESOURCE_GROUP,
        "the group a request made, found by name before a create and after a crash; the wait for running; teardown, describe and power targets; the reconciler's listing",
    ),
    Permission::at(
        "Microsoft.ContainerInstance/containerGroups/write",
        RESOURCE_GROUP,
        "creating the container group",
    ),
    Permission::at(
        "Microsoft.ContainerInstance/containerGroups/delete",
        RESOURCE_GROUP,
        "teardowns and removing what a failed provision made",
    ),
    Permission::at(
        "Microsoft.ContainerInstance/containerGroups/start/action",
        RESOURCE_GROUP,
        "start requests",
    ),
    Permission::at(
        "Microsoft.ContainerInstance/containerGroups/stop/action",
        RESOURCE_GROUP,
        "stop requests",
    ),
    Permission::at(
        "Microsoft.ContainerInstance/containerGroups/restart/action",
        RESOURCE_GROUP,
        "reboot requests",
    ),
];

/// The actions of `manifest` granted at `scope`.
pub fn actions_at(manifest: &[Permission], scope: &str) -> Vec<&'static str> {
    let mut actions = Vec::new();
    for permission in manifest.iter().filter(|p| p.scope == scope) {
        if !actions.contains(&permission.action) {
            actions.push(permission.action);
        }
    }
    actions
}

/// Both workers' rights, in manifest order.
fn both() -> Vec<Permission> {
    VM_PERMISSIONS
        .iter()
        .chain(ACI_PERMISSIONS)
        .copied()
        .collect()
}

/// The actions of the worker's role: what both workers do in the resource group and on
/// the subnets' network.
pub fn group_role_actions() -> Vec<&'static str> {
    let both = both();
    let mut actions = actions_at(&both, RESOURCE_GROUP);
    actions.extend(actions_at(&both, SUBNET));
    actions
}

/// The actions of the subscription's role: what no resource group holds.
pub fn subscription_role_actions() -> Vec<&'static str> {
    actions_at(&both(), SUBSCRIPTION)
}

/// The two custom roles docs/azure.md shows, for both workers: the worker's, assigned
/// on the resource group (and on the subnets' virtual network when it is elsewhere), and
/// the subscription's, assigned on the subscription, with only what no resource group
/// holds.
pub fn roles() -> Vec<serde_json::Value> {
    let role = |name: &str, description: &str, actions: Vec<&str>| {
        serde_json::json!({
            "Name": name,
            "IsCustom": true,
            "Description": description,
            "Actions": actions,
            "NotActions": [],
            "AssignableScopes": ["/subscriptions/<subscription>"],
        })
    };
    vec![
        role(
            "Provisioner worker",
            "What the provisioner's azure-vm and azure-container-instances workers do in their resource group. Assign on the resource group (and the subnets' virtual network).",
            group_role_actions(),
        ),
        role(
            "Provisioner worker (subscription)",
            "What the provisioner's azure-vm worker reads outside any resource group. Assign on the subscription.",
            subscription_role_actions(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    /// docs/azure.md's custom roles are the ones generated from the manifests.
    #[test]
    fn the_documented_roles_are_the_manifests() {
        let documented = provisioner_core::permissions::documented_json(
            include_str!("../../../docs/azure.md"),
            "\"AssignableScopes\"",
        );
        assert_eq!(
            documented,
            super::roles(),
            "regenerate them with `provisioner permissions --platform azure-vm --policy`"
        );
    }
}
