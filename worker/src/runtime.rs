//! Loading ONNX Runtime and a model: the runtime library (from the flag, the env or the project's
//! `.venv`), the process's one environment, sessions on CPU or CUDA, and, when CUDA cannot be
//! had, an error that names what is missing.

use std::path::{Path, PathBuf};

use ort::environment::Environment;
use ort::ep::cuda::ConvAlgorithmSearch;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use crate::config::{ArenaExtend, ConvAlgo, CudaOptions, Device};
use crate::signature::Signature;
use crate::{Error, Result};

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
        .filter(|name| !loads(name))
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

/// Whether the dynamic loader can load `name` (a dlopen probe).
#[expect(
    unsafe_code,
    reason = "the one way to ask the dynamic loader: dlopen runs the library's initialisers"
)]
fn loads(name: &str) -> bool {
    // SAFETY: loading a shared library runs its initialisers; these are NVIDIA's CUDA
    // libraries, the same ones the CUDA provider is about to load itself.
    unsafe { libloading::Library::new(name) }.is_ok()
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

/// A loaded model: the session plus what is needed to reload it per job.
pub struct ResidentSession {
    env: Environment,
    options: SessionOptions,
    session: Option<Session>,
    reload_per_job: bool,
    /// The graph's inputs and outputs, read at load.
    signature: Signature,
    /// Where the model runs: the asked-for device, or the CPU after a fallback.
    device: Device,
}

impl std::fmt::Debug for ResidentSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResidentSession")
            .field("options", &self.options)
            .field("reload_per_job", &self.reload_per_job)
            .finish_non_exhaustive()
    }
}

impl ResidentSession {
    /// Loads the model (timed) unless `reload_per_job`, in which case each batch loads its own.
    pub fn new(env: Environment, options: SessionOptions, reload_per_job: bool) -> Result<Self> {
        // Even with reload-per-job, load once at start: a broken model or device must fail at
        // startup, not on the first job.
        let (session, device) = load_session(&env, &options)?;
        let signature = Signature::of(&session)?;
        Ok(Self {
            env,
            options,
            signature,
            session: (!reload_per_job).then_some(session),
            reload_per_job,
            device,
        })
    }

    /// The device the model runs on (the CPU after a fallback).
    pub fn device(&self) -> Device {
        self.device
    }

    /// The graph's inputs and outputs.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Runs `f` on the resident session, or on a freshly loaded one with reload-per-job, with
    /// the graph's signature beside it.
    pub fn with_session<T>(
        &mut self,
        f: impl FnOnce(&mut Session, &Signature) -> Result<T>,
    ) -> Result<T> {
        if self.reload_per_job {
            let (mut session, _) = load_session(&self.env, &self.options)?;
            return f(&mut session, &self.signature);
        }
        let session = self
            .session
            .as_mut()
            .ok_or_else(|| Error::Internal("no session".into()))?;
        f(session, &self.signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_library_that_is_missing_is_a_clear_error() {
        let error =
            resolve_dylib(Some(Path::new("/nonexistent/libonnxruntime.so"))).expect_err("missing");
        assert!(error.to_string().contains("scripts/setup"), "{error}");
    }
}
