//! The worker's Prometheus metrics, registered on the process's own registry.

use ember_core::telemetry::register;
use prometheus::{
    Gauge, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry, exponential_buckets,
};

/// GPU gauges, from NVML readings.
#[derive(Debug, Clone)]
pub struct GpuMetrics {
    pub utilization: Gauge,
    pub memory_used: Gauge,
    pub memory_total: Gauge,
}

/// Handles to every worker metric; clone freely.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Jobs answered, by outcome (`ok` or an error code).
    pub jobs: IntCounterVec,
    /// Jobs requeued after a transient failure.
    pub requeued: IntCounterVec,
    pub batch_size: Histogram,
    pub queue_wait: Histogram,
    pub inference: Histogram,
    pub model_load: Gauge,
    pub in_flight: IntGauge,
    /// Present only where NVML found the GPU (no zero-valued GPU series on CPU workers).
    pub gpu: Option<GpuMetrics>,
    pub reconnects: prometheus::IntCounter,
    /// 1, labelled with the device the model runs on and the one asked for (they differ after a
    /// CPU fallback).
    pub device: prometheus::IntGaugeVec,
    /// 1, labelled with the model and the version this worker serves (join on the instance to
    /// split any other series by version during a rollout).
    pub model: prometheus::IntGaugeVec,
}

impl Metrics {
    pub fn register(registry: &Registry, with_gpu: bool) -> prometheus::Result<Self> {
        let seconds = |name: &str, help: &str| {
            // 0.5 ms .. ~16 s
            HistogramOpts::new(name, help).buckets(
                exponential_buckets(0.0005, 2.0, 16)
                    .unwrap_or_else(|_| vec![0.001, 0.01, 0.1, 1.0]),
            )
        };
        Ok(Self {
            jobs: register(
                registry,
                IntCounterVec::new(
                    Opts::new("ember_worker_jobs_total", "Jobs answered, by outcome"),
                    &["outcome"],
                )?,
            )?,
            requeued: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_worker_jobs_requeued_total",
                        "Jobs handed back to the queue after a transient failure",
                    ),
                    &["reason"],
                )?,
            )?,
            batch_size: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("ember_worker_batch_size", "Jobs per session.run")
                        .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0]),
                )?,
            )?,
            queue_wait: register(
                registry,
                Histogram::with_opts(seconds(
                    "ember_worker_queue_wait_seconds",
                    "From submission (ember-submitted-at) to the start of the job's batch",
                ))?,
            )?,
            inference: register(
                registry,
                Histogram::with_opts(seconds(
                    "ember_worker_inference_duration_seconds",
                    "Time inside session.run per batch",
                ))?,
            )?,
            model_load: register(
                registry,
                Gauge::new(
                    "ember_worker_model_load_duration_seconds",
                    "How long loading the model (and the warm-up run) took at start",
                )?,
            )?,
            in_flight: register(
                registry,
                IntGauge::new(
                    "ember_worker_jobs_in_flight",
                    "Jobs delivered to this worker and not yet acked",
                )?,
            )?,
            gpu: if with_gpu {
                Some(GpuMetrics {
                    utilization: register(
                        registry,
                        Gauge::new(
                            "ember_worker_gpu_utilization_ratio",
                            "GPU utilisation, 0..1 (NVML)",
                        )?,
                    )?,
                    memory_used: register(
                        registry,
                        Gauge::new(
                            "ember_worker_gpu_memory_used_bytes",
                            "GPU memory in use (NVML)",
                        )?,
                    )?,
                    memory_total: register(
                        registry,
                        Gauge::new(
                            "ember_worker_gpu_memory_total_bytes",
                            "GPU memory in all (NVML)",
                        )?,
                    )?,
                })
            } else {
                None
            },
            reconnects: register(
                registry,
                prometheus::IntCounter::new(
                    "ember_worker_broker_reconnects_total",
                    "Times the worker lost its broker connection and connected again",
                )?,
            )?,
            device: register(
                registry,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        "ember_worker_device_info",
                        "The device the model runs on (device) and the one asked for (requested)",
                    ),
                    &["device", "requested"],
                )?,
            )?,
            model: register(
                registry,
                prometheus::IntGaugeVec::new(
                    Opts::new(
                        "ember_worker_model_info",
                        "The model this worker serves and its version",
                    ),
                    &["model", "version"],
                )?,
            )?,
        })
    }
}
