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

    /// Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`, what
    /// `tritonclient.grpc` calls) on this address, with the API's auth, limits and errors. Off
    /// unless given (e.g. `127.0.0.1:8081`).
    #[arg(long, env = "EMBER_DISPATCHER_GRPC_LISTEN", value_name = "ADDR")]
    pub grpc_listen: Option<SocketAddr>,

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

    /// File holding the Redis URL (with its password: `redis://:PASSWORD@host:6379/0`, or
    /// `rediss://` for TLS), e.g. a mounted Secret; overrides --redis-url.
    #[arg(long, env = "EMBER_DISPATCHER_REDIS_URL_FILE", value_name = "PATH")]
    pub redis_url_file: Option<std::path::PathBuf>,

    /// PEM CA certificate(s) trusted for a `rediss://` Redis instead of the system's roots (a
    /// private CA). The server's certificate must name the URL's host.
    #[arg(long, env = "EMBER_DISPATCHER_REDIS_CA_FILE", value_name = "PATH")]
    pub redis_ca_file: Option<std::path::PathBuf>,

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

    /// Tenants (TOML: token digests, models, rate, queue share; see `ember_dispatcher::tenants`),
    /// e.g. a mounted Secret. Re-read when it changes: tokens are added and revoked without a
    /// restart.
    #[arg(long, env = "EMBER_DISPATCHER_TENANTS_FILE", value_name = "PATH")]
    pub tenants_file: Option<std::path::PathBuf>,

    /// How often the tenants file is checked for changes.
    #[arg(long, env = "EMBER_DISPATCHER_TENANTS_RELOAD_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub tenants_reload_interval: Duration,

    /// Serve without tokens: anyone who reaches the port may submit jobs and read every job's
    /// result. Without this flag, a dispatcher with neither --tenants-file nor --auth-token
    /// refuses to start. For a laptop, never for a shared cluster.
    #[arg(long, env = "EMBER_DISPATCHER_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Requests with a wrong token allowed per client address before all of that address's
    /// requests are refused (429) until its bucket refills; counted before the token is checked.
    #[arg(
        long,
        env = "EMBER_DISPATCHER_AUTH_FAILURE_LIMIT",
        default_value = "20/min"
    )]
    pub auth_failure_limit: crate::limits::Rate,

    /// Proxies (CIDRs) whose `--client-ip-header` names the client; from any other peer the
    /// header is ignored and the peer's address is the client's. Comma-separated.
    #[arg(
        long = "trusted-proxy",
        env = "EMBER_DISPATCHER_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<ipnet::IpNet>,

    /// The header a trusted proxy puts the client's address in (a comma-separated chain, the
    /// nearest proxy's addition last, as X-Forwarded-For).
    #[arg(
        long,
        env = "EMBER_DISPATCHER_CLIENT_IP_HEADER",
        default_value = "x-forwarded-for"
    )]
    pub client_ip_header: axum::http::HeaderName,

    /// Bearer tokens accepted on the API, all of one tenant `default` allowed every model
    /// (--tenants-file is the way to give several teams their own). Comma-separated.
    #[arg(
        long = "auth-token",
        env = "EMBER_DISPATCHER_AUTH_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub auth_tokens: Vec<String>,

    /// Standard Webhooks signing secret (`whsec_<base64>`, or raw text). Without it and
    /// --callback-secret-file, only --insecure-no-auth starts, with a development secret.
    #[arg(long, env = "EMBER_DISPATCHER_CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<String>,

    /// File holding the callback signing secrets, one per line: callbacks are signed with each
    /// (Standard Webhooks lists several signatures), so a new secret can be added, given to the
    /// receivers, and the old one removed. Overrides --callback-secret.
    #[arg(
        long,
        env = "EMBER_DISPATCHER_CALLBACK_SECRET_FILE",
        value_name = "PATH"
    )]
    pub callback_secret_file: Option<std::path::PathBuf>,

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

    /// Most results `ember.results.store` holds while no dispatcher takes them in; beyond it
    /// the oldest are dropped from it (`drop-head`: still routed to any other queue bound to
    /// `ember.results.stored`) and their jobs read `expired`. Its message TTL is --result-ttl.
    #[arg(
        long,
        env = "EMBER_DISPATCHER_RESULTS_STORE_MAX_LENGTH",
        default_value_t = 100_000
    )]
    pub results_store_max_length: u32,

    /// On SIGTERM, how long in-flight requests and callbacks may take before exiting.
    #[arg(long, env = "EMBER_DISPATCHER_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    #[command(flatten)]
    pub amqp: AmqpConfig,

    #[command(flatten)]
    pub log: LogConfig,
}
