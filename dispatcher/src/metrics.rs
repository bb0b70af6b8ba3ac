//! The dispatcher's Prometheus metrics, on the process's own registry.

use ember_core::telemetry::register;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    exponential_buckets,
};

#[derive(Debug, Clone)]
pub struct Metrics {
    /// HTTP requests by route template, method and status.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub publish_confirm: Histogram,
    /// Time a waiting request (infer, ?wait=) spent waiting for its result.
    pub wait: Histogram,
    pub callbacks: IntCounterVec,
    pub callback_attempts: IntCounter,
    pub callbacks_pending: IntGauge,
    pub results_stored: IntCounterVec,
    pub broker_reconnects: IntCounter,
}

fn seconds(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(
        exponential_buckets(0.0005, 2.0, 17).unwrap_or_else(|_| vec![0.001, 0.01, 0.1, 1.0]),
    )
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        Ok(Self {
            requests: register(
                registry,
                IntCounterVec::new(
                    Opts::new("ember_dispatcher_http_requests_total", "HTTP requests"),
                    &["route", "method", "status"],
                )?,
            )?,
            request_duration: register(
                registry,
                HistogramVec::new(
                    seconds(
                        "ember_dispatcher_http_request_duration_seconds",
                        "HTTP request duration",
                    ),
                    &["route"],
                )?,
            )?,
            publish_confirm: register(
                registry,
                Histogram::with_opts(seconds(
                    "ember_dispatcher_publish_confirm_seconds",
                    "From publishing a job to the broker's confirm",
                ))?,
            )?,
            wait: register(
                registry,
                Histogram::with_opts(seconds(
                    "ember_dispatcher_result_wait_seconds",
                    "From publishing a waited-for job to its result (end-to-end through a worker)",
                ))?,
            )?,
            callbacks: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_dispatcher_callbacks_total",
                        "Callbacks by outcome (delivered, dead_lettered, duplicate)",
                    ),
                    &["outcome"],
                )?,
            )?,
            callback_attempts: register(
                registry,
                IntCounter::new(
                    "ember_dispatcher_callback_attempts_total",
                    "Callback POSTs made",
                )?,
            )?,
            callbacks_pending: register(
                registry,
                IntGauge::new(
                    "ember_dispatcher_callbacks_pending",
                    "Callbacks in hand, between attempts",
                )?,
            )?,
            results_stored: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_dispatcher_results_stored_total",
                        "Results taken into the store (stored, duplicate, no_job_id)",
                    ),
                    &["outcome"],
                )?,
            )?,
            broker_reconnects: register(
                registry,
                IntCounter::new(
                    "ember_dispatcher_broker_reconnects_total",
                    "Times the broker connection was lost and made again",
                )?,
            )?,
        })
    }
}
