//! Logging, the per-process metrics registry and the admin HTTP server.
//!
//! The admin server answers `/metrics` (Prometheus text format from the process's own
//! [`prometheus::Registry`], never a global one), `/livez` (the process is running) and `/readyz`
//! (the part says it can do its work: for a worker, model loaded and consuming).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio_util::sync::CancellationToken;

/// Log output settings.
#[derive(Debug, Clone, clap::Args)]
pub struct LogConfig {
    /// Log format: `text` for terminals, `json` for containers.
    #[arg(long = "log-format", env = "EMBER_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub format: String,
    /// Log filter in `tracing` EnvFilter syntax (e.g. `info,ember_worker=debug`).
    #[arg(
        long = "log",
        env = "EMBER_LOG",
        default_value = "info,ort=warn,lapin::returned_messages=error"
    )]
    pub filter: String,
}

/// What [`init`] set up that must be flushed at exit: the trace exporter, when traces are on.
#[derive(Debug, Default)]
#[must_use = "keep it until exit and call `shutdown`, or the last spans are lost"]
pub struct Telemetry {
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter (a blocking call, bounded by
    /// the exporter's timeout).
    pub fn shutdown(self) {
        if let Some(provider) = self.traces
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "trace exporter did not shut down cleanly");
        }
    }
}

/// Installs the global `tracing` subscriber: logs to stderr, and traces over OTLP when the
/// `OTEL_*` variables ask for them ([`crate::otel`]; `service` names the part unless
/// `OTEL_SERVICE_NAME` does). Call it within the Tokio runtime.
pub fn init(
    config: &LogConfig,
    service: &str,
) -> Result<Telemetry, Box<dyn std::error::Error + Send + Sync>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    // Spans meant for traces never reach the logs.
    let filter = tracing_subscriber::EnvFilter::try_new(&config.filter)?
        .add_directive(format!("{}=off", crate::otel::TARGET).parse()?);
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let logs = if config.format == "json" {
        logs.json().with_filter(filter).boxed()
    } else {
        logs.with_filter(filter).boxed()
    };
    let traces = if crate::otel::configured()? {
        Some(crate::otel::provider(service)?)
    } else {
        None
    };
    let trace_layer = traces.as_ref().map(|provider| {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("ember"))
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.target() == crate::otel::TARGET
            }))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(trace_layer)
        .try_init()?;
    if traces.is_some() {
        tracing::info!("traces on: exporting over OTLP/gRPC");
    }
    Ok(Telemetry { traces })
}

/// Registers `collector` on `registry` and hands it back, for a part's `Metrics::register` to
/// build its struct of handles in one expression (`jobs: register(registry, IntCounterVec::new(…)?)?`).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    collector: C,
) -> prometheus::Result<C> {
    registry.register(Box::new(collector.clone()))?;
    Ok(collector)
}

/// A readiness flag shared between the part's work and `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone)]
struct AdminState {
    registry: Registry,
    readiness: Readiness,
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut buffer = Vec::with_capacity(8 * 1024);
    match TextEncoder::new().encode(&state.registry.gather(), &mut buffer) {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            buffer,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.readiness.get() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// The admin router, for embedding or testing.
pub fn admin_router(registry: Registry, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AdminState {
            registry,
            readiness,
        })
}

/// Binds `addr` and serves the admin endpoints until `stop` is cancelled. Returns the bound
/// address (useful with port 0).
pub async fn serve_admin(
    addr: SocketAddr,
    registry: Registry,
    readiness: Readiness,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = admin_router(registry, readiness);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "admin server failed");
        }
    });
    tracing::info!(%bound, "admin server listening");
    Ok(bound)
}

/// A part's running admin server and the readiness flag behind its `/readyz`: what each part
/// starts first, before it connects or loads anything, so that probes and metrics answer early.
#[derive(Debug)]
pub struct Admin {
    readiness: Readiness,
    stop: CancellationToken,
    addr: SocketAddr,
}

impl Admin {
    /// Serves `registry` and a fresh readiness flag (not ready) on `addr` (see [`serve_admin`]),
    /// until [`Admin::stop`].
    pub async fn start(addr: SocketAddr, registry: Registry) -> std::io::Result<Self> {
        let readiness = Readiness::default();
        let stop = CancellationToken::new();
        let addr = serve_admin(addr, registry, readiness.clone(), stop.clone()).await?;
        Ok(Self {
            readiness,
            stop,
            addr,
        })
    }

    /// The flag `/readyz` answers from; the part sets it.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// The bound address (the port chosen, where `addr` had port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving (after the part has drained, so that `/metrics` says how it went).
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("writes");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("reads");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status line");
        (status, response)
    }

    #[tokio::test]
    async fn readyz_follows_readiness_and_metrics_come_from_the_process_registry() {
        let registry = Registry::new();
        let counter =
            prometheus::IntCounter::new("ember_test_things_total", "things").expect("valid metric");
        registry
            .register(Box::new(counter.clone()))
            .expect("registers");
        counter.inc_by(3);
        let readiness = Readiness::default();
        let stop = CancellationToken::new();
        let addr = serve_admin(
            "127.0.0.1:0".parse().expect("addr"),
            registry,
            readiness.clone(),
            stop.clone(),
        )
        .await
        .expect("binds");

        assert_eq!(get(addr, "/livez").await.0, 200);
        assert_eq!(get(addr, "/readyz").await.0, 503);
        readiness.set(true);
        assert_eq!(get(addr, "/readyz").await.0, 200);
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("ember_test_things_total 3"), "{body}");
        assert_eq!(get(addr, "/nope").await.0, 404);
        stop.cancel();
    }
}
