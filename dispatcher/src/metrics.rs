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
    /// Requests refused for their token: `unauthorized` (a wrong token, counted against the
    /// client address) and `locked_out` (an address out of tries).
    pub auth_failures: IntCounterVec,
    /// Requests over their tenant's rate (`none`: without auth, over a client address's).
    pub tenant_rate_limited: IntCounterVec,
    /// Jobs by tenant, model and outcome (accepted, tenant_queue_full, queue_full, unavailable,
    /// model_forbidden). Labels are bounded: the configured tenants (plus `none`) times the
    /// served models.
    pub tenant_jobs: IntCounterVec,
    /// Tenants in force.
    pub tenants: IntGauge,
    pub tenant_reloads: IntCounterVec,
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
                        "Results taken in: stored, duplicate, no_job_id, and expired (dropped from \
                         ember.results.store before a dispatcher took them; their jobs read expired)",
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
            auth_failures: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_dispatcher_auth_failures_total",
                        "Requests refused for their token (unauthorized, locked_out)",
                    ),
                    &["outcome"],
                )?,
            )?,
            tenant_rate_limited: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_dispatcher_tenant_rate_limited_total",
                        "Requests over their tenant's request rate",
                    ),
                    &["tenant"],
                )?,
            )?,
            tenant_jobs: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_dispatcher_tenant_jobs_total",
                        "Jobs by tenant, model and outcome (accepted, tenant_queue_full, \
                         queue_full, unavailable, model_forbidden)",
                    ),
                    &["tenant", "model", "outcome"],
                )?,
            )?,
            tenants: register(
                registry,
                IntGauge::new("ember_dispatcher_tenants", "Tenants in force")?,
            )?,
            tenant_reloads: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_dispatcher_tenant_reloads_total",
                        "Reloads of the tenants file (ok, error: the previous tenants stay)",
                    ),
                    &["outcome"],
                )?,
            )?,
        })
    }
}
