//! The Kubernetes worker's permission manifest: every RBAC right (API group, resource,
//! verb) the worker and `provisioner check` use in a served namespace, and why. The Role
//! docs/kubernetes.md and infra/kubernetes/workers.yaml show has exactly
//! [`role_rules`] (a test compares them), the fake API server grants exactly these
//! (bound cluster-wide, or in the namespaces a test names) and refuses every other call
//! with RBAC's `403 Forbidden`, and the preflight asks SelfSubjectAccessReview for each.
//! SelfSubjectAccessReview itself needs no Role: every authenticated user may ask it
//! (the `system:basic-user` ClusterRole,
//! <https://kubernetes.io/docs/reference/access-authn-authz/rbac/#discovery-roles>).

use provisioner_core::permissions::Permission;

/// Granted by a Role bound in each served namespace (a ClusterRole bound cluster-wide
/// for `KUBERNETES_NAMESPACES=*`).
pub const NAMESPACE: &str = "namespace";

/// Actions are `<group>/<resource>:<verb>`, `core` for the core group.
pub const PERMISSIONS: &[Permission] = &[
    Permission::at(
        "apps/deployments:create",
        NAMESPACE,
        "creating the Deployment",
    ),
    Permission::at(
        "apps/deployments:get",
        NAMESPACE,
        "the Deployment a request made, read by name; the wait for its replicas; teardown and describe targets",
    ),
    Permission::at(
        "apps/deployments:list",
        NAMESPACE,
        "listing by the managed label: the reconciler",
    ),
    Permission::at(
        "apps/deployments:delete",
        NAMESPACE,
        "teardowns and removing what a failed provision made",
    ),
    Permission::at(
        "core/services:create",
        NAMESPACE,
        "creating the Service of a spec's ports",
    ),
    Permission::at(
        "core/services:get",
        NAMESPACE,
        "the Service a request made, read for its address",
    ),
    Permission::at(
        "core/services:list",
        NAMESPACE,
        "listing by the managed label: the reconciler",
    ),
    Permission::at(
        "core/services:delete",
        NAMESPACE,
        "teardowns and removing what a failed provision made",
    ),
    Permission::at(
        "core/pods:list",
        NAMESPACE,
        "why a Deployment stopped progressing: its pods' waiting reasons (an image that cannot be pulled, a crash loop, a pod that cannot be scheduled)",
    ),
];

/// An action's (API group, resource, verb); the core group is `""`.
pub fn split(action: &str) -> (&str, &str, &str) {
    let (path, verb) = action.split_once(':').unwrap_or((action, ""));
    let (group, resource) = path.split_once('/').unwrap_or(("", path));
    (if group == "core" { "" } else { group }, resource, verb)
}

/// The Role's `rules:` block, one rule per (group, resource) in the manifest's order.
pub fn role_rules() -> String {
    let mut rules: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for permission in PERMISSIONS {
        let (group, resource, verb) = split(permission.action);
        match rules
            .iter_mut()
            .find(|(g, r, _)| *g == group && *r == resource)
        {
            Some((_, _, verbs)) => verbs.push(verb),
            None => rules.push((group, resource, vec![verb])),
        }
    }
    let quoted = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("\"{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = String::from("rules:\n");
    for (group, resource, verbs) in rules {
        text.push_str(&format!(
            "- apiGroups: [\"{group}\"]\n  resources: [\"{resource}\"]\n  verbs: [{}]\n",
            quoted(&verbs)
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    /// The Role docs/kubernetes.md shows and the one infra/ deploys have exactly the
    /// manifest's rules.
    #[test]
    fn the_documented_and_deployed_roles_are_the_manifests() {
        let rules = super::role_rules();
        for (path, text) in [
            (
                "docs/kubernetes.md",
                include_str!("../../../docs/kubernetes.md"),
            ),
            (
                "infra/kubernetes/workers.yaml",
                include_str!("../../../infra/kubernetes/workers.yaml"),
            ),
        ] {
            assert!(
                text.contains("kind: Role\n") && text.contains(&rules),
                "{path} must hold a Role with exactly these rules:\n{rules}"
            );
        }
    }
}
