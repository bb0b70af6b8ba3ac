//! The model, loaded once and kept: [`Engine::load`] is the one bootstrap (runtime, session,
//! graph signature, processing pipeline, warm-up) shared by the worker, the offline pipeline and
//! the benchmarks; a dedicated thread per model instance then runs one `session.run` per batch:
//! the jobs' tensors stacked along the batch axis, the outputs split back per job. Instances
//! (Triton's instance groups) are independent sessions of the same model, each on its own thread
//! with its share of the cores, taking batches from one queue.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_core::model::ModelSpec;
use ember_core::protocol::ModelInfo;
use tokio::sync::{mpsc, oneshot};

use crate::config::{CudaOptions, Device};
use crate::process::{InputLimits, Pipeline, Prepared};
use crate::runtime::{self, ResidentSession, SessionOptions};
use crate::tensor::Tensor;
use crate::{Error, Result};

/// What [`Engine::load`] needs besides the model directory.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// `ORT_DYLIB_PATH`, else found in the project's `.venv`.
    pub ort_dylib: Option<PathBuf>,
    pub device: Device,
    pub allow_cpu_fallback: bool,
    pub cuda: CudaOptions,
    /// ONNX Runtime intra-op threads per instance (0: the cores this process may use, divided
    /// among the instances; see [`cpu_share`]).
    pub intra_threads: usize,
    /// Independent sessions of the model, each running its own batches (at least 1).
    pub instances: usize,
    pub spin: bool,
    /// Load the model for every batch (the stateless baseline).
    pub reload_per_job: bool,
    pub limits: InputLimits,
    /// Lowers model.toml's `max_batch`.
    pub max_batch: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            ort_dylib: None,
            device: Device::Cpu,
            allow_cpu_fallback: false,
            cuda: CudaOptions::default(),
            intra_threads: 0,
            instances: 1,
            spin: false,
            reload_per_job: false,
            limits: InputLimits::DEFAULT,
            max_batch: None,
        }
    }
}

/// A batch for the inference thread: per job, its tensors in graph order.
#[derive(Debug)]
struct BatchRequest {
    jobs: Vec<Vec<Tensor>>,
    rows: Vec<usize>,
    reply: oneshot::Sender<Result<BatchOutput>>,
}

/// What came back for a batch.
#[derive(Debug)]
pub struct BatchOutput {
    /// Per job, its rows of each graph output (graph order).
    pub outputs: Vec<Vec<Tensor>>,
    /// Time inside `session.run` (plus the session load with reload-per-job).
    pub inference: Duration,
    /// Which instance ran it (0-based).
    pub instance: usize,
}

/// Handle to the inference thread, and what was learnt at load.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<BatchRequest>,
    pub pipeline: Arc<Pipeline>,
    pub spec: Arc<ModelSpec>,
    /// Where the model runs (the CPU after a fallback).
    pub device: Device,
    /// Rows per `session.run` at most (1 when the graph cannot batch).
    pub max_batch: usize,
    /// The ONNX Runtime library in use.
    pub ort_dylib: PathBuf,
    /// Seconds from the start of loading to ready (warm-up included).
    pub load_seconds: f64,
    /// Sessions running batches side by side.
    pub instances: usize,
    /// ONNX Runtime intra-op threads of each.
    pub intra_threads: usize,
}

/// Intra-op threads per instance when none are asked for: the cores this process may use,
/// divided among the instances (at least 1 each). `available_parallelism` counts the CPU
/// affinity mask and a cgroup's CPU quota (a pod's `limits.cpu`), where ONNX Runtime's own
/// default counts the machine's cores.
pub fn cpu_share(instances: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / instances.max(1)).max(1)
}

impl Engine {
    /// Loads the model in `model_dir` and warms it up (every batch size on a GPU, where each
    /// new shape pays cuDNN's kernel search once). Blocking: call it off the async runtime.
    pub fn load(model_dir: &Path, options: EngineOptions) -> Result<Self> {
        let started = Instant::now();
        let spec = Arc::new(ModelSpec::load(model_dir).map_err(Error::Config)?);
        let dylib = runtime::resolve_dylib(options.ort_dylib.as_deref())?;
        let instances = options.instances.max(1);
        let intra_threads = match options.intra_threads {
            0 => cpu_share(instances),
            n => n,
        };
        let session = SessionOptions {
            model_path: model_dir.join(&spec.file),
            ort_dylib: dylib.clone(),
            device: options.device,
            allow_cpu_fallback: options.allow_cpu_fallback,
            cuda: options.cuda.clone(),
            intra_threads,
            spin: options.spin,
        };
        tracing::info!(model = %spec.name, path = %session.model_path.display(), device = %options.device, ort = %dylib.display(), instances, intra_threads, "loading the model");
        let env = runtime::init_runtime(&dylib)?;
        let loaded = ResidentSession::new(env.clone(), session.clone(), options.reload_per_job)?;
        let signature = loaded.signature().clone();
        let ceiling = options
            .max_batch
            .unwrap_or(spec.max_batch)
            .clamp(1, spec.max_batch);
        let max_batch = if !signature.batching || options.reload_per_job {
            1
        } else {
            ceiling
        };
        if !signature.batching {
            tracing::info!(
                "batching is off: the graph's first dimension is not dynamic on every input and \
                 output, so each job runs alone"
            );
        }
        let pipeline = Arc::new(Pipeline::new(&spec, signature, options.limits, ceiling)?);
        let device = loaded.device();
        let mut sessions = vec![loaded];
        for _ in 1..instances {
            sessions.push(ResidentSession::new(
                env.clone(),
                session.clone(),
                options.reload_per_job,
            )?);
        }
        // Each instance warms up on its own thread (where it will run: a GPU provider keeps
        // per-thread state) before taking batches, so every one has paid its first run (and on
        // a GPU each batch size's kernel search) before the worker says ready.
        let sizes = if matches!(device, Device::Cuda(_)) {
            max_batch
        } else {
            1
        };
        let engine = Self {
            tx: start_threads(sessions, &pipeline, sizes)?,
            pipeline,
            spec,
            device,
            max_batch,
            ort_dylib: dylib,
            load_seconds: started.elapsed().as_secs_f64(),
            instances,
            intra_threads,
        };
        Ok(engine)
    }

    /// What heartbeats say about the model.
    pub fn info(&self) -> ModelInfo {
        self.pipeline.signature.info(&self.spec, self.max_batch)
    }

    /// Runs one blank batch of `rows` rows through whichever instance is free and waits for it
    /// (from a blocking context); see [`warm`].
    pub fn warm_up(&self, rows: usize) -> Result<()> {
        let blank = self.pipeline.blank(rows)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(BatchRequest {
                jobs: vec![blank.inputs],
                rows: vec![blank.rows],
                reply,
            })
            .map_err(|_| Error::Internal("inference thread gone".into()))?;
        let ran = rx
            .blocking_recv()
            .map_err(|_| Error::Internal("inference thread gone".into()))?;
        warmed(&self.pipeline, ran)
    }

    /// Runs one batch of prepared jobs (equal batch keys), in order.
    pub async fn infer(&self, jobs: Vec<&mut Prepared>) -> Result<BatchOutput> {
        let rows = jobs.iter().map(|p| p.rows).collect();
        let jobs = jobs
            .into_iter()
            .map(|p| std::mem::take(&mut p.inputs))
            .collect();
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(BatchRequest { jobs, rows, reply })
            .await
            .map_err(|_| Error::Internal("inference thread gone".into()))?;
        rx.await
            .map_err(|_| Error::Internal("inference thread gone".into()))?
    }
}

/// Runs one blank batch of `rows` rows on `loaded`. Models whose non-batch dimensions are
/// dynamic get 1 there: when such a graph refuses that shape, the warm-up is skipped with a
/// warning rather than failing the start.
fn warm(loaded: &mut ResidentSession, pipeline: &Pipeline, rows: usize) -> Result<()> {
    let blank = pipeline.blank(rows)?;
    let ran = run_batch(loaded, vec![blank.inputs], &[blank.rows]);
    warmed(pipeline, ran)
}

fn warmed(pipeline: &Pipeline, ran: Result<BatchOutput>) -> Result<()> {
    let fixed = pipeline
        .signature
        .inputs
        .iter()
        .all(|p| p.shape.iter().skip(1).all(|&d| d >= 0));
    match ran {
        Ok(_) => Ok(()),
        Err(error) if !fixed && error.code() == ember_core::protocol::ErrorCode::ModelError => {
            tracing::warn!(%error, "warm-up with 1 in every dynamic dimension failed; skipped");
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// One thread per instance, all taking batches from one queue: whichever is free runs the next.
/// Each first warms its session up with batches of 1..=`sizes` rows; returns once all have.
fn start_threads(
    sessions: Vec<ResidentSession>,
    pipeline: &Arc<Pipeline>,
    sizes: usize,
) -> Result<mpsc::Sender<BatchRequest>> {
    let (tx, rx) = mpsc::channel::<BatchRequest>(2 * sessions.len());
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let (warmed_tx, warmed_rx) = std::sync::mpsc::channel::<Result<()>>();
    let instances = sessions.len();
    for (index, loaded) in sessions.into_iter().enumerate() {
        let rx = rx.clone();
        let (pipeline, warmed) = (pipeline.clone(), warmed_tx.clone());
        std::thread::Builder::new()
            .name(format!("ember-inference-{index}"))
            .spawn(move || {
                let mut loaded = loaded;
                let warm_up = (1..=sizes).try_for_each(|rows| warm(&mut loaded, &pipeline, rows));
                let failed = warm_up.is_err();
                let _ = warmed.send(warm_up);
                if failed {
                    return;
                }
                loop {
                    // One idle thread waits on the queue at a time, the others on the lock.
                    let request = rx.lock().unwrap_or_else(|e| e.into_inner()).blocking_recv();
                    let Some(request) = request else { break };
                    let output =
                        run_batch(&mut loaded, request.jobs, &request.rows).map(|output| {
                            BatchOutput {
                                instance: index,
                                ..output
                            }
                        });
                    // The asker may have gone (connection lost): nothing to do then.
                    let _ = request.reply.send(output);
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the inference thread: {e}")))?;
    }
    drop(warmed_tx);
    for _ in 0..instances {
        // A thread that died before saying so closes the channel: an error too. On an error
        // the sender is dropped on return and the other threads end.
        warmed_rx
            .recv()
            .map_err(|_| Error::Internal("an inference thread died warming up".into()))??;
    }
    Ok(tx)
}

/// Stacks the jobs' inputs, runs the session once, and splits every output back per job.
fn run_batch(
    loaded: &mut ResidentSession,
    jobs: Vec<Vec<Tensor>>,
    rows: &[usize],
) -> Result<BatchOutput> {
    let inputs = stack(jobs)?;
    let total: usize = rows.iter().sum();
    let started = Instant::now();
    let outputs = loaded.with_session(|session, signature| {
        let values = signature
            .inputs
            .iter()
            .zip(&inputs)
            .map(|(port, t)| Ok((port.name.as_str(), t.as_input()?)))
            .collect::<Result<Vec<_>>>()?;
        let outputs = session
            .run(values)
            .map_err(|e| Error::Model(e.to_string()))?;
        signature
            .outputs
            .iter()
            .map(|port| {
                let name = &port.name;
                let value = outputs
                    .get(name.as_str())
                    .ok_or_else(|| Error::Model(format!("the model gave no output `{name}`")))?;
                Tensor::from_output(name, value)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let inference = started.elapsed();
    let outputs = if rows.len() == 1 {
        vec![outputs]
    } else {
        split(outputs, rows, total)?
    };
    Ok(BatchOutput {
        outputs,
        inference,
        instance: 0,
    })
}

/// Per graph input, the jobs' tensors stacked along the batch axis (one job: as it is).
fn stack(jobs: Vec<Vec<Tensor>>) -> Result<Vec<Tensor>> {
    let inputs = jobs.first().map_or(0, Vec::len);
    let mut per_input: Vec<Vec<Tensor>> = (0..inputs)
        .map(|_| Vec::with_capacity(jobs.len()))
        .collect();
    for job in jobs {
        for (slot, tensor) in per_input.iter_mut().zip(job) {
            slot.push(tensor);
        }
    }
    per_input.into_iter().map(Tensor::stack).collect()
}

/// Splits each output's rows back per job.
fn split(outputs: Vec<Tensor>, rows: &[usize], total: usize) -> Result<Vec<Vec<Tensor>>> {
    let mut per_job: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for output in &outputs {
        if output.rows() != total {
            return Err(Error::Model(format!(
                "an output has {} rows for a batch of {total}",
                output.rows()
            )));
        }
        let mut start = 0;
        for (job, &n) in per_job.iter_mut().zip(rows) {
            job.push(output.rows_slice(start, n)?);
            start += n;
        }
    }
    Ok(per_job)
}
