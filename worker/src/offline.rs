//! The offline pipeline: the worker's own decode -> batch -> infer -> postprocess path, fed from
//! image files (or synthetic images) instead of a queue, so the model path can be measured where
//! no broker can run — such as a lent GPU machine, where nothing can be installed.
//!
//! It measures, on one device: the model resident (batch sizes given, closed loop with one batch
//! in flight: per-batch round trip from the first decode to the last detection), and the
//! stateless-function baseline that loads the model for every job (one session load per job). NVML is
//! sampled on its own thread throughout.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_core::model::ModelSpec;
use ember_core::protocol::{Detection, GpuReading};
use ember_core::telemetry::LogConfig;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::batcher::next_batch;
use crate::config::{CudaOptions, Device};
use crate::engine::{Engine, EngineOptions};
use crate::process::{InputLimits, Prepared};
use crate::{Error, Result, gpu};

/// Runs the worker's model path on files, without a broker, and reports figures as JSON.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ember-offline", version, about)]
pub struct OfflineConfig {
    /// The model directory (model.onnx + model.toml).
    #[arg(long, default_value = "models/ssdlite-person")]
    pub model_dir: PathBuf,

    /// PNG/JPEG files to feed (a directory: every .png/.jpg/.jpeg in it).
    #[arg(long, default_value = "tests/samples")]
    pub images: PathBuf,

    /// Feed this many synthetic 640x480 PNG images instead of files.
    #[arg(long)]
    pub synthetic: Option<usize>,

    /// Path of libonnxruntime.so (default: found in the project's .venv).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,

    /// Execution provider: cpu, cuda or cuda:<N>.
    #[arg(long, default_value = "cpu")]
    pub device: Device,

    /// Run on CPU if the asked-for GPU cannot be used (reported in the output).
    #[arg(long)]
    pub allow_cpu_fallback: bool,

    #[command(flatten)]
    pub cuda: CudaOptions,

    /// ONNX Runtime intra-op threads (0 = the cores this process may use).
    #[arg(long, default_value_t = 0)]
    pub intra_threads: usize,

    /// Batch sizes to measure with the model resident (may exceed model.toml's serving ceiling:
    /// this measures the graph).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub batches: Vec<usize>,

    /// Jobs per batch size.
    #[arg(long, default_value_t = 256)]
    pub jobs: usize,

    /// Jobs for the load-the-model-per-job baseline (0 skips it).
    #[arg(long, default_value_t = 10)]
    pub reload_jobs: usize,

    /// How long a batch waits for more jobs after its first one.
    #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
    pub max_batch_delay: Duration,

    /// How often NVML is read.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub nvml_interval: Duration,

    /// Write the report here (JSON) besides printing it.
    #[arg(long)]
    pub out: Option<PathBuf>,

    #[command(flatten)]
    pub log: LogConfig,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub max: f64,
}

impl Summary {
    fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Self {
                mean: 0.0,
                p50: 0.0,
                p95: 0.0,
                max: 0.0,
            };
        }
        samples.sort_by(f64::total_cmp);
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Self {
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
            p50: at(0.5),
            p95: at(0.95),
            max: samples[samples.len() - 1],
        }
    }
}

/// One batch size's figures with the model resident.
#[derive(Debug, Clone, Serialize)]
pub struct ResidentRun {
    pub batch: usize,
    pub jobs: usize,
    pub batches_run: usize,
    pub throughput_jobs_per_s: f64,
    /// Per batch: first decode to last detection (every job of a batch waits this long).
    pub latency_ms: Summary,
    /// Per batch: inside `session.run` only.
    pub inference_ms: Summary,
}

/// The load-per-job baseline.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadRun {
    pub jobs: usize,
    /// Per job: decode, session load, run, postprocess.
    pub latency_ms: Summary,
}

/// What NVML saw during the run.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReport {
    pub name: String,
    pub driver: String,
    pub samples: usize,
    pub utilization_max: f64,
    /// Mean over the samples with the GPU busy (utilisation above zero).
    pub utilization_mean_busy: f64,
    pub memory_used_max_bytes: u64,
    pub memory_total_bytes: u64,
    /// Every reading: milliseconds since the start, utilisation, memory used.
    pub series: Vec<(u64, f64, u64)>,
}

/// One image's detections, to check the device gives the same answers as the CPU.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub image: String,
    pub detections: Vec<Detection>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub requested_device: String,
    pub device: String,
    pub device_fallback: bool,
    pub ort_dylib: String,
    pub images: usize,
    pub model_load_seconds: f64,
    /// The warm-up batch (cuDNN's kernel search on a GPU happens here).
    pub warmup_seconds: f64,
    pub check: Vec<Check>,
    pub resident: Vec<ResidentRun>,
    pub reload_per_job: Option<ReloadRun>,
    /// Mean batch-1 latency, load-per-job over resident.
    pub reload_over_resident: Option<f64>,
    pub gpu: Option<GpuReport>,
}

fn read_images(config: &OfflineConfig) -> Result<Vec<(String, Arc<Vec<u8>>)>> {
    if let Some(count) = config.synthetic {
        return (0..count.max(1))
            .map(|i| Ok((format!("synthetic-{i}.png"), Arc::new(synthetic_png(i)?))))
            .collect();
    }
    let entries = std::fs::read_dir(&config.images).map_err(|e| {
        Error::Config(format!(
            "cannot read images from {}: {e}",
            config.images.display()
        ))
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Config(format!(
            "no .png/.jpg files in {} (or pass --synthetic N)",
            config.images.display()
        )));
    }
    files
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            Ok((name.unwrap_or_default(), Arc::new(bytes)))
        })
        .collect()
}

/// A 640x480 gradient with a seed-dependent tint, encoded as PNG.
fn synthetic_png(seed: usize) -> Result<Vec<u8>> {
    let tint = (seed * 37 % 256) as u8;
    let image = image::RgbImage::from_fn(640, 480, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, tint])
    });
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| Error::Internal(format!("synthetic image: {e}")))?;
    Ok(png)
}

/// The worker's path around one engine: decode on the blocking pool, gather with the worker's
/// batcher, one `session.run` per batch, the output processor.
struct Feeder {
    engine: Engine,
    max_batch_delay: Duration,
}

impl Feeder {
    /// Sends `jobs` through as one batch (of at most `jobs.len()`); returns each job's detections
    /// and the time inside `session.run`.
    async fn round(&self, jobs: &[Arc<Vec<u8>>]) -> Result<(Vec<Vec<Detection>>, Duration)> {
        let (tx, mut rx) = mpsc::channel::<Prepared>(jobs.len().max(1));
        let preparing = Arc::new(AtomicUsize::new(jobs.len()));
        for body in jobs {
            let (tx, body, preparing) = (tx.clone(), body.clone(), preparing.clone());
            let pipeline = self.engine.pipeline.clone();
            tokio::spawn(async move {
                let prepared =
                    tokio::task::spawn_blocking(move || pipeline.prepare(None, None, &body)).await;
                if let Ok(Ok(prepared)) = prepared {
                    let _ = tx.send(prepared).await;
                }
                preparing.fetch_sub(1, Ordering::SeqCst);
            });
        }
        drop(tx);
        let more_coming = || preparing.load(Ordering::SeqCst) > 0;
        let mut detections = Vec::with_capacity(jobs.len());
        let mut inference = Duration::ZERO;
        while let Some(mut batch) = next_batch(
            &mut rx,
            jobs.len().max(1),
            self.max_batch_delay,
            more_coming,
        )
        .await
        {
            let output = self.engine.infer(batch.iter_mut().collect()).await?;
            inference += output.inference;
            for (prepared, outputs) in batch.iter().zip(output.outputs) {
                let result =
                    self.engine
                        .pipeline
                        .finish(&prepared.shape, prepared.rows, outputs)?;
                detections.push(result.detections.unwrap_or_default());
            }
        }
        if detections.len() != jobs.len() {
            return Err(Error::InvalidInput(format!(
                "{} of {} images could not be decoded",
                jobs.len() - detections.len(),
                jobs.len()
            )));
        }
        Ok((detections, inference))
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Runs the whole measurement.
pub async fn run(config: OfflineConfig) -> Result<Report> {
    let spec = ModelSpec::load(&config.model_dir).map_err(Error::Config)?;
    let images = read_images(&config)?;
    let options = EngineOptions {
        ort_dylib: config.ort_dylib_path.clone(),
        device: config.device,
        allow_cpu_fallback: config.allow_cpu_fallback,
        cuda: config.cuda.clone(),
        intra_threads: config.intra_threads,
        spin: true,
        limits: InputLimits::DEFAULT,
        // This measures the graph: batches may exceed model.toml's serving ceiling.
        max_batch: None,
        ..EngineOptions::default()
    };

    let started = Instant::now();
    let series: Arc<Mutex<Vec<(u64, f64, u64)>>> = Arc::default();
    let memory_total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampling = CancellationToken::new();
    let _stop_sampling = sampling.clone().drop_guard();
    let gpu_info = match config.device {
        Device::Cuda(index) => match gpu::Gpu::open(index.unsigned_abs()) {
            Some(gpu) => {
                let info = (gpu.name.clone(), gpu.driver.clone());
                let (series, total) = (series.clone(), memory_total.clone());
                gpu.sample(
                    config.nvml_interval,
                    sampling.clone(),
                    move |r: &GpuReading| {
                        let at = started.elapsed().as_millis() as u64;
                        total.store(r.memory_total_bytes, Ordering::Relaxed);
                        series.lock().unwrap_or_else(|e| e.into_inner()).push((
                            at,
                            r.utilization,
                            r.memory_used_bytes,
                        ));
                    },
                )
                .map_err(|e| Error::Internal(format!("NVML sampling: {e}")))?;
                Some(info)
            }
            None => None,
        },
        Device::Cpu => None,
    };

    let load = |reload: bool| {
        let (dir, options) = (config.model_dir.clone(), options.clone());
        let warm = config.batches.clone();
        tokio::task::spawn_blocking(move || -> Result<(Engine, f64)> {
            let engine = Engine::load(
                &dir,
                EngineOptions {
                    reload_per_job: reload,
                    ..options
                },
            )?;
            let started = Instant::now();
            if matches!(engine.device, Device::Cuda(_)) && !reload {
                for &n in &warm {
                    engine.warm_up(n)?;
                }
            }
            Ok((engine, started.elapsed().as_secs_f64()))
        })
    };
    let (engine, warmup_seconds) = load(false)
        .await
        .map_err(|e| Error::Internal(format!("model loading panicked: {e}")))??;
    let (device, model_load_seconds, dylib) =
        (engine.device, engine.load_seconds, engine.ort_dylib.clone());
    tracing::info!(%device, model_load_seconds, warmup_seconds, "model loaded and warmed up");
    let pipeline = Feeder {
        engine,
        max_batch_delay: config.max_batch_delay,
    };

    let mut check = Vec::with_capacity(images.len());
    for (name, body) in &images {
        let (mut detections, _) = pipeline.round(std::slice::from_ref(body)).await?;
        check.push(Check {
            image: name.clone(),
            detections: detections.pop().unwrap_or_default(),
        });
    }

    let mut resident = Vec::with_capacity(config.batches.len());
    for &batch in &config.batches {
        let batch = batch.max(1);
        let mut next = images.iter().map(|(_, body)| body.clone()).cycle();
        let (mut latencies, mut inferences) = (Vec::new(), Vec::new());
        let mut done = 0;
        let run_started = Instant::now();
        while done < config.jobs {
            let jobs: Vec<Arc<Vec<u8>>> =
                next.by_ref().take(batch.min(config.jobs - done)).collect();
            let round_started = Instant::now();
            let (_, inference) = pipeline.round(&jobs).await?;
            latencies.push(ms(round_started.elapsed()));
            inferences.push(ms(inference));
            done += jobs.len();
        }
        let seconds = run_started.elapsed().as_secs_f64();
        let run = ResidentRun {
            batch,
            jobs: done,
            batches_run: latencies.len(),
            throughput_jobs_per_s: done as f64 / seconds.max(f64::EPSILON),
            latency_ms: Summary::of(latencies),
            inference_ms: Summary::of(inferences),
        };
        tracing::info!(
            batch,
            throughput = run.throughput_jobs_per_s,
            p50_ms = run.latency_ms.p50,
            p95_ms = run.latency_ms.p95,
            "resident"
        );
        resident.push(run);
    }
    drop(pipeline);

    let reload_per_job = if config.reload_jobs > 0 {
        let (engine, _) = load(true)
            .await
            .map_err(|e| Error::Internal(format!("model loading panicked: {e}")))??;
        let pipeline = Feeder {
            engine,
            max_batch_delay: config.max_batch_delay,
        };
        let mut latencies = Vec::with_capacity(config.reload_jobs);
        for (_, body) in images.iter().cycle().take(config.reload_jobs) {
            let round_started = Instant::now();
            pipeline.round(std::slice::from_ref(body)).await?;
            latencies.push(ms(round_started.elapsed()));
        }
        let run = ReloadRun {
            jobs: latencies.len(),
            latency_ms: Summary::of(latencies),
        };
        tracing::info!(mean_ms = run.latency_ms.mean, "reload per job");
        Some(run)
    } else {
        None
    };
    sampling.cancel();

    let reload_over_resident = match (&reload_per_job, resident.iter().find(|r| r.batch == 1)) {
        (Some(reload), Some(one)) if one.latency_ms.mean > 0.0 => {
            Some(reload.latency_ms.mean / one.latency_ms.mean)
        }
        _ => None,
    };
    let gpu = gpu_info.map(|(name, driver)| {
        let series = std::mem::take(&mut *series.lock().unwrap_or_else(|e| e.into_inner()));
        let busy: Vec<f64> = series.iter().map(|s| s.1).filter(|u| *u > 0.0).collect();
        GpuReport {
            name,
            driver,
            samples: series.len(),
            utilization_max: series.iter().map(|s| s.1).fold(0.0, f64::max),
            utilization_mean_busy: if busy.is_empty() {
                0.0
            } else {
                busy.iter().sum::<f64>() / busy.len() as f64
            },
            memory_used_max_bytes: series.iter().map(|s| s.2).max().unwrap_or(0),
            memory_total_bytes: memory_total.load(Ordering::Relaxed),
            series,
        }
    });
    Ok(Report {
        model: spec.name.clone(),
        requested_device: config.device.to_string(),
        device: device.to_string(),
        device_fallback: device != config.device,
        ort_dylib: dylib.display().to_string(),
        images: images.len(),
        model_load_seconds,
        warmup_seconds,
        check,
        resident,
        reload_per_job,
        reload_over_resident,
        gpu,
    })
}

/// Prints the report as a table.
pub fn print(report: &Report) {
    println!(
        "{} on {} (asked for {}{}), {} images, model load {:.2} s, warm-up {:.2} s",
        report.model,
        report.device,
        report.requested_device,
        if report.device_fallback {
            ", FELL BACK TO CPU"
        } else {
            ""
        },
        report.images,
        report.model_load_seconds,
        report.warmup_seconds,
    );
    println!(
        "{:>6} {:>6} {:>10} {:>9} {:>9} {:>12}",
        "batch", "jobs", "jobs/s", "p50 ms", "p95 ms", "run p50 ms"
    );
    for run in &report.resident {
        println!(
            "{:>6} {:>6} {:>10.1} {:>9.2} {:>9.2} {:>12.2}",
            run.batch,
            run.jobs,
            run.throughput_jobs_per_s,
            run.latency_ms.p50,
            run.latency_ms.p95,
            run.inference_ms.p50
        );
    }
    if let Some(reload) = &report.reload_per_job {
        println!(
            "load per job: {} jobs, mean {:.1} ms, p95 {:.1} ms (x{:.1} the resident batch-1 mean)",
            reload.jobs,
            reload.latency_ms.mean,
            reload.latency_ms.p95,
            report.reload_over_resident.unwrap_or(0.0)
        );
    }
    if let Some(gpu) = &report.gpu {
        println!(
            "{} (driver {}): {} NVML samples, utilisation max {:.0}%, busy mean {:.0}%, memory max {:.0} MiB",
            gpu.name,
            gpu.driver,
            gpu.samples,
            gpu.utilization_max * 100.0,
            gpu.utilization_mean_busy * 100.0,
            gpu.memory_used_max_bytes as f64 / (1 << 20) as f64
        );
    }
    for check in &report.check {
        let found: Vec<String> = check
            .detections
            .iter()
            .map(|d| format!("{} {:.2}", d.label, d.score))
            .collect();
        println!(
            "{}: {}",
            check.image,
            if found.is_empty() {
                "nothing".into()
            } else {
                found.join(", ")
            }
        );
    }
}

/// Writes the report as JSON.
pub fn save(report: &Report, path: &Path) -> Result<()> {
    let json =
        serde_json::to_vec_pretty(report).map_err(|e| Error::Internal(format!("report: {e}")))?;
    std::fs::write(path, json).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}
