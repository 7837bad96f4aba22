//! What the binary says about its work: logs on stderr (`PROVISIONER_LOG`,
//! `PROVISIONER_LOG_FORMAT`) and OpenTelemetry traces.
//!
//! Spans of the provisioner's own code (`submit`, each `delivery`, each `platform_call`)
//! are always OpenTelemetry spans, so a request's `traceparent` goes on through the
//! worker to its status events even where nothing is exported. They are exported by
//! OTLP over HTTP when the standard variables say where: `OTEL_EXPORTER_OTLP_ENDPOINT` (a
//! base URL, `/v1/traces` is added) or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, with
//! `OTEL_EXPORTER_OTLP_PROTOCOL` `http/protobuf` (the default) or `http/json`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` and the `OTEL_BSP_*` batch settings.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The tracer provider; [`Telemetry::shutdown`] exports what is still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports the spans still buffered (the batch processor's last batch).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("warning: exporting the last traces failed: {e}");
        }
    }
}

/// Installs the logging and tracing of this process. `default_filter` applies when
/// `PROVISIONER_LOG` is unset; `service` names the process in traces unless
/// `OTEL_SERVICE_NAME` does. An error names the setting at fault.
pub fn init(default_filter: &str, service: &str) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_env("PROVISIONER_LOG")
        .unwrap_or_else(|_| EnvFilter::new(default_filter));
    let logs = match std::env::var("PROVISIONER_LOG_FORMAT").as_deref() {
        Err(_) | Ok("" | "text") => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        // One JSON object a line, for a log pipeline: the event's fields at the top, the
        // innermost span (`span`) and every enclosing one (`spans`): the delivery's
        // `platform`, `request.id`, `attempt` and `trace_id` are on every line of its work.
        Ok("json") => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
        Ok(other) => {
            return Err(format!(
                "PROVISIONER_LOG_FORMAT={other:?} is not `text` or `json`"
            ));
        }
    };

    let provider = provisioner_core::trace::tracer_provider(service)?;
    // Only the provisioner's own spans become trace spans (not the SDKs' and clients'
    // inner spans), whatever the log filter shows; log events stay in the logs.
    let traces = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("provisioner"))
        .with_filter(filter_fn(|meta| {
            meta.is_span()
                && meta.target().starts_with("provisioner")
                && *meta.level() <= Level::INFO
        }))
        .boxed();
    tracing_subscriber::registry()
        .with(vec![logs, traces])
        .try_init()
        .map_err(|e| format!("cannot install logging: {e}"))?;
    Ok(Telemetry { provider })
}
