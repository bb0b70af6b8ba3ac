//! Autoscaler configuration: every flag is also an `EMBER_AUTOSCALER_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ember_core::amqp::AmqpConfig;
use ember_core::args::{ModelArgs, Part};
use ember_core::telemetry::LogConfig;

use crate::policy::Settings;

/// Where replicas live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `ember-worker` processes on this machine.
    Local,
    /// Deployments named by `InferencePool` resources (kubeconfig or in-cluster config).
    Kubernetes,
    /// Nothing: decide for each `--signal-model` and only say so (the decisions log, metrics,
    /// and the KEDA external scaler of `--keda-listen`); no Kubernetes API, no Lease.
    Signal,
}

/// The autoscaler's model and admin flags: several models (local backend),
/// `EMBER_AUTOSCALER_*`, admin on port 9300.
#[derive(Debug, Clone)]
pub struct AutoscalerPart;

impl Part for AutoscalerPart {
    const MODEL_DIR_ENV: &'static str = "EMBER_AUTOSCALER_MODEL_DIRS";
    const MODEL_DIR_HELP: &'static str =
        "Model directories to scale (local backend); repeat or comma-separate";
    const MODEL_NAME_ENV: &'static str = "EMBER_AUTOSCALER_MODEL_NAME";
    const ADMIN_ADDR_ENV: &'static str = "EMBER_AUTOSCALER_ADMIN_ADDR";
    const ADMIN_ADDR_DEFAULT: &'static str = "127.0.0.1:9300";
    const MANY_MODELS: bool = true;
}

/// The Ember autoscaler: sets each model's replicas from backlog, service rate and GPU load.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ember-autoscaler", version, about)]
pub struct Config {
    #[arg(
        long,
        env = "EMBER_AUTOSCALER_BACKEND",
        value_enum,
        default_value = "local"
    )]
    pub backend: Backend,

    /// The models to decide for (signal backend); repeat or comma-separate.
    #[arg(
        long = "signal-model",
        env = "EMBER_AUTOSCALER_SIGNAL_MODELS",
        value_delimiter = ','
    )]
    pub signal_models: Vec<String>,

    /// Serve KEDA's external scaler gRPC protocol (`externalscaler.ExternalScaler`) on this
    /// address, answering with this autoscaler's decisions; off unless set.
    #[arg(long, env = "EMBER_AUTOSCALER_KEDA_LISTEN")]
    pub keda_listen: Option<SocketAddr>,

    /// Print the InferencePool CRD as YAML and exit.
    #[arg(long)]
    pub print_crd: bool,

    /// Namespace of the InferencePools, Deployments and the Lease (kubernetes backend).
    #[arg(long, env = "EMBER_AUTOSCALER_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Name of the leader-election Lease (kubernetes backend).
    #[arg(
        long,
        env = "EMBER_AUTOSCALER_LEASE_NAME",
        default_value = "ember-autoscaler"
    )]
    pub lease_name: String,

    /// This replica's identity in the Lease (default: POD_NAME, else the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// How long a Lease holds without renewal.
    #[arg(long, env = "EMBER_AUTOSCALER_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,

    /// `--model-dir` (repeatable), `--model-name`, `--admin-addr`.
    #[command(flatten)]
    pub model: ModelArgs<AutoscalerPart>,

    /// The worker program (local backend); default: `ember-worker` beside this binary.
    #[arg(long, env = "EMBER_AUTOSCALER_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,

    /// An extra argument for every worker (local backend); repeat.
    #[arg(
        long = "worker-arg",
        env = "EMBER_AUTOSCALER_WORKER_ARGS",
        value_delimiter = ' ',
        allow_hyphen_values = true
    )]
    pub worker_args: Vec<String>,

    /// A TOML file of pools (local backend), instead of `--model-dir`: `[[pool]]` entries with
    /// `model`, `source` (a model directory, relative to the file, or a URI), optional `sha256`
    /// and `version`. Re-read when it changes; a changed source or version rolls the pool out.
    #[arg(long, env = "EMBER_AUTOSCALER_POOLS_FILE")]
    pub pools_file: Option<PathBuf>,

    /// Where the local backend writes its pools' status as JSON (versions, rollout phase,
    /// events); default with `--pools-file`: beside it, `<name>.status.json`.
    #[arg(long, env = "EMBER_AUTOSCALER_STATUS_FILE")]
    pub status_file: Option<PathBuf>,

    /// A rollout whose new workers are not all ready this long after it began is rolled back
    /// (local backend).
    #[arg(long, env = "EMBER_AUTOSCALER_ROLLOUT_DEADLINE", default_value = "120s", value_parser = humantime::parse_duration)]
    pub rollout_deadline: Duration,

    /// How often to decide.
    #[arg(long, env = "EMBER_AUTOSCALER_TICK", default_value = "1s", value_parser = humantime::parse_duration)]
    pub tick: Duration,

    /// A worker unheard of for this long is gone.
    #[arg(long, env = "EMBER_AUTOSCALER_HEARTBEAT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    #[arg(long, env = "EMBER_AUTOSCALER_MIN_REPLICAS", default_value_t = 0)]
    pub min_replicas: u32,

    #[arg(long, env = "EMBER_AUTOSCALER_MAX_REPLICAS", default_value_t = 4)]
    pub max_replicas: u32,

    /// Work off the backlog within this time (on top of arrivals).
    #[arg(long, env = "EMBER_AUTOSCALER_TARGET_DRAIN_TIME", default_value = "10s", value_parser = humantime::parse_duration)]
    pub target_drain_time: Duration,

    /// Plan each replica at this fraction of its measured service rate.
    #[arg(
        long,
        env = "EMBER_AUTOSCALER_TARGET_UTILISATION",
        default_value_t = 0.8
    )]
    pub target_utilisation: f64,

    /// Jobs/s per replica to assume before one is measured.
    #[arg(
        long,
        env = "EMBER_AUTOSCALER_INITIAL_SERVICE_RATE",
        default_value_t = 20.0
    )]
    pub initial_service_rate: f64,

    /// Scale down only when lower demand held this long.
    #[arg(long, env = "EMBER_AUTOSCALER_SCALE_DOWN_WINDOW", default_value = "30s", value_parser = humantime::parse_duration)]
    pub scale_down_window: Duration,

    /// At most this many replicas removed per decision.
    #[arg(long, env = "EMBER_AUTOSCALER_SCALE_DOWN_STEP", default_value_t = 1)]
    pub scale_down_step: u32,

    /// With --min-replicas 0: no work for this long means zero replicas.
    #[arg(long, env = "EMBER_AUTOSCALER_IDLE_TO_ZERO", default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_to_zero: Duration,

    /// GPU utilisation above which a growing backlog forces a step up.
    #[arg(long, env = "EMBER_AUTOSCALER_GPU_HIGH", default_value_t = 0.9)]
    pub gpu_high: f64,

    /// GPU utilisation under which scale-down is allowed.
    #[arg(long, env = "EMBER_AUTOSCALER_GPU_LOW", default_value_t = 0.5)]
    pub gpu_low: f64,

    /// Demand within this fraction above capacity does not scale up (against flapping).
    #[arg(long, env = "EMBER_AUTOSCALER_TOLERANCE", default_value_t = 0.1)]
    pub tolerance: f64,

    /// `x-delivery-limit` of model queues (must agree with the workers).
    #[arg(long, env = "EMBER_AUTOSCALER_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// `x-max-length` of model queues (must agree with the workers).
    #[arg(
        long,
        env = "EMBER_AUTOSCALER_QUEUE_MAX_LENGTH",
        default_value_t = 10_000
    )]
    pub queue_max_length: u32,

    #[command(flatten)]
    pub amqp: AmqpConfig,

    #[command(flatten)]
    pub log: LogConfig,
}

impl Config {
    pub fn settings(&self) -> Settings {
        Settings {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas.max(self.min_replicas),
            target_drain_time: self.target_drain_time,
            target_utilisation: self.target_utilisation,
            initial_service_rate: self.initial_service_rate,
            scale_down_window: self.scale_down_window,
            scale_down_step: self.scale_down_step,
            idle_to_zero: self.idle_to_zero,
            gpu_high: self.gpu_high,
            gpu_low: self.gpu_low,
            tolerance: self.tolerance,
        }
    }
}
