//! The model, loaded once and kept: ONNX Runtime through `ort`, on a dedicated thread that runs
//! one `session.run` per batch, and the SSD decoder that turns its outputs into detections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_core::protocol::Detection;
use ember_core::protocol::oip::OutputTensor;
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;
use tokio::sync::{mpsc, oneshot};

use crate::config::{ArenaExtend, ConvAlgo, CudaOptions, Device};
use crate::{Error, Result};
use ember_core::model::{InputSpec, ModelSpec, OutputSpec};
use ort::ep::cuda::ConvAlgorithmSearch;

/// Finds the ONNX Runtime library: the flag/env value, else the project's `.venv` (searched
/// from the current directory upwards), so a missing library is a clear error, never a panic.
pub fn resolve_dylib(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = configured {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(Error::Runtime(format!(
                "ORT_DYLIB_PATH {} is not a file; run scripts/setup to install onnxruntime",
                path.display()
            )))
        };
    }
    let cwd = std::env::current_dir().map_err(|e| Error::Runtime(e.to_string()))?;
    for dir in cwd.ancestors() {
        let lib = dir.join(".venv/lib");
        let Ok(entries) = std::fs::read_dir(&lib) else {
            continue;
        };
        for python in entries.flatten() {
            let capi = python.path().join("site-packages/onnxruntime/capi");
            let Ok(files) = std::fs::read_dir(&capi) else {
                continue;
            };
            let mut found: Vec<PathBuf> = files
                .flatten()
                .map(|f| f.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            found.sort();
            if let Some(path) = found.pop() {
                return Ok(path);
            }
        }
    }
    Err(Error::Runtime(
        "no ONNX Runtime library: set ORT_DYLIB_PATH or run scripts/setup (it installs the \
         onnxruntime wheel into .venv)"
            .into(),
    ))
}

/// Loads the library and creates the process's one ONNX Runtime environment (ONNX Runtime
/// allows one per process; a second call, e.g. a second worker in a test process, shares it).
pub fn init_runtime(dylib: &Path) -> Result<Environment> {
    static ENVIRONMENT: std::sync::Mutex<Option<Environment>> = std::sync::Mutex::new(None);
    let mut slot = ENVIRONMENT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = slot.as_ref() {
        return Ok(env.clone());
    }
    let builder = ort::init_from(dylib).map_err(|e| {
        Error::Runtime(format!(
            "cannot load ONNX Runtime from {}: {e}",
            dylib.display()
        ))
    })?;
    let env = builder
        .with_name("ember-worker")
        .build()
        .map_err(|e| Error::Runtime(format!("cannot create the ONNX Runtime environment: {e}")))?;
    *slot = Some(env.clone());
    Ok(env)
}

/// How to build sessions.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    pub model_path: PathBuf,
    /// The ONNX Runtime library in use (named in CUDA errors: its provider libraries sit beside it).
    pub ort_dylib: PathBuf,
    pub device: Device,
    pub allow_cpu_fallback: bool,
    pub cuda: CudaOptions,
    pub intra_threads: usize,
    /// Intra-op threads spin between runs (ONNX Runtime's default) or sleep.
    pub spin: bool,
}

/// The CUDA libraries the onnxruntime-gpu 1.31 (CUDA 13) provider needs at load time.
const CUDA_LIBRARIES: &[&str] = &[
    "libcuda.so.1",
    "libcudart.so.13",
    "libcublas.so.13",
    "libcublasLt.so.13",
    "libcurand.so.10",
    "libcudnn.so.9",
];

/// Says why CUDA cannot be used, naming what is missing: the provider library beside the ONNX
/// Runtime library (the CPU wheel has none), or the CUDA libraries the dynamic loader cannot find.
pub fn diagnose_cuda(ort_dylib: &Path) -> String {
    let dir = ort_dylib.parent().unwrap_or(Path::new("."));
    let provider = dir.join("libonnxruntime_providers_cuda.so");
    if !provider.is_file() {
        return format!(
            "{} is missing: {} has no CUDA provider (install the onnxruntime-gpu wheel, not \
             onnxruntime)",
            provider.display(),
            ort_dylib.display()
        );
    }
    let missing: Vec<&str> = CUDA_LIBRARIES
        .iter()
        .copied()
        // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's CUDA
        // libraries, the same ones the CUDA provider is about to load itself.
        .filter(|name| unsafe { libloading::Library::new(name) }.is_err())
        .collect();
    if missing.is_empty() {
        format!(
            "the provider {} is there and the CUDA libraries load; see the ONNX Runtime error",
            provider.display()
        )
    } else {
        format!(
            "the dynamic loader cannot find {} (add their directory to LD_LIBRARY_PATH; \
             libcuda.so.1 comes with the NVIDIA driver)",
            missing.join(", ")
        )
    }
}

fn cuda_provider(index: i32, cuda: &CudaOptions) -> ort::ep::ExecutionProviderDispatch {
    let mut provider = ort::ep::CUDA::default()
        .with_device_id(index)
        .with_arena_extend_strategy(match cuda.cuda_arena_extend {
            ArenaExtend::NextPowerOfTwo => ort::ep::ArenaExtendStrategy::NextPowerOfTwo,
            ArenaExtend::SameAsRequested => ort::ep::ArenaExtendStrategy::SameAsRequested,
        })
        .with_conv_algorithm_search(match cuda.cudnn_conv_algo {
            ConvAlgo::Exhaustive => ConvAlgorithmSearch::Exhaustive,
            ConvAlgo::Heuristic => ConvAlgorithmSearch::Heuristic,
            ConvAlgo::Default => ConvAlgorithmSearch::Default,
        });
    if let Some(limit) = cuda.cuda_mem_limit {
        provider = provider.with_memory_limit(limit);
    }
    provider.build().error_on_failure()
}

/// Creates a session and says which device it runs on: asking for CUDA where it cannot be had
/// fails unless fallback is allowed, and then the session runs on the CPU.
pub fn load_session(env: &Environment, options: &SessionOptions) -> Result<(Session, Device)> {
    let runtime = |e: ort::Error| Error::Runtime(e.to_string());
    let mut builder = Session::builder(env)
        .map_err(runtime)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| runtime(e.into()))?;
    if !options.spin {
        builder = builder
            .with_config_entry("session.intra_op.allow_spinning", "0")
            .map_err(|e| runtime(e.into()))?;
    }
    if options.intra_threads > 0 {
        builder = builder
            .with_intra_threads(options.intra_threads)
            .map_err(|e| runtime(e.into()))?;
    }
    let mut device = options.device;
    if let Device::Cuda(index) = options.device {
        match builder
            .clone()
            .with_execution_providers([cuda_provider(index, &options.cuda)])
        {
            Ok(with_cuda) => builder = with_cuda,
            Err(error) if options.allow_cpu_fallback => {
                tracing::error!(
                    %error,
                    why = %diagnose_cuda(&options.ort_dylib),
                    device = %options.device,
                    "CUDA is not available; RUNNING ON CPU because --allow-cpu-fallback was given"
                );
                device = Device::Cpu;
            }
            Err(error) => {
                return Err(Error::Runtime(format!(
                    "device {} was asked for but CUDA cannot be used: {error}; {} (pass \
                     --allow-cpu-fallback to run on CPU instead)",
                    options.device,
                    diagnose_cuda(&options.ort_dylib)
                )));
            }
        }
    }
    let session = builder.commit_from_file(&options.model_path).map_err(|e| {
        Error::Runtime(format!(
            "cannot load model {}: {e}",
            options.model_path.display()
        ))
    })?;
    Ok((session, device))
}

/// One image's place in a batch.
#[derive(Debug, Clone, Copy)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// A batch for the inference thread: `sizes.len()` images, each `H x W x 3` bytes, concatenated.
#[derive(Debug)]
pub struct BatchRequest {
    pub pixels: Vec<Vec<u8>>,
    pub sizes: Vec<ImageSize>,
    /// Per image: also return the raw output tensors (Open Inference Protocol jobs).
    pub raw: Vec<bool>,
    pub reply: oneshot::Sender<Result<BatchOutput>>,
}

/// What came back for a batch.
#[derive(Debug)]
pub struct BatchOutput {
    pub detections: Vec<Vec<Detection>>,
    /// Per image, where asked for: its slice of each output tensor.
    pub tensors: Vec<Option<Vec<OutputTensor>>>,
    /// Time inside `session.run` (plus the session load with `--reload-per-job`).
    pub inference: Duration,
}

/// Handle to the inference thread.
#[derive(Debug, Clone)]
pub struct Engine {
    tx: mpsc::Sender<BatchRequest>,
    width: u32,
    height: u32,
}

/// The SSD decoding settings, resolved from the model spec.
#[derive(Debug, Clone)]
struct Decoder {
    input_tensor: String,
    width: u32,
    height: u32,
    num_detections: String,
    boxes: String,
    scores: String,
    classes: String,
    score_threshold: f32,
    labels: Arc<ModelSpec>,
}

impl Decoder {
    fn new(spec: Arc<ModelSpec>) -> Self {
        let InputSpec::Image {
            tensor,
            width,
            height,
            ..
        } = &spec.input;
        let OutputSpec::Ssd {
            num_detections,
            boxes,
            scores,
            classes,
            score_threshold,
        } = &spec.output;
        Self {
            input_tensor: tensor.clone(),
            width: *width,
            height: *height,
            num_detections: num_detections.clone(),
            boxes: boxes.clone(),
            scores: scores.clone(),
            classes: classes.clone(),
            score_threshold: *score_threshold,
            labels: spec.clone(),
        }
    }
}

/// A loaded model: the session plus what is needed to reload it per job.
pub struct Loaded {
    env: Environment,
    options: SessionOptions,
    session: Option<Session>,
    reload_per_job: bool,
    /// Where the model runs: the asked-for device, or the CPU after a fallback.
    device: Device,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("options", &self.options)
            .field("reload_per_job", &self.reload_per_job)
            .finish_non_exhaustive()
    }
}

impl Loaded {
    /// Loads the model (timed) unless `reload_per_job`, in which case each batch loads its own.
    pub fn new(env: Environment, options: SessionOptions, reload_per_job: bool) -> Result<Self> {
        // Even with reload-per-job, load once at start: a broken model or device must fail at
        // startup, not on the first job.
        let (session, device) = load_session(&env, &options)?;
        Ok(Self {
            env,
            options,
            session: (!reload_per_job).then_some(session),
            reload_per_job,
            device,
        })
    }

    /// The device the model runs on (the CPU after a fallback).
    pub fn device(&self) -> Device {
        self.device
    }
}

impl Engine {
    /// Starts the inference thread around `loaded`; runs one warm-up batch before returning.
    pub fn start(loaded: Loaded, spec: Arc<ModelSpec>) -> Result<Self> {
        let decoder = Decoder::new(spec);
        let (tx, mut rx) = mpsc::channel::<BatchRequest>(2);
        let warm = (decoder.width, decoder.height);
        std::thread::Builder::new()
            .name("ember-inference".into())
            .spawn(move || {
                let mut loaded = loaded;
                let mut input = Vec::new();
                while let Some(request) = rx.blocking_recv() {
                    let output = run_batch(&mut loaded, &decoder, &request, &mut input);
                    // The asker may have gone (connection lost): nothing to do then.
                    let _ = request.reply.send(output);
                }
            })
            .map_err(|e| Error::Internal(format!("cannot start the inference thread: {e}")))?;
        let engine = Self {
            tx,
            width: warm.0,
            height: warm.1,
        };
        engine.warm_up(1)?;
        Ok(engine)
    }

    /// Runs one blank batch of `n` images and waits for it (from a blocking context). On a GPU,
    /// each new batch size pays cuDNN's kernel search at its first run: warming every size the
    /// worker can gather keeps that off the first jobs.
    pub fn warm_up(&self, n: usize) -> Result<()> {
        let (width, height) = (self.width, self.height);
        let (reply, rx) = oneshot::channel();
        let request = BatchRequest {
            pixels: vec![vec![0u8; (width * height * 3) as usize]; n.max(1)],
            sizes: vec![ImageSize { width, height }; n.max(1)],
            raw: vec![true; n.max(1)],
            reply,
        };
        self.tx
            .blocking_send(request)
            .map_err(|_| Error::Internal("inference thread gone".into()))?;
        rx.blocking_recv()
            .map_err(|_| Error::Internal("inference thread gone".into()))?
            .map(|_| ())
    }

    /// Runs one batch; the images must already be at the model's input size.
    pub async fn infer(
        &self,
        pixels: Vec<Vec<u8>>,
        sizes: Vec<ImageSize>,
        raw: Vec<bool>,
    ) -> Result<BatchOutput> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(BatchRequest {
                pixels,
                sizes,
                raw,
                reply,
            })
            .await
            .map_err(|_| Error::Internal("inference thread gone".into()))?;
        rx.await
            .map_err(|_| Error::Internal("inference thread gone".into()))?
    }
}

fn run_batch(
    loaded: &mut Loaded,
    decoder: &Decoder,
    request: &BatchRequest,
    input: &mut Vec<u8>,
) -> Result<BatchOutput> {
    let n = request.pixels.len();
    let frame = (decoder.width * decoder.height * 3) as usize;
    input.clear();
    input.reserve(n * frame);
    for pixels in &request.pixels {
        if pixels.len() != frame {
            return Err(Error::Internal(format!(
                "image of {} bytes where {frame} were expected",
                pixels.len()
            )));
        }
        input.extend_from_slice(pixels);
    }
    let started = Instant::now();
    let mut reloaded;
    let session = if loaded.reload_per_job {
        reloaded = load_session(&loaded.env, &loaded.options)?.0;
        &mut reloaded
    } else {
        loaded
            .session
            .as_mut()
            .ok_or_else(|| Error::Internal("no session".into()))?
    };
    let shape = [
        n as i64,
        i64::from(decoder.height),
        i64::from(decoder.width),
        3,
    ];
    let tensor = TensorRef::from_array_view((shape, input.as_slice()))
        .map_err(|e| Error::Model(e.to_string()))?;
    let outputs = session
        .run(ort::inputs![decoder.input_tensor.as_str() => tensor])
        .map_err(|e| Error::Model(e.to_string()))?;
    let inference = started.elapsed();

    let extract = |name: &str| -> Result<&[f32]> {
        let value = outputs
            .get(name)
            .ok_or_else(|| Error::Model(format!("the model has no output `{name}`")))?;
        value
            .try_extract_tensor::<f32>()
            .map(|(_, data)| data)
            .map_err(|e| Error::Model(format!("output `{name}`: {e}")))
    };
    let counts = extract(&decoder.num_detections)?;
    let boxes = extract(&decoder.boxes)?;
    let scores = extract(&decoder.scores)?;
    let classes = extract(&decoder.classes)?;
    let detections = decode_ssd(
        SsdOutputs {
            counts,
            boxes,
            scores,
            classes,
        },
        &request.sizes,
        decoder.score_threshold,
        &decoder.labels,
    )?;
    let slots = scores.len().checked_div(n).unwrap_or(0);
    let tensors = request
        .raw
        .iter()
        .enumerate()
        .map(|(i, &raw)| {
            raw.then(|| {
                let tensor = |name: &str, data: &[f32], shape: Vec<usize>| OutputTensor {
                    name: name.to_string(),
                    datatype: "FP32".into(),
                    shape,
                    data: data.to_vec(),
                };
                vec![
                    tensor(&decoder.num_detections, &counts[i..i + 1], vec![1]),
                    tensor(
                        &decoder.boxes,
                        &boxes[i * slots * 4..(i + 1) * slots * 4],
                        vec![1, slots, 4],
                    ),
                    tensor(
                        &decoder.scores,
                        &scores[i * slots..(i + 1) * slots],
                        vec![1, slots],
                    ),
                    tensor(
                        &decoder.classes,
                        &classes[i * slots..(i + 1) * slots],
                        vec![1, slots],
                    ),
                ]
            })
        })
        .collect();
    Ok(BatchOutput {
        detections,
        tensors,
        inference,
    })
}

/// The four SSD output tensors of a batch, flattened.
#[derive(Debug, Clone, Copy)]
pub struct SsdOutputs<'a> {
    pub counts: &'a [f32],
    pub boxes: &'a [f32],
    pub scores: &'a [f32],
    pub classes: &'a [f32],
}

/// Splits a batch's SSD outputs per image: keeps detections at or above `threshold` and maps
/// normalised `(ymin, xmin, ymax, xmax)` to `[x1, y1, x2, y2]` in each original image's pixels.
pub fn decode_ssd(
    out: SsdOutputs<'_>,
    sizes: &[ImageSize],
    threshold: f32,
    spec: &ModelSpec,
) -> Result<Vec<Vec<Detection>>> {
    let n = sizes.len();
    if out.counts.len() != n || n == 0 {
        return Err(Error::Model(format!(
            "num_detections has {} entries for a batch of {n}",
            out.counts.len()
        )));
    }
    let slots = out.scores.len() / n;
    if out.scores.len() != n * slots
        || out.classes.len() != n * slots
        || out.boxes.len() != n * slots * 4
    {
        return Err(Error::Model("SSD output shapes disagree".into()));
    }
    let mut all = Vec::with_capacity(n);
    for (i, size) in sizes.iter().enumerate() {
        let count = (out.counts[i].max(0.0) as usize).min(slots);
        let (w, h) = (size.width as f32, size.height as f32);
        let mut detections = Vec::new();
        for k in 0..count {
            let slot = i * slots + k;
            let score = out.scores[slot];
            if score < threshold {
                continue;
            }
            let b = &out.boxes[slot * 4..slot * 4 + 4];
            let clamp = |v: f32| v.clamp(0.0, 1.0);
            let class_id = out.classes[slot].round().max(0.0) as u32;
            detections.push(Detection {
                label: spec.label(class_id),
                class_id,
                score,
                bbox: [
                    clamp(b[1]) * w,
                    clamp(b[0]) * h,
                    clamp(b[3]) * w,
                    clamp(b[2]) * h,
                ],
            });
        }
        all.push(detections);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModelSpec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/ssdlite-person");
        ModelSpec::load(&path).expect("bundled model.toml")
    }

    #[test]
    fn ssd_outputs_split_per_image_thresholded_and_in_pixels() {
        // Two images, 3 slots each.
        let counts = [2.0, 1.0];
        let scores = [0.9, 0.3, 0.0, 0.6, 0.0, 0.0];
        let classes = [1.0, 1.0, 0.0, 2.0, 0.0, 0.0];
        let mut boxes = vec![0.0f32; 24];
        boxes[0..4].copy_from_slice(&[0.1, 0.2, 0.5, 0.6]); // image 0, slot 0
        boxes[12..16].copy_from_slice(&[0.0, 0.0, 1.5, 1.0]); // image 1, slot 0 (ymax clamped)
        let sizes = [
            ImageSize {
                width: 100,
                height: 200,
            },
            ImageSize {
                width: 10,
                height: 10,
            },
        ];
        let out = SsdOutputs {
            counts: &counts,
            boxes: &boxes,
            scores: &scores,
            classes: &classes,
        };
        let decoded = decode_ssd(out, &sizes, 0.5, &spec()).expect("decodes");
        assert_eq!(decoded.len(), 2);
        assert_eq!(
            decoded[0].len(),
            1,
            "the 0.3 detection is under the threshold"
        );
        let d = &decoded[0][0];
        assert_eq!((d.label.as_str(), d.class_id), ("person", 1));
        let expected = [20.0, 20.0, 60.0, 100.0];
        for (got, want) in d.bbox.iter().zip(expected) {
            assert!((got - want).abs() < 1e-4, "{:?}", d.bbox);
        }
        assert_eq!(decoded[1][0].label, "class_2");
        assert_eq!(decoded[1][0].bbox, [0.0, 0.0, 10.0, 10.0]);
    }

    #[test]
    fn mismatched_output_shapes_are_a_model_error() {
        let out = SsdOutputs {
            counts: &[1.0],
            boxes: &[0.0; 3],
            scores: &[0.9],
            classes: &[1.0],
        };
        let sizes = [ImageSize {
            width: 1,
            height: 1,
        }];
        let error = decode_ssd(out, &sizes, 0.5, &spec()).expect_err("fails");
        assert_eq!(error.code(), ember_core::protocol::ErrorCode::ModelError);
    }

    #[test]
    fn a_configured_library_that_is_missing_is_a_clear_error() {
        let error =
            resolve_dylib(Some(Path::new("/nonexistent/libonnxruntime.so"))).expect_err("missing");
        assert!(error.to_string().contains("scripts/setup"), "{error}");
    }
}
