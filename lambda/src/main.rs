//! `provisioner-lambda`: the EC2 or ECS worker as a Lambda function (see the library's
//! doc for how queue events are settled). Configured by environment variables only:
//!
//! - `PLATFORM`: `aws-ec2` or `aws-ecs` (required)
//! - `AMQP_URL`, `REDIS_URL` (required), `REDIS_KEY_PREFIX` (default `provisioner:`)
//! - `LEASE_SECONDS` (30; capped by the invocation's remaining time), `PREFETCH` (16 messages
//!   of a batch at once), `MAX_ATTEMPTS` (8), `RETRY_BASE_MS` (1000), `RETRY_MAX_SECONDS` (300)
//! - `REAP_AFTER_SECONDS` (3600; 0: never), `RECONCILE_EVERY_SECONDS` (0: never),
//!   `RECONCILE_MIN_AGE_SECONDS` (600): what a scheduled event's housekeeping round does
//!   beyond expiries and fleets, as the daemon's settings of the same names
//! - the standard AWS chain for the platform's credentials and region (the function's role)
//!
//! A missing or wrong setting stops the function at its start with a message saying which.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use lambda_runtime::{LambdaEvent, service_fn};
use provisioner_core::Broker;
use provisioner_core::Platform;
use provisioner_core::amqp::{AmqpBroker, AmqpConfig, ManagementApi};
use provisioner_core::policy::RetryPolicy;
use provisioner_core::redact_url as redact;
use provisioner_core::redis_store::{DEFAULT_RETENTION, RedisStore};
use provisioner_core::runtime::WorkerConfig;
use provisioner_events::PlatformName;
use provisioner_lambda::sqs::SqsParker;
use provisioner_lambda::{Answer, Handler, deadline_from_millis};

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn number<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match var(name) {
        None => Ok(default),
        Some(text) => text
            .parse()
            .map_err(|_| format!("{name}={text:?} is not a number")),
    }
}

async fn handler() -> Result<Handler, String> {
    let built_in: Vec<String> = provisioner_platforms::built_in()
        .iter()
        .map(|p| p.to_string())
        .collect();
    let platform_name = var("PLATFORM")
        .ok_or_else(|| format!("PLATFORM is not set: one of {}", built_in.join(", ")))?;
    let platform_name = PlatformName::parse(&platform_name).ok_or_else(|| {
        format!(
            "PLATFORM={platform_name:?} is not a platform; this function runs {}",
            built_in.join(", ")
        )
    })?;
    // One AWS configuration for the platform and for SQS, where retries are parked.
    let aws_config = provisioner_aws_common::load_config()
        .await
        .map_err(|e| e.to_string())?;
    let mut settings = provisioner_platforms::Settings::default();
    settings.aws_config = Some(aws_config.clone());
    let platform: Arc<dyn Platform> = provisioner_platforms::build(platform_name, &settings)
        .await
        .map_err(|e| e.to_string())?;
    let amqp_url = var("AMQP_URL").ok_or("AMQP_URL is not set")?;
    let redis_url = var("REDIS_URL").ok_or("REDIS_URL is not set")?;
    let prefix = var("REDIS_KEY_PREFIX").unwrap_or_else(|| "provisioner:".into());
    let lease_seconds: u64 = number("LEASE_SECONDS", 30)?;
    let prefetch: u16 = number("PREFETCH", 16)?;
    let max_attempts: u32 = number("MAX_ATTEMPTS", 8)?;
    let retry_base_ms: u64 = number("RETRY_BASE_MS", 1000)?;
    let retry_max_seconds: u64 = number("RETRY_MAX_SECONDS", 300)?;
    let reap_after_seconds: u64 = number("REAP_AFTER_SECONDS", 3600)?;
    let reconcile_every_seconds: u64 = number("RECONCILE_EVERY_SECONDS", 0)?;
    let reconcile_min_age_seconds: u64 = number("RECONCILE_MIN_AGE_SECONDS", 600)?;
    if lease_seconds < 2 || prefetch == 0 || max_attempts == 0 || retry_base_ms == 0 {
        return Err(
            "LEASE_SECONDS must be at least 2, PREFETCH, MAX_ATTEMPTS and RETRY_BASE_MS at least 1"
                .into(),
        );
    }
    // A warm function keeps its log stream: it names the worker in leases and logs.
    let worker_id = format!(
        "lambda-{}",
        var("AWS_LAMBDA_LOG_STREAM_NAME")
            .map(|s| s
                .chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .collect::<String>())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
    );
    let mut amqp = AmqpConfig::new(&amqp_url);
    amqp.connection_name = worker_id.clone();
    amqp.management_api = ManagementApi::from_setting(var("RABBITMQ_MANAGEMENT_URL").as_deref());
    let broker = AmqpBroker::connect(amqp)
        .await
        .map_err(|e| format!("RabbitMQ at {}: {e}", redact(&amqp_url)))?;
    broker
        .declare(platform.name())
        .await
        .map_err(|e| format!("declaring the topology on RabbitMQ: {e}"))?;
    let store = RedisStore::connect(&redis_url, &prefix, DEFAULT_RETENTION)
        .await
        .map_err(|e| format!("Redis at {}: {e}", redact(&redis_url)))?
        .for_platform(platform_name);
    store.check_layout().await.map_err(|e| e.to_string())?;
    let rate_limits = provisioner_core::RateLimitSettings::parse(
        var("RATE_LIMITS").as_deref().unwrap_or_default(),
    )?;
    // A deployment that signs: the function verifies every request (it cannot tell the
    // exchange a message came through) and signs the requests it derives.
    let signing = provisioner_core::signing::SigningKeys::from_settings(
        var("REQUEST_SIGNING_KEYS").as_deref(),
        var("REQUEST_SIGNING_KEYS_FILE")
            .as_deref()
            .map(std::path::Path::new),
        Duration::from_secs(number(
            "REQUEST_SIGNATURE_MAX_AGE_SECONDS",
            DEFAULT_RETENTION.as_secs(),
        )?),
    )?
    .map(Arc::new);
    // Producers bound to tenants: held to them on Amazon MQ, where each message names
    // its publisher (on SQS nobody vouches for one, and the binding is not applied).
    let tenants = var("TENANTS")
        .map(|setting| provisioner_core::tenants::TenantBinding::parse(&setting))
        .transpose()
        .map_err(|e| format!("TENANTS: {e}"))?
        .map(Arc::new);
    let config = WorkerConfig {
        signing,
        tenants,
        worker_id,
        prefetch,
        rate_limits,
        lease: Duration::from_secs(lease_seconds),
        retry: RetryPolicy {
            max_attempts,
            base_delay: Duration::from_millis(retry_base_ms),
            max_delay: Duration::from_secs(retry_max_seconds),
        },
        ..WorkerConfig::default()
    }
    .with_background(
        reap_after_seconds,
        reconcile_every_seconds,
        reconcile_min_age_seconds,
    )?;
    // SQS retries are parked as new messages on their queue (see the sqs module).
    let sqs = aws_sdk_sqs::Client::new(&aws_config);
    let mut handler = Handler::new(platform, Arc::new(store), Arc::new(broker), config)
        .with_sqs(SqsParker::new(sqs));
    match var("METRICS_NAMESPACE").as_deref() {
        Some("off") => {}
        namespace => handler = handler.with_metrics_namespace(namespace.unwrap_or("provisioner")),
    }
    Ok(handler)
}

/// One invocation: the queue event in, what the event source must know out. An error
/// makes the event source deliver the whole batch again.
async fn answer(
    handler: &Handler,
    event: LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, lambda_runtime::Error> {
    let deadline = deadline_from_millis(event.context.deadline);
    match handler.invoke(&event.payload, deadline).await? {
        Answer::Done => Ok(serde_json::json!({})),
        Answer::Sqs(response) => Ok(serde_json::to_value(response)?),
        Answer::Housekeeping(done) => Ok(serde_json::to_value(done)?),
        Answer::RedeliverBatch(why) => Err(why.into()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    // Kept for the life of the process: the tracer's spans need their provider.
    let traces = {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let logs = tracing_subscriber::fmt::layer()
            // CloudWatch stamps each line itself and shows no colours.
            .without_time()
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .with_filter(
                tracing_subscriber::EnvFilter::try_from_env("PROVISIONER_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            );
        // The provisioner's spans carry trace ids, so a request's traceparent goes on to
        // its status events; they are exported by OTLP when OTEL_EXPORTER_OTLP_* say
        // where (e.g. the ADOT collector layer's http://localhost:4318), flushed at the
        // end of each invocation, since Lambda freezes the process between them.
        let provider = match provisioner_core::trace::tracer_provider("provisioner-lambda") {
            Ok(provider) => provider,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(64);
            }
        };
        let traces = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("provisioner-lambda"))
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span()
                    && meta.target().starts_with("provisioner")
                    && *meta.level() <= tracing::Level::INFO
            }));
        tracing_subscriber::registry()
            .with(logs)
            .with(traces)
            .init();
        provider
    };
    let handler = match handler().await {
        Ok(handler) => Arc::new(handler),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(64);
        }
    };
    let served = lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        let handler = handler.clone();
        let traces = traces.clone();
        async move {
            let answered = answer(&handler, event).await;
            // Before answering: once answered, Lambda may freeze the process.
            let flushed = tokio::task::spawn_blocking(move || traces.force_flush()).await;
            if let Ok(Err(e)) = flushed {
                tracing::warn!(error = %e, "could not export this invocation's traces");
            }
            answered
        }
    }))
    .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: the Lambda runtime stopped: {e}");
            ExitCode::from(70)
        }
    }
}
