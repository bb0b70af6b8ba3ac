//! The `kubernetes` backend: an `InferencePool` custom resource per model names the worker
//! Deployment, bounds and targets. Each tick the leader (a Lease) reads the Deployment, decides,
//! marks idle pods cheapest to delete (`controller.kubernetes.io/pod-deletion-cost`) before a
//! scale-in, patches the Deployment's scale subresource, records an Event per change and writes
//! the pool's status.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, CustomResource, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::Config;
use crate::backend::{Backend, Context, Observed, Scaled, Target};
use crate::policy::{self, Decision, PolicyState, Settings, Signals};
use crate::signals::ModelView;

/// The annotation Kubernetes reads to choose which pods go first on scale-in (lowest first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

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

/// A model's pool of workers: which Deployment, its bounds, and the scaling targets.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ember.dev",
    version = "v1alpha1",
    kind = "InferencePool",
    namespaced,
    status = "InferencePoolStatus",
    shortname = "ipool",
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".spec.model"}"#,
    printcolumn = r#"{"name":"Desired","type":"integer","jsonPath":".status.desiredReplicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Backlog","type":"integer","jsonPath":".status.backlog"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.lastReason"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    /// The model (queue `ember.jobs.<model>`).
    pub model: String,
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
#[serde(rename_all = "camelCase")]
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
                    model: pool.spec.model.clone(),
                    spec: pool,
                    versions: Vec::new(),
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
        record_event(client, pool, &namespace, &decision, spec_replicas, &note).await?;
    }
    let status = pool_status(&signals, &decision, reason, now_text);
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

async fn record_event(
    client: &Client,
    pool: &InferencePool,
    namespace: &str,
    decision: &Decision,
    from: u32,
    note: &str,
) -> Result<(), Error> {
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let reason = if decision.replicas > from {
        "ScaledUp"
    } else {
        "ScaledDown"
    };
    let regarding = ObjectReference {
        api_version: Some(InferencePool::api_version(&()).to_string()),
        kind: Some(InferencePool::kind(&()).to_string()),
        name: Some(pool.name_any()),
        namespace: Some(namespace.to_string()),
        uid: pool.uid(),
        ..ObjectReference::default()
    };
    let event = Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", pool.name_any())),
            namespace: Some(namespace.to_string()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        action: Some("Scale".into()),
        reason: Some(reason.into()),
        note: Some(note.chars().take(1024).collect()),
        regarding: Some(regarding),
        reporting_controller: Some("ember.dev/autoscaler".into()),
        reporting_instance: Some(
            std::env::var("POD_NAME").unwrap_or_else(|_| "ember-autoscaler".into()),
        ),
        type_: Some("Normal".into()),
        ..Event::default()
    };
    events.create(&PostParams::default(), &event).await?;
    Ok(())
}
