//! # ember-worker
//!
//! Keeps one model resident (loaded once, warmed up, never per job) and answers the jobs of its
//! queue: consume with prefetch, decode off the async runtime, gather dynamic batches of equal
//! shapes, one `session.run` per batch on a dedicated thread, publish results with confirms, then
//! ack. Any ONNX model: the graph says the tensors, `model.toml` (optional) the processing.
//!
//! # Layout
//!
//! - [`config`]: flags and `EMBER_WORKER_*` variables.
//! - [`source`]: `--model-uri` (path, https, s3) into a model directory: cache, digest, unpacking.
//! - [`runtime`]: the ONNX Runtime library, sessions, CUDA and what is missing for it.
//! - [`signature`]: the graph's inputs and outputs; `model.toml` and each job checked against them.
//! - [`tensor`]: typed tensors: OIP JSON and binary decoding, stacking and splitting rows.
//! - [`process`]: the declared processing: image input; ssd, classification, detection outputs.
//! - [`engine`]: [`engine::Engine::load`], the one bootstrap, and the inference thread.
//! - [`batcher`]: gathering dynamic batches.
//! - [`service`]: the AMQP job path: intake -> batch -> reply, recovery, heartbeats.
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
pub mod process;
pub mod runtime;
pub mod service;
pub mod signature;
pub mod source;
pub mod tensor;

use std::sync::Arc;

use ember_core::telemetry::Admin;
use ember_core::topology::QueueSettings;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{Error, Result};

use crate::config::Device;
use crate::engine::{Engine, EngineOptions};
use crate::process::InputLimits;
use crate::service::{Context, SessionEnd, Stats};

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

impl Config {
    /// How to load the model, from the flags.
    pub fn engine_options(&self) -> EngineOptions {
        EngineOptions {
            ort_dylib: self.ort_dylib_path.clone(),
            device: self.device,
            allow_cpu_fallback: self.allow_cpu_fallback,
            cuda: self.cuda.clone(),
            intra_threads: self.intra_threads,
            instances: self.instances,
            spin: self.ort_spin,
            reload_per_job: self.reload_per_job,
            limits: InputLimits {
                max_bytes: self.max_input_bytes,
                max_pixels: self.max_pixels,
            },
            max_batch: self.max_batch,
        }
    }
}

/// The model directory: `--model-dir`, or `--model-uri` resolved (downloaded, verified and
/// unpacked into the cache, or found there).
pub async fn model_dir(config: &Config) -> Result<std::path::PathBuf> {
    match &config.source.model_uri {
        Some(uri) => source::resolve(uri, &config.source)
            .await
            .map_err(|e| Error::Config(e.to_string())),
        None => Ok(config.model.model_dir().to_path_buf()),
    }
}

/// Loads the model off the async runtime; `--model-version` replaces model.toml's version.
pub async fn load_engine(config: &Config) -> Result<Engine> {
    let version = config
        .model_version
        .as_deref()
        .map(|v| ember_core::model::check_version(v).map(|()| v.to_string()))
        .transpose()
        .map_err(Error::Config)?;
    let (dir, options) = (model_dir(config).await?, config.engine_options());
    let mut engine = tokio::task::spawn_blocking(move || Engine::load(&dir, options))
        .await
        .map_err(|e| Error::Internal(format!("model loading panicked: {e}")))??;
    if let Some(version) = version {
        let mut spec = (*engine.spec).clone();
        spec.version = version;
        engine.spec = Arc::new(spec);
    }
    Ok(engine)
}

/// `--check`: loads the model directory, validates it against the graph, runs one warm-up,
/// and says what it found (the verdict, as JSON on stdout).
pub async fn check(config: &Config) -> Result<serde_json::Value> {
    let engine = load_engine(config).await?;
    let info = engine.info();
    Ok(serde_json::json!({
        "verdict": "ok",
        "model": config.model.model_name.clone().unwrap_or_else(|| engine.spec.name.clone()),
        "version": info.version,
        "inputs": info.inputs,
        "outputs": info.outputs,
        "input": info.input,
        "decoder": info.decoder,
        "accepts": engine.pipeline.describe(),
        "batching": engine.pipeline.signature.batching,
        "max_batch": info.max_batch,
        "device": engine.device.to_string(),
        "load_seconds": engine.load_seconds,
    }))
}

/// Names checked, the model loaded, metrics and the admin server up, GPU sampling started.
async fn start(config: &Config) -> Result<(Context, Admin, Option<crate::gpu::Sampling>)> {
    let worker_id = config.worker_id.clone().unwrap_or_else(default_worker_id);
    if !valid_name(&worker_id) {
        return Err(Error::Config(format!(
            "worker id `{worker_id}`: use letters, digits, '-' and '_'"
        )));
    }
    if let Some(name) = &config.model.model_name
        && !valid_name(name)
    {
        return Err(Error::Config(format!(
            "model name `{name}`: use letters, digits, '-' and '_'"
        )));
    }
    // NVML is opened for a GPU that was asked for, even after a CPU fallback: its readings
    // (idle) then say plainly that the GPU is not in use.
    let gpu = match config.device {
        Device::Cuda(index) => gpu::Gpu::open(index.unsigned_abs()),
        Device::Cpu => None,
    };
    let registry = Registry::new();
    let metrics = metrics::Metrics::register(&registry, gpu.is_some())
        .map_err(|e| Error::Internal(format!("metrics: {e}")))?;
    let admin = Admin::start(config.model.admin_addr, registry)
        .await
        .map_err(|e| Error::Config(format!("admin server on {}: {e}", config.model.admin_addr)))?;
    let engine = load_engine(config).await?;
    let model = config
        .model
        .model_name
        .clone()
        .unwrap_or_else(|| engine.spec.name.clone());
    ember_core::model::check_name(&model).map_err(Error::Config)?;
    let device = engine.device;
    metrics
        .device
        .with_label_values(&[device.to_string(), config.device.to_string()])
        .set(1);
    metrics
        .model
        .with_label_values(&[model.as_str(), engine.spec.version.as_str()])
        .set(1);
    let sampling = match gpu {
        Some(gpu) => Some(sample_gpu(gpu, &metrics, config)?),
        None => None,
    };
    metrics.model_load.set(engine.load_seconds);
    let prefetch = config
        .prefetch
        .unwrap_or_else(|| u16::try_from(engine.max_batch * 2).unwrap_or(u16::MAX))
        .max(1);
    tracing::info!(
        model_load_seconds = engine.load_seconds,
        %device,
        max_batch = engine.max_batch,
        prefetch,
        accepts = %engine.pipeline.describe(),
        reload_per_job = config.reload_per_job,
        "model loaded and warmed up"
    );
    let context = Context {
        model,
        worker_id,
        model_info: engine.info(),
        model_load_seconds: engine.load_seconds,
        device: device.to_string(),
        device_fallback: device != config.device,
        engine,
        metrics,
        stats: Stats::default(),
        readiness: admin.readiness(),
        gpu: sampling.as_ref().map(|s| s.latest.clone()),
        max_batch_delay: config.max_batch_delay,
        prefetch,
        queue: QueueSettings {
            delivery_limit: config.delivery_limit,
            max_length: config.queue_max_length,
        },
        heartbeat_interval: config.heartbeat_interval,
        drain_timeout: config.drain_timeout,
        cancelled: std::sync::Mutex::new(std::collections::HashMap::new()),
    };
    Ok((context, admin, sampling))
}

fn sample_gpu(gpu: gpu::Gpu, metrics: &metrics::Metrics, config: &Config) -> Result<gpu::Sampling> {
    let gauges = metrics.gpu.clone();
    let stop = CancellationToken::new();
    let latest = gpu
        .sample(config.heartbeat_interval, stop.clone(), move |reading| {
            if let Some(gauges) = &gauges {
                gauges.utilization.set(reading.utilization);
                gauges.memory_used.set(reading.memory_used_bytes as f64);
                gauges.memory_total.set(reading.memory_total_bytes as f64);
            }
        })
        .map_err(|e| Error::Internal(format!("cannot start NVML sampling: {e}")))?;
    Ok(gpu::Sampling {
        latest,
        _stop: stop.drop_guard(),
    })
}

/// Runs the worker until `shutdown` is cancelled and the jobs in hand are answered.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    let (context, admin, _sampling) = start(&config).await?;
    let context = Arc::new(context);
    let result = serve(&config, &context, &shutdown).await;
    admin.stop();
    tracing::info!("worker stopped");
    result
}

/// Connects, serves, and reconnects after a lost connection, until shutdown drains the worker.
async fn serve(
    config: &Config,
    context: &Arc<Context>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let client_name = format!("ember-worker {}", context.worker_id);
    while !shutdown.is_cancelled() {
        let Some(connection) =
            ember_core::amqp::connect(&config.amqp, &client_name, shutdown).await
        else {
            break;
        };
        match service::serve_connection(context, &connection, shutdown).await {
            SessionEnd::Drained { timed_out } => {
                let _ = connection.close(200, "worker shutting down".into()).await;
                if timed_out {
                    return Err(Error::Internal("drain timed out".into()));
                }
                break;
            }
            SessionEnd::Lost(reason) => {
                context.metrics.reconnects.inc();
                tracing::warn!(%reason, "reconnecting to the broker");
                let _ = connection.close(200, "reconnecting".into()).await;
            }
        }
    }
    Ok(())
}
