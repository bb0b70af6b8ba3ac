//! # ember-worker
//!
//! Keeps one model resident (the study's "callable object": loaded once, warmed up, never per
//! job) and answers the jobs of its queue: consume with prefetch, decode and resize off the async
//! runtime, gather dynamic batches, one `session.run` per batch on a dedicated thread, publish
//! results with confirms, then ack.
//!
//! # Layout
//!
//! - [`config`]: flags and `EMBER_WORKER_*` variables.
//! - [`preprocess`]: job body -> model input, with limits.
//! - [`engine`]: ONNX Runtime session on its own thread; SSD decoding.
//! - [`batcher`]: dynamic batching.
//! - [`service`]: the AMQP loop for one connection: consume, batch, publish, ack, heartbeats.
//! - [`metrics`], [`gpu`]: Prometheus metrics and NVML readings (sampled on their own thread).
//! - [`offline`]: the same model path fed from files, no broker (`ember-offline`).
//! - [`error`]: the error type and what each error does to a job.

pub mod batcher;
pub mod config;
pub mod engine;
pub mod error;
pub mod gpu;
pub mod metrics;
pub mod offline;
pub mod preprocess;
pub mod service;

use std::sync::Arc;
use std::time::Instant;

use ember_core::telemetry::{Readiness, serve_admin};
use ember_core::topology::QueueSettings;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{Error, Result};

use crate::config::Device;
use crate::engine::{Engine, Loaded, SessionOptions};
use crate::preprocess::InputLimits;
use crate::service::{SessionEnd, Shared, Stats};
use ember_core::model::ModelSpec;

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Runs the worker until `shutdown` is cancelled and the jobs in hand are answered.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let spec = Arc::new(ModelSpec::load(&config.model_dir).map_err(Error::Config)?);
    let model = config
        .model_name
        .clone()
        .unwrap_or_else(|| spec.name.clone());
    if !valid_name(&model) {
        return Err(Error::Config(format!(
            "model name `{model}`: use letters, digits, '-' and '_'"
        )));
    }
    let worker_id = config.worker_id.clone().unwrap_or_else(default_worker_id);
    if !valid_name(&worker_id) {
        return Err(Error::Config(format!(
            "worker id `{worker_id}`: use letters, digits, '-' and '_'"
        )));
    }
    let max_batch = if config.reload_per_job {
        1
    } else {
        config
            .max_batch
            .unwrap_or(spec.max_batch)
            .clamp(1, spec.max_batch)
    };
    let prefetch = config
        .prefetch
        .unwrap_or_else(|| u16::try_from(max_batch * 2).unwrap_or(u16::MAX))
        .max(1);

    // NVML is opened for a GPU that was asked for, even after a CPU fallback: its readings
    // (idle) then say plainly that the GPU is not in use.
    let gpu = match config.device {
        Device::Cuda(index) => gpu::Gpu::open(index.unsigned_abs()),
        Device::Cpu => None,
    };
    let registry = Registry::new();
    let metrics = metrics::Metrics::register(&registry, gpu.is_some())
        .map_err(|e| Error::Internal(format!("metrics: {e}")))?;
    let readiness = Readiness::default();
    let admin_stop = CancellationToken::new();
    serve_admin(
        config.admin_addr,
        registry.clone(),
        readiness.clone(),
        admin_stop.clone(),
    )
    .await
    .map_err(|e| Error::Config(format!("admin server on {}: {e}", config.admin_addr)))?;

    let target = preprocess::Target::of(&spec);
    let dylib = engine::resolve_dylib(config.ort_dylib_path.as_deref())?;
    let options = SessionOptions {
        model_path: config.model_dir.join(&spec.file),
        ort_dylib: dylib.clone(),
        device: config.device,
        allow_cpu_fallback: config.allow_cpu_fallback,
        cuda: config.cuda.clone(),
        intra_threads: config.intra_threads,
        spin: config.ort_spin,
    };
    tracing::info!(model = %model, path = %options.model_path.display(), device = %config.device, ort = %dylib.display(), "loading the model");
    let load_started = Instant::now();
    let reload = config.reload_per_job;
    let engine_spec = spec.clone();
    let (engine, device) = tokio::task::spawn_blocking(move || -> Result<(Engine, Device)> {
        let env = engine::init_runtime(&dylib)?;
        let loaded = Loaded::new(env, options, reload)?;
        let device = loaded.device();
        let engine = Engine::start(loaded, engine_spec)?;
        if matches!(device, Device::Cuda(_)) {
            for n in 2..=max_batch {
                engine.warm_up(n)?;
            }
        }
        Ok((engine, device))
    })
    .await
    .map_err(|e| Error::Internal(format!("model loading panicked: {e}")))??;
    let device_fallback = device != config.device;
    metrics
        .device
        .with_label_values(&[device.to_string(), config.device.to_string()])
        .set(1);
    let gpu_stop = CancellationToken::new();
    let _stop_sampling = gpu_stop.clone().drop_guard();
    let gpu = match gpu {
        Some(gpu) => {
            let gauges = metrics.gpu.clone();
            let sampled = gpu.sample(config.heartbeat_interval, gpu_stop, move |reading| {
                if let Some(gauges) = &gauges {
                    gauges.utilization.set(reading.utilization);
                    gauges.memory_used.set(reading.memory_used_bytes as f64);
                    gauges.memory_total.set(reading.memory_total_bytes as f64);
                }
            });
            Some(sampled.map_err(|e| Error::Internal(format!("cannot start NVML sampling: {e}")))?)
        }
        None => None,
    };
    let model_load_seconds = load_started.elapsed().as_secs_f64();
    metrics.model_load.set(model_load_seconds);
    tracing::info!(
        model_load_seconds,
        %device,
        max_batch,
        prefetch,
        reload_per_job = reload,
        "model loaded and warmed up"
    );

    let shared = Arc::new(Shared {
        model,
        worker_id: worker_id.clone(),
        engine,
        metrics,
        stats: Stats::default(),
        readiness,
        gpu,
        device: device.to_string(),
        device_fallback,
        limits: InputLimits {
            max_bytes: config.max_input_bytes,
            max_pixels: config.max_pixels,
        },
        target,
        max_batch,
        max_batch_delay: config.max_batch_delay,
        prefetch,
        queue: QueueSettings {
            delivery_limit: config.delivery_limit,
            max_length: config.queue_max_length,
        },
        heartbeat_interval: config.heartbeat_interval,
        drain_timeout: config.drain_timeout,
        model_load_seconds,
        cancelled: std::sync::Mutex::new(std::collections::HashMap::new()),
    });

    let mut result = Ok(());
    while !shutdown.is_cancelled() {
        let client_name = format!("ember-worker {worker_id}");
        let Some(connection) =
            ember_core::amqp::connect(&config.amqp, &client_name, &shutdown).await
        else {
            break;
        };
        match service::serve_connection(&shared, &connection, &shutdown).await {
            SessionEnd::Drained { timed_out } => {
                let _ = connection.close(200, "worker shutting down".into()).await;
                if timed_out {
                    result = Err(Error::Internal("drain timed out".into()));
                }
                break;
            }
            SessionEnd::Lost(reason) => {
                shared.metrics.reconnects.inc();
                tracing::warn!(%reason, "reconnecting to the broker");
                let _ = connection.close(200, "reconnecting".into()).await;
            }
        }
    }
    admin_stop.cancel();
    tracing::info!("worker stopped");
    result
}
