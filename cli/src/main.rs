//! `provisioner`: the worker daemon, the producer and observer commands, and the embedded
//! default that runs everything in one process when no `AMQP_URL`/`REDIS_URL` is given.
//!
//! Configuration is read once here, validated, and passed down; a bad setting exits with
//! code 64 and a message naming it, an unreachable service with 69.

mod config;
mod demo_http;
mod observe;
mod submit;
mod telemetry;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use provisioner_core::amqp::{AmqpBroker, AmqpConfig, ManagementApi};
use provisioner_core::redis_store::RedisStore;
use provisioner_core::{Broker, Outcome, StateStore, Worker};
use provisioner_events::PlatformName;

use crate::config::{Connections, PlatformSettings, WorkerSettings};

#[derive(Debug, Parser)]
#[command(
    name = "provisioner",
    version,
    about = "Provisioning driven by messages: RabbitMQ in, status events out, Redis for idempotency."
)]
struct Cli {
    #[command(flatten)]
    connections: Connections,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a worker for one platform until SIGTERM or Ctrl-C.
    Worker {
        #[command(flatten)]
        settings: WorkerSettings,
        #[command(flatten)]
        platforms: PlatformSettings,
    },
    /// Publish requests from a file (one JSON object, an array, or JSON lines; `-` for stdin).
    ///
    /// Without AMQP_URL and REDIS_URL it runs embedded: an in-process broker, store and the
    /// workers the requests need, waiting for every request to end.
    Submit(submit::SubmitArgs),
    /// Print status events as they are published.
    Watch {
        /// Only this request.
        #[arg(long)]
        request_id: Option<String>,
        /// Only this platform.
        #[arg(long)]
        platform: Option<String>,
        /// Print each event as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Show what the state store knows of a request. Request ids are one platform's:
    /// without --platform, every platform's record of that id is shown.
    Status {
        request_id: String,
        /// Only this platform's record.
        #[arg(long, value_parser = config::parse_platform)]
        platform: Option<PlatformName>,
    },
    /// Check, before sending any work, that a worker of this platform can work here:
    /// where it will act, with which credentials, and whether it holds the rights it
    /// needs. Exits 0 when nothing failed, 64 otherwise (69 when its endpoint does not
    /// answer at all).
    Check {
        #[arg(long, env = "PLATFORM", value_parser = config::parse_platform)]
        platform: PlatformName,
        #[command(flatten)]
        platforms: PlatformSettings,
    },
    /// Print the rights a platform's worker uses on its cloud's API (its permission
    /// manifest: each action, where it is granted, under what condition, and why), or
    /// with --policy the policy document that grants exactly those (AWS: IAM JSON).
    Permissions {
        #[arg(long, env = "PLATFORM", value_parser = config::parse_platform)]
        platform: PlatformName,
        /// Print the policy document instead of the manifest.
        #[arg(long, conflicts_with = "json")]
        policy: bool,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a platform's dead letters back to its work queue, once what refused them is
    /// fixed. Each goes back with its own routing key; its record decides what happens.
    Redrive {
        /// The platform whose dead-letter queue to empty.
        #[arg(long, value_parser = config::parse_platform)]
        platform: PlatformName,
        /// Only list what would move; leave every message where it is.
        #[arg(long)]
        dry_run: bool,
        /// Move at most this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Compare what a platform holds with the provisioner's marks against the records,
    /// and send the teardown of what no record explains (no record, a provision that
    /// ended in error, a torn-down one still there). Fresh resources and foreign ones
    /// (without our marks) are never touched. Prints one JSON line per resource.
    Reconcile {
        #[arg(long, env = "PLATFORM", value_parser = config::parse_platform)]
        platform: PlatformName,
        /// Only report what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// Leave alone anything younger than this.
        #[arg(long, default_value_t = 600)]
        min_age_seconds: u64,
        /// Look at each verdict again after this pause before acting on it.
        #[arg(long, default_value_t = 5)]
        second_look_seconds: u64,
        /// Send at most this many teardowns.
        #[arg(long, default_value_t = 20)]
        max: usize,
        #[command(flatten)]
        platforms: PlatformSettings,
    },
    /// Show or set a tenant's quota: how many machines its provisions may hold at once,
    /// shared by every worker and platform. `*` is the default of every tenant without a
    /// quota of its own.
    Quota {
        #[command(subcommand)]
        action: QuotaAction,
    },
    /// Print the broker topology every worker declares (exchanges, queues, bindings) and
    /// the users of a least-privilege deployment (producer, one worker per platform,
    /// operator) as RabbitMQ definitions, for `rabbitmqctl import_definitions` or the
    /// management API (`infra/rabbitmq/definitions.json` is this on the default vhost).
    Definitions {
        /// The vhost the definitions are for.
        #[arg(long, default_value = "/")]
        vhost: String,
    },
    /// Print the Redis users of a least-privilege deployment as `ACL SETUSER` lines for
    /// `redis-cli`: one worker user per platform, limited to its platform's keys and the
    /// tenants' shared ledger, and an operator. They set no password and change none:
    /// turn each on once with `ACL SETUSER <user> on >PASSWORD`.
    RedisUsers,
    /// Move the state store from key layout version 1 (everything directly under the
    /// prefix) to version 2 (each platform's keys under `<prefix><platform>:`), with the
    /// workers stopped, as a Redis user that reaches every key under the prefix. Safe to
    /// run again. With signing keys set, the fleets it moves are sealed with them.
    MigrateStore,
    /// A tiny HTTP server, the program of the shipped process examples.
    #[command(hide = true)]
    DemoHttp {
        #[arg(long, env = "PORT")]
        port: u16,
    },
}

#[derive(Debug, Subcommand)]
enum QuotaAction {
    /// Print the tenant's limits (its own or the default) and what it holds: machines,
    /// and any other unit with a limit or holdings (`units`).
    Show { tenant: String },
    /// Set the tenant's limit; `none` removes it (the default, if any, applies again).
    /// A lower limit takes nothing away: it refuses new provisions until enough are gone.
    Set {
        tenant: String,
        limit: String,
        /// What the limit counts: `machines` (every provision holds one), or a unit a
        /// platform defines, e.g. `vcpus` (EC2: its instance type's).
        #[arg(long, default_value = "machines")]
        unit: String,
    },
}

/// Exit codes from sysexits: bad usage or configuration, unavailable service.
pub const EXIT_CONFIG: u8 = 64;
pub const EXIT_DATA: u8 = 65;
pub const EXIT_UNAVAILABLE: u8 = 69;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    // A daemon logs its work; a command a person runs only says what went wrong.
    let default_filter = match cli.command {
        Command::Worker { .. } => {
            "warn,provisioner=info,provisioner_core=info,provisioner_docker=info,provisioner_process=info"
        }
        _ => "error,provisioner_core=warn",
    };
    let service = match cli.command {
        Command::Worker { .. } => "provisioner-worker",
        Command::Submit(_) => "provisioner-submit",
        _ => "provisioner",
    };
    let telemetry = match telemetry::init(default_filter, service) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(run(cli));
    drop(runtime);
    telemetry.shutdown();
    code
}

/// An error with the exit code it deserves.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn config(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: EXIT_CONFIG,
            error: error.into(),
        }
    }
    pub fn unavailable(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: EXIT_UNAVAILABLE,
            error: error.into(),
        }
    }
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure {
            code: 1,
            error: error.into(),
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Worker {
            settings,
            platforms,
        } => worker(&cli.connections, settings, platforms).await,
        Command::Submit(args) => submit::run(&cli.connections, args).await,
        Command::Watch {
            request_id,
            platform,
            json,
        } => watch(&cli.connections, request_id, platform, json).await,
        Command::Status {
            request_id,
            platform,
        } => status(&cli.connections, &request_id, platform).await,
        Command::RedisUsers => {
            for user in provisioner_core::redis_store::acl_users(&cli.connections.redis_key_prefix)
            {
                println!("ACL SETUSER {}", user.join(" "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::MigrateStore => migrate_store(&cli.connections).await,
        Command::Check {
            platform,
            platforms,
        } => check(platform, platforms).await,
        Command::Permissions {
            platform,
            policy,
            json,
        } => permissions(platform, policy, json),
        Command::Redrive {
            platform,
            dry_run,
            limit,
        } => redrive(&cli.connections, platform, dry_run, limit).await,
        Command::Reconcile {
            platform,
            dry_run,
            min_age_seconds,
            second_look_seconds,
            max,
            platforms,
        } => {
            let options = provisioner_core::ReconcileOptions {
                min_age: Duration::from_secs(min_age_seconds),
                second_look_after: Duration::from_secs(second_look_seconds),
                max_removals: max,
                dry_run,
            };
            reconcile(&cli.connections, platform, platforms, options).await
        }
        Command::Quota { action } => quota(&cli.connections, action).await,
        Command::Definitions { vhost } => {
            let config = AmqpConfig::new(String::new());
            let definitions = provisioner_core::amqp::definitions(&config, &vhost);
            println!(
                "{}",
                serde_json::to_string_pretty(&definitions).unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoHttp { port } => demo_http::serve(port).await.map_err(Failure::from),
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("error: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}

async fn amqp(connections: &Connections, name: &str) -> Result<AmqpBroker, Failure> {
    let url = connections.require_amqp()?;
    let mut config = AmqpConfig::new(url);
    config.status_publishers = config::comma_list(&connections.status_publishers);
    config.connection_name = name.to_owned();
    config.management_api =
        ManagementApi::from_setting(connections.rabbitmq_management_url.as_deref());
    AmqpBroker::connect(config).await.map_err(|e| {
        Failure::unavailable(anyhow::anyhow!("RabbitMQ at {}: {e}", config::redact(url)))
    })
}

async fn redis(connections: &Connections) -> Result<RedisStore, Failure> {
    let url = connections.require_redis()?;
    RedisStore::connect(url, &connections.redis_key_prefix, connections.retention())
        .await
        .map_err(|e| Failure::unavailable(anyhow::anyhow!("Redis at {}: {e}", config::redact(url))))
}

async fn worker(
    connections: &Connections,
    settings: WorkerSettings,
    platforms: PlatformSettings,
) -> Result<ExitCode, Failure> {
    let mut config = settings.validate()?;
    config.retention = connections.retention();
    config.signing = connections.signing_keys()?;
    if let Some(tenants) = &settings.tenants {
        let binding = provisioner_core::tenants::TenantBinding::parse(tenants)
            .map_err(|e| Failure::config(anyhow::anyhow!("TENANTS: {e}")))?;
        config.tenants = Some(Arc::new(binding));
    }
    if config.signing.is_none() {
        // Off is the default for a first try on one's own broker; said loudly, because
        // then whoever can publish on provisioning.requests can make this worker act.
        tracing::warn!(
            "REQUEST SIGNING IS OFF: this worker runs every request anyone who can publish on provisioning.requests sends. Set REQUEST_SIGNING_KEYS or REQUEST_SIGNING_KEYS_FILE (the deployment forms in infra/ do) unless every publisher is trusted"
        );
    }
    connections.require_amqp()?;
    connections.require_redis()?;
    let platform = platforms.build(settings.platform).await?;
    log_preflight(platform.as_ref()).await;
    let store = redis(connections).await?.for_platform(settings.platform);
    store
        .check_layout()
        .await
        .map_err(|e| Failure::config(anyhow::anyhow!(e)))?;
    let store: Arc<dyn StateStore> = Arc::new(store);
    let broker: Arc<dyn Broker> = Arc::new(amqp(connections, &config.worker_id).await?);
    let worker = Arc::new(Worker::new(platform, store, broker, config));
    if let Some(addr) = settings.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            Failure::config(anyhow::anyhow!(
                "METRICS_ADDR {addr}: cannot listen there: {e}"
            ))
        })?;
        tracing::info!(%addr, "serving /metrics, /live and /ready");
        tokio::spawn(observe::serve(listener, worker.metrics(), worker.health()));
    }
    worker.run(shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}

/// `provisioner check`: the platform's setup (a failure there is the first finding) and
/// its preflight, one line each.
async fn check(platform: PlatformName, platforms: PlatformSettings) -> Result<ExitCode, Failure> {
    println!("checking {platform}");
    let built = match platforms.build(platform).await {
        Ok(built) => built,
        Err(failure) => {
            println!("  FAIL  setup: {:#}", failure.error);
            return Ok(ExitCode::from(failure.code));
        }
    };
    println!("  ok    setup: configuration read");
    let findings = built.preflight().await;
    let mut failed = 0;
    for finding in &findings {
        let mark = match finding.outcome {
            Outcome::Pass => "ok  ",
            Outcome::Warn => "warn",
            Outcome::Fail => {
                failed += 1;
                "FAIL"
            }
        };
        println!("  {mark}  {}: {}", finding.check, finding.detail);
    }
    if failed == 0 {
        println!("{platform}: ready");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{platform}: {failed} check(s) failed; the worker would fail at them");
        Ok(ExitCode::from(EXIT_CONFIG))
    }
}

fn permissions(platform: PlatformName, policy: bool, json: bool) -> Result<ExitCode, Failure> {
    let permissions = match provisioner_platforms::permissions(platform) {
        Ok(permissions) => permissions,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    if policy {
        return match permissions.policy {
            Some(document) => {
                println!("{}", document.trim_end());
                Ok(ExitCode::SUCCESS)
            }
            None => {
                eprintln!(
                    "{platform} has no policy document to print; `provisioner permissions --platform {platform}` lists its rights"
                );
                Ok(ExitCode::from(EXIT_CONFIG))
            }
        };
    }
    if json {
        let manifest: Vec<serde_json::Value> = permissions
            .manifest
            .iter()
            .map(|p| {
                serde_json::json!({
                    "action": p.action,
                    "scope": p.scope,
                    "condition": (!p.condition.is_empty()).then(|| serde_json::from_str::<serde_json::Value>(p.condition).unwrap_or_else(|_| p.condition.into())),
                    "why": p.why,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"platform": platform, "permissions": manifest})
        );
        return Ok(ExitCode::SUCCESS);
    }
    if permissions.manifest.is_empty() {
        println!(
            "{platform}: no cloud rights; it acts on this host (or its manifest is not written yet)"
        );
    }
    for p in permissions.manifest {
        let condition = if p.condition.is_empty() {
            String::new()
        } else {
            format!(" when {}", p.condition)
        };
        println!("{}  on {}{condition}\n    {}", p.action, p.scope, p.why);
    }
    Ok(ExitCode::SUCCESS)
}

/// How long a worker's start waits for its setup checks.
const PREFLIGHT_AT_START: std::time::Duration = std::time::Duration::from_secs(20);

/// Logs a platform's preflight at worker start: the worker still starts (a right it
/// lacks may be one it never needs), but a person reading the log sees what will fail.
async fn log_preflight(platform: &dyn provisioner_core::Platform) {
    // Bounded: a platform endpoint that hangs must not keep the worker from its queue.
    let Ok(findings) = tokio::time::timeout(PREFLIGHT_AT_START, platform.preflight()).await else {
        tracing::warn!("the setup checks took over {PREFLIGHT_AT_START:?}; starting without them");
        return;
    };
    for finding in findings {
        match finding.outcome {
            Outcome::Pass => tracing::info!(check = %finding.check, "{}", finding.detail),
            Outcome::Warn => tracing::warn!(check = %finding.check, "{}", finding.detail),
            Outcome::Fail => tracing::error!(
                check = %finding.check,
                "{} (provisioner check --platform {} says more)",
                finding.detail,
                platform.name()
            ),
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
    }
}

async fn watch(
    connections: &Connections,
    request_id: Option<String>,
    platform: Option<String>,
    json: bool,
) -> Result<ExitCode, Failure> {
    if let Some(platform) = &platform
        && PlatformName::parse(platform).is_none()
    {
        return Err(Failure::config(anyhow::anyhow!(
            "unknown platform {platform:?}"
        )));
    }
    let broker = amqp(connections, "provisioner-watch").await?;
    let mut stop = std::pin::pin!(shutdown_signal());
    let mut reconnect_delay = std::time::Duration::from_millis(250);
    // Set when a subscription ended or failed, so the watcher says when it is back.
    let mut interrupted = false;
    loop {
        let subscribed = tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            subscribed = broker.subscribe_status() => subscribed,
        };
        let mut events = match subscribed {
            Ok(events) => {
                if interrupted {
                    eprintln!("watch: subscribed again");
                }
                reconnect_delay = std::time::Duration::from_millis(250);
                events
            }
            Err(e) => {
                // A watcher outlives broker restarts: say so, and subscribe again.
                interrupted = true;
                eprintln!(
                    "watch: cannot subscribe ({e}); retrying in {} ms",
                    reconnect_delay.as_millis()
                );
                tokio::select! {
                    _ = &mut stop => return Ok(ExitCode::SUCCESS),
                    _ = tokio::time::sleep(reconnect_delay) => {}
                }
                reconnect_delay = (reconnect_delay * 2).min(std::time::Duration::from_secs(10));
                continue;
            }
        };
        loop {
            let event = tokio::select! {
                _ = &mut stop => return Ok(ExitCode::SUCCESS),
                event = events.next() => event,
            };
            let Some(event) = event else {
                eprintln!(
                    "watch: lost the connection to RabbitMQ; events until it is back are not shown"
                );
                interrupted = true;
                break;
            };
            if request_id
                .as_ref()
                .is_some_and(|id| *id != event.request_id)
                || platform.as_ref().is_some_and(|p| *p != event.platform)
            {
                continue;
            }
            submit::print_event(&event, json);
        }
    }
}

async fn redrive(
    connections: &Connections,
    platform: PlatformName,
    dry_run: bool,
    limit: usize,
) -> Result<ExitCode, Failure> {
    let broker = amqp(connections, "provisioner-redrive").await?;
    broker
        .declare(platform)
        .await
        .with_context(|| format!("declaring the {platform} queues"))?;
    let moved = broker
        .redrive(platform, dry_run, limit)
        .await
        .with_context(|| format!("redriving the {platform} dead letters"))?;
    for letter in &moved {
        println!(
            "{}\t{}\t{}\t{}",
            letter.request_id.as_deref().unwrap_or("-"),
            letter.routing_key,
            letter.class.as_deref().unwrap_or("-"),
            letter.reason.as_deref().unwrap_or("-"),
        );
    }
    eprintln!(
        "{} {} dead letter(s) of {platform}",
        if dry_run { "would move" } else { "moved" },
        moved.len()
    );
    Ok(ExitCode::SUCCESS)
}

async fn reconcile(
    connections: &Connections,
    platform: PlatformName,
    platforms: PlatformSettings,
    options: provisioner_core::ReconcileOptions,
) -> Result<ExitCode, Failure> {
    let built = platforms.build(platform).await?;
    let store = redis(connections).await?.for_platform(platform);
    let broker = amqp(connections, "provisioner-reconcile").await?;
    broker
        .declare(platform)
        .await
        .with_context(|| format!("declaring the {platform} queues"))?;
    let worker = Worker::new(
        built,
        Arc::new(store),
        Arc::new(broker),
        provisioner_core::WorkerConfig::default(),
    );
    let decisions = worker
        .reconcile(&options)
        .await
        .with_context(|| format!("reconciling {platform}"))?;
    for decision in &decisions {
        println!("{}", serde_json::to_string(decision).context("formatting")?);
    }
    Ok(ExitCode::SUCCESS)
}

async fn quota(connections: &Connections, action: QuotaAction) -> Result<ExitCode, Failure> {
    let tenant = match &action {
        QuotaAction::Show { tenant } | QuotaAction::Set { tenant, .. } => tenant.clone(),
    };
    if tenant.is_empty() || tenant.len() > 128 || tenant.chars().any(char::is_control) {
        return Err(Failure::config(anyhow::anyhow!(
            "a tenant is 1 to 128 characters without control characters"
        )));
    }
    if let QuotaAction::Set { limit, unit, .. } = &action {
        if !provisioner_core::store::valid_quota_unit(unit) {
            return Err(Failure::config(anyhow::anyhow!(
                "unit {unit:?} is not a quota unit: 1 to 32 lower-case letters, digits, `_` or `-` (e.g. machines, vcpus)"
            )));
        }
        let limit = match limit.as_str() {
            "none" => None,
            number => Some(number.parse::<u64>().map_err(|_| {
                Failure::config(anyhow::anyhow!(
                    "limit {number:?} is neither a number of {unit} nor `none`"
                ))
            })?),
        };
        let store = redis(connections).await?;
        store
            .set_quota(&tenant, unit, limit)
            .await
            .context("writing the quota")?;
    }
    let store = redis(connections).await?;
    let usage = store.quota(&tenant).await.context("reading the quota")?;
    let mut output =
        serde_json::json!({"tenant": tenant, "limit": usage.limit, "used": usage.used});
    if !usage.units.is_empty() {
        output["units"] = serde_json::to_value(&usage.units).context("formatting")?;
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&output).context("formatting")?
    );
    Ok(ExitCode::SUCCESS)
}

async fn status(
    connections: &Connections,
    request_id: &str,
    platform: Option<PlatformName>,
) -> Result<ExitCode, Failure> {
    let store = redis(connections).await?;
    let platforms: Vec<PlatformName> = match platform {
        Some(platform) => vec![platform],
        None => PlatformName::ALL.to_vec(),
    };
    let mut found = 0;
    for platform in platforms {
        let Some(record) = store
            .for_platform(platform)
            .get(request_id)
            .await
            .context("reading the state store")?
        else {
            continue;
        };
        found += 1;
        let output = serde_json::json!({
            "request_id": request_id,
            "platform": platform,
            "state": record.state,
            "owner": record.owner,
            "fence": record.fence,
            "seq": record.seq,
            "attempts": record.attempts,
            "torn_down_by": record.torn_down_by,
            "acted_on_by": record.actor,
            "lease_remaining_ms": record.lease_remaining.map(|d| d.as_millis() as u64),
            "result": record.result,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&output).context("formatting")?
        );
    }
    if found == 0 {
        eprintln!(
            "no request {request_id} is known (never received, or finished longer ago than the retention)"
        );
        return Ok(ExitCode::from(EXIT_DATA));
    }
    Ok(ExitCode::SUCCESS)
}

async fn migrate_store(connections: &Connections) -> Result<ExitCode, Failure> {
    let store = redis(connections).await?;
    let keys = connections.signing_keys()?;
    let report = store
        .migrate_from_v1(keys.as_deref())
        .await
        .context("migrating the state store")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "moved": report.moved,
            "left": report.left,
        }))
        .context("formatting")?
    );
    if report.left.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("some keys say no platform and were left where they are; see `left`");
        Ok(ExitCode::from(EXIT_DATA))
    }
}

#[cfg(test)]
mod layout {
    /// The end-to-end suite in the top-level `tests/` is listed target by target in this
    /// package's Cargo.toml (`autotests = false`, since it lies outside the package): a
    /// file added there without its `[[test]]` entry would never run.
    #[test]
    fn every_file_of_the_top_level_tests_is_a_test_target() {
        let manifest = include_str!("../Cargo.toml");
        let suite = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests");
        let mut missing = Vec::new();
        for entry in std::fs::read_dir(&suite).expect("the top-level tests/") {
            let name = entry
                .expect("entry")
                .file_name()
                .into_string()
                .expect("name");
            if name.ends_with(".rs") && !manifest.contains(&format!("path = \"../tests/{name}\"")) {
                missing.push(name);
            }
        }
        assert!(
            missing.is_empty(),
            "add a [[test]] entry to cli/Cargo.toml for {missing:?}"
        );
    }
}
