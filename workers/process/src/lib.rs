//! The `process` platform: a local program as the "machine" (the LOCAL flavour of the
//! source documents), health-checked on its port. It needs nothing installed, so the
//! embedded mode can show the whole flow on any machine.
//!
//! Running a command named in a message would be remote code execution for anyone who can
//! publish, so only programs on the worker's own allow-list run, by absolute path, never
//! through a shell. A process lives as long as the worker that started it (it is stopped
//! when the worker exits); the same request id finds its running process instead of
//! starting another — also after its worker was killed outright, when the worker taking
//! the request over on the same host adopts the process it left ([`orphans`]).

pub mod orphans;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use provisioner_core::allow::matches;
use provisioner_core::health::Probe;
use provisioner_core::platform::spec_of;
use provisioner_core::{Described, Finding, Platform, PlatformError, SetupError};
use provisioner_events::spec::HealthCheck;
use provisioner_events::spec::process::ProcessSpec;
use provisioner_events::{
    Endpoint, ErrorClass, Operation, PlatformName, Request, RequestId, Resource, State,
    TeardownTarget,
};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::info;

/// A program requests may run: the name they use, the file it is, arguments that always
/// come first, and which arguments a request may add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedProgram {
    pub path: PathBuf,
    pub leading_args: Vec<String>,
    /// `None`: any arguments. Otherwise each argument of a request must equal one of
    /// these, or start with one ending in `*` (before `{port}` is replaced).
    pub argument_patterns: Option<Vec<String>>,
}

/// The allow-list, from the worker's configuration.
#[derive(Debug, Clone, Default)]
pub struct ProcessPolicy {
    pub programs: BTreeMap<String, AllowedProgram>,
    /// Environment variable names a spec may set (`PREFIX*` patterns allowed); none by
    /// default. A child starts with a clean environment: only these, `PATH`, `PORT` and
    /// the request id, never the worker's own (its broker and Redis URLs, signing keys,
    /// cloud credentials).
    pub allowed_env: Vec<String>,
}

/// Variables no allow-list opens: each makes the program load or run code other than its
/// own (the dynamic loader's, interpreters' startup hooks), or is the platform's own.
const NEVER_FROM_A_SPEC: [&str; 20] = [
    "LD_*",
    "DYLD_*",
    "PATH",
    "IFS",
    "BASH_ENV",
    "ENV",
    "SHELLOPTS",
    "PS4",
    "PYTHON*",
    "NODE_OPTIONS",
    "NODE_PATH",
    "PERL5*",
    "PERLLIB",
    "RUBYOPT",
    "RUBYLIB",
    "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS",
    "GCONV_PATH",
    "PORT",
    orphans::REQUEST_VARIABLE,
];

/// The `PATH` a child gets: the system's directories, not the worker's.
const CHILD_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Splits `PROCESS_ALLOW` at the commas outside `[…]`.
fn entries(list: &str) -> Vec<&str> {
    let (mut entries, mut depth, mut start) = (Vec::new(), 0u32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                entries.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    entries.push(&list[start..]);
    entries
        .into_iter()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect()
}

impl ProcessPolicy {
    /// Parses `name=/abs/path,other=/abs/path2[--port {port} --mode=*]` (the
    /// `PROCESS_ALLOW` setting): a program with `[…]` takes only the arguments listed
    /// there (space-separated; `prefix*` matches by prefix; `[]` takes none).
    pub fn parse(list: &str) -> Result<Self, SetupError> {
        let mut programs = BTreeMap::new();
        for entry in entries(list) {
            let (name, rest) = entry.split_once('=').ok_or_else(|| {
                SetupError::config(format!(
                    "allow-list entry {entry:?} is not name=/absolute/path"
                ))
            })?;
            let (path, argument_patterns) = match rest.split_once('[') {
                None => (rest, None),
                Some((path, patterns)) => {
                    let patterns = patterns.strip_suffix(']').ok_or_else(|| {
                        SetupError::config(format!(
                            "allow-list entry {entry:?}: the argument list must end with ']'"
                        ))
                    })?;
                    (
                        path,
                        Some(patterns.split_whitespace().map(str::to_owned).collect()),
                    )
                }
            };
            let path = PathBuf::from(path.trim());
            if !path.is_absolute() {
                return Err(SetupError::config(format!(
                    "allow-list entry {entry:?}: the path must be absolute"
                )));
            }
            programs.insert(
                name.trim().to_owned(),
                AllowedProgram {
                    path,
                    leading_args: Vec::new(),
                    argument_patterns,
                },
            );
        }
        Ok(ProcessPolicy {
            programs,
            allowed_env: Vec::new(),
        })
    }

    /// Refuses an environment variable or argument the worker's configuration does not
    /// allow.
    fn check(&self, spec: &ProcessSpec, program: &AllowedProgram) -> Result<(), PlatformError> {
        let refuse =
            |message: String| Err(PlatformError::permanent(ErrorClass::Permission, message));
        for name in spec.env.keys() {
            if NEVER_FROM_A_SPEC.iter().any(|p| matches(p, name)) {
                return refuse(format!(
                    "environment variable {name} cannot come from a request: it changes what code the program loads, or is the platform's own"
                ));
            }
            if !self.allowed_env.iter().any(|p| matches(p, name)) {
                return refuse(format!(
                    "environment variable {name} is not on this worker's allow-list ({}); add it to PROCESS_ALLOWED_ENV on the worker",
                    if self.allowed_env.is_empty() {
                        "none".into()
                    } else {
                        self.allowed_env.join(", ")
                    }
                ));
            }
        }
        if let Some(patterns) = &program.argument_patterns {
            for (i, arg) in spec.args.iter().enumerate() {
                if !patterns.iter().any(|p| matches(p, arg)) {
                    return refuse(format!(
                        "argument {i} of {} is not one this worker allows for it ({}); the operator lists them in PROCESS_ALLOW as {}=/path[…]",
                        spec.program,
                        if patterns.is_empty() {
                            "none".into()
                        } else {
                            patterns.join(" ")
                        },
                        spec.program
                    ));
                }
            }
        }
        Ok(())
    }
}

struct Running {
    /// Our child; `None` for a process adopted from a worker that died.
    child: Option<Child>,
    pid: u32,
    port: u16,
}

impl Running {
    fn adopted(orphan: orphans::Orphan) -> Self {
        Running {
            child: None,
            pid: orphan.pid,
            port: orphan.port,
        }
    }

    /// Whether it runs; `Err` says why not.
    fn check(&mut self) -> Result<(), String> {
        match &mut self.child {
            Some(child) => match child.try_wait() {
                Ok(None) => Ok(()),
                Ok(Some(status)) => Err(format!("the process exited ({status})")),
                Err(e) => Err(format!("the process cannot be waited on: {e}")),
            },
            None if orphans::alive(self.pid) => Ok(()),
            None => Err("the process exited".into()),
        }
    }

    async fn stop(&mut self) -> Result<(), String> {
        match &mut self.child {
            Some(child) => child
                .kill()
                .await
                .map_err(|e| format!("cannot stop process {}: {e}", self.pid)),
            None => orphans::stop(self.pid).await,
        }
    }
}

/// The process [`Platform`].
pub struct ProcessPlatform {
    policy: ProcessPolicy,
    address: String,
    running: Mutex<HashMap<String, Running>>,
}

impl std::fmt::Debug for ProcessPlatform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPlatform")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

fn free_port() -> Result<u16, PlatformError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| PlatformError::transient(format!("no free local port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| PlatformError::transient(format!("no free local port: {e}")))
}

impl ProcessPlatform {
    pub fn new(policy: ProcessPolicy) -> Self {
        ProcessPlatform {
            policy,
            address: "127.0.0.1".into(),
            running: Mutex::new(HashMap::new()),
        }
    }

    fn program(&self, spec: &ProcessSpec) -> Result<&AllowedProgram, PlatformError> {
        self.policy.programs.get(&spec.program).ok_or_else(|| {
            let allowed: Vec<&str> = self.policy.programs.keys().map(String::as_str).collect();
            PlatformError::permanent(
                ErrorClass::Permission,
                format!(
                    "program {:?} is not on this worker's allow-list (allowed: {}); add it to PROCESS_ALLOW on the worker",
                    spec.program,
                    if allowed.is_empty() { "none".into() } else { allowed.join(", ") }
                ),
            )
        })
    }

    fn resource(&self, request_id: &str, running: &Running) -> Resource {
        Resource {
            id: running.pid.to_string(),
            name: format!("proc-{request_id}"),
            address: Some(self.address.clone()),
            endpoints: vec![Endpoint {
                port: running.port,
                host: self.address.clone(),
                host_port: running.port,
                protocol: "tcp".into(),
            }],
            members: Vec::new(),
        }
    }

    /// The request id of a target whose process is still alive, adopting one a dead
    /// worker left; forgets dead ones.
    async fn find(&self, target: &TeardownTarget) -> Option<String> {
        let mut running = self.running.lock().await;
        running.retain(|_, r| r.check().is_ok());
        match target {
            TeardownTarget::Request(id) => {
                if !running.contains_key(id.as_str()) {
                    let orphan = orphans::find(id.as_str())?;
                    info!(
                        pid = orphan.pid,
                        "adopted the process a stopped worker left"
                    );
                    running.insert(id.to_string(), Running::adopted(orphan));
                }
                Some(id.to_string())
            }
            TeardownTarget::Resource(pid) => {
                if let Some((id, _)) = running.iter().find(|(_, r)| r.pid.to_string() == *pid) {
                    return Some(id.clone());
                }
                let (id, orphan) = orphans::of_pid(pid.parse().ok()?)?;
                running.insert(id.clone(), Running::adopted(orphan));
                Some(id)
            }
        }
    }
}

#[async_trait]
impl Platform for ProcessPlatform {
    fn name(&self) -> PlatformName {
        PlatformName::Process
    }

    async fn preflight(&self) -> Vec<Finding> {
        if self.policy.programs.is_empty() {
            return vec![Finding::fail(
                "programs",
                "none allowed: set PROCESS_ALLOW=name=/absolute/path,...",
            )];
        }
        self.policy
            .programs
            .iter()
            .map(|(name, program)| {
                if program.path.is_file() {
                    Finding::pass(
                        format!("program {name}"),
                        program.path.display().to_string(),
                    )
                } else {
                    Finding::fail(
                        format!("program {name}"),
                        format!("{} is not a file", program.path.display()),
                    )
                }
            })
            .collect()
    }

    fn validate(&self, request: &Request) -> Result<(), PlatformError> {
        if request.operation == Operation::Provision {
            let spec = spec_of::<ProcessSpec>(request)?;
            self.policy.check(&spec, self.program(&spec)?)?;
        }
        Ok(())
    }

    async fn provision(&self, request: &Request) -> Result<Resource, PlatformError> {
        let spec = spec_of::<ProcessSpec>(request)?;
        let program = self.program(&spec)?.clone();
        self.policy.check(&spec, &program)?;
        let id = request.request_id.to_string();
        let mut running = self.running.lock().await;
        if let Some(existing) = running.get_mut(&id) {
            if existing.check().is_ok() {
                return Ok(self.resource(&id, existing));
            }
            running.remove(&id);
        }
        let port = if let Some(orphan) = orphans::find(&id) {
            // Started by a worker that died: adopt it, and wait for it as for our own.
            info!(
                pid = orphan.pid,
                "adopted the process a stopped worker left"
            );
            running.insert(id.clone(), Running::adopted(orphan));
            drop(running);
            orphan.port
        } else {
            self.start(&spec, &program, &id, running)?
        };
        self.wait_ready(&spec, &id, port).await
    }

    async fn owner_of(&self, resource_id: &str) -> Result<Option<RequestId>, PlatformError> {
        let target = TeardownTarget::Resource(resource_id.to_owned());
        Ok(self
            .find(&target)
            .await
            .and_then(|id| RequestId::new(id).ok()))
    }

    async fn teardown(&self, target: &TeardownTarget) -> Result<Option<Resource>, PlatformError> {
        let Some(id) = self.find(target).await else {
            return Ok(None);
        };
        let Some(mut entry) = self.running.lock().await.remove(&id) else {
            return Ok(None);
        };
        let resource = self.resource(&id, &entry);
        entry.stop().await.map_err(PlatformError::transient)?;
        info!(pid = entry.pid, "stopped process");
        Ok(Some(Resource {
            endpoints: Vec::new(),
            ..resource
        }))
    }

    async fn describe(&self, target: &TeardownTarget) -> Result<Option<Described>, PlatformError> {
        let Some(id) = self.find(target).await else {
            return Ok(None);
        };
        Ok(self.running.lock().await.get(&id).map(|entry| Described {
            // A process that exited is reaped and forgotten: what is listed runs.
            state: State::Running,
            resource: self.resource(&id, entry),
        }))
    }

    async fn list(&self) -> Result<Vec<Resource>, PlatformError> {
        let mut running = self.running.lock().await;
        running.retain(|_, r| r.check().is_ok());
        Ok(running.iter().map(|(id, r)| self.resource(id, r)).collect())
    }
}

impl ProcessPlatform {
    /// Starts the program of a request; returns its port.
    fn start(
        &self,
        spec: &ProcessSpec,
        program: &AllowedProgram,
        id: &str,
        mut running: tokio::sync::MutexGuard<'_, HashMap<String, Running>>,
    ) -> Result<u16, PlatformError> {
        let port = match spec.port {
            Some(port) => port,
            None => free_port()?,
        };
        let args: Vec<String> = program
            .leading_args
            .iter()
            .chain(&spec.args)
            .map(|arg| arg.replace("{port}", &port.to_string()))
            .collect();
        // A clean environment: the worker's own holds its broker and Redis URLs, signing
        // keys and cloud credentials.
        let child = Command::new(&program.path)
            .args(&args)
            .env_clear()
            .env("PATH", CHILD_PATH)
            .envs(&spec.env)
            .env("PORT", port.to_string())
            .env(orphans::REQUEST_VARIABLE, id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                PlatformError::permanent(
                    ErrorClass::NotFound,
                    format!(
                        "cannot start {} ({}): {e}",
                        spec.program,
                        program.path.display()
                    ),
                )
            })?;
        let pid = child.id().unwrap_or_default();
        info!(pid, port, program = %spec.program, "started process");
        running.insert(
            id.to_owned(),
            Running {
                child: Some(child),
                pid,
                port,
            },
        );
        Ok(port)
    }

    /// Waits until the process of `id` answers on `port`; stops it if it never does.
    async fn wait_ready(
        &self,
        spec: &ProcessSpec,
        id: &str,
        port: u16,
    ) -> Result<Resource, PlatformError> {
        let probe = match &spec.health {
            Some(HealthCheck::Http { path, .. }) => Probe::Http {
                host: self.address.clone(),
                port,
                path: path.clone(),
            },
            Some(HealthCheck::Tcp { .. }) | None => Probe::Tcp {
                host: self.address.clone(),
                port,
            },
        };
        let timeout = spec
            .ready_timeout_seconds
            .map_or(DEFAULT_READY_TIMEOUT, Duration::from_secs);
        let alive = || async {
            let mut running = self.running.lock().await;
            match running.get_mut(id) {
                Some(entry) => entry.check(),
                None => Err("the process was torn down".into()),
            }
        };
        match probe.wait_ready(timeout, alive).await {
            Ok(()) => {
                let running = self.running.lock().await;
                let entry = running.get(id).ok_or_else(|| {
                    PlatformError::transient("the process was torn down while starting")
                })?;
                Ok(self.resource(id, entry))
            }
            Err(why) => {
                if let Some(mut failed) = self.running.lock().await.remove(id) {
                    let _ = failed.stop().await;
                }
                Err(PlatformError::permanent(
                    why.class(),
                    format!(
                        "{} did not become ready: {why}; it was stopped",
                        spec.program
                    ),
                ))
            }
        }
    }
}
