//! OpenTelemetry traces: one trace per job, across the queue.
//!
//! Off unless configured with the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` turns it on (`OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` keep it off); the exporter speaks OTLP over gRPC (the
//! `OTEL_EXPORTER_OTLP_*` variables of the OTLP exporter apply: headers, timeout, compression);
//! `OTEL_SERVICE_NAME` names the part (default: the binary's name, e.g. `ember-worker`);
//! `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` sample (default: parent-based, always on).
//!
//! Spans are `tracing` spans of the target [`TARGET`], made only when traces are on
//! ([`on`]; otherwise the job path makes none: `tracing::Span::none()`), exported by
//! `tracing-opentelemetry` and kept out of the logs. Across the queue the context travels as
//! the W3C `traceparent` header, on AMQP messages as on HTTP.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use opentelemetry::Context;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The `tracing` target of every span meant for traces (and only for them).
pub const TARGET: &str = "ember_trace";

static ON: AtomicBool = AtomicBool::new(false);

/// Whether traces are being made (set once, at startup).
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Why traces could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OTLP exporter: {0}")]
    Exporter(String),
    #[error("{0}")]
    Config(String),
}

fn variable(name: &str) -> Option<String> {
    std::env::var(name)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// Whether the environment asks for traces: an OTLP endpoint is given, and neither
/// `OTEL_SDK_DISABLED=true` nor an `OTEL_TRACES_EXPORTER` other than `otlp` says no. Any other
/// protocol than gRPC is refused (an error, not a silent nothing).
pub fn configured() -> Result<bool, Error> {
    if variable("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(false);
    }
    if let Some(exporter) = variable("OTEL_TRACES_EXPORTER")
        && !exporter.eq_ignore_ascii_case("otlp")
    {
        return Ok(false);
    }
    let endpoint = variable("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| variable("OTEL_EXPORTER_OTLP_ENDPOINT"));
    if endpoint.is_none() {
        return Ok(false);
    }
    let protocol = variable("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|| variable("OTEL_EXPORTER_OTLP_PROTOCOL"));
    match protocol.as_deref() {
        None | Some("grpc") => Ok(true),
        Some(other) => Err(Error::Config(format!(
            "OTEL_EXPORTER_OTLP_PROTOCOL={other}: Ember exports traces over OTLP/gRPC only \
             (set it to grpc, or leave it unset, and point the endpoint at the collector's \
             gRPC port, 4317 by default)"
        ))),
    }
}

/// The tracer provider for `service` (unless `OTEL_SERVICE_NAME` names it), exporting in
/// batches over OTLP/gRPC. Must be called within the Tokio runtime (the gRPC client's). Turns
/// [`on`] on and sets the W3C trace context propagator.
pub fn provider(service: &str) -> Result<SdkTracerProvider, Error> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
        .map_err(|e| Error::Exporter(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if variable("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_string());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    ON.store(true, Ordering::Relaxed);
    Ok(provider)
}

/// The remote context a `traceparent` (W3C) names; the empty context without one (or a bad
/// one: a malformed header starts a new trace, it does not fail the job).
pub fn remote(traceparent: Option<&str>) -> Context {
    let Some(traceparent) = traceparent else {
        return Context::new();
    };
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// The `traceparent` that makes a receiver's spans children of `span`; `None` when the span is
/// not recorded (traces off, or not sampled: then a given header passes on as it came).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Sets `span`'s parent to the remote context of `traceparent`, when there is one.
pub fn set_remote_parent(span: &tracing::Span, traceparent: Option<&str>) {
    if traceparent.is_some() {
        let _ = span.set_parent(remote(traceparent));
    }
}

/// Records a finished span with explicit times (e.g. a job's time in the queue, from its
/// submission stamp to its arrival), a child of `parent`. Only with traces [`on`].
pub fn record_span(
    name: &'static str,
    parent: &Context,
    start: SystemTime,
    end: SystemTime,
    attributes: Vec<KeyValue>,
) {
    if !on() {
        return;
    }
    let tracer = opentelemetry::global::tracer_provider().tracer("ember");
    let mut span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(&tracer, parent);
    opentelemetry::trace::Span::end_with_timestamp(&mut span, end);
}

/// `span`'s own context, to link to from another span.
pub fn span_context(span: &tracing::Span) -> opentelemetry::trace::SpanContext {
    span.context().span().span_context().clone()
}

/// Links `from` to `to` (a batch's run and each of its jobs, both ways). Nothing when either
/// is not recorded.
pub fn link(from: &tracing::Span, to: &tracing::Span) {
    if from.is_disabled() || to.is_disabled() {
        return;
    }
    let target = span_context(to);
    if target.is_valid() {
        from.add_link(target);
    }
}

/// A step of a job's work (decoding, the wait for a batch, the result's publish): a child
/// span of `parent` named `name`; none when `parent` is not recorded (traces off).
pub fn step(parent: &tracing::Span, name: &'static str) -> tracing::Span {
    if parent.is_disabled() {
        return tracing::Span::none();
    }
    tracing::info_span!(target: TARGET, parent: parent, "step", otel.name = name)
}

pub use opentelemetry::KeyValue;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_and_a_bad_one_starts_afresh() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = remote(Some(good));
        let span = context.span();
        let read = span.span_context();
        assert!(read.is_valid() && read.is_remote() && read.is_sampled());
        assert_eq!(
            read.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(read.span_id().to_string(), "00f067aa0ba902b7");
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(
                !remote(Some(bad)).span().span_context().is_valid(),
                "{bad:?}"
            );
        }
        assert!(!remote(None).span().span_context().is_valid());
    }

    #[test]
    fn without_traces_a_span_has_no_traceparent() {
        assert!(!on());
        assert_eq!(traceparent(&tracing::Span::none()), None);
    }
}
