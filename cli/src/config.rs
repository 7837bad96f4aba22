//! Settings from flags and the environment, validated once at start.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use provisioner_core::policy::RetryPolicy;
use provisioner_core::{Platform, SetupError, WorkerConfig};
use provisioner_docker::DockerPolicy;
use provisioner_events::PlatformName;
use provisioner_platforms::{BuildError, Settings as RegistrySettings};
use provisioner_process::{AllowedProgram, ProcessPolicy};

use crate::Failure;

/// Where the broker and the state store are. Neither given: the embedded mode.
#[derive(Debug, Clone, Args)]
pub struct Connections {
    /// RabbitMQ, e.g. amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(long, env = "AMQP_URL", global = true)]
    pub amqp_url: Option<String>,
    /// RabbitMQ's management API, where a client creates the queue policies that are
    /// missing (never changing one that exists). Default: http://<AMQP host>:15672 with
    /// AMQP_URL's credentials for amqp:// (none for amqps://); `off` leaves policies to
    /// the operator. Out of reach, queues are declared with the settings as arguments.
    #[arg(
        long,
        env = "RABBITMQ_MANAGEMENT_URL",
        global = true,
        hide_env_values = true
    )]
    pub rabbitmq_management_url: Option<String>,
    /// Whose status events `watch`, `submit --wait` and the journal believe: broker
    /// users, comma-separated (`{platform}` stands for the event's platform, `prefix*`
    /// matches by prefix), besides the client's own user. RabbitMQ vouches for the
    /// publisher in each message's user_id.
    #[arg(
        long,
        env = "STATUS_PUBLISHERS",
        default_value = "provisioner-worker-{platform},provisioner-operator",
        global = true
    )]
    pub status_publishers: String,
    /// Redis, e.g. redis://127.0.0.1:6379
    #[arg(long, env = "REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so deployments can share a Redis.
    #[arg(
        long,
        env = "REDIS_KEY_PREFIX",
        default_value = "provisioner:",
        global = true
    )]
    pub redis_key_prefix: String,
    /// How long finished requests' records are kept (and a request id stays taken); a
    /// message published longer ago is refused rather than run again.
    #[arg(long, env = "RETENTION_SECONDS", default_value_t = 7 * 24 * 3600, global = true)]
    pub retention_seconds: u64,
    /// Signed requests: `id=secret,…` (each secret at least 32 bytes). Workers run only
    /// requests signed with one of them; `submit` signs with the first. Prefer
    /// REQUEST_SIGNING_KEYS_FILE, which keeps the secrets out of the environment.
    #[arg(
        long,
        env = "REQUEST_SIGNING_KEYS",
        hide_env_values = true,
        global = true
    )]
    pub request_signing_keys: Option<String>,
    /// A file holding the signing keys, one `id=secret` a line (e.g. a mounted secret).
    #[arg(long, env = "REQUEST_SIGNING_KEYS_FILE", global = true)]
    pub request_signing_keys_file: Option<std::path::PathBuf>,
    /// How old a signature may be (default: RETENTION_SECONDS, since a request within it
    /// is answered by its record and never runs twice).
    #[arg(long, env = "REQUEST_SIGNATURE_MAX_AGE_SECONDS", global = true)]
    pub request_signature_max_age_seconds: Option<u64>,
}

/// Hides the password of a URL for messages.
pub use provisioner_core::redact_url as redact;

impl Connections {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_seconds.max(1))
    }

    /// The request signing keys, when this deployment signs requests.
    pub fn signing_keys(
        &self,
    ) -> Result<Option<Arc<provisioner_core::signing::SigningKeys>>, Failure> {
        let max_age = self
            .request_signature_max_age_seconds
            .map_or_else(|| self.retention(), Duration::from_secs);
        provisioner_core::signing::SigningKeys::from_settings(
            self.request_signing_keys.as_deref(),
            self.request_signing_keys_file.as_deref(),
            max_age,
        )
        .map(|keys| keys.map(Arc::new))
        .map_err(|e| Failure::config(anyhow::anyhow!(e)))
    }

    /// Both set: the real services; neither: embedded; one alone is a mistake.
    pub fn embedded(&self) -> Result<bool, Failure> {
        match (&self.amqp_url, &self.redis_url) {
            (None, None) => Ok(true),
            (Some(_), Some(_)) => Ok(false),
            (Some(_), None) => Err(Failure::config(anyhow::anyhow!(
                "AMQP_URL is set but REDIS_URL is not: set both to use RabbitMQ and Redis, or neither for the embedded mode"
            ))),
            (None, Some(_)) => Err(Failure::config(anyhow::anyhow!(
                "REDIS_URL is set but AMQP_URL is not: set both to use RabbitMQ and Redis, or neither for the embedded mode"
            ))),
        }
    }

    pub fn require_amqp(&self) -> Result<&str, Failure> {
        let url = self.amqp_url.as_deref().ok_or_else(|| {
            Failure::config(anyhow::anyhow!(
                "AMQP_URL is not set (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)"
            ))
        })?;
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(Failure::config(anyhow::anyhow!(
                "AMQP_URL {} must start with amqp:// or amqps://",
                redact(url)
            )));
        }
        Ok(url)
    }

    pub fn require_redis(&self) -> Result<&str, Failure> {
        let url = self.redis_url.as_deref().ok_or_else(|| {
            Failure::config(anyhow::anyhow!(
                "REDIS_URL is not set (e.g. redis://127.0.0.1:6379)"
            ))
        })?;
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://"))
        {
            return Err(Failure::config(anyhow::anyhow!(
                "REDIS_URL {} must start with redis://, rediss:// or unix://",
                redact(url)
            )));
        }
        Ok(url)
    }
}

pub fn parse_platform(name: &str) -> Result<PlatformName, String> {
    PlatformName::parse(name).ok_or_else(|| {
        let known: Vec<&str> = PlatformName::ALL.iter().map(|p| p.as_str()).collect();
        format!("unknown platform {name:?}; known: {}", known.join(", "))
    })
}

/// The runtime's settings.
#[derive(Debug, Clone, Args)]
pub struct WorkerSettings {
    /// The platform this worker serves.
    #[arg(long, env = "PLATFORM", value_parser = parse_platform)]
    pub platform: PlatformName,
    /// Unique name of this worker in leases and logs (default: random).
    #[arg(long, env = "WORKER_ID")]
    pub worker_id: Option<String>,
    /// Binds producers to tenants: `key:<signing key id>=<tenant>,user:<broker user>=<tenant>`
    /// (`*`: any tenant). When set, a producer may name only its own tenant, and must.
    #[arg(long, env = "TENANTS")]
    pub tenants: Option<String>,
    /// Deliveries handled at once.
    #[arg(long, env = "PREFETCH", default_value_t = 16)]
    pub prefetch: u16,
    /// Fleets this worker coordinates at once; more wait on the schedule for any worker.
    #[arg(long, env = "FLEET_COORDINATORS", default_value_t = 64)]
    pub fleet_coordinators: usize,
    /// Lease length; a crashed worker's requests are taken over after it.
    #[arg(long, env = "LEASE_SECONDS", default_value_t = 30)]
    pub lease_seconds: u64,
    /// Attempts per request, the first included.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// Delay before the first retry; doubles each time, with jitter.
    #[arg(long, env = "RETRY_BASE_MS", default_value_t = 1000)]
    pub retry_base_ms: u64,
    /// Longest delay between retries.
    #[arg(long, env = "RETRY_MAX_SECONDS", default_value_t = 300)]
    pub retry_max_seconds: u64,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    pub shutdown_grace_seconds: u64,
    /// Times a message may be parked without an attempt (held by another worker, its
    /// target busy, the store or broker away) before it is refused.
    #[arg(long, env = "MAX_WAITS", default_value_t = 500)]
    pub max_waits: u32,
    /// The longest one platform call may take, whatever the platform's own timeouts.
    #[arg(long, env = "OPERATION_TIMEOUT_SECONDS", default_value_t = 900)]
    pub operation_timeout_seconds: u64,
    /// The broker's `consumer_timeout` (RabbitMQ's default: 30 min): a delivery held
    /// longer is taken back, so a platform call must end well before it.
    #[arg(long, env = "BROKER_CONSUMER_TIMEOUT_SECONDS", default_value_t = 1800)]
    pub broker_consumer_timeout_seconds: u64,
    /// A request in progress that no worker came back to for this long after its last
    /// attempt is ended in error and what it made removed (0: never).
    #[arg(long, env = "REAP_AFTER_SECONDS", default_value_t = 3600)]
    pub reap_after_seconds: u64,
    /// How often to look for resources whose `ttl_seconds` or `expires_at` is up and send
    /// their teardown, in milliseconds (0: never; another worker of the platform must).
    #[arg(long, env = "EXPIRE_EVERY_MS", default_value_t = 1000)]
    pub expire_every_ms: u64,
    /// How often this worker reconciles its platform's resources with the records, as
    /// `provisioner reconcile` does (0: never).
    #[arg(long, env = "RECONCILE_EVERY_SECONDS", default_value_t = 0)]
    pub reconcile_every_seconds: u64,
    /// The periodic reconciliation leaves alone anything younger than this.
    #[arg(long, env = "RECONCILE_MIN_AGE_SECONDS", default_value_t = 600)]
    pub reconcile_min_age_seconds: u64,
    /// Pacing by the platform's API token buckets: empty for the platform's defaults,
    /// `off`, or overrides `<action>=<capacity>/<refill per second>,…` (e.g.
    /// `RunInstances=10/4`).
    #[arg(long, env = "RATE_LIMITS", default_value = "")]
    pub rate_limits: String,
    /// Where to serve `/metrics` (Prometheus), `/live` and `/ready`, e.g. `0.0.0.0:9464`
    /// (default: not served).
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl WorkerSettings {
    pub fn validate(&self) -> Result<WorkerConfig, Failure> {
        let bad = |what: String| Err(Failure::config(anyhow::anyhow!(what)));
        if self.fleet_coordinators == 0 {
            return bad("FLEET_COORDINATORS must be at least 1".into());
        }
        if self.prefetch == 0 {
            return bad("PREFETCH must be at least 1".into());
        }
        if self.lease_seconds < 2 {
            return bad(format!(
                "LEASE_SECONDS {} is too short; at least 2",
                self.lease_seconds
            ));
        }
        if self.max_attempts == 0 {
            return bad("MAX_ATTEMPTS must be at least 1".into());
        }
        if self.retry_base_ms == 0
            || Duration::from_millis(self.retry_base_ms)
                > Duration::from_secs(self.retry_max_seconds)
        {
            return bad("RETRY_BASE_MS must be above 0 and below RETRY_MAX_SECONDS".into());
        }
        let worker_id = match &self.worker_id {
            Some(id)
                if id.is_empty()
                    || id.len() > 128
                    || id.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                return bad(format!(
                    "WORKER_ID {id:?} must be 1 to 128 characters without spaces"
                ));
            }
            Some(id) => id.clone(),
            None => format!(
                "{}-{}",
                self.platform,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        };
        if self.lease_seconds > 3600 {
            return bad(format!(
                "LEASE_SECONDS {} is over an hour; a crashed worker's requests would wait that long",
                self.lease_seconds
            ));
        }
        if self.max_attempts > 1000 || self.retry_max_seconds > 24 * 3600 {
            return bad("MAX_ATTEMPTS is at most 1000 and RETRY_MAX_SECONDS at most a day".into());
        }
        if self.max_waits == 0 {
            return bad("MAX_WAITS must be at least 1".into());
        }
        // Settling takes up to a lease more after the platform call; all of it must end
        // before the broker takes the delivery back.
        if self.operation_timeout_seconds == 0
            || self.operation_timeout_seconds + 2 * self.lease_seconds
                >= self.broker_consumer_timeout_seconds
        {
            return bad(format!(
                "OPERATION_TIMEOUT_SECONDS {} plus two leases must stay below BROKER_CONSUMER_TIMEOUT_SECONDS {} (RabbitMQ takes a delivery back after its consumer_timeout)",
                self.operation_timeout_seconds, self.broker_consumer_timeout_seconds
            ));
        }
        let rate_limits = provisioner_core::RateLimitSettings::parse(&self.rate_limits)
            .map_err(|e| Failure::config(anyhow::anyhow!(e)))?;
        WorkerConfig {
            worker_id,
            rate_limits,
            prefetch: self.prefetch,
            fleet_coordinators: self.fleet_coordinators,
            lease: Duration::from_secs(self.lease_seconds),
            retry: RetryPolicy {
                max_attempts: self.max_attempts,
                base_delay: Duration::from_millis(self.retry_base_ms),
                max_delay: Duration::from_secs(self.retry_max_seconds),
            },
            max_waits: self.max_waits,
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            operation_timeout: Duration::from_secs(self.operation_timeout_seconds),
            expire_every: (self.expire_every_ms > 0)
                .then(|| Duration::from_millis(self.expire_every_ms)),
            ..WorkerConfig::default()
        }
        .with_background(
            self.reap_after_seconds,
            self.reconcile_every_seconds,
            self.reconcile_min_age_seconds,
        )
        .map_err(|e| Failure::config(anyhow::anyhow!(e)))
    }
}

fn parse_bool(value: &str) -> Result<bool, String> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

/// The items of a comma-separated setting, trimmed, empty ones left out.
pub fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Each platform's own settings: what the worker allows.
#[derive(Debug, Clone, Args)]
pub struct PlatformSettings {
    /// The Docker engine: unix:///path or tcp://host:port.
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    #[arg(long, env = "DOCKER_ALLOW_PRIVILEGED", value_parser = parse_bool, default_value = "false")]
    pub docker_allow_privileged: bool,
    #[arg(long, env = "DOCKER_ALLOW_HOST_MOUNTS", value_parser = parse_bool, default_value = "false")]
    pub docker_allow_host_mounts: bool,
    #[arg(long, env = "DOCKER_ALLOW_HOST_NETWORK", value_parser = parse_bool, default_value = "false")]
    pub docker_allow_host_network: bool,
    #[arg(long, env = "DOCKER_ALLOW_CAP_ADD", value_parser = parse_bool, default_value = "false")]
    pub docker_allow_cap_add: bool,
    /// Comma-separated networks a spec's network_mode may name besides the engine's
    /// default bridge and `none`.
    #[arg(long, env = "DOCKER_ALLOWED_NETWORKS", default_value = "")]
    pub docker_allowed_networks: String,
    /// Comma-separated image patterns (`prefix*` allowed); empty allows all.
    #[arg(long, env = "DOCKER_ALLOWED_IMAGES", default_value = "")]
    pub docker_allowed_images: String,
    /// The address published ports bind to and events report.
    #[arg(long, env = "DOCKER_PUBLISH_ADDRESS", default_value = "127.0.0.1")]
    pub docker_publish_address: String,
    /// Programs the process platform may run: name=/absolute/path,... (`[args…]` after a
    /// path: the only arguments a request may pass it).
    #[arg(long, env = "PROCESS_ALLOW", default_value = "")]
    pub process_allow: String,
    /// Environment variable names a process spec may set (`PREFIX*` allowed).
    #[arg(long, env = "PROCESS_ALLOWED_ENV", default_value = "")]
    pub process_allowed_env: String,
}

impl PlatformSettings {
    pub fn docker_policy(&self) -> DockerPolicy {
        DockerPolicy {
            allow_privileged: self.docker_allow_privileged,
            allow_host_mounts: self.docker_allow_host_mounts,
            allow_host_network: self.docker_allow_host_network,
            allow_cap_add: self.docker_allow_cap_add,
            allowed_networks: comma_list(&self.docker_allowed_networks),
            allowed_images: comma_list(&self.docker_allowed_images),
            publish_address: self.docker_publish_address.clone(),
        }
    }

    /// The process allow-list; the embedded mode adds the shipped demo program.
    pub fn process_policy(&self, with_demo: bool) -> Result<ProcessPolicy, Failure> {
        let mut policy = ProcessPolicy::parse(&self.process_allow)
            .map_err(|e| Failure::config(anyhow::anyhow!("PROCESS_ALLOW: {e}")))?;
        policy.allowed_env = comma_list(&self.process_allowed_env);
        if with_demo {
            let exe = std::env::current_exe().map_err(|e| {
                Failure::config(anyhow::anyhow!("cannot find this program's path: {e}"))
            })?;
            policy.programs.insert(
                "demo-http".into(),
                AllowedProgram {
                    path: exe,
                    leading_args: vec!["demo-http".into()],
                    argument_patterns: Some(vec!["--port".into(), "{port}".into()]),
                },
            );
            policy.allowed_env.push("GREETING".into());
        }
        Ok(policy)
    }

    /// The registry's settings from these flags; `with_demo` lets the process platform run
    /// the shipped demo program (the embedded mode).
    pub fn registry_settings(&self, with_demo: bool) -> Result<RegistrySettings, Failure> {
        let mut settings = RegistrySettings::default();
        settings.docker_host = self.docker_host.clone();
        settings.docker_policy = self.docker_policy();
        settings.process_policy = self.process_policy(with_demo)?;
        Ok(settings)
    }

    /// Sets `platform` up through the registry of platforms.
    pub async fn build(&self, platform: PlatformName) -> Result<Arc<dyn Platform>, Failure> {
        build_platform(platform, &self.registry_settings(false)?).await
    }
}

/// Builds `platform` through the registry, sorting its failure: a platform this binary
/// lacks and a wrong setting are configuration errors, an engine that does not answer is
/// unavailable (worth starting again later).
pub async fn build_platform(
    platform: PlatformName,
    settings: &RegistrySettings,
) -> Result<Arc<dyn Platform>, Failure> {
    provisioner_platforms::build(platform, settings)
        .await
        .map_err(|error| match &error {
            BuildError::Setup {
                source: SetupError::Unavailable(_),
                ..
            } => Failure::unavailable(anyhow::anyhow!(error)),
            _ => Failure::config(anyhow::anyhow!(error)),
        })
}
