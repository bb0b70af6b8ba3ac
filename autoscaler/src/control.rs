//! The control loop, one for every backend: serves /metrics and /readyz, connects to the broker
//! (reconnecting), records heartbeats, and each tick measures every target's queue and workers
//! and hands them to the [`Backend`].

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use ember_core::telemetry::Admin;
use ember_core::topology::{self, QueueSettings};
use lapin::{Channel, Connection};
use prometheus::Registry;
use tokio_util::sync::CancellationToken;

use crate::backend::{Backend, Context, Observed, Scaled};
use crate::keda::{self, Board};
use crate::metrics::Metrics;
use crate::policy::PolicyState;
use crate::signals::{ArrivalMeter, Heartbeats, ModelView};
use crate::{Config, Error};

/// What the loop remembers of one target across ticks and reconnections.
#[derive(Debug, Default)]
struct Memory {
    policy: PolicyState,
    arrivals: ArrivalMeter,
}

/// What the loop keeps across reconnections: replicas keep running while the broker is away.
#[derive(Debug, Default)]
struct State {
    heartbeats: Heartbeats,
    memory: HashMap<String, Memory>,
    /// The versions each target listed at its last tick (see [`crate::backend::Target`]).
    versions: HashMap<String, BTreeSet<String>>,
    /// Versions (model, version) left out of their target's list whose queue is not yet
    /// retired (a worker of the version still consumes it, or the broker was lost).
    retiring: BTreeSet<(String, String)>,
}

/// Runs `backend` until `shutdown`, then stops it.
pub async fn run<B: Backend>(
    config: Config,
    mut backend: B,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let registry = Registry::new();
    let metrics =
        Metrics::register(&registry).map_err(|e| Error::Config(format!("metrics: {e}")))?;
    let admin = Admin::start(config.model.admin_addr, registry).await?;
    // Ten ticks without a decision: the loop has lost the broker.
    let board = Board::new((config.tick * 10).max(Duration::from_secs(5)));
    for model in &config.signal_models {
        board.expect(model.trim());
    }
    let keda = match config.keda_listen {
        Some(addr) => Some(keda::Server::start(addr, board.clone(), shutdown.clone()).await?),
        None => None,
    };
    let ctx = Context {
        config,
        metrics,
        readiness: admin.readiness(),
        board,
        started: Instant::now(),
        shutdown,
    };
    let mut state = State::default();
    while !ctx.shutdown.is_cancelled() {
        let Some(connection) =
            ember_core::amqp::connect(&ctx.config.amqp, "ember-autoscaler", &ctx.shutdown).await
        else {
            break;
        };
        let served = serve(&ctx, &mut backend, &mut state, &connection).await;
        ctx.readiness.set(false);
        if let Err(error) = served {
            tracing::warn!(%error, "lost the broker; reconnecting (replicas keep running)");
        }
        let _ = connection.close(200, "autoscaler".into()).await;
    }
    backend.stop().await;
    if let Some(keda) = keda {
        keda.stop().await;
    }
    admin.stop();
    Ok(())
}

/// One broker connection: heartbeats as they come, a tick every `--tick`.
async fn serve<B: Backend>(
    ctx: &Context,
    backend: &mut B,
    state: &mut State,
    connection: &Connection,
) -> lapin::Result<()> {
    let channel = connection.create_channel().await?;
    topology::declare_shared(&channel).await?;
    let mut beats = topology::HeartbeatFeed::subscribe(&channel, "#").await?;
    // Model queues are declared once per connection, when a target first names them.
    let mut declared = HashSet::new();
    ctx.readiness.set(true);
    let mut ticker = tokio::time::interval(ctx.config.tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = ctx.shutdown.cancelled() => return Ok(()),
            beat = beats.next() => match beat {
                Some(Ok(beat)) => state.heartbeats.record(beat, Instant::now()),
                Some(Err(error)) => return Err(error),
                None => return Ok(()),
            },
            _ = ticker.tick() => {
                tick(ctx, backend, state, &channel, &mut declared).await?;
                retire(ctx, state, connection, &mut declared).await?;
            }
        }
    }
}

/// One tick: every target the backend names, measured and handed back to it to scale.
async fn tick<B: Backend>(
    ctx: &Context,
    backend: &mut B,
    state: &mut State,
    channel: &Channel,
    declared: &mut HashSet<String>,
) -> lapin::Result<()> {
    for target in backend.observe(ctx).await {
        if declared.insert(target.model.clone()) {
            topology::declare_model(channel, &target.model, queue_settings(&ctx.config)).await?;
        }
        for version in &target.versions {
            if declared.insert(topology::version_queue(&target.model, version)) {
                topology::declare_version(
                    channel,
                    &target.model,
                    version,
                    queue_settings(&ctx.config),
                )
                .await?;
            }
        }
        track_versions(state, &target.key, &target.model, &target.versions);
        let memory = state.memory.entry(target.key.clone()).or_default();
        let observed = measure(
            ctx,
            &mut state.heartbeats,
            &mut memory.arrivals,
            channel,
            (&target.model, &target.versions),
        )
        .await?;
        match backend
            .scale(ctx, &target, &observed, &mut memory.policy)
            .await
        {
            Ok(scaled) => {
                ctx.board.post(&target.model, &scaled.decision);
                record(&ctx.metrics, &target.model, &observed.view, &scaled);
            }
            Err(error) => tracing::warn!(
                key = %target.key,
                model = %target.model,
                %error,
                "scaling failed"
            ),
        }
    }
    Ok(())
}

/// Remembers the versions `key` lists now; a version it listed before and no longer does is
/// to be retired (a version listed again is not).
fn track_versions(state: &mut State, key: &str, model: &str, versions: &[String]) {
    if versions.is_empty() {
        return;
    }
    let now: BTreeSet<String> = versions.iter().cloned().collect();
    for version in &now {
        state.retiring.remove(&(model.to_string(), version.clone()));
    }
    if let Some(before) = state.versions.insert(key.to_string(), now.clone()) {
        for gone in before.difference(&now) {
            tracing::info!(%model, version = %gone, "version left the pool: retiring its queue");
            state.retiring.insert((model.to_string(), gone.clone()));
        }
    }
}

/// Retires the queues of versions that left their pool, once no worker of theirs is heard
/// from (a draining worker still holds jobs it may hand back to its version's queue) and none
/// consumes them (see [`topology::retire_version`]); the rest are tried again next tick.
async fn retire(
    ctx: &Context,
    state: &mut State,
    connection: &Connection,
    declared: &mut HashSet<String>,
) -> lapin::Result<()> {
    let mut done = Vec::new();
    let now = Instant::now();
    for (model, version) in &state.retiring {
        let alive = state
            .heartbeats
            .workers(model, now, ctx.config.heartbeat_timeout)
            .iter()
            .any(|w| {
                w.beat
                    .model_info
                    .as_ref()
                    .is_some_and(|i| i.version == *version)
            });
        if alive {
            continue;
        }
        match topology::retire_version(connection, model, version).await? {
            topology::Retired::Done { moved } => {
                tracing::info!(%model, %version, moved, "version queue retired; jobs that pinned it are answered model_version_not_found");
                done.push((model.clone(), version.clone()));
            }
            topology::Retired::InUse { moved } => {
                tracing::debug!(%model, %version, moved, "version queue still in use");
            }
        }
    }
    for (model, version) in done {
        // Declared again should it come back (a rollback to it).
        declared.remove(&topology::version_queue(&model, &version));
        state.retiring.remove(&(model, version));
    }
    Ok(())
}

fn queue_settings(config: &Config) -> QueueSettings {
    QueueSettings {
        delivery_limit: config.delivery_limit,
        max_length: config.queue_max_length,
    }
}

/// A model now: ready jobs, its workers, and the arrival rate since the last tick.
async fn measure(
    ctx: &Context,
    heartbeats: &mut Heartbeats,
    arrivals: &mut ArrivalMeter,
    channel: &Channel,
    (model, versions): (&str, &[String]),
) -> lapin::Result<Observed> {
    let now = Instant::now();
    // Jobs pinned to a version wait in its queue: part of the model's backlog.
    let queue = topology::jobs_queue(model);
    let mut ready = u64::from(topology::ready_messages(channel, &queue).await?);
    for version in versions {
        let queue = topology::version_queue(model, version);
        ready += u64::from(topology::ready_messages(channel, &queue).await?);
    }
    let workers = heartbeats.workers(model, now, ctx.config.heartbeat_timeout);
    let view = ModelView::from_workers(&workers);
    let (arrival_rate, backlog_growing) =
        arrivals.observe(now, ready, view.in_flight, view.completed);
    Ok(Observed {
        ready,
        arrival_rate,
        backlog_growing,
        view,
    })
}

fn record(metrics: &Metrics, model: &str, view: &ModelView, scaled: &Scaled) {
    let Scaled { signals, decision } = scaled;
    let m = [model];
    metrics
        .desired
        .with_label_values(&m)
        .set(i64::from(decision.replicas));
    metrics
        .ready
        .with_label_values(&m)
        .set(i64::from(signals.replicas_ready));
    metrics
        .starting
        .with_label_values(&m)
        .set(i64::from(signals.replicas_starting));
    metrics
        .backlog
        .with_label_values(&m)
        .set(signals.backlog() as i64);
    metrics
        .queue_ready
        .with_label_values(&m)
        .set(signals.ready as i64);
    metrics
        .arrival_rate
        .with_label_values(&m)
        .set(signals.arrival_rate);
    if let Some(rate) = view.service_rate {
        metrics.service_rate.with_label_values(&m).set(rate);
    }
    if let Some(ratio) = view.busy_ratio {
        metrics.busy_ratio.with_label_values(&m).set(ratio);
    }
    if let Some(gpu) = view.gpu_utilisation {
        metrics.gpu_utilisation.with_label_values(&m).set(gpu);
    }
    if let Some(load) = view.model_load_seconds {
        metrics.model_load_seconds.with_label_values(&m).set(load);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_retired_when_its_pool_stops_listing_it_and_not_when_listed_again() {
        let mut state = State::default();
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        track_versions(&mut state, "pool", "m", &list(&["1"]));
        assert!(state.retiring.is_empty());
        track_versions(&mut state, "pool", "m", &list(&["1", "2"]));
        assert!(state.retiring.is_empty(), "a rollout adds a version");
        track_versions(&mut state, "pool", "m", &list(&["2"]));
        assert_eq!(
            state.retiring,
            BTreeSet::from([("m".to_string(), "1".to_string())])
        );
        // Rolled back to 1 before its queue was retired: it stays.
        track_versions(&mut state, "pool", "m", &list(&["1", "2"]));
        assert!(state.retiring.is_empty());
        // A target that names no versions manages none.
        track_versions(&mut state, "pool", "m", &[]);
        assert!(state.retiring.is_empty());
    }
}
