//! # ember-dispatcher
//!
//! The HTTP front of an Ember fleet: the KServe/Triton Open Inference Protocol v2 (JSON and
//! binary tensors, answered synchronously through the queue by Direct Reply-to) and asynchronous
//! jobs (202 + polling, `?wait=`, idempotency keys, cancellation, signed callbacks). Results live
//! in a shared Redis store, so any replica answers for any job.
//!
//! # Layout
//!
//! - [`config`]: flags and `EMBER_DISPATCHER_*` variables.
//! - [`api`]: the routes, and the one path by which a job is enqueued (record, then publish).
//! - [`middleware`]: request metrics, header limits, bearer auth and the rate limits, in front of
//!   every route; [`limits`]: what they enforce (header limits, token buckets, the client's
//!   address); [`tenants`]: whose a token is, what it may use, reloaded from its file.
//! - [`oip_binary`]: the binary tensor extension: requests checked by their JSON header and
//!   passed on as they came, responses in each datatype's binary form.
//! - [`broker`]: the RabbitMQ link (publish with confirms, Direct Reply-to, result storing), and
//!   [`broker::Heartbeats`], what the workers report (readiness, the graph's model info),
//!   reconnecting by itself.
//! - [`store`]: job records, results, idempotency keys in Redis.
//! - [`callbacks`]: Standard Webhooks signing, retries, dead-lettering; [`ssrf`]: where a
//!   callback may go (the SSRF guard, at submit and at connect time).
//! - [`grpc`]: the same protocol over gRPC (`inference.GRPCInferenceService`), on its own port.
//! - [`metrics`], [`error`].

pub mod api;
pub mod broker;
pub mod callbacks;
pub mod config;
pub mod error;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod middleware;
pub mod oip_binary;
pub mod ssrf;
pub mod store;
pub mod tenants;

use std::collections::HashMap;
use std::sync::Arc;

use ember_core::model::ModelSpec;
use ember_core::telemetry::Admin;
use ember_core::topology::QueueSettings;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("result store: {0}")]
    Store(#[from] redis::RedisError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

fn load_models(config: &Config) -> Result<HashMap<String, ModelSpec>, Error> {
    let mut models = HashMap::new();
    if config.model.model_name.is_some() && config.model.model_dirs.len() != 1 {
        return Err(Error::Config(
            "--model-name needs exactly one --model-dir".into(),
        ));
    }
    for dir in &config.model.model_dirs {
        let spec = ModelSpec::load(dir).map_err(Error::Config)?;
        let name = config
            .model
            .model_name
            .clone()
            .unwrap_or_else(|| spec.name.clone());
        ember_core::model::check_name(&name).map_err(Error::Config)?;
        models.insert(name, spec);
    }
    Ok(models)
}

/// The development callback secret, used only with `--insecure-no-auth` when none is given.
const DEVELOPMENT_CALLBACK_SECRET: &str = "whsec_ZW1iZXItZGV2ZWxvcG1lbnQtc2VjcmV0";

/// What the dispatcher's security settings come to at startup: the tenants, the callback
/// signing keys and the Redis URL, read from their files.
struct Security {
    tenants: Arc<tenants::Tenants>,
    callback_keys: Vec<Vec<u8>>,
    redis_url: String,
}

fn read_secret(flag: &str, path: &std::path::Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{flag} {}: {e}", path.display())))
}

impl Security {
    /// Refuses to start without tokens (unless `--insecure-no-auth`) and without a callback
    /// secret of the operator's own (the built-in one is public).
    fn load(config: &Config) -> Result<Self, Error> {
        if config.auth_tokens.iter().any(String::is_empty) {
            return Err(Error::Config(
                "an empty --auth-token (a stray comma?) would let requests without a token in"
                    .into(),
            ));
        }
        let defaults = tenants::Defaults {
            rate: config.rate_limit,
            burst: config.rate_limit_burst,
        };
        let directory = match (&config.tenants_file, config.auth_tokens.is_empty()) {
            (Some(_), false) => {
                return Err(Error::Config(
                    "give tokens either in --tenants-file or with --auth-token, not both".into(),
                ));
            }
            (Some(path), true) => tenants::Tenants::load(path, defaults).map_err(Error::Config)?,
            (None, _) => tenants::Directory::from_tokens(&config.auth_tokens, defaults),
        };
        let has_tokens = config.tenants_file.is_some() || !directory.is_empty();
        if config.insecure_no_auth && has_tokens {
            return Err(Error::Config(
                "--insecure-no-auth contradicts the tokens given (--tenants-file, --auth-token)"
                    .into(),
            ));
        }
        if !config.insecure_no_auth && !has_tokens {
            return Err(Error::Config(
                "no tokens: give --tenants-file (or --auth-token), or run with \
                 --insecure-no-auth to let anyone who reaches the port in"
                    .into(),
            ));
        }
        if config.insecure_no_auth {
            tracing::warn!(
                "--insecure-no-auth: no tokens are asked for; anyone who reaches the API may \
                 submit jobs and read every job's result"
            );
        }
        let callback_keys = match (&config.callback_secret_file, &config.callback_secret) {
            (Some(path), _) => {
                let keys = callbacks::parse_secrets(&read_secret("--callback-secret-file", path)?);
                if keys.is_empty() {
                    return Err(Error::Config(format!(
                        "--callback-secret-file {}: holds no secret",
                        path.display()
                    )));
                }
                keys
            }
            (None, Some(secret)) if !secret.trim().is_empty() => {
                vec![callbacks::signing_key(secret.trim())]
            }
            _ if config.insecure_no_auth => {
                vec![callbacks::signing_key(DEVELOPMENT_CALLBACK_SECRET)]
            }
            _ => {
                return Err(Error::Config(
                    "no callback secret: give --callback-secret-file (the built-in development \
                     secret is public, for --insecure-no-auth only)"
                        .into(),
                ));
            }
        };
        let redis_url = match &config.redis_url_file {
            Some(path) => read_secret("--redis-url-file", path)?.trim().to_string(),
            None => config.redis_url.clone(),
        };
        let tenants = tenants::Tenants::new(
            directory,
            !config.insecure_no_auth,
            config.tenants_file.clone(),
            defaults,
        );
        Ok(Self {
            tenants: Arc::new(tenants),
            callback_keys,
            redis_url,
        })
    }
}

/// Runs the dispatcher until `shutdown`; then stops taking requests, lets the ones in flight
/// finish, and hands the callbacks in hand back to the queue.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    run_with_resolver(config, Arc::new(ssrf::SystemResolver), shutdown).await
}

/// [`run`], resolving callback host names with `names` (at submit time and, through the
/// [`ssrf::CallbackGuard`], at connect time) instead of the system resolver: tests use it
/// to play DNS rebinding.
pub async fn run_with_resolver(
    config: Config,
    names: Arc<dyn reqwest::dns::Resolve>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let models = load_models(&config)?;
    let security = Security::load(&config)?;
    let registry = Registry::new();
    let metrics = metrics::Metrics::register(&registry)
        .map_err(|e| Error::Config(format!("metrics: {e}")))?;
    let admin = Admin::start(config.model.admin_addr, registry).await?;

    // rustls is built with two providers here (ring, and aws-lc-rs through reqwest): choose.
    ember_core::amqp::install_crypto_provider();
    let redis_ca = match &config.redis_ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| Error::Config(format!("--redis-ca-file {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let store = store::Store::connect(&security.redis_url, redis_ca, config.result_ttl).await?;
    let callback_guard = ssrf::CallbackGuard::new(config.callback_allow_nets.clone(), names);
    let client = callback_guard
        .http_client(config.callback_timeout)
        .map_err(|e| Error::Config(format!("http client: {e}")))?;
    let callbacks = Arc::new(callbacks::CallbackSender {
        client,
        keys: security.callback_keys,
        policy: callbacks::RetryPolicy {
            max_attempts: config.callback_max_attempts.max(1),
            max_age: config.callback_max_age,
            initial_backoff: config.callback_initial_backoff,
            max_backoff: config.callback_max_backoff,
        },
        guard: callback_guard.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
    });
    let broker = broker::Broker::new();
    let tracker = TaskTracker::new();
    let broker_task = tokio::spawn(broker.clone().run(
        broker::BrokerContext {
            amqp: config.amqp.clone(),
            models: models.keys().cloned().collect(),
            queue: QueueSettings {
                delivery_limit: config.delivery_limit,
                max_length: config.queue_max_length,
            },
            results: broker::ResultsStoreSettings {
                max_length: config.results_store_max_length,
                ttl: config.result_ttl,
            },
            store: store.clone(),
            metrics: metrics.clone(),
            callbacks,
            callback_concurrency: config.callback_concurrency,
        },
        shutdown.clone(),
        tracker,
    ));

    let state = Arc::new(api::AppState {
        broker: broker.clone(),
        store,
        metrics,
        models,
        infer_timeout: config.infer_timeout,
        max_wait: config.max_wait,
        tenants: security.tenants.clone(),
        callback_guard,
        limits: api::Limits {
            max_body_bytes: config.max_body_bytes,
            max_header_bytes: config.max_header_bytes as usize,
            max_headers: usize::from(config.max_headers),
            rate: config
                .rate_limit
                .map(|rate| limits::RateLimiter::new(rate, config.rate_limit_burst)),
            auth_failures: limits::RateLimiter::new(config.auth_failure_limit, None),
            trusted_proxies: config.trusted_proxies.clone(),
            client_ip_header: config.client_ip_header.clone(),
        },
    });
    state
        .metrics
        .tenants
        .set(security.tenants.current().len() as i64);
    let tenants_watch = tokio::spawn(security.tenants.clone().watch(
        config.tenants_reload_interval,
        state.metrics.clone(),
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "API listening");
    let ready_probe = {
        let broker = broker.clone();
        let readiness = admin.readiness();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while !shutdown.is_cancelled() {
                readiness.set(broker.connected().await);
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                }
            }
            readiness.set(false);
        })
    };
    let grpc_server = match config.grpc_listen {
        Some(addr) => Some(serve_grpc(addr, state.clone(), shutdown.clone()).await?),
        None => None,
    };
    let server_shutdown = shutdown.clone();
    let app = api::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { server_shutdown.cancelled().await });
    // Serve until shutdown; the drain after it is bounded by --drain-timeout (measured from
    // the signal, not from the start).
    let drained = async {
        let served = served.await;
        let _ = broker_task.await;
        served
    };
    let outcome = tokio::select! {
        outcome = drained => outcome,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(config.drain_timeout).await;
        } => {
            tracing::warn!("drain timed out");
            Ok(())
        }
    };
    let _ = ready_probe.await;
    let _ = tenants_watch.await;
    if let Some(grpc_server) = grpc_server {
        let _ = grpc_server.await;
    }
    admin.stop();
    outcome.map_err(Error::Io)
}

/// Serves the Open Inference Protocol over gRPC on `addr` (HTTP/2 through axum, as the REST
/// API is served: the peer's address for the rate limits, no timeout of tonic's own, so that a
/// client's `grpc-timeout` is answered `DEADLINE_EXCEEDED` by the call itself) until `shutdown`.
async fn serve_grpc(
    addr: std::net::SocketAddr,
    state: Arc<api::AppState>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "gRPC API listening (inference.GRPCInferenceService)");
    // HTTP/2 answers a call in several writes (headers, data, trailers): without TCP_NODELAY
    // the last waits for the client's delayed ACK (measured without it: a 300x300 tensor's
    // round trip p50 45.1 ms over gRPC against 25.0 ms over REST, median of 3 rounds,
    // docs/benchmarks/overhead-grpc-before-nodelay.json).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "TCP_NODELAY not set");
        }
    });
    let app = tonic::service::Routes::new(grpc::OipGrpc::new(state).server())
        .into_axum_router()
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "gRPC server failed");
        }
    }))
}
