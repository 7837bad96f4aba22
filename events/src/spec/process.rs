//! The `process` platform's spec: a local command as the "machine".

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::HealthCheck;

use crate::Invalid;
use crate::invalid::invalid;

/// A command from the worker's allow-list, run directly (never through a shell).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "process spec")]
pub struct ProcessSpec {
    /// The name of a program on the worker's allow-list (not a path, not a shell line).
    pub program: String,
    /// Arguments; the text `{port}` in any of them is replaced by the port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The port the program listens on; when absent the worker picks a free one and passes
    /// it as `{port}` and as the environment variable `PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Defaults to a TCP check on the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
    /// How long the program may take to pass its health check. Default 30 s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_timeout_seconds: Option<u64>,
}

impl ProcessSpec {
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.program.is_empty()
            || !self
                .program
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(invalid!(
                "program {:?} must be the name of an allowed program (letters, digits, '.', '_', '-')",
                self.program
            ));
        }
        if self.port == Some(0) {
            return Err("port 0 is not a port; leave \"port\" out to get a free one".into());
        }
        if let Some(health) = &self.health {
            health.validate()?;
            if let (Some(check), Some(port)) = (health.port(), self.port)
                && check != port
            {
                return Err(invalid!(
                    "the health check uses port {check} but the program listens on {port}"
                ));
            }
        }
        for arg in &self.args {
            if arg.contains('\0') {
                return Err("arguments cannot contain NUL bytes".into());
            }
        }
        super::validate_env_and_timeout(&self.env, self.ready_timeout_seconds)
    }
}
