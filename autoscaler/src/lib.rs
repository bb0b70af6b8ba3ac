//! # ember-autoscaler
//!
//! Sets each model's replica count every tick (1 s by default, not KEDA's 30 s) from what the
//! queue and the workers say: ready jobs (passive declare), in-flight jobs, worker states,
//! service rates and GPU utilisation (heartbeats, no DCGM -> Prometheus hop), replicas still
//! loading their model. The policy is pure ([`policy`]); backends carry decisions out.
//!
//! # Layout
//!
//! - [`control`]: the control loop, one for every backend: broker connection (reconnecting),
//!   heartbeats, and each tick queue depths and arrivals per model, handed to the backend.
//! - [`backend`]: the [`Backend`](backend::Backend) trait (`observe`, `scale`, `stop`) and the
//!   [`Context`](backend::Context) the loop shares with it. A new backend is a new file.
//! - [`local`]: the `local` backend (worker processes on this machine).
//! - [`kubernetes`]: the `kubernetes` backend (the `InferencePool` CRD, Deployments' scale, the
//!   leader Lease, pod deletion costs, Events and status).
//! - [`signal`]: the `signal` backend: decisions only, for KEDA to carry out.
//! - [`keda`]: KEDA's external scaler gRPC protocol, answered with the loop's decisions
//!   (`--keda-listen`, any backend).
//! - [`policy`]: signals -> replicas, with reasons. Pure and table-tested.
//! - [`rollout`]: a new model version over a pool, surge then retire, with rollback. Pure and
//!   table-tested; the local backend carries it out.
//! - [`signals`]: heartbeats -> per-model view and rates.
//! - [`sim`]: a deterministic simulator comparing the policy with a KEDA-like one.
//! - [`config`], [`metrics`].

pub mod backend;
pub mod config;
pub mod control;
pub mod keda;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod rollout;
pub mod signal;
pub mod signals;
pub mod sim;

use tokio_util::sync::CancellationToken;

pub use config::Config;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    #[error("kubernetes: {0}")]
    Kubernetes(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the autoscaler until `shutdown`; with the local backend it then stops every worker
/// (each drains) before returning.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    match config.backend {
        config::Backend::Local => {
            let backend = local::LocalBackend::new(&config)?;
            control::run(config, backend, shutdown).await
        }
        config::Backend::Kubernetes => {
            let backend = kubernetes::KubernetesBackend::connect(&config).await?;
            control::run(config, backend, shutdown).await
        }
        config::Backend::Signal => {
            let backend = signal::SignalBackend::new(&config)?;
            control::run(config, backend, shutdown).await
        }
    }
}
