//! Worker configuration: every flag is also an `EMBER_WORKER_*` environment variable.

use std::path::PathBuf;
use std::time::Duration;

use ember_core::amqp::AmqpConfig;
use ember_core::args::{ModelArgs, Part};
use ember_core::telemetry::LogConfig;

use crate::process::InputLimits;

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// CUDA device index.
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<i32>) {
                Some(Ok(index)) if index >= 0 => Ok(Device::Cuda(index)),
                _ => Err(format!(
                    "`{other}` is not a device: use cpu, cuda or cuda:<N>"
                )),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

/// How the CUDA execution provider allocates and picks kernels (ignored on CPU).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CudaOptions {
    /// Most bytes the CUDA memory arena may hold (default: no limit).
    #[arg(long, env = "EMBER_WORKER_CUDA_MEM_LIMIT")]
    pub cuda_mem_limit: Option<usize>,

    /// How the CUDA arena grows: next-power-of-two (ONNX Runtime's default; fewer, larger
    /// allocations) or same-as-requested (tighter memory, more allocations).
    #[arg(
        long,
        env = "EMBER_WORKER_CUDA_ARENA_EXTEND",
        default_value = "next-power-of-two"
    )]
    pub cuda_arena_extend: ArenaExtend,

    /// How cuDNN picks convolution kernels: exhaustive (benchmarks every kernel at the first run
    /// of each shape; the warm-up pays for it), heuristic or default.
    #[arg(
        long,
        env = "EMBER_WORKER_CUDNN_CONV_ALGO",
        default_value = "exhaustive"
    )]
    pub cudnn_conv_algo: ConvAlgo,
}

/// The CUDA arena's growth strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ArenaExtend {
    #[default]
    NextPowerOfTwo,
    SameAsRequested,
}

/// cuDNN's convolution algorithm search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvAlgo {
    #[default]
    Exhaustive,
    Heuristic,
    Default,
}

/// Where the model comes from when not from `--model-dir` (see `source`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SourceArgs {
    /// The model artifact instead of --model-dir: a path or file:// (a model directory, used in
    /// place, or an artifact file), https:// (http:// only to 127.0.0.1 or localhost) or
    /// s3://bucket/key. An artifact is a .tar.gz/.tgz/.tar of a model directory or one .onnx file.
    /// It wins over --model-dir: an image's EMBER_WORKER_MODEL_DIR (its bundled model) gives way
    /// to the URI a pool sets, which Kubernetes cannot do by unsetting the image's variable.
    #[arg(long, env = "EMBER_WORKER_MODEL_URI")]
    pub model_uri: Option<String>,

    /// The artifact's SHA-256 (64 hex digits): checked before use, and the cache key (a cached
    /// artifact is then used without any network call). Required for https:// sources unless
    /// --allow-unverified-model.
    #[arg(long, env = "EMBER_WORKER_MODEL_SHA256", requires = "model_uri")]
    pub model_sha256: Option<String>,

    /// Load an https:// artifact without --model-sha256 (downloaded at every start, unverified).
    #[arg(long, env = "EMBER_WORKER_ALLOW_UNVERIFIED_MODEL")]
    pub allow_unverified_model: bool,

    /// Where downloaded artifacts are unpacked, one `sha256-<hex>` directory each (default:
    /// $XDG_CACHE_HOME/ember/models, else $HOME/.cache/ember/models).
    #[arg(long, env = "EMBER_WORKER_MODEL_CACHE_DIR")]
    pub model_cache_dir: Option<PathBuf>,

    /// PEM file of CA certificates trusted for the model source, besides the system's.
    #[arg(long, env = "EMBER_WORKER_MODEL_CA_FILE")]
    pub model_ca_file: Option<PathBuf>,
}

impl SourceArgs {
    /// `--model-cache-dir`, or the user's cache directory's `ember/models`.
    pub fn cache_dir(&self) -> Result<PathBuf, crate::source::Problem> {
        if let Some(dir) = &self.model_cache_dir {
            return Ok(dir.clone());
        }
        let from_env = |name: &str| {
            std::env::var_os(name)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        from_env("XDG_CACHE_HOME")
            .or_else(|| from_env("HOME").map(|home| home.join(".cache")))
            .map(|cache| cache.join("ember/models"))
            .ok_or_else(|| {
                crate::source::Problem::Invalid(
                    "no cache directory: give --model-cache-dir (neither XDG_CACHE_HOME nor HOME \
                     is set)"
                        .into(),
                )
            })
    }
}

/// The worker's model and admin flags: one model, `EMBER_WORKER_*`, admin on port 9100.
#[derive(Debug, Clone)]
pub struct WorkerPart;

impl Part for WorkerPart {
    const MODEL_DIR_ENV: &'static str = "EMBER_WORKER_MODEL_DIR";
    const MODEL_DIR_HELP: &'static str = "The model directory (model.onnx + model.toml)";
    const MODEL_NAME_ENV: &'static str = "EMBER_WORKER_MODEL_NAME";
    const ADMIN_ADDR_ENV: &'static str = "EMBER_WORKER_ADMIN_ADDR";
    const ADMIN_ADDR_DEFAULT: &'static str = "127.0.0.1:9100";
    const MANY_MODELS: bool = false;
}

/// An Ember worker: keeps one model resident and answers its jobs.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ember-worker", version, about)]
pub struct Config {
    /// `--model-dir` (one), `--model-name`, `--admin-addr`.
    #[command(flatten)]
    pub model: ModelArgs<WorkerPart>,

    /// `--model-uri` and how its artifact is verified and cached.
    #[command(flatten)]
    pub source: SourceArgs,

    /// The model's version (in heartbeats, results and metadata), instead of model.toml's.
    #[arg(long, env = "EMBER_WORKER_MODEL_VERSION")]
    pub model_version: Option<String>,

    /// This worker's id in heartbeats and results (default: host name + random suffix).
    #[arg(long, env = "EMBER_WORKER_ID")]
    pub worker_id: Option<String>,

    /// Path of libonnxruntime.so (default: found in the project's .venv).
    #[arg(long, env = "ORT_DYLIB_PATH")]
    pub ort_dylib_path: Option<PathBuf>,

    /// Execution provider: cpu, cuda or cuda:<N>.
    #[arg(long, env = "EMBER_WORKER_DEVICE", default_value = "cpu")]
    pub device: Device,

    /// Run on CPU if the asked-for GPU cannot be used (logged loudly). Without it, that is a
    /// startup error.
    #[arg(long, env = "EMBER_WORKER_ALLOW_CPU_FALLBACK")]
    pub allow_cpu_fallback: bool,

    #[command(flatten)]
    pub cuda: CudaOptions,

    /// ONNX Runtime intra-op threads per model instance (0 = the cores this process may use,
    /// CPU affinity and a cgroup quota such as a pod's limits.cpu counted, divided among the
    /// instances).
    #[arg(long, env = "EMBER_WORKER_INTRA_THREADS", default_value_t = 0)]
    pub intra_threads: usize,

    /// Threads of the async runtime (AMQP, decoding of small bodies, results); 0 = one per
    /// core. The model's instances run on threads of their own besides these.
    #[arg(long, env = "EMBER_WORKER_RUNTIME_THREADS", default_value_t = 0)]
    pub runtime_threads: usize,

    /// Independent sessions of the model in this worker, each running its own batches on its
    /// own thread (Triton's instance groups). Each holds its own copy of the weights.
    #[arg(long, env = "EMBER_WORKER_INSTANCES", default_value_t = 1,
          value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..=64), usize::from))]
    pub instances: usize,

    /// Let ONNX Runtime's intra-op threads spin while waiting for work (lower latency on a
    /// dedicated machine; burns a core that the broker or other workers may need otherwise).
    #[arg(long, env = "EMBER_WORKER_ORT_SPIN")]
    pub ort_spin: bool,

    /// Most jobs per session.run (default and ceiling: model.toml's max_batch).
    #[arg(long, env = "EMBER_WORKER_MAX_BATCH")]
    pub max_batch: Option<usize>,

    /// How long a batch waits for more jobs after its first one.
    #[arg(long, env = "EMBER_WORKER_MAX_BATCH_DELAY", default_value = "5ms", value_parser = humantime::parse_duration)]
    pub max_batch_delay: Duration,

    /// Unacked jobs the broker may hand this worker (default: 2 x max batch).
    #[arg(long, env = "EMBER_WORKER_PREFETCH")]
    pub prefetch: Option<u16>,

    /// Largest accepted job body, in bytes.
    #[arg(long, env = "EMBER_WORKER_MAX_INPUT_BYTES", default_value_t = InputLimits::DEFAULT.max_bytes)]
    pub max_input_bytes: usize,

    /// Largest accepted image, in pixels (width x height), checked before decoding.
    #[arg(long, env = "EMBER_WORKER_MAX_PIXELS", default_value_t = InputLimits::DEFAULT.max_pixels)]
    pub max_pixels: u64,

    /// Load the model for every job (the stateless-function baseline) instead of keeping it.
    #[arg(long, env = "EMBER_WORKER_RELOAD_PER_JOB")]
    pub reload_per_job: bool,

    /// After SIGTERM, how long to finish the jobs in hand before exiting anyway.
    #[arg(long, env = "EMBER_WORKER_DRAIN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// How often to publish a heartbeat to ember.telemetry.
    #[arg(long, env = "EMBER_WORKER_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// `x-delivery-limit` of the model's queue (must agree with every other declarer).
    #[arg(long, env = "EMBER_WORKER_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// `x-max-length` of the model's queue (must agree with every other declarer).
    #[arg(long, env = "EMBER_WORKER_QUEUE_MAX_LENGTH", default_value_t = 10_000)]
    pub queue_max_length: u32,

    /// Load the model directory, check model.toml against the graph, run one warm-up, print a
    /// verdict (JSON) and exit: 0 when the model can be served.
    #[arg(long)]
    pub check: bool,

    #[command(flatten)]
    pub amqp: AmqpConfig,

    #[command(flatten)]
    pub log: LogConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn devices_parse_and_bad_ones_are_refused() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("cuda:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert!("cuda:-1".parse::<Device>().is_err());
        assert!("tpu".parse::<Device>().is_err());
    }

    #[test]
    fn flags_parse_with_humantime_durations() {
        let config = Config::try_parse_from([
            "ember-worker",
            "--max-batch-delay",
            "20ms",
            "--max-batch",
            "4",
            "--device",
            "cuda:1",
        ])
        .expect("parses");
        assert_eq!(config.max_batch_delay, Duration::from_millis(20));
        assert_eq!(config.max_batch, Some(4));
        assert_eq!(config.device, Device::Cuda(1));
        assert!(!config.reload_per_job);
        assert_eq!(config.cuda.cuda_mem_limit, None);
        assert_eq!(config.cuda.cuda_arena_extend, ArenaExtend::NextPowerOfTwo);
    }

    #[test]
    fn a_model_uri_wins_over_a_model_dir() {
        let config = Config::try_parse_from([
            "ember-worker",
            "--model-uri",
            "s3://bucket/m.tar.gz",
            "--model-sha256",
            &"ab".repeat(32),
            "--model-version",
            "2",
        ])
        .expect("parses: the default --model-dir does not conflict");
        assert_eq!(
            config.source.model_uri.as_deref(),
            Some("s3://bucket/m.tar.gz")
        );
        assert_eq!(config.model_version.as_deref(), Some("2"));
        assert!(!config.source.allow_unverified_model);
        // An image sets EMBER_WORKER_MODEL_DIR; a pool's URI must still be served.
        let both = Config::try_parse_from([
            "ember-worker",
            "--model-uri",
            "s3://bucket/m.tar.gz",
            "--model-dir",
            "models/iris-classifier",
        ])
        .expect("parses: the URI wins");
        assert_eq!(
            both.source.model_uri.as_deref(),
            Some("s3://bucket/m.tar.gz")
        );
        assert!(
            Config::try_parse_from(["ember-worker", "--model-sha256", &"ab".repeat(32)]).is_err(),
            "a digest without a URI"
        );
        let dir = PathBuf::from("/var/cache/models");
        let config = Config::try_parse_from([
            "ember-worker",
            "--model-uri",
            "https://h/m.tgz",
            "--allow-unverified-model",
            "--model-cache-dir",
            "/var/cache/models",
        ])
        .expect("parses");
        assert!(config.source.allow_unverified_model);
        assert_eq!(config.source.cache_dir().expect("given"), dir);
    }

    #[test]
    fn cuda_arena_settings_parse() {
        let config = Config::try_parse_from([
            "ember-worker",
            "--device",
            "cuda",
            "--cuda-mem-limit",
            "2147483648",
            "--cuda-arena-extend",
            "same-as-requested",
            "--cudnn-conv-algo",
            "heuristic",
        ])
        .expect("parses");
        assert_eq!(config.cuda.cuda_mem_limit, Some(2 << 30));
        assert_eq!(config.cuda.cuda_arena_extend, ArenaExtend::SameAsRequested);
        assert_eq!(config.cuda.cudnn_conv_algo, ConvAlgo::Heuristic);
        assert!(
            Config::try_parse_from(["ember-worker", "--cuda-arena-extend", "sometimes"]).is_err()
        );
    }
}
