//! # ember-autoscaler
//!
//! Sets each model's replica count every tick (1 s by default, not KEDA's 30 s) from what the
//! queue and the workers say: ready jobs (passive declare), in-flight jobs, worker states,
//! service rates and GPU utilisation (heartbeats, no DCGM -> Prometheus hop), replicas still
//! loading their model. The policy is pure ([`policy`]); backends carry decisions out.
//!
//! # Layout
//!
//! - [`policy`]: signals -> replicas, with reasons. Pure and table-tested.
//! - [`signals`]: heartbeats -> per-model view and rates.
//! - [`local`]: the `local` backend (worker processes on this machine).
//! - [`sim`]: a deterministic simulator comparing the policy with a KEDA-like one.
//! - [`config`], [`metrics`].

pub mod backend;
pub mod config;
pub mod control;
pub mod kubernetes;
pub mod local;
pub mod metrics;
pub mod policy;
pub mod signals;
pub mod sim;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_core::protocol::Heartbeat;
use ember_core::telemetry::{Readiness, serve_admin};
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::Connection;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::backend::Scaled;
use crate::control::{ready_messages, record};
use crate::policy::{PolicyState, Signals};
use crate::signals::{ArrivalMeter, Heartbeats, ModelView};

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
        config::Backend::Kubernetes => run_kubernetes(config, shutdown).await,
    }
}

struct PoolScaler {
    policy: PolicyState,
    arrivals: ArrivalMeter,
}

async fn run_kubernetes(config: Config, shutdown: CancellationToken) -> Result<(), Error> {
    // With several rustls providers in one build (kube's ring, reqwest's aws-lc-rs in the
    // workspace), rustls cannot pick one by itself: choose ring for this process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .map_err(|e| Error::Kubernetes(format!("no cluster configuration: {e}")))?;
    let registry = Registry::new();
    let metrics = metrics::Metrics::register(&registry)
        .map_err(|e| Error::Config(format!("metrics: {e}")))?;
    let readiness = Readiness::default();
    let admin_stop = CancellationToken::new();
    serve_admin(
        config.admin_addr,
        registry,
        readiness.clone(),
        admin_stop.clone(),
    )
    .await?;
    let identity = config.identity.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| format!("ember-autoscaler-{}", uuid::Uuid::new_v4().simple()))
    });
    let lease = kubernetes::LeaderLease {
        name: config.lease_name.clone(),
        identity,
        duration: config.lease_duration,
    };
    let heartbeats = Arc::new(Mutex::new(Heartbeats::default()));
    let mut pools: std::collections::HashMap<String, PoolScaler> = std::collections::HashMap::new();
    let started = Instant::now();
    while !shutdown.is_cancelled() {
        let Some(connection) =
            ember_core::amqp::connect(&config.amqp, "ember-autoscaler", &shutdown).await
        else {
            break;
        };
        let served = serve_kubernetes(
            &connection,
            &config,
            &client,
            &lease,
            &mut pools,
            &heartbeats,
            &metrics,
            &readiness,
            started,
            &shutdown,
        )
        .await;
        readiness.set(false);
        if let Err(error) = served {
            tracing::warn!(%error, "lost the broker; reconnecting");
        }
        let _ = connection.close(200, "autoscaler".into()).await;
    }
    admin_stop.cancel();
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn serve_kubernetes(
    connection: &Connection,
    config: &Config,
    client: &kube::Client,
    lease: &kubernetes::LeaderLease,
    pools: &mut std::collections::HashMap<String, PoolScaler>,
    heartbeats: &Arc<Mutex<Heartbeats>>,
    metrics: &metrics::Metrics,
    readiness: &Readiness,
    started: Instant,
    shutdown: &CancellationToken,
) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    topology::declare_shared(&channel).await?;
    let mut beats = topology::telemetry_consumer(&channel).await?;
    let queue = QueueSettings {
        delivery_limit: config.delivery_limit,
        max_length: config.queue_max_length,
    };
    let mut declared = std::collections::HashSet::new();
    readiness.set(true);
    let mut leading = false;
    let mut ticker = tokio::time::interval(config.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            beat = beats.next() => match beat {
                Some(Ok(delivery)) => {
                    if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&delivery.data) {
                        heartbeats.lock().unwrap_or_else(|e| e.into_inner()).record(beat, Instant::now());
                    }
                }
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
            _ = ticker.tick() => {
                let leader = match lease.acquire_or_renew(client, &config.namespace).await {
                    Ok(leader) => leader,
                    Err(error) => {
                        tracing::warn!(%error, "lease check failed; not acting this tick");
                        false
                    }
                };
                if leader != leading {
                    tracing::info!(leader, identity = %lease.identity, "leadership changed");
                    leading = leader;
                }
                if !leader {
                    continue;
                }
                let api: kube::Api<kubernetes::InferencePool> =
                    kube::Api::namespaced(client.clone(), &config.namespace);
                let list = match api.list(&kube::api::ListParams::default()).await {
                    Ok(list) => list,
                    Err(error) => {
                        tracing::warn!(%error, "cannot list InferencePools");
                        continue;
                    }
                };
                for pool in list {
                    let model = pool.spec.model.clone();
                    if declared.insert(model.clone()) {
                        topology::declare_model(&channel, &model, queue).await?;
                    }
                    let now = Instant::now();
                    let ready = ready_messages(&channel, &model).await?;
                    let view = {
                        let mut heartbeats = heartbeats.lock().unwrap_or_else(|e| e.into_inner());
                        ModelView::from_workers(&heartbeats.workers(&model, now, config.heartbeat_timeout))
                    };
                    let name = kube::ResourceExt::name_any(&pool);
                    let scaler = pools.entry(name.clone()).or_insert_with(|| PoolScaler {
                        policy: PolicyState::default(),
                        arrivals: ArrivalMeter::default(),
                    });
                    let (arrival_rate, growing) =
                        scaler.arrivals.observe(now, ready, view.in_flight, view.completed);
                    match kubernetes::reconcile(
                        client, &pool, (ready, arrival_rate, growing), &view, &mut scaler.policy,
                        started.elapsed(),
                    )
                    .await
                    {
                        Ok(decision) => {
                            let signals = Signals {
                                ready,
                                in_flight: view.in_flight,
                                arrival_rate,
                                ..Signals::default()
                            };
                            record(metrics, &model, &view, &Scaled { signals, decision });
                        }
                        Err(error) => tracing::warn!(pool = %name, %error, "reconcile failed"),
                    }
                }
            }
        }
    }
}
