//! The `kubernetes` backend: an `InferencePool` custom resource per model names the worker
//! Deployment, bounds and targets, and where the model comes from. Each tick the leader (a Lease)
//! reads the Deployment, rolls its pod template to a changed model source (and back when the new
//! pods are not ready in time), decides, marks idle pods cheapest to delete
//! (`controller.kubernetes.io/pod-deletion-cost`) before a scale-in, patches the Deployment's
//! scale subresource, records an Event per change and writes the pool's status.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Container, ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResource, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::Config;
use crate::backend::{Backend, Context, Observed, Scaled, Target};
use crate::policy::{self, Decision, PolicyState, Settings, Signals};
use crate::signals::ModelView;

/// The annotation Kubernetes reads to choose which pods go first on scale-in (lowest first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";
/// The worker container whose environment carries the model source (manifests/base/worker.yaml).
pub const WORKER_CONTAINER: &str = "worker";
/// The worker's variables for the model source, in [`ModelSource`]'s field order.
pub const MODEL_URI_ENV: &str = "EMBER_WORKER_MODEL_URI";
pub const MODEL_SHA256_ENV: &str = "EMBER_WORKER_MODEL_SHA256";
pub const MODEL_VERSION_ENV: &str = "EMBER_WORKER_MODEL_VERSION";

fn default_drain() -> f64 {
    10.0
}
fn default_utilisation() -> f64 {
    0.8
}
fn default_rate() -> f64 {
    10.0
}
fn default_window() -> u64 {
    60
}
fn default_step() -> u32 {
    1
}
fn default_idle() -> u64 {
    300
}
fn default_gpu_high() -> f64 {
    0.9
}
fn default_gpu_low() -> f64 {
    0.5
}
fn default_tolerance() -> f64 {
    0.1
}
fn default_progress_deadline() -> u64 {
    600
}

/// A model's pool of workers: which model and Deployment, its bounds, and the scaling targets.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ember.dev",
    version = "v1alpha1",
    kind = "InferencePool",
    namespaced,
    status = "InferencePoolStatus",
    shortname = "ipool",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model.name"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.model.current.version"}"#,
    printcolumn = r#"{"name":"Rollout","type":"string","jsonPath":".status.model.rollout.phase"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.lastReason"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// The model: its name (queue `ember.jobs.<name>`) and, optionally, where the workers fetch
    /// it from. A change of `uri`, `sha256` or `version` rolls the worker Deployment.
    pub model: ModelSpec,
    /// The worker Deployment in the same namespace.
    pub deployment: String,
    #[serde(default)]
    pub min_replicas: u32,
    pub max_replicas: u32,
    #[serde(default = "default_drain")]
    pub target_drain_time_seconds: f64,
    #[serde(default = "default_utilisation")]
    pub target_utilisation: f64,
    /// Jobs/s per replica assumed before one is measured.
    #[serde(default = "default_rate")]
    pub initial_service_rate: f64,
    #[serde(default = "default_window")]
    pub scale_down_window_seconds: u64,
    #[serde(default = "default_step")]
    pub scale_down_step: u32,
    #[serde(default = "default_idle")]
    pub idle_to_zero_seconds: u64,
    #[serde(default = "default_gpu_high")]
    pub gpu_high: f64,
    #[serde(default = "default_gpu_low")]
    pub gpu_low: f64,
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// How a change of the model source is rolled out.
    #[serde(default)]
    pub rollout: RolloutSpec,
}

/// The model a pool serves: its name and, optionally, the source its workers load.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The model's name (queue `ember.jobs.<name>`).
    pub name: String,
    /// Where the workers fetch the model directory from (`EMBER_WORKER_MODEL_URI`): a path,
    /// `https://` or `s3://`. Absent: the model baked into the worker image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The artifact's SHA-256 digest, hex (`EMBER_WORKER_MODEL_SHA256`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[0-9a-fA-F]{64}$"))]
    pub sha256: Option<String>,
    /// The version the workers report (`EMBER_WORKER_MODEL_VERSION`; overrides model.toml's):
    /// up to 64 letters, digits, `.`, `-` and `_`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z0-9._-]{1,64}$"))]
    pub version: Option<String>,
}

impl ModelSpec {
    /// The source part: what the worker Deployment's pod template must carry.
    pub fn source(&self) -> ModelSource {
        ModelSource {
            uri: self.uri.clone(),
            sha256: self.sha256.clone(),
            version: self.version.clone(),
        }
    }
}

/// How a model source change is rolled out.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Seconds the new pods have to become ready before the Deployment is rolled back.
    #[serde(default = "default_progress_deadline")]
    pub progress_deadline_seconds: u64,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            progress_deadline_seconds: default_progress_deadline(),
        }
    }
}

impl InferencePoolSpec {
    pub fn settings(&self) -> Settings {
        Settings {
            min_replicas: self.min_replicas,
            max_replicas: self.max_replicas.max(self.min_replicas),
            target_drain_time: Duration::from_secs_f64(self.target_drain_time_seconds.max(0.001)),
            target_utilisation: self.target_utilisation,
            initial_service_rate: self.initial_service_rate,
            scale_down_window: Duration::from_secs(self.scale_down_window_seconds),
            scale_down_step: self.scale_down_step,
            idle_to_zero: Duration::from_secs(self.idle_to_zero_seconds),
            gpu_high: self.gpu_high,
            gpu_low: self.gpu_low,
            tolerance: self.tolerance,
        }
    }
}

/// A status condition.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// What the autoscaler last saw and decided.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct InferencePoolStatus {
    pub desired_replicas: u32,
    pub ready_replicas: u32,
    pub starting_replicas: u32,
    pub backlog: u64,
    pub ready_jobs: u64,
    pub in_flight: u64,
    pub arrival_rate: f64,
    pub service_rate: Option<f64>,
    pub gpu_utilisation: Option<f64>,
    pub last_decision: Option<String>,
    pub last_reason: Option<String>,
    pub last_decision_time: Option<String>,
    #[serde(default)]
    pub conditions: Vec<PoolCondition>,
    /// The model source: what is served, what it replaced, what failed, and the last rollout.
    /// Absent while the pool names no source (the image's model, never rolled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelStatus>,
}

/// Where a model comes from: what the worker Deployment's pod template carries as
/// `EMBER_WORKER_MODEL_URI`, `_SHA256` and `_VERSION`. All absent: the image's own model.
///
/// Absent fields serialise as `null`, so that a status merge patch clears what is no longer set.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ModelSource {
    #[serde(default)]
    pub uri: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
}

impl ModelSource {
    pub fn is_empty(&self) -> bool {
        self.uri.is_none() && self.sha256.is_none() && self.version.is_none()
    }

    /// A short name for messages: the version, else the digest's first 12 digits, else the URI.
    pub fn label(&self) -> String {
        if let Some(version) = &self.version {
            if version.starts_with(|c: char| c.is_ascii_digit()) {
                format!("v{version}")
            } else {
                version.clone()
            }
        } else if let Some(sha) = &self.sha256 {
            format!("sha256:{}", sha.chars().take(12).collect::<String>())
        } else if let Some(uri) = &self.uri {
            redact_uri(uri)
        } else {
            "the image's model".into()
        }
    }

    /// Every field, for Event notes (the URI without credentials or query).
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "the image's model".into();
        }
        let mut parts = Vec::new();
        if let Some(version) = &self.version {
            parts.push(format!("version {version}"));
        }
        if let Some(uri) = &self.uri {
            parts.push(redact_uri(uri));
        }
        if let Some(sha) = &self.sha256 {
            parts.push(format!("sha256 {sha}"));
        }
        parts.join(", ")
    }
}

/// A URI fit for an Event: no user info (`user:password@`) and no query (presigned URLs carry
/// their signature there).
pub fn redact_uri(uri: &str) -> String {
    let uri = uri.split(['?', '#']).next().unwrap_or_default();
    match uri.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
        None => uri.to_string(),
    }
}

/// Where a rollout stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// The Deployment rolls to the new source; new pods load it.
    Progressing,
    /// Every replica runs the new source and is available.
    Complete,
    /// The new pods were not ready within the deadline: the template is back on the last good
    /// source, and the failed one is not tried again until `spec.model` changes.
    RolledBack,
    /// The Deployment cannot carry a model source (no worker container): nothing was changed.
    Failed,
}

impl RolloutPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Progressing => "Progressing",
            Self::Complete => "Complete",
            Self::RolledBack => "RolledBack",
            Self::Failed => "Failed",
        }
    }
}

/// Ready workers reporting one model version in their heartbeats.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct WorkerVersion {
    pub version: String,
    pub ready: u32,
}

/// The last rollout of a pool's model source, and how far it got.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    pub phase: RolloutPhase,
    /// The version rolled out (the target's), if it names one.
    pub version: Option<String>,
    /// The source rolled out.
    pub target: ModelSource,
    pub message: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// The Deployment's `metadata.generation` with the new template: its status speaks of the
    /// new pods once `status.observedGeneration` reaches it.
    pub generation: Option<i64>,
    /// From the Deployment's status: pods in all, pods on the new template, ready, available.
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub updated_replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub available_replicas: i32,
    /// The versions the workers' heartbeats report, with their ready workers.
    #[serde(default)]
    pub worker_versions: Vec<WorkerVersion>,
}

/// A pool's model source over time.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelStatus {
    /// The last good source: rolled out completely (or found on the Deployment when the pool
    /// first named a source). A failed rollout returns the template to it.
    pub current: ModelSource,
    /// The source `current` replaced at the last completed rollout.
    pub previous: Option<ModelSource>,
    /// A source that was rolled back: not tried again while `spec.model` asks for it.
    pub failed: Option<ModelSource>,
    pub rollout: Option<RolloutStatus>,
}

impl ModelStatus {
    fn progressing(&self) -> Option<&RolloutStatus> {
        self.rollout
            .as_ref()
            .filter(|r| r.phase == RolloutPhase::Progressing)
    }
}

/// The model versions `pool` serves now, for the control loop's version queues: the current
/// one, and the target's too while a rollout is in progress. Versions are named by the pool's
/// sources: a pool that names none serves none the loop manages.
pub fn served_versions(pool: &InferencePool) -> Vec<String> {
    let model = pool.status.as_ref().and_then(|s| s.model.as_ref());
    let sources: Vec<&ModelSource> = match model {
        // Not rolled yet: what the spec names is what the pool is about to serve.
        None => return pool.spec.model.version.iter().cloned().collect(),
        Some(model) => match model.progressing() {
            Some(rollout) => vec![&model.current, &rollout.target],
            None => vec![&model.current],
        },
    };
    let mut versions: Vec<String> = Vec::new();
    for version in sources.into_iter().filter_map(|s| s.version.clone()) {
        if !versions.contains(&version) {
            versions.push(version);
        }
    }
    versions
}

// --- rollouts: the pure parts ------------------------------------------------------------------

/// What a Deployment's status says about its rollout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploymentProgress {
    /// `metadata.generation`: bumped by every spec change.
    pub generation: i64,
    /// `status.observedGeneration`: the generation the controller has acted on.
    pub observed_generation: i64,
    /// `spec.replicas`.
    pub desired: i32,
    /// `status.replicas`: pods of the old and new templates.
    pub replicas: i32,
    /// `status.updatedReplicas`: pods of the current template.
    pub updated: i32,
    pub ready: i32,
    pub available: i32,
    /// The `Progressing` condition says `ProgressDeadlineExceeded`.
    pub deadline_exceeded: bool,
}

impl DeploymentProgress {
    pub fn of(deployment: &Deployment) -> Self {
        let spec = &deployment.spec;
        let status = deployment.status.as_ref();
        let int = |v: Option<i32>| v.unwrap_or(0).max(0);
        Self {
            generation: deployment.metadata.generation.unwrap_or(0),
            observed_generation: status.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: int(spec.replicas),
            replicas: int(status.and_then(|s| s.replicas)),
            updated: int(status.and_then(|s| s.updated_replicas)),
            ready: int(status.and_then(|s| s.ready_replicas)),
            available: int(status.and_then(|s| s.available_replicas)),
            deadline_exceeded: status.and_then(|s| s.conditions.as_ref()).is_some_and(
                |conditions| {
                    conditions.iter().any(|c| {
                        c.type_.as_deref() == Some("Progressing")
                            && c.status.as_deref() == Some("False")
                            && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                    })
                },
            ),
        }
    }

    /// Whether the controller has seen the template of `generation` (or a later one).
    fn observed(&self, generation: Option<i64>) -> bool {
        self.observed_generation >= generation.unwrap_or(0).max(self.generation)
    }

    /// The rollout of `generation` is done, as `kubectl rollout status` judges it: every
    /// replica on the new template, none of the old left, all of them available.
    pub fn complete(&self, generation: Option<i64>) -> bool {
        self.observed(generation)
            && self.updated >= self.desired
            && self.replicas <= self.updated
            && self.available >= self.updated
    }

    /// New pods that are ready: with `maxUnavailable: 0` the old ones stay ready until they go,
    /// so ready pods beyond the old ones are new.
    pub fn new_ready(&self) -> i32 {
        let old = (self.replicas - self.updated).max(0);
        (self.ready - old).clamp(0, self.updated)
    }
}

/// An Event a rollout step posts about the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutEvent {
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// What one tick does about a pool's model source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RolloutPlan {
    /// The pool's `status.model` after this tick; `None`: the pool names no source (nothing to
    /// do, nothing written).
    pub status: Option<ModelStatus>,
    /// The source to write on the worker container's environment (a start, a rollback, or the
    /// template put back after someone changed it).
    pub write: Option<ModelSource>,
    pub event: Option<RolloutEvent>,
}

/// What [`plan_rollout`] decides from.
#[derive(Debug, Clone)]
pub struct RolloutInput<'a> {
    /// What `spec.model` asks for.
    pub spec: &'a ModelSource,
    /// `spec.rollout.progressDeadlineSeconds`.
    pub deadline: Duration,
    /// The pool's `status.model` as read.
    pub status: Option<&'a ModelStatus>,
    /// The source the Deployment's worker container carries, or why it cannot carry one.
    pub template: &'a Result<ModelSource, String>,
    pub progress: &'a DeploymentProgress,
    /// Ready workers per version, from heartbeats.
    pub worker_versions: &'a [WorkerVersion],
    pub now: Timestamp,
}

fn seconds_since(start: &str, now: Timestamp) -> Option<u64> {
    let start: Timestamp = start.parse().ok()?;
    Some(now.duration_since(start).as_secs().max(0) as u64)
}

/// The rollout state machine, one step per tick. Pure: what to write on the template, which
/// Event to post and the new `status.model`, from the spec, the last status, the template and
/// the Deployment's status. Every step is safe to repeat (a tick whose status write failed is
/// decided again the same way at the next one).
///
/// - No rollout in progress, `spec.model` differs from the current source (and is not the one
///   that failed): **start** one: write the spec's source, phase `Progressing`.
/// - In progress: **complete** once the Deployment has every replica on the new template and
///   available; **roll back** (write the current source again, remember the failed one) once
///   the deadline has passed or the Deployment reports `ProgressDeadlineExceeded`; a spec
///   changed meanwhile starts a new rollout from the current source.
/// - Nothing in progress and the template drifted from the current source: write it back.
pub fn plan_rollout(input: &RolloutInput<'_>) -> RolloutPlan {
    let RolloutInput {
        spec,
        deadline,
        status,
        template,
        progress,
        worker_versions,
        now,
    } = input;
    if status.is_none() && spec.is_empty() {
        return RolloutPlan::default();
    }
    let now_text = now.to_string();
    let template = match template {
        Ok(template) => template,
        Err(why) => {
            let mut model = status.cloned().unwrap_or_default();
            let repeated = model
                .rollout
                .as_ref()
                .is_some_and(|r| r.phase == RolloutPhase::Failed && &r.message == why);
            if repeated {
                // Said already: the status stays as it is (no new timestamps every tick).
                return RolloutPlan {
                    status: Some(model),
                    write: None,
                    event: None,
                };
            }
            let mut rollout = new_rollout(spec, &now_text, progress, worker_versions);
            rollout.phase = RolloutPhase::Failed;
            rollout.message = why.clone();
            rollout.finished_at = Some(now_text);
            model.rollout = Some(rollout);
            return RolloutPlan {
                status: Some(model),
                write: None,
                event: Some(RolloutEvent {
                    warning: true,
                    reason: "RolloutFailed",
                    note: why.clone(),
                }),
            };
        }
    };
    // The first time a pool names a source, what the template carries is the last good one.
    let mut model = status.cloned().unwrap_or_else(|| ModelStatus {
        current: template.clone(),
        ..ModelStatus::default()
    });
    let deadline_s = deadline.as_secs();

    if let Some(rollout) = model.progressing().cloned() {
        if **spec != rollout.target {
            let note = format!("superseding {}", rollout.target.label());
            return start(
                model,
                spec,
                &now_text,
                progress,
                worker_versions,
                deadline_s,
                Some(note),
            );
        }
        let elapsed = seconds_since(&rollout.started_at, *now).unwrap_or(0);
        let mut next = RolloutStatus {
            replicas: progress.replicas,
            updated_replicas: progress.updated,
            ready_replicas: progress.ready,
            available_replicas: progress.available,
            worker_versions: worker_versions.to_vec(),
            ..rollout.clone()
        };
        let label = rollout.target.label();
        // Complete only on the template rolled out: after a rollback whose status write was
        // lost, the Deployment completes the previous source, not this one.
        if *template == rollout.target && progress.complete(rollout.generation) {
            next.phase = RolloutPhase::Complete;
            next.finished_at = Some(now_text);
            next.message = if progress.desired == 0 {
                format!(
                    "{label}: rolled out at 0 replicas after {elapsed} s (new pods load it when the pool scales up)"
                )
            } else {
                format!(
                    "{label}: {}/{} pods updated and available after {elapsed} s",
                    progress.available.min(progress.updated),
                    progress.desired
                )
            };
            let note = format!("{} (replacing {})", next.message, model.current.label());
            if model.current != rollout.target {
                model.previous = Some(std::mem::replace(&mut model.current, rollout.target));
            }
            model.failed = None;
            model.rollout = Some(next);
            return RolloutPlan {
                status: Some(model),
                write: None,
                event: Some(RolloutEvent {
                    warning: false,
                    reason: "RolloutComplete",
                    note,
                }),
            };
        }
        let reported = progress.deadline_exceeded && progress.observed(rollout.generation);
        if elapsed > deadline_s || reported {
            let why = if reported && elapsed <= deadline_s {
                format!(
                    "{label}: the Deployment reports ProgressDeadlineExceeded ({}/{} new pods ready after {elapsed} s)",
                    progress.new_ready(),
                    progress.desired
                )
            } else {
                format!(
                    "{label}: {}/{} new pods ready after {elapsed} s",
                    progress.new_ready(),
                    progress.desired
                )
            };
            next.phase = RolloutPhase::RolledBack;
            next.finished_at = Some(now_text);
            next.message = format!("{why}; rolled back to {}", model.current.label());
            let write = (*template != model.current).then(|| model.current.clone());
            model.failed = Some(rollout.target);
            let note = next.message.clone();
            model.rollout = Some(next);
            return RolloutPlan {
                status: Some(model),
                write,
                event: Some(RolloutEvent {
                    warning: true,
                    reason: "RolledBack",
                    note,
                }),
            };
        }
        next.message = format!(
            "{label}: {}/{} new pods ready, {} updated, {elapsed} s of {deadline_s} s",
            progress.new_ready(),
            progress.desired,
            progress.updated
        );
        // Someone wrote the template meanwhile: this rollout's source goes back on.
        let write = (*template != rollout.target).then(|| rollout.target.clone());
        model.rollout = Some(next);
        return RolloutPlan {
            status: Some(model),
            write,
            event: None,
        };
    }

    if model.failed.as_ref() == Some(*spec) {
        // Rolled back: not tried again until spec.model changes. The template stays on the
        // current source.
        let write = (*template != model.current).then(|| model.current.clone());
        if let Some(rollout) = model.rollout.as_mut() {
            rollout.worker_versions = worker_versions.to_vec();
        }
        return RolloutPlan {
            status: Some(model),
            write,
            event: None,
        };
    }
    if **spec != model.current {
        return start(
            model,
            spec,
            &now_text,
            progress,
            worker_versions,
            deadline_s,
            None,
        );
    }
    if let Some(rollout) = model.rollout.as_mut() {
        rollout.worker_versions = worker_versions.to_vec();
    }
    if *template != model.current {
        let note = format!(
            "the worker Deployment's template carried {}; put back {} (spec.model)",
            template.describe(),
            model.current.describe()
        );
        let write = Some(model.current.clone());
        return RolloutPlan {
            status: Some(model),
            write,
            event: Some(RolloutEvent {
                warning: false,
                reason: "ModelSourceRestored",
                note,
            }),
        };
    }
    RolloutPlan {
        status: Some(model),
        write: None,
        event: None,
    }
}

fn new_rollout(
    target: &ModelSource,
    now_text: &str,
    progress: &DeploymentProgress,
    worker_versions: &[WorkerVersion],
) -> RolloutStatus {
    RolloutStatus {
        phase: RolloutPhase::Progressing,
        version: target.version.clone(),
        target: target.clone(),
        message: String::new(),
        started_at: now_text.to_string(),
        finished_at: None,
        generation: Some(progress.generation),
        replicas: progress.replicas,
        updated_replicas: progress.updated,
        ready_replicas: progress.ready,
        available_replicas: progress.available,
        worker_versions: worker_versions.to_vec(),
    }
}

fn start(
    mut model: ModelStatus,
    spec: &ModelSource,
    now_text: &str,
    progress: &DeploymentProgress,
    worker_versions: &[WorkerVersion],
    deadline_s: u64,
    why: Option<String>,
) -> RolloutPlan {
    let mut rollout = new_rollout(spec, now_text, progress, worker_versions);
    rollout.message = format!(
        "{}: started (replacing {}; rolled back unless ready within {deadline_s} s)",
        spec.label(),
        model.current.label()
    );
    let note = format!(
        "rolling out {} (replacing {}){}; rolled back unless ready within {deadline_s} s",
        spec.describe(),
        model.current.describe(),
        why.map(|w| format!(", {w}")).unwrap_or_default()
    );
    model.failed = None;
    model.rollout = Some(rollout);
    RolloutPlan {
        status: Some(model),
        // Written even when the template carries it already (a start whose status write was
        // lost): the patch is then a no-op and its generation is the one to wait for.
        write: Some(spec.clone()),
        event: Some(RolloutEvent {
            warning: false,
            reason: "RolloutStarted",
            note,
        }),
    }
}

/// The worker container: the one named [`WORKER_CONTAINER`], else the only one.
fn worker_container(deployment: &Deployment) -> Result<(usize, &Container), String> {
    let containers = deployment
        .spec
        .template
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    if let Some(found) = containers
        .iter()
        .enumerate()
        .find(|(_, c)| c.name == WORKER_CONTAINER)
    {
        return Ok(found);
    }
    match containers {
        [only] => Ok((0, only)),
        _ => Err(format!(
            "deployment {} has no container named {WORKER_CONTAINER} to carry the model source",
            deployment.name_any()
        )),
    }
}

const SOURCE_ENV: [&str; 3] = [MODEL_URI_ENV, MODEL_SHA256_ENV, MODEL_VERSION_ENV];

fn source_fields(source: &ModelSource) -> [Option<&String>; 3] {
    [
        source.uri.as_ref(),
        source.sha256.as_ref(),
        source.version.as_ref(),
    ]
}

/// The source the Deployment's worker container carries in its environment.
pub fn template_source(deployment: &Deployment) -> Result<ModelSource, String> {
    let (_, container) = worker_container(deployment)?;
    let env = container.env.as_deref().unwrap_or_default();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            // A value from elsewhere (valueFrom) is not one the pool wrote: it reads as "".
            .map(|e| e.value.clone().unwrap_or_default())
    };
    Ok(ModelSource {
        uri: value(MODEL_URI_ENV),
        sha256: value(MODEL_SHA256_ENV),
        version: value(MODEL_VERSION_ENV),
    })
}

fn is_zero(value: &IntOrString) -> bool {
    match value {
        IntOrString::Int(n) => *n == 0,
        IntOrString::String(s) => s.trim_end_matches('%').trim().parse::<f64>() == Ok(0.0),
    }
}

/// The JSON Patch (RFC 6902) that puts `to` on the worker container's environment, each
/// position guarded by a `test` of the name found there when the Deployment was read, and makes
/// the strategy a rolling update that never takes a ready pod away before its replacement is
/// ready (`maxUnavailable: 0`, `maxSurge` at least 1).
pub fn template_patch(deployment: &Deployment, to: &ModelSource) -> Result<Vec<Value>, String> {
    let (index, container) = worker_container(deployment)?;
    let base = format!("/spec/template/spec/containers/{index}");
    let mut ops =
        vec![json!({"op": "test", "path": format!("{base}/name"), "value": container.name})];
    let env = container.env.as_deref();
    let mut removals = Vec::new();
    let mut additions = Vec::new();
    for (name, wanted) in SOURCE_ENV.into_iter().zip(source_fields(to)) {
        let found = env.and_then(|env| env.iter().position(|e| e.name == name));
        match (found, wanted) {
            (Some(at), Some(value)) => {
                let entry = &env.unwrap_or_default()[at];
                if entry.value.as_ref() != Some(value) || entry.value_from.is_some() {
                    ops.push(json!({"op": "test", "path": format!("{base}/env/{at}/name"), "value": name}));
                    ops.push(json!({"op": "replace", "path": format!("{base}/env/{at}"), "value": {"name": name, "value": value}}));
                }
            }
            (Some(at), None) => removals.push((at, name)),
            (None, Some(value)) => additions.push(json!({"name": name, "value": value})),
            (None, None) => {}
        }
    }
    // Highest index first: a removal shifts only what comes after it.
    removals.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (at, name) in removals {
        ops.push(json!({"op": "test", "path": format!("{base}/env/{at}/name"), "value": name}));
        ops.push(json!({"op": "remove", "path": format!("{base}/env/{at}")}));
    }
    if !additions.is_empty() {
        if env.is_none() {
            ops.push(json!({"op": "add", "path": format!("{base}/env"), "value": additions}));
        } else {
            for entry in additions {
                ops.push(json!({"op": "add", "path": format!("{base}/env/-"), "value": entry}));
            }
        }
    }
    let strategy = deployment.spec.strategy.as_ref();
    let rolling = strategy
        .filter(|s| s.type_.as_deref().unwrap_or("RollingUpdate") == "RollingUpdate")
        .and_then(|s| s.rolling_update.as_ref());
    let unavailable_zero = rolling
        .and_then(|r| r.max_unavailable.as_ref())
        .is_some_and(is_zero);
    let surge = rolling
        .and_then(|r| r.max_surge.clone())
        .filter(|s| !is_zero(s));
    if !unavailable_zero || surge.is_none() {
        ops.push(json!({"op": "add", "path": "/spec/strategy", "value": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": surge.unwrap_or(IntOrString::Int(1)), "maxUnavailable": 0},
        }}));
    }
    Ok(ops)
}

/// The CRD as YAML (what `manifests/base/crd-inferencepool.yaml` must hold).
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = InferencePool::crd();
    format!(
        "# Generated from autoscaler/src/kubernetes.rs by `ember-autoscaler --print-crd`; a test fails if it drifts.\n{}",
        serde_yaml::to_string(&crd).unwrap_or_default()
    )
}

/// Errors of the Kubernetes backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("deployment {0} has no label selector")]
    NoSelector(String),
    #[error("deployment {0}: {1}")]
    Template(String, String),
}

/// Leader election through a `coordination.k8s.io/v1` Lease.
#[derive(Debug, Clone)]
pub struct LeaderLease {
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaderLease {
    /// Takes or renews the lease; false while another holder's lease is live.
    pub async fn acquire_or_renew(&self, client: &Client, namespace: &str) -> Result<bool, Error> {
        let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
        let now = MicroTime(Timestamp::now());
        let seconds = self.duration.as_secs().max(1) as i32;
        // A 404 means no lease yet (matched on the code: not every server says "NotFound").
        let existing = match leases.get(&self.name).await {
            Ok(lease) => Some(lease),
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(error) => return Err(error.into()),
        };
        let Some(mut lease) = existing else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match leases.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error.into()),
            };
        };
        let resource_version = lease.metadata.resource_version.clone();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let mut patch = json!({
            "metadata": {"resourceVersion": resource_version},
            "spec": {"leaseDurationSeconds": seconds, "renewTime": now},
        });
        if !mine {
            let expires = spec.renew_time.as_ref().map(|t| {
                t.0 + Duration::from_secs(
                    spec.lease_duration_seconds.unwrap_or(seconds).max(0) as u64
                )
            });
            if expires.is_some_and(|at| at > now.0) {
                return Ok(false);
            }
            patch["spec"]["holderIdentity"] = json!(self.identity);
            patch["spec"]["acquireTime"] = json!(now);
            patch["spec"]["leaseTransitions"] = json!(spec.lease_transitions.unwrap_or(0) + 1);
        }
        // resourceVersion in the patch makes it a compare-and-swap: if a rival wrote since our
        // read, the server answers 409 and we are not the leader.
        match leases
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error.into()),
        }
    }
}

/// The `kubernetes` backend: the `InferencePool`s of `--namespace`, acted on by the replica that
/// holds the Lease only.
pub struct KubernetesBackend {
    client: Client,
    lease: LeaderLease,
    /// Whether this replica led at the last tick, to log changes only.
    leading: bool,
}

impl std::fmt::Debug for KubernetesBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesBackend")
            .field("lease", &self.lease)
            .field("leading", &self.leading)
            .finish_non_exhaustive()
    }
}

impl KubernetesBackend {
    /// A client from the kubeconfig or the in-cluster configuration, and this replica's Lease
    /// identity (`--identity`, else the host name).
    pub async fn connect(config: &Config) -> Result<Self, crate::Error> {
        // With several rustls providers in one build (kube's ring, reqwest's aws-lc-rs in the
        // workspace), rustls cannot pick one by itself: choose ring for this process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_default()
            .await
            .map_err(|e| crate::Error::Kubernetes(format!("no cluster configuration: {e}")))?;
        let identity = config.identity.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| format!("ember-autoscaler-{}", uuid::Uuid::new_v4().simple()))
        });
        let lease = LeaderLease {
            name: config.lease_name.clone(),
            identity,
            duration: config.lease_duration,
        };
        Ok(Self {
            client,
            lease,
            leading: false,
        })
    }

    /// Takes or renews the Lease; a failed check means not acting this tick.
    async fn leads(&mut self, namespace: &str) -> bool {
        let leader = match self.lease.acquire_or_renew(&self.client, namespace).await {
            Ok(leader) => leader,
            Err(error) => {
                tracing::warn!(%error, "lease check failed; not acting this tick");
                false
            }
        };
        if leader != self.leading {
            tracing::info!(leader, identity = %self.lease.identity, "leadership changed");
            self.leading = leader;
        }
        leader
    }
}

impl Backend for KubernetesBackend {
    type Spec = InferencePool;
    type Error = Error;

    async fn observe(&mut self, ctx: &Context) -> Vec<Target<InferencePool>> {
        let namespace = &ctx.config.namespace;
        if !self.leads(namespace).await {
            return Vec::new();
        }
        let pools: Api<InferencePool> = Api::namespaced(self.client.clone(), namespace);
        match pools.list(&ListParams::default()).await {
            Ok(list) => list
                .into_iter()
                .map(|pool| Target {
                    key: pool.name_any(),
                    model: pool.spec.model.name.clone(),
                    versions: served_versions(&pool),
                    spec: pool,
                })
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot list InferencePools");
                Vec::new()
            }
        }
    }

    async fn scale(
        &mut self,
        ctx: &Context,
        target: &Target<InferencePool>,
        observed: &Observed,
        policy: &mut PolicyState,
    ) -> Result<Scaled, Error> {
        let Observed {
            ready,
            arrival_rate,
            backlog_growing,
            view,
        } = observed;
        let signals_in = (*ready, *arrival_rate, *backlog_growing);
        let now = ctx.started.elapsed();
        let decision = reconcile(&self.client, &target.spec, signals_in, view, policy, now).await?;
        // The replica counts stay inside `reconcile` (they are in the pool's status); the
        // metrics get what the loop measured.
        let signals = Signals {
            ready: *ready,
            in_flight: view.in_flight,
            arrival_rate: *arrival_rate,
            ..Signals::default()
        };
        Ok(Scaled { signals, decision })
    }

    /// Nothing to stop: the Deployments keep their replicas and the Lease runs out.
    async fn stop(&mut self) {}
}

/// Deletion costs for the Deployment's pods: still-loading ones (no heartbeat) cheapest, idle
/// ones next, busy ones by how much they hold.
pub fn deletion_cost(pod: &str, view: &ModelView) -> i64 {
    match view.workers.iter().find(|(worker, _)| worker == pod) {
        None => -200,
        Some((_, 0)) => -100,
        Some((_, in_flight)) => (*in_flight as i64).saturating_mul(100),
    }
}

/// One pool, one tick: read the Deployment, decide, carry it out, write status.
pub async fn reconcile(
    client: &Client,
    pool: &InferencePool,
    signals_in: (u64, f64, bool),
    view: &ModelView,
    state: &mut PolicyState,
    now: Duration,
) -> Result<Decision, Error> {
    let (ready_jobs, arrival_rate, backlog_growing) = signals_in;
    let namespace = pool.namespace().unwrap_or_else(|| "default".into());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    let deployment = deployments.get(&pool.spec.deployment).await?;
    let spec_replicas = deployment.spec.replicas.unwrap_or(0).max(0) as u32;
    let ready_replicas = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
        .max(0) as u32;
    let ready = ready_replicas.min(spec_replicas);
    let signals = Signals {
        ready: ready_jobs,
        in_flight: view.in_flight,
        arrival_rate,
        service_rate_per_replica: view.service_rate,
        replicas_ready: ready,
        replicas_starting: spec_replicas - ready,
        gpu_utilisation: view.gpu_utilisation,
        backlog_growing,
    };
    // A rollout step that fails (a rejected patch, an Event not posted) is tried again at the
    // next tick, from the status as it was: scaling goes on meanwhile.
    let model = match roll(client, pool, &namespace, &deployment, view).await {
        Ok(model) => model,
        Err(error) => {
            tracing::warn!(pool = %pool.name_any(), %error, "rollout step failed; scaling goes on");
            pool.status.as_ref().and_then(|s| s.model.clone())
        }
    };
    let decision = policy::decide(&pool.spec.settings(), state, &signals, now);
    let changed = decision.replicas != spec_replicas;
    if decision.replicas < spec_replicas {
        mark_deletion_costs(client, &namespace, &deployment, view).await?;
    }
    let reasons: Vec<&str> = decision.reasons.iter().map(|r| r.as_str()).collect();
    let reason = reasons.first().copied().unwrap_or("steady");
    let now_text = Timestamp::now().to_string();
    if changed {
        deployments
            .patch_scale(
                &pool.spec.deployment,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": decision.replicas}})),
            )
            .await?;
        let note = format!(
            "{} -> {} replicas ({}): ready jobs {ready_jobs}, in flight {}, arrivals {arrival_rate:.1}/s, service {}/s per replica",
            spec_replicas,
            decision.replicas,
            reasons.join(", "),
            view.in_flight,
            view.service_rate
                .map_or("unmeasured".to_string(), |r| format!("{r:.1}")),
        );
        let scaled = if decision.replicas > spec_replicas {
            "ScaledUp"
        } else {
            "ScaledDown"
        };
        record_event(client, pool, &namespace, "Scale", scaled, false, &note).await?;
    }
    let mut status = pool_status(&signals, &decision, reason, now_text);
    status.model = model;
    let pools: Api<InferencePool> = Api::namespaced(client.clone(), &namespace);
    pools
        .patch_status(
            &pool.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
    Ok(decision)
}

/// The pool's status after a decision: what was seen, what was decided and why.
fn pool_status(
    signals: &Signals,
    decision: &Decision,
    reason: &str,
    now_text: String,
) -> InferencePoolStatus {
    let spec_replicas = signals.replicas_ready + signals.replicas_starting;
    InferencePoolStatus {
        desired_replicas: decision.replicas,
        ready_replicas: signals.replicas_ready,
        starting_replicas: signals.replicas_starting,
        backlog: signals.backlog(),
        ready_jobs: signals.ready,
        in_flight: signals.in_flight,
        arrival_rate: signals.arrival_rate,
        service_rate: signals.service_rate_per_replica,
        gpu_utilisation: signals.gpu_utilisation,
        last_decision: Some(format!("{spec_replicas} -> {}", decision.replicas)),
        last_reason: Some(reason.to_string()),
        last_decision_time: Some(now_text.clone()),
        model: None,
        conditions: vec![PoolCondition {
            type_: "Scaling".into(),
            status: "True".into(),
            reason: reason.to_string(),
            message: format!(
                "recommended {}, decided {}",
                decision.recommended, decision.replicas
            ),
            last_transition_time: now_text,
        }],
    }
}

/// One pool's model source this tick: [`plan_rollout`] on what was read, carried out (the
/// template patch, then the Event). Returns the pool's `status.model` to write.
async fn roll(
    client: &Client,
    pool: &InferencePool,
    namespace: &str,
    deployment: &Deployment,
    view: &ModelView,
) -> Result<Option<ModelStatus>, Error> {
    let spec = pool.spec.model.source();
    let template = template_source(deployment);
    let progress = DeploymentProgress::of(deployment);
    let worker_versions = worker_versions(view);
    let plan = plan_rollout(&RolloutInput {
        spec: &spec,
        deadline: Duration::from_secs(pool.spec.rollout.progress_deadline_seconds),
        status: pool.status.as_ref().and_then(|s| s.model.as_ref()),
        template: &template,
        progress: &progress,
        worker_versions: &worker_versions,
        now: Timestamp::now(),
    });
    let RolloutPlan {
        mut status,
        write,
        event,
    } = plan;
    if let Some(source) = write {
        let name = deployment.name_any();
        let ops = template_patch(deployment, &source)
            .map_err(|why| Error::Template(name.clone(), why))?;
        let patched = patch_deployment_json(client, namespace, &name, &ops).await?;
        // What to wait for: the generation with this template (a real API server bumps it on
        // every spec change).
        if let Some(rollout) = status
            .as_mut()
            .and_then(|m| m.rollout.as_mut())
            .filter(|r| r.phase == RolloutPhase::Progressing && r.target == source)
        {
            rollout.generation = patched.metadata.generation.or(rollout.generation);
        }
    }
    if let Some(event) = event {
        if event.warning {
            tracing::warn!(pool = %pool.name_any(), reason = event.reason, note = %event.note, "rollout");
        } else {
            tracing::info!(pool = %pool.name_any(), reason = event.reason, note = %event.note, "rollout");
        }
        record_event(
            client,
            pool,
            namespace,
            "Rollout",
            event.reason,
            event.warning,
            &event.note,
        )
        .await?;
    }
    Ok(status)
}

/// Ready workers per model version, from their heartbeats (`model_info.version`).
fn worker_versions(view: &ModelView) -> Vec<WorkerVersion> {
    view.ready_by_version
        .iter()
        .map(|(version, ready)| WorkerVersion {
            version: version.clone(),
            ready: *ready,
        })
        .collect()
}

/// A JSON Patch (`application/json-patch+json`) of a Deployment. kube's `Patch::Json` needs the
/// `json-patch` crate; the request is built as a merge patch (same path, body as given) and its
/// content type changed.
async fn patch_deployment_json(
    client: &Client,
    namespace: &str,
    name: &str,
    ops: &[Value],
) -> Result<Deployment, Error> {
    let mut request =
        kube::core::Request::new(format!("/apis/apps/v1/namespaces/{namespace}/deployments"))
            .patch(name, &PatchParams::default(), &Patch::Merge(ops))
            .map_err(kube::Error::BuildRequest)?;
    let content_type = "application/json-patch+json"
        .parse()
        .map_err(|_| Error::Template(name.to_string(), "bad content type".into()))?;
    request.headers_mut().insert("content-type", content_type);
    Ok(client.request::<Deployment>(request).await?)
}

async fn mark_deletion_costs(
    client: &Client,
    namespace: &str,
    deployment: &Deployment,
    view: &ModelView,
) -> Result<(), Error> {
    let labels: BTreeMap<String, String> = deployment
        .spec
        .selector
        .match_labels
        .clone()
        .ok_or_else(|| Error::NoSelector(deployment.name_any()))?;
    let selector: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&selector.join(",")))
        .await?;
    for pod in list {
        let name = pod.name_any();
        let cost = deletion_cost(&name, view).to_string();
        if pod.annotations().get(DELETION_COST) == Some(&cost) {
            continue;
        }
        pods.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {DELETION_COST: cost}}})),
        )
        .await?;
    }
    Ok(())
}

/// An `events.k8s.io/v1` Event about the pool.
async fn record_event(
    client: &Client,
    pool: &InferencePool,
    namespace: &str,
    action: &str,
    reason: &str,
    warning: bool,
    note: &str,
) -> Result<(), Error> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let regarding = ObjectReference {
        api_version: Some(InferencePool::api_version(&()).to_string()),
        kind: Some(InferencePool::kind(&()).to_string()),
        name: Some(pool.name_any()),
        namespace: Some(namespace.to_string()),
        uid: pool.uid(),
        ..ObjectReference::default()
    };
    let now = Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            // Named as client-go and kube-runtime name theirs (`<object>.<hex nanoseconds>`):
            // unique per Event without a server-side generateName.
            name: Some(format!("{}.{:x}", pool.name_any(), now.as_nanosecond())),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(action.into()),
        reason: Some(reason.into()),
        note: Some(note.chars().take(1024).collect()),
        regarding: Some(regarding),
        reporting_controller: Some("ember.dev/autoscaler".into()),
        reporting_instance: Some(
            std::env::var("POD_NAME").unwrap_or_else(|_| "ember-autoscaler".into()),
        ),
        type_: Some(if warning { "Warning" } else { "Normal" }.into()),
        ..Event::default()
    };
    events.create(&PostParams::default(), &event).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn v(version: &str) -> ModelSource {
        ModelSource {
            uri: Some(format!("s3://models/ssdlite-person/{version}.tar.gz")),
            sha256: None,
            version: Some(version.into()),
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn progress(
        generation: i64,
        observed: i64,
        desired: i32,
        replicas: i32,
        updated: i32,
        ready: i32,
    ) -> DeploymentProgress {
        DeploymentProgress {
            generation,
            observed_generation: observed,
            desired,
            replicas,
            updated,
            ready,
            available: ready,
            deadline_exceeded: false,
        }
    }

    fn rolling(target: ModelSource, generation: i64) -> RolloutStatus {
        RolloutStatus {
            phase: RolloutPhase::Progressing,
            version: target.version.clone(),
            target,
            message: String::new(),
            started_at: at(0).to_string(),
            finished_at: None,
            generation: Some(generation),
            replicas: 0,
            updated_replicas: 0,
            ready_replicas: 0,
            available_replicas: 0,
            worker_versions: Vec::new(),
        }
    }

    fn status(current: ModelSource, rollout: Option<RolloutStatus>) -> ModelStatus {
        ModelStatus {
            current,
            previous: None,
            failed: None,
            rollout,
        }
    }

    struct Case {
        name: &'static str,
        spec: ModelSource,
        status: Option<ModelStatus>,
        template: Result<ModelSource, String>,
        progress: DeploymentProgress,
        now: i64,
        // Expected:
        write: Option<ModelSource>,
        event: Option<(&'static str, bool)>,
        phase: Option<RolloutPhase>,
        current: Option<ModelSource>,
        failed: Option<ModelSource>,
        message: &'static str,
    }

    fn case(
        name: &'static str,
        spec: ModelSource,
        status: Option<ModelStatus>,
        template: ModelSource,
    ) -> Case {
        Case {
            name,
            spec,
            status,
            template: Ok(template),
            progress: progress(1, 1, 2, 2, 2, 2),
            now: 30,
            write: None,
            event: None,
            phase: None,
            current: None,
            failed: None,
            message: "",
        }
    }

    #[test]
    fn the_rollout_state_machine() {
        let rolled_back = ModelStatus {
            failed: Some(v("3")),
            rollout: Some(RolloutStatus {
                phase: RolloutPhase::RolledBack,
                ..rolling(v("3"), 4)
            }),
            ..status(v("2"), None)
        };
        let complete = status(
            v("2"),
            Some(RolloutStatus {
                phase: RolloutPhase::Complete,
                ..rolling(v("2"), 3)
            }),
        );
        let cases = vec![
            Case {
                current: None,
                ..case(
                    "a pool that names no source is left alone",
                    ModelSource::default(),
                    None,
                    v("1"),
                )
            },
            Case {
                current: Some(v("1")),
                ..case(
                    "first sight, the template carries the spec: adopted, nothing rolls",
                    v("1"),
                    None,
                    v("1"),
                )
            },
            Case {
                write: Some(v("1")),
                event: Some(("RolloutStarted", false)),
                phase: Some(RolloutPhase::Progressing),
                current: Some(ModelSource::default()),
                message: "v1: started (replacing the image's model; rolled back unless ready within 600 s)",
                ..case(
                    "first sight, the template carries the image's model: a rollout starts",
                    v("1"),
                    None,
                    ModelSource::default(),
                )
            },
            Case {
                write: Some(v("3")),
                event: Some(("RolloutStarted", false)),
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                ..case(
                    "a new spec starts a rollout from the current source",
                    v("3"),
                    Some(complete.clone()),
                    v("2"),
                )
            },
            Case {
                progress: progress(4, 3, 2, 2, 2, 2),
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                message: "v3: 2/2 new pods ready, 2 updated, 30 s of 600 s",
                ..case(
                    "a status from before the new template is not completion",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                progress: progress(4, 4, 2, 3, 1, 3),
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                message: "v3: 1/2 new pods ready, 1 updated, 30 s of 600 s",
                ..case(
                    "half way: one new pod ready beside two old",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                progress: progress(4, 4, 2, 2, 2, 2),
                event: Some(("RolloutComplete", false)),
                phase: Some(RolloutPhase::Complete),
                current: Some(v("3")),
                message: "v3: 2/2 pods updated and available after 30 s",
                ..case(
                    "every replica new and available: complete",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                progress: progress(4, 4, 0, 0, 0, 0),
                event: Some(("RolloutComplete", false)),
                phase: Some(RolloutPhase::Complete),
                current: Some(v("3")),
                message: "v3: rolled out at 0 replicas after 30 s (new pods load it when the pool scales up)",
                ..case(
                    "a pool at zero completes at once",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                progress: progress(4, 4, 2, 4, 2, 2),
                now: 601,
                write: Some(v("2")),
                event: Some(("RolledBack", true)),
                phase: Some(RolloutPhase::RolledBack),
                current: Some(v("2")),
                failed: Some(v("3")),
                message: "v3: 0/2 new pods ready after 601 s; rolled back to v2",
                ..case(
                    "not ready by the deadline: rolled back",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                progress: DeploymentProgress {
                    deadline_exceeded: true,
                    ..progress(4, 4, 2, 3, 1, 2)
                },
                now: 100,
                write: Some(v("2")),
                event: Some(("RolledBack", true)),
                phase: Some(RolloutPhase::RolledBack),
                current: Some(v("2")),
                failed: Some(v("3")),
                message: "v3: the Deployment reports ProgressDeadlineExceeded (0/2 new pods ready after 100 s); rolled back to v2",
                ..case(
                    "the Deployment's own deadline: rolled back early",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                progress: DeploymentProgress {
                    deadline_exceeded: true,
                    ..progress(4, 3, 2, 2, 2, 2)
                },
                now: 100,
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                ..case(
                    "a deadline exceeded by an older template is not this rollout's",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                progress: progress(5, 5, 2, 2, 2, 2),
                now: 700,
                event: Some(("RolledBack", true)),
                phase: Some(RolloutPhase::RolledBack),
                current: Some(v("2")),
                failed: Some(v("3")),
                ..case(
                    "a rollback whose status write was lost: the template is back already, no second write",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("2"),
                )
            },
            Case {
                now: 50,
                write: Some(v("3")),
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                ..case(
                    "someone wrote the template during the rollout: its source goes back on",
                    v("3"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("1"),
                )
            },
            Case {
                write: Some(v("4")),
                event: Some(("RolloutStarted", false)),
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                ..case(
                    "a spec changed during a rollout supersedes it, from the last good source",
                    v("4"),
                    Some(status(v("2"), Some(rolling(v("3"), 4)))),
                    v("3"),
                )
            },
            Case {
                now: 5000,
                phase: Some(RolloutPhase::RolledBack),
                current: Some(v("2")),
                failed: Some(v("3")),
                ..case(
                    "a rolled-back spec is not tried again",
                    v("3"),
                    Some(rolled_back.clone()),
                    v("2"),
                )
            },
            Case {
                write: Some(v("4")),
                event: Some(("RolloutStarted", false)),
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                failed: None,
                ..case(
                    "a new spec after a rollback rolls out",
                    v("4"),
                    Some(rolled_back),
                    v("2"),
                )
            },
            Case {
                write: Some(v("2")),
                event: Some(("ModelSourceRestored", false)),
                phase: Some(RolloutPhase::Complete),
                current: Some(v("2")),
                ..case(
                    "a template changed behind the pool's back is put back",
                    v("2"),
                    Some(complete.clone()),
                    v("1"),
                )
            },
            Case {
                write: Some(ModelSource::default()),
                event: Some(("RolloutStarted", false)),
                phase: Some(RolloutPhase::Progressing),
                current: Some(v("2")),
                ..case(
                    "a spec that drops its source rolls back to the image's model",
                    ModelSource::default(),
                    Some(complete.clone()),
                    v("2"),
                )
            },
            Case {
                template: Err(
                    "deployment w has no container named worker to carry the model source".into(),
                ),
                event: Some(("RolloutFailed", true)),
                phase: Some(RolloutPhase::Failed),
                current: Some(ModelSource::default()),
                message: "deployment w has no container named worker to carry the model source",
                ..case(
                    "a Deployment without a worker container cannot roll",
                    v("1"),
                    None,
                    ModelSource::default(),
                )
            },
        ];
        for c in cases {
            let plan = plan_rollout(&RolloutInput {
                spec: &c.spec,
                deadline: Duration::from_secs(600),
                status: c.status.as_ref(),
                template: &c.template,
                progress: &c.progress,
                worker_versions: &[],
                now: at(c.now),
            });
            assert_eq!(plan.write, c.write, "{}: write", c.name);
            assert_eq!(
                plan.event.as_ref().map(|e| (e.reason, e.warning)),
                c.event,
                "{}: event",
                c.name
            );
            let model = plan.status.as_ref();
            assert_eq!(
                model.map(|m| m.current.clone()),
                c.current,
                "{}: current",
                c.name
            );
            assert_eq!(
                model.and_then(|m| m.rollout.as_ref()).map(|r| r.phase),
                c.phase,
                "{}: phase",
                c.name
            );
            if c.current.is_some() {
                assert_eq!(
                    model.and_then(|m| m.failed.clone()),
                    c.failed,
                    "{}: failed",
                    c.name
                );
            }
            if !c.message.is_empty() {
                assert_eq!(
                    model.unwrap().rollout.as_ref().unwrap().message,
                    c.message,
                    "{}",
                    c.name
                );
            }
        }
    }

    #[test]
    fn completion_keeps_what_it_replaced_and_a_repeated_failure_posts_once() {
        let plan = plan_rollout(&RolloutInput {
            spec: &v("3"),
            deadline: Duration::from_secs(600),
            status: Some(&status(v("2"), Some(rolling(v("3"), 4)))),
            template: &Ok(v("3")),
            progress: &progress(4, 4, 1, 1, 1, 1),
            worker_versions: &[WorkerVersion {
                version: "3".into(),
                ready: 1,
            }],
            now: at(12),
        });
        let model = plan.status.unwrap();
        assert_eq!(model.previous, Some(v("2")));
        let rollout = model.rollout.unwrap();
        assert_eq!(rollout.finished_at, Some(at(12).to_string()));
        assert_eq!(rollout.worker_versions[0].ready, 1);
        assert_eq!(
            plan.event.unwrap().note,
            "v3: 1/1 pods updated and available after 12 s (replacing v2)"
        );

        let why: Result<ModelSource, String> = Err("no worker container".into());
        let spec = v("3");
        let nothing = DeploymentProgress::default();
        let input = |status| RolloutInput {
            spec: &spec,
            deadline: Duration::from_secs(600),
            status,
            template: &why,
            progress: &nothing,
            worker_versions: &[],
            now: at(0),
        };
        let first = plan_rollout(&input(None));
        assert!(first.event.is_some());
        let again = plan_rollout(&input(first.status.as_ref()));
        assert_eq!(
            again.event, None,
            "the same failure is not posted every tick"
        );
        assert_eq!(again.status, first.status, "nor its status rewritten");
    }

    fn pool(model: Value, status: Option<Value>) -> InferencePool {
        let mut value = json!({
            "apiVersion": "ember.dev/v1alpha1", "kind": "InferencePool",
            "metadata": {"name": "ssd", "namespace": "ember"},
            "spec": {"model": model, "deployment": "w", "maxReplicas": 2},
        });
        if let Some(status) = status {
            value["status"] = json!({"model": status});
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn the_versions_a_pool_serves() {
        let src = |version: &str| json!({"uri": null, "sha256": null, "version": version});
        let rollout = |phase: &str, version: &str| json!({"phase": phase, "version": version, "target": src(version), "message": "", "startedAt": at(0).to_string()});
        let cases = [
            ("no source named", json!({"name": "m"}), None, vec![]),
            (
                "a uri without a version",
                json!({"name": "m", "uri": "s3://b/k"}),
                None,
                vec![],
            ),
            (
                "not rolled yet: the spec's",
                json!({"name": "m", "version": "1"}),
                None,
                vec!["1"],
            ),
            (
                "steady",
                json!({"name": "m", "version": "2"}),
                Some(json!({"current": src("2"), "rollout": rollout("Complete", "2")})),
                vec!["2"],
            ),
            (
                "during a rollout, old and new",
                json!({"name": "m", "version": "3"}),
                Some(json!({"current": src("2"), "rollout": rollout("Progressing", "3")})),
                vec!["2", "3"],
            ),
            (
                "after a rollback, the previous only",
                json!({"name": "m", "version": "3"}),
                Some(
                    json!({"current": src("2"), "failed": src("3"), "rollout": rollout("RolledBack", "3")}),
                ),
                vec!["2"],
            ),
            (
                "a new artifact under the same version: once",
                json!({"name": "m", "version": "2", "uri": "s3://b/other"}),
                Some(json!({"current": src("2"), "rollout": rollout("Progressing", "2")})),
                vec!["2"],
            ),
        ];
        for (name, model, status, want) in cases {
            assert_eq!(served_versions(&pool(model, status)), want, "{name}");
        }
    }

    fn deployment(containers: Value, strategy: Option<Value>) -> Deployment {
        let mut value = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "w", "namespace": "ember", "generation": 7},
            "spec": {"selector": {"matchLabels": {"app": "w"}},
                     "template": {"metadata": {"labels": {"app": "w"}}, "spec": {"containers": containers}}},
        });
        if let Some(strategy) = strategy {
            value["spec"]["strategy"] = strategy;
        }
        serde_json::from_value(value).unwrap()
    }

    fn safe() -> Option<Value> {
        Some(
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        )
    }

    /// Applies RFC 6902 `test`, `add`, `replace` and `remove` as an API server does.
    fn apply(mut doc: Value, ops: &[Value]) -> Value {
        for op in ops {
            let path = op["path"].as_str().unwrap();
            let (parent, last) = path.rsplit_once('/').unwrap();
            let target = doc
                .pointer_mut(parent)
                .unwrap_or_else(|| panic!("no {parent}"));
            match op["op"].as_str().unwrap() {
                "test" => assert_eq!(target[last], op["value"], "test {path}"),
                "add" if last == "-" => target.as_array_mut().unwrap().push(op["value"].clone()),
                "add" | "replace" if target.is_object() => target[last] = op["value"].clone(),
                "replace" => target[last.parse::<usize>().unwrap()] = op["value"].clone(),
                "remove" => {
                    target.as_array_mut().unwrap().remove(last.parse().unwrap());
                }
                other => panic!("{other}"),
            }
        }
        doc
    }

    #[test]
    fn the_template_patch_writes_exactly_the_source_and_a_safe_strategy() {
        let env = |pairs: &[(&str, &str)]| -> Value {
            pairs
                .iter()
                .map(|(n, v)| json!({"name": n, "value": v}))
                .collect()
        };
        let worker = |env: Value| json!({"name": "worker", "image": "w", "env": env});
        let cases = [
            (
                "no env at all: one add",
                deployment(json!([{"name": "worker", "image": "w"}]), safe()),
                v("2"),
                2,
            ),
            (
                "the source already there: only the guard",
                deployment(
                    json!([worker(env(&[
                        (MODEL_URI_ENV, "s3://models/ssdlite-person/2.tar.gz"),
                        (MODEL_VERSION_ENV, "2")
                    ]))]),
                    safe(),
                ),
                v("2"),
                1,
            ),
            (
                "a changed version, a dropped uri, other variables kept",
                deployment(
                    json!([worker(env(&[
                        (MODEL_URI_ENV, "s3://x"),
                        ("EMBER_WORKER_ID", "id"),
                        (MODEL_VERSION_ENV, "1")
                    ]))]),
                    safe(),
                ),
                ModelSource {
                    version: Some("2".into()),
                    sha256: Some("ab".repeat(32)),
                    uri: None,
                },
                // guard; version test + replace; uri test + remove; sha256 add
                6,
            ),
            (
                "a sidecar first, the worker found by name; maxUnavailable 25% made 0, maxSurge kept",
                deployment(
                    json!([{"name": "sidecar", "image": "s"}, worker(env(&[("A", "b")]))]),
                    Some(
                        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "50%", "maxUnavailable": "25%"}}),
                    ),
                ),
                v("2"),
                // guard, uri add, version add, strategy
                4,
            ),
            (
                "Recreate becomes a surging rolling update",
                deployment(
                    json!([worker(json!([]))]),
                    Some(json!({"type": "Recreate"})),
                ),
                v("2"),
                4,
            ),
            (
                "no strategy (the default 25%/25%) becomes maxUnavailable 0",
                deployment(json!([worker(json!([]))]), None),
                ModelSource::default(),
                2,
            ),
        ];
        for (name, dep, to, count) in cases {
            let ops = template_patch(&dep, &to).unwrap();
            assert_eq!(ops.len(), count, "{name}: {ops:#?}");
            let after: Deployment =
                serde_json::from_value(apply(serde_json::to_value(&dep).unwrap(), &ops)).unwrap();
            assert_eq!(template_source(&after), Ok(to.clone()), "{name}");
            let strategy = after.spec.strategy.clone().unwrap();
            assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"), "{name}");
            let rolling = strategy.rolling_update.unwrap();
            assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)), "{name}");
            assert!(!is_zero(&rolling.max_surge.unwrap()), "{name}");
            // Every variable that is not the source is kept.
            let before = template_env_names(&dep);
            let kept = template_env_names(&after);
            for other in before.iter().filter(|n| !SOURCE_ENV.contains(&n.as_str())) {
                assert!(kept.contains(other), "{name}: {other} lost");
            }
        }
        let surge = deployment(
            json!([worker(json!([]))]),
            Some(
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "50%", "maxUnavailable": "25%"}}),
            ),
        );
        let ops = template_patch(&surge, &v("1")).unwrap();
        assert_eq!(
            ops.last().unwrap()["value"]["rollingUpdate"],
            json!({"maxSurge": "50%", "maxUnavailable": 0})
        );

        let two = deployment(
            json!([{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]),
            safe(),
        );
        assert!(
            template_patch(&two, &v("1"))
                .unwrap_err()
                .contains("no container named worker")
        );
        assert!(template_source(&two).is_err());
    }

    fn template_env_names(dep: &Deployment) -> Vec<String> {
        let (_, container) = worker_container(dep).unwrap();
        container
            .env
            .iter()
            .flatten()
            .map(|e| e.name.clone())
            .collect()
    }

    #[test]
    fn the_deployment_status_read_as_progress() {
        let dep: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "w", "generation": 5},
            "spec": {"replicas": 2, "selector": {}, "template": {}},
            "status": {"observedGeneration": 5, "replicas": 3, "updatedReplicas": 1, "readyReplicas": 2,
                       "availableReplicas": 2, "conditions": [
                           {"type": "Available", "status": "True"},
                           {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}
        }))
        .unwrap();
        let p = DeploymentProgress::of(&dep);
        assert_eq!(
            p,
            DeploymentProgress {
                generation: 5,
                observed_generation: 5,
                desired: 2,
                replicas: 3,
                updated: 1,
                ready: 2,
                available: 2,
                deadline_exceeded: true,
            }
        );
        assert_eq!(p.new_ready(), 0, "two old pods ready, the new one not");
        assert!(!p.complete(Some(5)));
        assert!(progress(5, 5, 2, 2, 2, 2).complete(Some(5)));
        assert!(
            !progress(5, 5, 2, 2, 2, 2).complete(Some(6)),
            "our patch's generation not seen yet"
        );
        assert!(
            !progress(5, 5, 2, 3, 2, 3).complete(Some(5)),
            "an old pod is left"
        );
    }

    #[test]
    fn uris_in_events_lose_their_credentials_and_query() {
        for (uri, want) in [
            ("s3://bucket/m.tar.gz", "s3://bucket/m.tar.gz"),
            (
                "https://u:secret@host/m.tar.gz?X-Amz-Signature=abc",
                "https://host/m.tar.gz",
            ),
            ("https://host", "https://host"),
            ("/opt/ember/models/m", "/opt/ember/models/m"),
        ] {
            assert_eq!(redact_uri(uri), want);
        }
        assert_eq!(v("3").label(), "v3");
        let named = ModelSource {
            version: Some("canary".into()),
            ..ModelSource::default()
        };
        assert_eq!(named.label(), "canary");
    }
}
