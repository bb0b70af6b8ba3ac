//! The seam between the control loop and where replicas live: the [`Backend`] trait and the
//! [`Context`] the loop shares with it. A new backend is a new file implementing the trait.

use std::future::Future;
use std::time::Instant;

use ember_core::telemetry::Readiness;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::keda::Board;
use crate::metrics::Metrics;
use crate::policy::{Decision, PolicyState, Signals};
use crate::signals::ModelView;

/// What the control loop and its backend share for the life of the process (controller-rs's
/// `Context`). One task runs the loop and the backend, so it is lent, not put in an `Arc`.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub metrics: Metrics,
    /// `/readyz`: true while the loop holds a broker connection.
    pub readiness: Readiness,
    /// Each model's latest decision, for the KEDA external scaler (posted whether or not it
    /// serves).
    pub board: Board,
    /// When the autoscaler started: the policy's clock.
    pub started: Instant,
    pub shutdown: CancellationToken,
}

/// One thing a backend scales: a model's worker processes, an `InferencePool`.
#[derive(Debug, Clone)]
pub struct Target<S> {
    /// What the loop keeps this target's memory (arrivals, policy state) under across ticks.
    pub key: String,
    /// The model: its queue is declared and measured, its workers' heartbeats read.
    pub model: String,
    /// What the backend needs to act on the target.
    pub spec: S,
    /// The model versions the target serves now (two during a rollout, old and new): the loop
    /// keeps each one's queue `ember.jobs.<model>@<version>` (jobs pinned to it) declared, and
    /// retires the queue of a version that leaves this list (its waiting jobs are answered
    /// `model_version_not_found` by the workers left). Empty: versions are not managed.
    pub versions: Vec<String>,
}

/// What the loop saw of a target's model this tick.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Ready jobs in the model's queue (passive declare).
    pub ready: u64,
    /// Jobs/s arriving, smoothed.
    pub arrival_rate: f64,
    /// Whether ready + in flight grew since the last tick.
    pub backlog_growing: bool,
    /// The model's workers, from their heartbeats.
    pub view: ModelView,
}

/// What a backend decided for a target, and the signals the metrics record with it.
#[derive(Debug, Clone)]
pub struct Scaled {
    pub signals: Signals,
    pub decision: Decision,
}

/// Where replicas live. Each tick the control loop asks the backend what there is to scale
/// (`observe`), measures each target's model, and hands that to `scale`, which reads the
/// target's replicas, decides with [`crate::policy::decide`] and carries the decision out. When
/// the loop ends it calls `stop`.
///
/// The methods return `Send` futures (implementations write `async fn`) so that the loop can run
/// on any tokio runtime.
pub trait Backend {
    /// What the backend needs to act on one target.
    type Spec: Send + Sync;
    /// Why scaling one target failed this tick: logged, and the loop goes on.
    type Error: std::fmt::Display;

    /// The targets to scale this tick; none when this replica is not to act (not the leader).
    fn observe(&mut self, ctx: &Context) -> impl Future<Output = Vec<Target<Self::Spec>>> + Send;

    /// Decides `target`'s replicas from what the loop `observed` (the policy's memory of the
    /// target in `policy`) and carries the decision out.
    fn scale(
        &mut self,
        ctx: &Context,
        target: &Target<Self::Spec>,
        observed: &Observed,
        policy: &mut PolicyState,
    ) -> impl Future<Output = Result<Scaled, Self::Error>> + Send;

    /// Stops what the backend started, once the loop has ended.
    fn stop(&mut self) -> impl Future<Output = ()> + Send;
}
