//! A platform's permission manifest: every right its worker, and `provisioner check`,
//! uses on the cloud's API, where it must be granted and why. The documented policies
//! and roles are generated from it or checked against it by tests, and the test doubles
//! hand a worker exactly these rights and refuse the rest, so code, docs and doubles
//! cannot drift apart. `provisioner permissions --platform <name>` prints it.

/// One right on a cloud's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// The action as the cloud's policy language names it: `ec2:RunInstances`,
    /// `compute.instances.insert`, `Microsoft.Compute/virtualMachines/write`,
    /// `apps/deployments:create` (Kubernetes: group/resource:verb, `core` for the core
    /// group).
    pub action: &'static str,
    /// Where it must be granted: an IAM `Resource` pattern (AWS, `*` for all), or the
    /// scope of a role assignment (`subscription`, `resource group`, `project`,
    /// `namespace`).
    pub scope: &'static str,
    /// The condition it is granted under, in the cloud's policy language (AWS: an IAM
    /// `Condition` block as JSON), or empty for none.
    pub condition: &'static str,
    /// The calls that need it, and why.
    pub why: &'static str,
}

impl Permission {
    /// A right granted everywhere it applies, without a condition.
    pub const fn anywhere(action: &'static str, why: &'static str) -> Self {
        Self {
            action,
            scope: "*",
            condition: "",
            why,
        }
    }

    /// A right granted at `scope`.
    pub const fn at(action: &'static str, scope: &'static str, why: &'static str) -> Self {
        Self {
            action,
            scope,
            condition: "",
            why,
        }
    }

    /// The same right, granted only under `condition`.
    pub const fn when(self, condition: &'static str) -> Self {
        Self { condition, ..self }
    }
}

/// The JSON blocks of a Markdown page (fenced as `json`) that contain `marker`, parsed:
/// how the tests read the policies and roles docs/ shows, to compare them with the ones
/// generated from a manifest. A block that is not JSON panics, naming the page's fault.
pub fn documented_json(markdown: &str, marker: &str) -> Vec<serde_json::Value> {
    markdown
        .split("```json\n")
        .skip(1)
        .filter_map(|block| block.split("\n```").next())
        .filter(|block| block.contains(marker))
        .map(|block| {
            serde_json::from_str(block)
                .unwrap_or_else(|e| panic!("a documented block is not JSON ({e}): {block}"))
        })
        .collect()
}
