//! The Kubernetes backend against a mock API server that plays a scripted scenario and asserts
//! every request (path, verb, content type, body), the way kube-rs's controller-rs tests.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use ember_autoscaler::kubernetes::{self, DELETION_COST, InferencePool, LeaderLease};
use ember_autoscaler::policy::PolicyState;
use ember_autoscaler::signals::ModelView;
use http::{Method, Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type BodyCheck = Box<dyn Fn(&Value) + Send>;

/// One expected request and the answer to give.
struct Step {
    method: Method,
    path: &'static str,
    /// Checks on the request body (JSON), if any.
    check: Option<BodyCheck>,
    content_type: Option<&'static str>,
    status: u16,
    reply: Value,
}

fn step(method: Method, path: &'static str, reply: Value) -> Step {
    Step {
        method,
        path,
        check: None,
        content_type: None,
        status: 200,
        reply,
    }
}

impl Step {
    fn body(mut self, check: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Some(Box::new(check));
        self
    }
    fn content_type(mut self, ct: &'static str) -> Self {
        self.content_type = Some(ct);
        self
    }
    fn status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }
}

/// Serves `steps` in order, asserting each request; then asserts nothing more is asked.
fn serve(mut handle: Handle, steps: Vec<Step>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for (i, step) in steps.into_iter().enumerate() {
            let (request, send) =
                tokio::time::timeout(Duration::from_secs(5), handle.next_request())
                    .await
                    .unwrap_or_else(|_| {
                        panic!("request {i} ({} {}) never came", step.method, step.path)
                    })
                    .expect("the client is gone");
            assert_eq!(request.method(), step.method, "request {i}");
            assert_eq!(request.uri().path(), step.path, "request {i}");
            if let Some(ct) = step.content_type {
                assert_eq!(request.headers()["content-type"], ct, "request {i}");
            }
            let bytes = request.into_body().collect_bytes().await.unwrap();
            if let Some(check) = &step.check {
                let body: Value = serde_json::from_slice(&bytes).unwrap();
                check(&body);
            }
            let response = Response::builder()
                .status(step.status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&step.reply).unwrap()))
                .unwrap();
            send.send_response(response);
        }
    })
}

fn client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "ember"), handle)
}

fn pool() -> InferencePool {
    serde_json::from_value(json!({
        "apiVersion": "ember.dev/v1alpha1",
        "kind": "InferencePool",
        "metadata": {"name": "ssd", "namespace": "ember", "uid": "u-1"},
        "spec": {"model": {"name": "ssdlite-person"}, "deployment": "workers", "minReplicas": 0, "maxReplicas": 5,
                 "targetDrainTimeSeconds": 10, "targetUtilisation": 1.0, "initialServiceRate": 10,
                 "scaleDownWindowSeconds": 0, "scaleDownStep": 5, "idleToZeroSeconds": 0}
    }))
    .unwrap()
}

fn deployment(replicas: u32, ready: u32) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "workers", "namespace": "ember"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "ember-worker", "model": "ssd"}},
                 "template": {"metadata": {"labels": {"app": "ember-worker", "model": "ssd"}}, "spec": {"containers": []}}},
        "status": {"replicas": replicas, "readyReplicas": ready}
    })
}

fn scale(replicas: u32) -> Value {
    json!({"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": "workers"},
           "spec": {"replicas": replicas}, "status": {"replicas": replicas}})
}

fn event() -> Value {
    json!({"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "ssd-x"}, "eventTime": "2026-01-01T00:00:00.000000Z"})
}

#[tokio::test]
async fn a_backlog_scales_the_deployment_up_with_an_event_and_a_status() {
    let (client, handle) = client();
    let pool_value = serde_json::to_value(pool()).unwrap();
    let server = serve(
        handle,
        vec![
            step(
                Method::GET,
                "/apis/apps/v1/namespaces/ember/deployments/workers",
                deployment(1, 1),
            ),
            step(
                Method::PATCH,
                "/apis/apps/v1/namespaces/ember/deployments/workers/scale",
                scale(3),
            )
            .content_type("application/merge-patch+json")
            .body(|b| assert_eq!(b, &json!({"spec": {"replicas": 3}}))),
            step(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/ember/events",
                event(),
            )
            .body(|b| {
                assert_eq!(b["reason"], "ScaledUp");
                assert_eq!(b["action"], "Scale");
                // Named as client-go names Events: <object>.<hex nanoseconds>.
                let name = b["metadata"]["name"].as_str().unwrap();
                assert!(
                    name.strip_prefix("ssd.")
                        .is_some_and(|hex| u128::from_str_radix(hex, 16).is_ok()),
                    "{name}"
                );
                assert_eq!(b["type"], "Normal");
                assert_eq!(b["regarding"]["kind"], "InferencePool");
                assert_eq!(b["regarding"]["name"], "ssd");
                assert_eq!(b["regarding"]["uid"], "u-1");
                assert_eq!(b["reportingController"], "ember.dev/autoscaler");
                assert!(
                    b["note"]
                        .as_str()
                        .unwrap()
                        .starts_with("1 -> 3 replicas (demand)"),
                    "{b}"
                );
            }),
            step(
                Method::PATCH,
                "/apis/ember.dev/v1alpha1/namespaces/ember/inferencepools/ssd/status",
                pool_value,
            )
            .content_type("application/merge-patch+json")
            .body(|b| {
                let status = &b["status"];
                assert_eq!(status["desiredReplicas"], 3);
                assert_eq!(status["readyReplicas"], 1);
                assert_eq!(status["readyJobs"], 200);
                assert_eq!(status["inFlight"], 8);
                assert_eq!(status["backlog"], 208);
                assert_eq!(status["lastDecision"], "1 -> 3");
                assert_eq!(status["lastReason"], "demand");
                assert_eq!(status["conditions"][0]["type"], "Scaling");
            }),
        ],
    );
    let view = ModelView {
        ready: 1,
        in_flight: 8,
        ..ModelView::default()
    };
    let mut state = PolicyState::default();
    // (200 + 8) / 10 s = 20.8 jobs/s over 10 jobs/s per replica -> 3.
    let decision = kubernetes::reconcile(
        &client,
        &pool(),
        (200, 0.0, true),
        &view,
        &mut state,
        Duration::ZERO,
    )
    .await
    .unwrap();
    assert_eq!(decision.replicas, 3);
    server.await.unwrap();
}

#[tokio::test]
async fn scale_in_marks_idle_pods_cheapest_to_delete_first() {
    let (client, handle) = client();
    let pool_value = serde_json::to_value(pool()).unwrap();
    let pods = json!({
        "apiVersion": "v1", "kind": "PodList", "metadata": {},
        "items": [
            {"metadata": {"name": "workers-busy", "namespace": "ember"}},
            {"metadata": {"name": "workers-idle", "namespace": "ember"}},
            {"metadata": {"name": "workers-loading", "namespace": "ember",
                          "annotations": {DELETION_COST: "-200"}}},
        ]
    });
    let server = serve(
        handle,
        vec![
            step(
                Method::GET,
                "/apis/apps/v1/namespaces/ember/deployments/workers",
                deployment(3, 2),
            ),
            step(Method::GET, "/api/v1/namespaces/ember/pods", pods),
            step(
                Method::PATCH,
                "/api/v1/namespaces/ember/pods/workers-busy",
                json!({"metadata": {"name": "workers-busy"}}),
            )
            .content_type("application/merge-patch+json")
            .body(|b| assert_eq!(b["metadata"]["annotations"][DELETION_COST], "300")),
            step(
                Method::PATCH,
                "/api/v1/namespaces/ember/pods/workers-idle",
                json!({"metadata": {"name": "workers-idle"}}),
            )
            .body(|b| assert_eq!(b["metadata"]["annotations"][DELETION_COST], "-100")),
            // workers-loading already carries its cost: no request for it.
            step(
                Method::PATCH,
                "/apis/apps/v1/namespaces/ember/deployments/workers/scale",
                scale(1),
            )
            .body(|b| assert_eq!(b, &json!({"spec": {"replicas": 1}}))),
            step(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/ember/events",
                event(),
            )
            .body(|b| assert_eq!(b["reason"], "ScaledDown")),
            step(
                Method::PATCH,
                "/apis/ember.dev/v1alpha1/namespaces/ember/inferencepools/ssd/status",
                pool_value,
            )
            .body(|b| assert_eq!(b["status"]["desiredReplicas"], 1)),
        ],
    );
    let view = ModelView {
        ready: 2,
        in_flight: 3,
        workers: vec![("workers-busy".into(), 3), ("workers-idle".into(), 0)],
        idle_workers: vec!["workers-idle".into()],
        ready_ids: vec!["workers-busy".into(), "workers-idle".into()],
        service_rate: Some(10.0),
        ..ModelView::default()
    };
    let mut state = PolicyState::default();
    // Three in flight, nothing waiting: one replica's worth, and the window is 0 s.
    let decision = kubernetes::reconcile(
        &client,
        &pool(),
        (0, 0.0, false),
        &view,
        &mut state,
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    assert_eq!(decision.replicas, 1);
    server.await.unwrap();
}

fn lease(holder: &str, renewed: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "ember-autoscaler", "namespace": "ember", "resourceVersion": "41"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": renewed, "acquireTime": renewed, "leaseTransitions": 2}
    })
}

fn leader(identity: &str) -> LeaderLease {
    LeaderLease {
        name: "ember-autoscaler".into(),
        identity: identity.into(),
        duration: Duration::from_secs(15),
    }
}

#[tokio::test]
async fn leader_election_creates_renews_respects_and_takes_over_the_lease() {
    let path = "/apis/coordination.k8s.io/v1/namespaces/ember/leases/ember-autoscaler";
    let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"});
    let now = k8s_openapi::jiff::Timestamp::now();
    let fresh = format!("{}", now.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"));
    let (client, handle) = client();
    let server = serve(
        handle,
        vec![
            // No lease: create it.
            step(Method::GET, path, not_found).status(404),
            step(Method::POST, "/apis/coordination.k8s.io/v1/namespaces/ember/leases", lease("a", &fresh)).body(|b| {
                assert_eq!(b["metadata"]["name"], "ember-autoscaler");
                assert_eq!(b["spec"]["holderIdentity"], "a");
                assert_eq!(b["spec"]["leaseDurationSeconds"], 15);
            }),
            // Ours: renew with a compare-and-swap on the resourceVersion.
            step(Method::GET, path, lease("a", &fresh)),
            step(Method::PATCH, path, lease("a", &fresh))
                .content_type("application/merge-patch+json")
                .body(|b| {
                    assert_eq!(b["metadata"]["resourceVersion"], "41");
                    assert!(b["spec"]["renewTime"].is_string());
                    assert!(b["spec"].get("holderIdentity").is_none(), "a renewal keeps the holder");
                }),
            // Someone else's, fresh: keep off (no write).
            step(Method::GET, path, lease("b", &fresh)),
            // Someone else's, expired: take over.
            step(Method::GET, path, lease("b", "2020-01-01T00:00:00.000000Z")),
            step(Method::PATCH, path, lease("a", &fresh)).body(|b| {
                assert_eq!(b["metadata"]["resourceVersion"], "41");
                assert_eq!(b["spec"]["holderIdentity"], "a");
                assert_eq!(b["spec"]["leaseTransitions"], 3);
            }),
            // A rival wrote first: 409, not the leader.
            step(Method::GET, path, lease("b", "2020-01-01T00:00:00.000000Z")),
            step(Method::PATCH, path, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"})).status(409),
        ],
    );
    let me = leader("a");
    assert!(
        me.acquire_or_renew(&client, "ember").await.unwrap(),
        "created"
    );
    assert!(
        me.acquire_or_renew(&client, "ember").await.unwrap(),
        "renewed"
    );
    assert!(
        !me.acquire_or_renew(&client, "ember").await.unwrap(),
        "held by b"
    );
    assert!(
        me.acquire_or_renew(&client, "ember").await.unwrap(),
        "taken over"
    );
    assert!(
        !me.acquire_or_renew(&client, "ember").await.unwrap(),
        "lost the race"
    );
    server.await.unwrap();
}

// --- rollouts ------------------------------------------------------------------------------

const DEPLOYMENT: &str = "/apis/apps/v1/namespaces/ember/deployments/workers";
const STATUS: &str = "/apis/ember.dev/v1alpha1/namespaces/ember/inferencepools/ssd/status";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ember/events";
const URI: &str = "EMBER_WORKER_MODEL_URI";
const SHA: &str = "EMBER_WORKER_MODEL_SHA256";
const VERSION: &str = "EMBER_WORKER_MODEL_VERSION";

fn artifact(version: u32) -> String {
    format!("s3://models/ssdlite-person/{version}.tar.gz")
}

fn digest(version: u32) -> String {
    format!("{version}").repeat(64)
}

/// The pool asking for `version` (its artifact and digest), with a status as a previous tick
/// wrote it.
fn versioned_pool(version: u32, status: Option<Value>) -> InferencePool {
    let mut value = serde_json::to_value(pool()).unwrap();
    value["spec"]["model"] = json!({"name": "ssdlite-person", "uri": artifact(version),
                                    "sha256": digest(version), "version": version.to_string()});
    value["spec"]["rollout"] = json!({"progressDeadlineSeconds": 600});
    if let Some(status) = status {
        value["status"] = status;
    }
    serde_json::from_value(value).unwrap()
}

struct Rolled {
    generation: i64,
    observed: i64,
    replicas: u32,
    status_replicas: u32,
    updated: u32,
    ready: u32,
}

/// The worker Deployment carrying `version`'s source, as its controller reports it.
fn worker_deployment(version: u32, r: &Rolled) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "workers", "namespace": "ember", "generation": r.generation},
        "spec": {"replicas": r.replicas,
                 "selector": {"matchLabels": {"app": "ember-worker", "model": "ssd"}},
                 "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                 "template": {"metadata": {"labels": {"app": "ember-worker", "model": "ssd"}},
                              "spec": {"containers": [{"name": "worker", "image": "ember-worker", "env": [
                                  {"name": "EMBER_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                                  {"name": URI, "value": artifact(version)},
                                  {"name": SHA, "value": digest(version)},
                                  {"name": VERSION, "value": version.to_string()},
                              ]}]}}},
        "status": {"observedGeneration": r.observed, "replicas": r.status_replicas, "updatedReplicas": r.updated,
                   "readyReplicas": r.ready, "availableReplicas": r.ready}
    })
}

/// The JSON Patch that moves the worker container's source to `version` from any other.
fn expected_source_patch(version: u32) -> Value {
    let env = "/spec/template/spec/containers/0/env";
    json!([
        {"op": "test", "path": "/spec/template/spec/containers/0/name", "value": "worker"},
        {"op": "test", "path": format!("{env}/1/name"), "value": URI},
        {"op": "replace", "path": format!("{env}/1"), "value": {"name": URI, "value": artifact(version)}},
        {"op": "test", "path": format!("{env}/2/name"), "value": SHA},
        {"op": "replace", "path": format!("{env}/2"), "value": {"name": SHA, "value": digest(version)}},
        {"op": "test", "path": format!("{env}/3/name"), "value": VERSION},
        {"op": "replace", "path": format!("{env}/3"), "value": {"name": VERSION, "value": version.to_string()}},
    ])
}

/// A status written by one tick, kept for the next one to read.
type Written = std::sync::Arc<std::sync::Mutex<Value>>;

fn keep(written: &Written) -> impl Fn(&Value) + Send + 'static {
    let written = written.clone();
    move |b: &Value| *written.lock().unwrap() = b["status"].clone()
}

async fn tick(client: &Client, pool: &InferencePool, ready_jobs: u64) {
    let mut state = PolicyState::default();
    kubernetes::reconcile(
        client,
        pool,
        (ready_jobs, 0.0, false),
        &ModelView::default(),
        &mut state,
        Duration::ZERO,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_new_model_version_rolls_the_template_while_scaling_goes_on_then_completes() {
    let (client, handle) = client();
    let first = Written::default();
    let second = Written::default();
    let complete_v1 = json!({"model": {
        "current": {"uri": artifact(1), "sha256": digest(1), "version": "1"},
        "rollout": {"phase": "Complete", "version": "1", "target": {"uri": artifact(1), "sha256": digest(1), "version": "1"},
                    "message": "v1: 2/2 pods updated and available after 20 s", "startedAt": "2026-01-01T00:00:00Z"}}});
    let at_v1 = Rolled {
        generation: 3,
        observed: 3,
        replicas: 2,
        status_replicas: 2,
        updated: 2,
        ready: 2,
    };
    let patched = Rolled {
        generation: 4,
        ..at_v1
    };
    let done = Rolled {
        generation: 5,
        observed: 5,
        replicas: 3,
        status_replicas: 3,
        updated: 3,
        ready: 3,
    };
    let server = serve(
        handle,
        vec![
            // Tick 1: spec.model says v2, the template carries v1.
            step(Method::GET, DEPLOYMENT, worker_deployment(1, &at_v1)),
            step(Method::PATCH, DEPLOYMENT, worker_deployment(2, &patched))
                .content_type("application/json-patch+json")
                .body(|b| assert_eq!(b, &expected_source_patch(2), "{b:#}")),
            step(Method::POST, EVENTS, event()).body(|b| {
                assert_eq!(b["reason"], "RolloutStarted");
                assert_eq!(b["action"], "Rollout");
                assert_eq!(b["type"], "Normal");
                assert_eq!(b["regarding"]["name"], "ssd");
                let note = b["note"].as_str().unwrap();
                assert!(
                    note.starts_with("rolling out version 2, s3://models/ssdlite-person/2.tar.gz"),
                    "{note}"
                );
                assert!(note.contains("(replacing version 1,"), "{note}");
                assert!(
                    note.ends_with("rolled back unless ready within 600 s"),
                    "{note}"
                );
            }),
            // Scaling goes on during the rollout: 300 jobs want 3 replicas.
            step(
                Method::PATCH,
                "/apis/apps/v1/namespaces/ember/deployments/workers/scale",
                scale(3),
            )
            .body(|b| assert_eq!(b, &json!({"spec": {"replicas": 3}}))),
            step(Method::POST, EVENTS, event()).body(|b| assert_eq!(b["reason"], "ScaledUp")),
            step(Method::PATCH, STATUS, serde_json::to_value(pool()).unwrap())
                .content_type("application/merge-patch+json")
                .body({
                    let keep = keep(&first);
                    move |b| {
                        keep(b);
                        let model = &b["status"]["model"];
                        assert_eq!(model["current"]["version"], "1", "{model:#}");
                        assert_eq!(model["rollout"]["phase"], "Progressing");
                        assert_eq!(model["rollout"]["version"], "2");
                        assert_eq!(model["rollout"]["target"]["uri"], artifact(2));
                        // The generation the patch answered with: the one to wait for.
                        assert_eq!(model["rollout"]["generation"], 4);
                        assert_eq!(model["failed"], Value::Null);
                        assert_eq!(b["status"]["desiredReplicas"], 3);
                    }
                }),
            // Tick 2: scaled to 3 (generation 5), which the controller has not acted on yet: its
            // status does not speak of the new template: still progressing.
            step(
                Method::GET,
                DEPLOYMENT,
                worker_deployment(
                    2,
                    &Rolled {
                        generation: 5,
                        observed: 4,
                        replicas: 3,
                        ..patched
                    },
                ),
            ),
            step(Method::PATCH, STATUS, serde_json::to_value(pool()).unwrap()).body({
                let keep = keep(&second);
                move |b| {
                    keep(b);
                    assert_eq!(b["status"]["model"]["rollout"]["phase"], "Progressing");
                }
            }),
            // Tick 3: every replica on the new template and available.
            step(Method::GET, DEPLOYMENT, worker_deployment(2, &done)),
            step(Method::POST, EVENTS, event()).body(|b| {
                assert_eq!(b["reason"], "RolloutComplete");
                assert_eq!(b["type"], "Normal");
                let note = b["note"].as_str().unwrap();
                assert!(
                    note.starts_with("v2: 3/3 pods updated and available after "),
                    "{note}"
                );
                assert!(note.ends_with("(replacing v1)"), "{note}");
            }),
            step(Method::PATCH, STATUS, serde_json::to_value(pool()).unwrap()).body(|b| {
                let model = &b["status"]["model"];
                assert_eq!(model["current"]["version"], "2", "{model:#}");
                assert_eq!(model["previous"]["version"], "1");
                assert_eq!(model["rollout"]["phase"], "Complete");
                assert_eq!(model["rollout"]["updatedReplicas"], 3);
                assert!(model["rollout"]["finishedAt"].is_string());
            }),
        ],
    );
    let mut v2 = versioned_pool(2, Some(complete_v1));
    // Before the tick: the loop keeps v1's queue (the rollout has not started).
    assert_eq!(kubernetes::served_versions(&v2), ["1"]);
    tick(&client, &v2, 300).await;
    v2.status = serde_json::from_value(first.lock().unwrap().clone()).unwrap();
    assert_eq!(
        kubernetes::served_versions(&v2),
        ["1", "2"],
        "both during the rollout"
    );
    tick(&client, &v2, 300).await;
    v2.status = serde_json::from_value(second.lock().unwrap().clone()).unwrap();
    tick(&client, &v2, 300).await;
    server.await.unwrap();
}

#[tokio::test]
async fn new_pods_not_ready_by_the_deadline_roll_back_with_a_warning_and_are_not_retried() {
    let (client, handle) = client();
    let rolled_back = Written::default();
    let started =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(601);
    let progressing_v3 = json!({"model": {
        "current": {"uri": artifact(2), "sha256": digest(2), "version": "2"},
        "previous": {"uri": artifact(1), "sha256": digest(1), "version": "1"},
        "rollout": {"phase": "Progressing", "version": "3", "target": {"uri": artifact(3), "sha256": digest(3), "version": "3"},
                    "message": "", "startedAt": started.to_string(), "generation": 6}}});
    // Two new pods that never become ready beside the two old ones, which stay (maxUnavailable 0).
    let stuck = Rolled {
        generation: 6,
        observed: 6,
        replicas: 2,
        status_replicas: 4,
        updated: 2,
        ready: 2,
    };
    let back = Rolled {
        generation: 7,
        observed: 7,
        replicas: 2,
        status_replicas: 2,
        updated: 2,
        ready: 2,
    };
    let server = serve(
        handle,
        vec![
            step(Method::GET, DEPLOYMENT, worker_deployment(3, &stuck)),
            // The template goes back to v2.
            step(Method::PATCH, DEPLOYMENT, worker_deployment(2, &back))
                .content_type("application/json-patch+json")
                .body(|b| assert_eq!(b, &expected_source_patch(2), "{b:#}")),
            step(Method::POST, EVENTS, event()).body(|b| {
                assert_eq!(b["reason"], "RolledBack");
                assert_eq!(b["action"], "Rollout");
                assert_eq!(b["type"], "Warning");
                let note = b["note"].as_str().unwrap();
                assert!(
                    note.starts_with("v3: 0/2 new pods ready after 60"),
                    "{note}"
                );
                assert!(note.ends_with(" s; rolled back to v2"), "{note}");
            }),
            step(Method::PATCH, STATUS, serde_json::to_value(pool()).unwrap()).body({
                let keep = keep(&rolled_back);
                move |b| {
                    keep(b);
                    let model = &b["status"]["model"];
                    assert_eq!(model["current"]["version"], "2", "{model:#}");
                    assert_eq!(model["failed"]["version"], "3");
                    assert_eq!(model["failed"]["uri"], artifact(3));
                    assert_eq!(model["rollout"]["phase"], "RolledBack");
                    assert!(
                        model["rollout"]["message"]
                            .as_str()
                            .unwrap()
                            .starts_with("v3: 0/2 new pods ready after 60")
                    );
                    assert_eq!(model["rollout"]["readyReplicas"], 2);
                    assert_eq!(model["rollout"]["updatedReplicas"], 2);
                }
            }),
            // The next tick: spec.model still says v3, which failed: no patch, no Event.
            step(Method::GET, DEPLOYMENT, worker_deployment(2, &back)),
            step(Method::PATCH, STATUS, serde_json::to_value(pool()).unwrap()).body(|b| {
                let model = &b["status"]["model"];
                assert_eq!(model["rollout"]["phase"], "RolledBack");
                assert_eq!(model["failed"]["version"], "3");
            }),
        ],
    );
    // Two ready jobs per replica's worth: 200 jobs keep the 2 replicas (no scale request).
    let mut v3 = versioned_pool(3, Some(progressing_v3));
    assert_eq!(kubernetes::served_versions(&v3), ["2", "3"]);
    tick(&client, &v3, 200).await;
    v3.status = serde_json::from_value(rolled_back.lock().unwrap().clone()).unwrap();
    assert_eq!(
        kubernetes::served_versions(&v3),
        ["2"],
        "after a rollback: the previous only"
    );
    tick(&client, &v3, 200).await;
    server.await.unwrap();
}

#[tokio::test]
async fn a_rejected_template_patch_does_not_stop_scaling() {
    let (client, handle) = client();
    let at_v1 = Rolled {
        generation: 3,
        observed: 3,
        replicas: 1,
        status_replicas: 1,
        updated: 1,
        ready: 1,
    };
    let complete_v1 = json!({"model": {
        "current": {"uri": artifact(1), "sha256": digest(1), "version": "1"}, "rollout": null}});
    let invalid = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422,
                         "message": "the server rejected our request due to an error in our request"});
    let server = serve(
        handle,
        vec![
            step(Method::GET, DEPLOYMENT, worker_deployment(1, &at_v1)),
            // Someone edited the container between the read and the patch: a test op fails.
            step(Method::PATCH, DEPLOYMENT, invalid).status(422),
            step(
                Method::PATCH,
                "/apis/apps/v1/namespaces/ember/deployments/workers/scale",
                scale(3),
            )
            .body(|b| assert_eq!(b, &json!({"spec": {"replicas": 3}}))),
            step(Method::POST, EVENTS, event()).body(|b| assert_eq!(b["reason"], "ScaledUp")),
            // The status keeps the model as it was: the rollout starts again at the next tick.
            step(Method::PATCH, STATUS, serde_json::to_value(pool()).unwrap()).body(|b| {
                assert_eq!(b["status"]["desiredReplicas"], 3);
                assert_eq!(b["status"]["model"]["current"]["version"], "1");
                assert_eq!(b["status"]["model"]["rollout"], Value::Null);
            }),
        ],
    );
    tick(&client, &versioned_pool(2, Some(complete_v1)), 300).await;
    server.await.unwrap();
}

#[test]
fn the_crd_in_the_manifests_is_the_one_the_code_generates() {
    let path = ember_testkit::root().join("manifests/base/crd-inferencepool.yaml");
    let committed = std::fs::read_to_string(&path).unwrap();
    assert!(
        committed == kubernetes::crd_yaml(),
        "{} drifted from the code: regenerate it with `ember-autoscaler --print-crd > {}`",
        path.display(),
        path.display()
    );
}
