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
        "spec": {"model": "ssdlite-person", "deployment": "workers", "minReplicas": 0, "maxReplicas": 5,
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
