//! Trace context across the broker (W3C Trace Context).
//!
//! A request may carry `traceparent` (and `tracestate`) among its AMQP headers, as
//! `provisioner submit` sets them and as any producer following the W3C convention for
//! AMQP can. The worker's span of the delivery becomes a child of that context (a message
//! without one starts a new trace), and everything the worker publishes while it works on
//! the delivery (its status events, a retry parked in a delay queue, a dead letter, a
//! fleet's member requests) carries the context of the span it was published from. One
//! trace so runs from the producer through every attempt to the terminal event.
//!
//! Spans become OpenTelemetry spans only where a `tracing-opentelemetry` layer is
//! installed (the `provisioner` binary installs one, and exports by OTLP when told to);
//! without it nothing here does anything and no header is written.

use std::collections::BTreeMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header naming the trace and the parent span (as the AsyncAPI document names it).
pub const TRACEPARENT: &str = provisioner_events::asyncapi::TRACEPARENT_HEADER;
/// The W3C header carrying vendors' trace state along with `traceparent`.
pub const TRACESTATE: &str = "tracestate";

/// A message's trace headers (`traceparent`, `tracestate`), as they travel.
pub type TraceHeaders = BTreeMap<String, String>;

struct Carrier<'a>(&'a TraceHeaders);

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct Sink<'a>(&'a mut TraceHeaders);

impl Injector for Sink<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// Makes `span` a child of the trace `headers` name; with no (valid) `traceparent` the
/// span starts a new trace. Call it before the span is first entered. Returns the trace
/// id, when spans are traced here.
pub fn continue_trace(span: &Span, headers: &TraceHeaders) -> Option<String> {
    let parent = TraceContextPropagator::new().extract(&Carrier(headers));
    // Err only when no OpenTelemetry layer sees this span: then there is no trace at all.
    span.set_parent(parent).ok()?;
    trace_id(span)
}

/// The trace id of `span` (32 hex digits), when it is traced.
pub fn trace_id(span: &Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
}

/// The headers naming the current span as the parent of whatever a message sets off;
/// empty when the current span is not traced.
pub fn current_headers() -> TraceHeaders {
    let context = Span::current().context();
    let mut headers = TraceHeaders::new();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut Sink(&mut headers));
    }
    headers
}

/// The tracer provider of a process named `service` (unless `OTEL_SERVICE_NAME` names
/// it): exporting by OTLP over HTTP in batches when the standard variables say where
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, a base URL to which `/v1/traces` is added, or
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_EXPORTER_OTLP_PROTOCOL` `http/protobuf`,
/// the default, or `http/json`; `OTEL_EXPORTER_OTLP_HEADERS`; the `OTEL_BSP_*` batch
/// settings), and keeping the spans to itself otherwise, so ids still travel. The error
/// names the setting at fault.
#[cfg(feature = "otlp")]
pub fn tracer_provider(
    service: &str,
) -> Result<opentelemetry_sdk::trace::SdkTracerProvider, String> {
    let configured = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !configured("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_owned());
    }
    let mut provider =
        opentelemetry_sdk::trace::SdkTracerProvider::builder().with_resource(resource.build());
    if configured("OTEL_EXPORTER_OTLP_ENDPOINT") || configured("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_*: cannot export traces: {e}"))?;
        provider = provider.with_batch_exporter(exporter);
    }
    Ok(provider.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_traced_and_nothing_is_written() {
        let span = tracing::info_span!("untraced");
        let mut headers = TraceHeaders::new();
        headers.insert(
            TRACEPARENT.into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        assert_eq!(continue_trace(&span, &headers), None);
        let _entered = span.enter();
        assert!(current_headers().is_empty());
    }

    #[test]
    fn a_delivery_continues_the_producers_trace_and_is_named_as_the_parent_downstream() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let producers = "4bf92f3577b34da6a3ce929d0e0e4736";
            let mut headers = TraceHeaders::new();
            headers.insert(
                TRACEPARENT.into(),
                format!("00-{producers}-00f067aa0ba902b7-01"),
            );
            headers.insert(TRACESTATE.into(), "vendor=opaque".into());
            let span = tracing::info_span!("delivery");
            assert_eq!(continue_trace(&span, &headers).as_deref(), Some(producers));
            let downstream = span.in_scope(current_headers);
            let traceparent = &downstream[TRACEPARENT];
            assert!(
                traceparent.starts_with(&format!("00-{producers}-")),
                "{traceparent}"
            );
            assert!(
                !traceparent.contains("00f067aa0ba902b7"),
                "the delivery's own span is the parent: {traceparent}"
            );
            assert!(
                traceparent.ends_with("-01"),
                "sampled as the producer asked: {traceparent}"
            );
            assert_eq!(downstream[TRACESTATE], "vendor=opaque");

            // No traceparent, or one that is not W3C: a new trace starts at the delivery.
            for headers in [
                TraceHeaders::new(),
                TraceHeaders::from([(TRACEPARENT.to_owned(), "garbage".to_owned())]),
            ] {
                let span = tracing::info_span!("delivery");
                let started = continue_trace(&span, &headers).expect("a new trace");
                assert_eq!(started.len(), 32);
                assert_ne!(started, producers);
                let downstream = span.in_scope(current_headers);
                assert!(downstream[TRACEPARENT].contains(&started));
            }
        });
    }
}
