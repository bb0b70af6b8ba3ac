//! Dispatcher configuration: every flag is also an `EMBER_DISPATCHER_*` environment variable.

use std::net::SocketAddr;
use std::time::Duration;

use ember_core::amqp::AmqpConfig;
use ember_core::args::{ModelArgs, Part};
use ember_core::telemetry::LogConfig;

/// The dispatcher's model and admin flags: several models, `EMBER_DISPATCHER_*`, admin on port
/// 9200.
#[derive(Debug, Clone)]
pub struct DispatcherPart;

impl Part for DispatcherPart {
    const MODEL_DIR_ENV: &'static str = "EMBER_DISPATCHER_MODEL_DIRS";
    const MODEL_DIR_HELP: &'static str = "Model directories served (their model.toml gives names \
                                          and metadata); repeat or comma-separate";
    const MODEL_NAME_ENV: &'static str = "EMBER_DISPATCHER_MODEL_NAME";
    const ADMIN_ADDR_ENV: &'static str = "EMBER_DISPATCHER_ADMIN_ADDR";
    const ADMIN_ADDR_DEFAULT: &'static str = "127.0.0.1:9200";
    const MANY_MODELS: bool = true;
}

/// The Ember dispatcher: HTTP API in front of the job queues.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "ember-dispatcher", version, about)]
pub struct Config {
    /// API address (the Open Inference Protocol and job routes).
    #[arg(
        long,
        env = "EMBER_DISPATCHER_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,

    /// `--admin-addr`, `--model-dir` (repeatable), `--model-name`.
    #[command(flatten)]
    pub model: ModelArgs<DispatcherPart>,

    /// Redis holding job records, results and idempotency keys (shared by all replicas).
    #[arg(
        long,
        env = "EMBER_DISPATCHER_REDIS_URL",
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: String,

    /// How long job records and results are kept.
    #[arg(long, env = "EMBER_DISPATCHER_RESULT_TTL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub result_ttl: Duration,

    /// Largest accepted request body, in bytes (413 beyond).
    #[arg(long, env = "EMBER_DISPATCHER_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest total size of a request's header fields, in bytes, each counted as
    /// `name: value\r\n` (431 beyond). hyper refuses heads over about 400 KiB by itself.
    #[arg(long, env = "EMBER_DISPATCHER_MAX_HEADER_BYTES", default_value_t = 32 * 1024,
          value_parser = clap::value_parser!(u32).range(256..=256 * 1024))]
    pub max_header_bytes: u32,

    /// Most header fields a request may have (431 beyond); hyper's own limit is 100.
    #[arg(long, env = "EMBER_DISPATCHER_MAX_HEADERS", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(8..=100))]
    pub max_headers: u16,

    /// Request rate allowed per bearer token (per client address when auth is off; IPv6 per
    /// /64), e.g. `50/s`, `3000/min`, `5/10s`; 429 with Retry-After beyond. Health routes are
    /// exempt. None: no limit.
    #[arg(long, env = "EMBER_DISPATCHER_RATE_LIMIT")]
    pub rate_limit: Option<crate::limits::Rate>,

    /// Requests a client may make at once before the rate applies (default: the rate's count).
    #[arg(
        long,
        env = "EMBER_DISPATCHER_RATE_LIMIT_BURST",
        requires = "rate_limit"
    )]
    pub rate_limit_burst: Option<u32>,

    /// How long /v2/.../infer waits for the result before 504.
    #[arg(long, env = "EMBER_DISPATCHER_INFER_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub infer_timeout: Duration,

    /// Longest `?wait=` accepted on job submission.
    #[arg(long, env = "EMBER_DISPATCHER_MAX_WAIT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,

    /// Bearer tokens accepted on the API (none: no auth). Comma-separated.
    #[arg(
        long = "auth-token",
        env = "EMBER_DISPATCHER_AUTH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auth_tokens: Vec<String>,

    /// Standard Webhooks signing secret (`whsec_<base64>`, or raw text).
    #[arg(
        long,
        env = "EMBER_DISPATCHER_CALLBACK_SECRET",
        hide_env_values = true,
        default_value = "whsec_ZW1iZXItZGV2ZWxvcG1lbnQtc2VjcmV0"
    )]
    pub callback_secret: String,

    /// Networks callback URLs may point into despite being loopback/private/link-local
    /// (e.g. 127.0.0.1/32). Comma-separated CIDRs.
    #[arg(
        long = "callback-allow-net",
        env = "EMBER_DISPATCHER_CALLBACK_ALLOW_NETS",
        value_delimiter = ','
    )]
    pub callback_allow_nets: Vec<ipnet::IpNet>,

    /// Delivery attempts per callback before it is dead-lettered.
    #[arg(
        long,
        env = "EMBER_DISPATCHER_CALLBACK_MAX_ATTEMPTS",
        default_value_t = 8
    )]
    pub callback_max_attempts: u32,

    /// Oldest a callback may get (from its first attempt) before it is dead-lettered.
    #[arg(long, env = "EMBER_DISPATCHER_CALLBACK_MAX_AGE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub callback_max_age: Duration,

    /// Delay before the second attempt; doubles per attempt (with jitter).
    #[arg(long, env = "EMBER_DISPATCHER_CALLBACK_INITIAL_BACKOFF", default_value = "1s", value_parser = humantime::parse_duration)]
    pub callback_initial_backoff: Duration,

    /// Longest delay between attempts (a receiver's Retry-After is honoured up to this).
    #[arg(long, env = "EMBER_DISPATCHER_CALLBACK_MAX_BACKOFF", default_value = "5m", value_parser = humantime::parse_duration)]
    pub callback_max_backoff: Duration,

    /// Timeout of one callback POST.
    #[arg(long, env = "EMBER_DISPATCHER_CALLBACK_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub callback_timeout: Duration,

    /// Callbacks delivered concurrently (the callbacks queue's prefetch).
    #[arg(
        long,
        env = "EMBER_DISPATCHER_CALLBACK_CONCURRENCY",
        default_value_t = 64
    )]
    pub callback_concurrency: u16,

    /// `x-delivery-limit` of model queues (must agree with the workers).
    #[arg(long, env = "EMBER_DISPATCHER_DELIVERY_LIMIT", default_value_t = 5)]
    pub delivery_limit: u32,

    /// `x-max-length` of model queues (must agree with the workers).
    #[arg(
        long,
        env = "EMBER_DISPATCHER_QUEUE_MAX_LENGTH",
        default_value_t = 10_000
    )]
    pub queue_max_length: u32,

    /// On SIGTERM, how long in-flight requests and callbacks may take before exiting.
    #[arg(long, env = "EMBER_DISPATCHER_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub amqp: AmqpConfig,

    #[command(flatten)]
    pub log: LogConfig,
}
