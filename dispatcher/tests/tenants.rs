//! Tenants and a broker that cannot fill up (issue 18): two tenants end to end over HTTP and
//! callbacks, each seeing only its own jobs; a token for one model cannot use another; tokens
//! rotated without a restart; wrong tokens limited per client address (behind a trusted proxy
//! only); a tenant held to its share of a model's queue; the results store queue's bound holding
//! with no dispatcher running, its jobs then reading `expired`; and the startup refusals. The
//! real dispatcher binary, a real worker (in this process), RabbitMQ, Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Dispatcher, InProcessWorker, SECRET};
use ember_testkit::callbacks::{Receiver, Reply};
use ember_testkit::{PATIENCE, free_port, metric, root};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tenants file entry: `name` with `tokens`, allowed `models`, and extra TOML lines.
fn tenant(name: &str, tokens: &[&str], models: &[&str], extra: &str) -> String {
    let digests: Vec<String> = tokens
        .iter()
        .map(|t| format!("\"{}\"", sha256_hex(t)))
        .collect();
    let models: Vec<String> = models.iter().map(|m| format!("\"{m}\"")).collect();
    format!(
        "[tenants.{name}]\ntoken_sha256 = [{}]\nmodels = [{}]\n{extra}\n",
        digests.join(", "),
        models.join(", ")
    )
}

fn write_tenants(path: &Path, entries: &[String]) {
    // Written whole and renamed into place, as a Secret volume's update is.
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, entries.concat()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn iris() -> PathBuf {
    root().join("models/iris-classifier")
}

/// An iris job body (OIP v2 JSON tensors, three known rows).
fn iris_body() -> Value {
    let (rows, _) = ember_testkit::iris_rows();
    json!({"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows}]})
}

/// A request as `token`'s tenant.
fn request(
    dispatcher: &Dispatcher,
    method: reqwest::Method,
    path: &str,
    token: &str,
) -> reqwest::RequestBuilder {
    dispatcher
        .http
        .request(method, format!("{}{path}", dispatcher.url))
        .bearer_auth(token)
}

/// The status of `GET /v2/models/{model}` as `token`'s tenant.
async fn model_status(dispatcher: &Dispatcher, model: &str, token: &str) -> u16 {
    request(
        dispatcher,
        reqwest::Method::GET,
        &format!("/v2/models/{model}"),
        token,
    )
    .send()
    .await
    .unwrap()
    .status()
    .as_u16()
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

async fn submit(
    dispatcher: &Dispatcher,
    model: &str,
    token: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut builder = request(
        dispatcher,
        reqwest::Method::POST,
        &format!("/v1/models/{model}/jobs"),
        token,
    )
    .json(&iris_body());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    json_of(builder.send().await.unwrap()).await
}

async fn view(dispatcher: &Dispatcher, id: &str, token: &str) -> (u16, Value) {
    json_of(
        request(
            dispatcher,
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}"),
            token,
        )
        .send()
        .await
        .unwrap(),
    )
    .await
}

/// Polls the job as `token` until it is no longer queued.
async fn finished(dispatcher: &Dispatcher, id: &str, token: &str) -> Value {
    let started = Instant::now();
    loop {
        let (status, body) = view(dispatcher, id, token).await;
        assert_eq!(status, 200, "{body}");
        if body["status"] != "queued" {
            return body;
        }
        assert!(started.elapsed() < PATIENCE, "job {id} never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_tenant_sees_only_its_own_jobs_and_uses_only_its_models() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("tenants");
    let other = ember_testkit::unique_model("tenants-other");
    let dir = ember_testkit::tempdir!("tenants");
    let file = dir.join("tenants.toml");
    write_tenants(
        &file,
        &[
            tenant("team-a", &["alpha"], &[&model], ""),
            tenant("team-b", &["bravo"], &["*"], ""),
            tenant("team-c", &["charlie"], &[&other], ""),
        ],
    );
    let receiver = Receiver::start(vec![], Some(Reply::Status(200))).await;
    // Two callback secrets, as while one is rotated: every callback is signed with both.
    let next_secret = "whsec_bmV4dC1zZWNyZXQtZm9yLWVtYmVyLXJvdGF0aW9u";
    let secrets = dir.join("callback-secrets");
    std::fs::write(
        &secrets,
        format!("# the new one first\n{next_secret}\n{SECRET}\n"),
    )
    .unwrap();
    let dispatcher = Dispatcher::start_with_dir(
        &model,
        &iris(),
        &[
            "--tenants-file",
            file.to_str().unwrap(),
            "--callback-secret-file",
            secrets.to_str().unwrap(),
        ],
    )
    .await;
    let _worker = InProcessWorker::start_with_dir(&model, &iris());
    let ready = Instant::now();
    while request(
        &dispatcher,
        reqwest::Method::GET,
        &format!("/v2/models/{model}/ready"),
        "alpha",
    )
    .send()
    .await
    .unwrap()
    .status()
        != 200
    {
        assert!(ready.elapsed() < PATIENCE, "no worker became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // team-a's job, answered inline, with a callback.
    let (status, a_job) = submit(
        &dispatcher,
        &model,
        "alpha",
        &[("x-callback-url", &receiver.url())],
    )
    .await;
    assert_eq!(status, 202, "{a_job}");
    let a_id = a_job["job_id"].as_str().unwrap().to_string();
    let done = finished(&dispatcher, &a_id, "alpha").await;
    assert_eq!(done["status"], "done", "{done}");
    receiver
        .wait_until("team-a's callback", |d| {
            d.iter().any(|d| d.body.contains(&a_id))
        })
        .await;
    let delivered = receiver.for_job(&a_id);
    assert_eq!(delivered.len(), 1);
    let signature = delivered[0].headers["webhook-signature"].to_str().unwrap();
    assert_eq!(signature.split(' ').count(), 2, "{signature}");
    // The Standard Webhooks library verifies it with either secret.
    for secret in [next_secret, SECRET] {
        let recorded = json!({
            "secret": secret,
            "deliveries": [{
                "body": delivered[0].body,
                "headers": {
                    "webhook-id": delivered[0].headers["webhook-id"].to_str().unwrap(),
                    "webhook-timestamp": delivered[0].headers["webhook-timestamp"].to_str().unwrap(),
                    "webhook-signature": signature,
                },
            }],
        });
        let path = dir.join("webhook.json");
        std::fs::write(&path, recorded.to_string()).unwrap();
        assert_eq!(
            common::python("verify_webhook.py", &[path.to_str().unwrap()]).trim(),
            a_id
        );
    }

    // team-b gets the same 404 for team-a's job as for an unknown one: status, code, message.
    let unknown = uuid::Uuid::new_v4().to_string();
    let (status, theirs) = view(&dispatcher, &a_id, "bravo").await;
    let (unknown_status, nobodys) = view(&dispatcher, &unknown, "bravo").await;
    assert_eq!((status, unknown_status), (404, 404));
    assert_eq!(theirs["error"]["code"], "job_not_found");
    assert_eq!(
        theirs["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&a_id, "ID"),
        nobodys["error"]["message"]
            .as_str()
            .unwrap()
            .replace(&unknown, "ID")
    );
    // Nor can it cancel or wait for it.
    for (method, path) in [
        (reqwest::Method::DELETE, format!("/v1/jobs/{a_id}")),
        (reqwest::Method::GET, format!("/v1/jobs/{a_id}?wait=1s")),
    ] {
        let response = request(&dispatcher, method, &path, "bravo")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }

    // OIP async: the status URL answers its tenant only.
    let response = request(
        &dispatcher,
        reqwest::Method::POST,
        &format!("/v2/models/{model}/infer"),
        "bravo",
    )
    .header("prefer", "respond-async")
    .json(&iris_body())
    .send()
    .await
    .unwrap();
    let (status, accepted) = json_of(response).await;
    assert_eq!(status, 202, "{accepted}");
    let b_id = accepted["job_id"].as_str().unwrap().to_string();
    assert_eq!(
        finished(&dispatcher, &b_id, "bravo").await["status"],
        "done"
    );
    assert_eq!(view(&dispatcher, &b_id, "alpha").await.0, 404);

    // One idempotency key, two tenants: two jobs, neither learns of the other's.
    let key = [("idempotency-key", "same-key-for-both")];
    let (_, first) = submit(&dispatcher, &model, "alpha", &key).await;
    let (_, second) = submit(&dispatcher, &model, "bravo", &key).await;
    let (_, again) = submit(&dispatcher, &model, "alpha", &key).await;
    assert_ne!(first["job_id"], second["job_id"]);
    assert_eq!(first["job_id"], again["job_id"]);

    // team-c may use only the other model: 403 on this one, for jobs, inference and metadata.
    let (status, refused) = submit(&dispatcher, &model, "charlie", &[]).await;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "model_forbidden");
    for (method, path) in [
        (reqwest::Method::POST, format!("/v2/models/{model}/infer")),
        (reqwest::Method::GET, format!("/v2/models/{model}")),
        (reqwest::Method::GET, format!("/v2/models/{model}/ready")),
    ] {
        let response = request(&dispatcher, method, &path, "charlie")
            .json(&iris_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 403, "{path}");
    }
    // No token, a wrong one: 401.
    assert_eq!(
        dispatcher
            .get(&format!("/v1/jobs/{a_id}"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(view(&dispatcher, &a_id, "alph").await.0, 401);

    let metrics = dispatcher.metrics().await;
    let accepted_a = metric(
        &metrics,
        &format!(
            "ember_dispatcher_tenant_jobs_total{{model=\"{model}\",outcome=\"accepted\",tenant=\"team-a\"}}"
        ),
    );
    assert_eq!(
        accepted_a, 2.0,
        "team-a's two jobs (one a repeat of a key)\n{metrics}"
    );
    let forbidden = metric(
        &metrics,
        &format!(
            "ember_dispatcher_tenant_jobs_total{{model=\"{model}\",outcome=\"model_forbidden\",tenant=\"team-c\"}}"
        ),
    );
    assert_eq!(forbidden, 4.0, "{metrics}");
    assert_eq!(metric(&metrics, "ember_dispatcher_tenants "), 3.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_rotated_and_revoked_without_a_restart() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("rotate");
    let dir = ember_testkit::tempdir!("rotate");
    let file = dir.join("tenants.toml");
    write_tenants(&file, &[tenant("team-a", &["old-token"], &["*"], "")]);
    let dispatcher = Dispatcher::start_with_dir(
        &model,
        &iris(),
        &[
            "--tenants-file",
            file.to_str().unwrap(),
            "--tenants-reload-interval",
            "100ms",
        ],
    )
    .await;
    let status = |token| model_status(&dispatcher, &model, token);
    assert_eq!(status("old-token").await, 200);
    assert_eq!(status("new-token").await, 401);

    // Add the new token beside the old: both work.
    write_tenants(
        &file,
        &[tenant("team-a", &["new-token", "old-token"], &["*"], "")],
    );
    let started = Instant::now();
    while status("new-token").await != 200 {
        assert!(
            started.elapsed() < PATIENCE,
            "the new token never took effect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("old-token").await, 200);

    // A broken file leaves the tenants as they were, and says so.
    // Renamed into place like every other write here: written in place, the watcher could
    // read the truncated (empty, so valid) file first and drop every tenant.
    write_tenants(
        &file,
        &["[tenants.team-a]\ntoken_sha256 = [\"not hex\"]\nmodels = [\"*\"]\n".to_string()],
    );
    let started = Instant::now();
    while metric(
        &dispatcher.metrics().await,
        "ember_dispatcher_tenant_reloads_total{outcome=\"error\"}",
    ) < 1.0
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the broken file was never read"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("new-token").await, 200);
    assert_eq!(status("old-token").await, 200);

    // Revoke the old one.
    write_tenants(&file, &[tenant("team-a", &["new-token"], &["*"], "")]);
    let started = Instant::now();
    while status("old-token").await != 401 {
        assert!(
            started.elapsed() < PATIENCE,
            "the old token was never revoked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status("new-token").await, 200);
    assert!(dispatcher.log_text().contains("tenants file not reloaded"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_tokens_are_limited_per_client_address_taken_from_a_trusted_proxy_only() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("lockout");
    let dir = ember_testkit::tempdir!("lockout");
    let file = dir.join("tenants.toml");
    write_tenants(&file, &[tenant("team-a", &["right"], &["*"], "")]);
    let tenants = file.to_str().unwrap();
    let path = format!("/v2/models/{model}");
    let try_as = |dispatcher: &Dispatcher, token: &str, client: &str| {
        request(dispatcher, reqwest::Method::GET, &path, token)
            .header("x-forwarded-for", client)
            .send()
    };

    // Behind a trusted proxy (the test, on 127.0.0.1): each forwarded client has its own tries.
    let proxied = Dispatcher::start_with_dir(
        &model,
        &iris(),
        &[
            "--tenants-file",
            tenants,
            "--auth-failure-limit",
            "3/h",
            "--trusted-proxy",
            "127.0.0.1/32",
        ],
    )
    .await;
    for _ in 0..3 {
        assert_eq!(
            try_as(&proxied, "guess", "198.51.100.7")
                .await
                .unwrap()
                .status(),
            401
        );
    }
    // Out of tries: refused before the token is looked at, the right one too.
    let locked = try_as(&proxied, "right", "198.51.100.7").await.unwrap();
    assert_eq!(locked.status(), 429);
    assert!(locked.headers().contains_key("retry-after"));
    let (_, body) = json_of(locked).await;
    // The protocol's error format on /v2 routes: {"error": "<message>"}.
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many wrong tokens"),
        "{body}"
    );
    // Another client behind the same proxy is not affected.
    assert_eq!(
        try_as(&proxied, "right", "198.51.100.8")
            .await
            .unwrap()
            .status(),
        200
    );
    let metrics = proxied.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ember_dispatcher_auth_failures_total{outcome=\"unauthorized\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &metrics,
            "ember_dispatcher_auth_failures_total{outcome=\"locked_out\"}"
        ),
        1.0
    );
    drop(proxied);

    // Without --trusted-proxy the header is the client's word, not believed: every "client"
    // here is 127.0.0.1, and three wrong tokens lock all of them out.
    let direct = Dispatcher::start_with_dir(
        &model,
        &iris(),
        &["--tenants-file", tenants, "--auth-failure-limit", "3/h"],
    )
    .await;
    for client in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        assert_eq!(
            try_as(&direct, "guess", client).await.unwrap().status(),
            401
        );
    }
    assert_eq!(
        try_as(&direct, "right", "198.51.100.4")
            .await
            .unwrap()
            .status(),
        429
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tenant_is_held_to_its_share_of_a_models_queue() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("share");
    let dir = ember_testkit::tempdir!("share");
    let file = dir.join("tenants.toml");
    write_tenants(
        &file,
        &[
            tenant("greedy", &["greedy"], &["*"], "max_outstanding = 2"),
            tenant("modest", &["modest"], &["*"], ""),
        ],
    );
    let dispatcher =
        Dispatcher::start_with_dir(&model, &iris(), &["--tenants-file", file.to_str().unwrap()])
            .await;
    // No worker yet: jobs wait in the queue.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, body) = submit(&dispatcher, &model, "greedy", &[]).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["job_id"].as_str().unwrap().to_string());
    }
    let response = request(
        &dispatcher,
        reqwest::Method::POST,
        &format!("/v1/models/{model}/jobs"),
        "greedy",
    )
    .json(&iris_body())
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let (_, body) = json_of(response).await;
    assert_eq!(body["error"]["code"], "tenant_queue_full", "{body}");
    // The refused job left no record behind, and the other tenant is let in.
    let (status, modest) = submit(&dispatcher, &model, "modest", &[]).await;
    assert_eq!(status, 202, "{modest}");

    // Once the worker answers, the share frees up again.
    let _worker = InProcessWorker::start_with_dir(&model, &iris());
    for id in &ids {
        assert_eq!(finished(&dispatcher, id, "greedy").await["status"], "done");
    }
    let started = Instant::now();
    loop {
        let (status, body) = submit(&dispatcher, &model, "greedy", &[]).await;
        if status == 202 {
            break;
        }
        assert_eq!(status, 429, "{body}");
        assert!(started.elapsed() < PATIENCE, "the share never freed up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = dispatcher.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            &format!(
                "ember_dispatcher_tenant_jobs_total{{model=\"{model}\",outcome=\"tenant_queue_full\",tenant=\"greedy\"}}"
            )
        ),
        1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn each_tenant_has_its_own_request_rate() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("tenant-rate");
    let dir = ember_testkit::tempdir!("tenant-rate");
    let file = dir.join("tenants.toml");
    write_tenants(
        &file,
        &[
            tenant(
                "team-a",
                &["alpha", "alpha-2"],
                &["*"],
                "rate_limit = \"2/h\"",
            ),
            tenant("team-b", &["bravo"], &["*"], "rate_limit = \"2/h\""),
        ],
    );
    let dispatcher =
        Dispatcher::start_with_dir(&model, &iris(), &["--tenants-file", file.to_str().unwrap()])
            .await;
    let status = |token| model_status(&dispatcher, &model, token);
    assert_eq!(status("alpha").await, 200);
    // A tenant's tokens share its bucket.
    assert_eq!(status("alpha-2").await, 200);
    assert_eq!(status("alpha").await, 429);
    assert_eq!(status("alpha-2").await, 429);
    // Another tenant's bucket is its own.
    assert_eq!(status("bravo").await, 200);
    let metrics = dispatcher.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ember_dispatcher_tenant_rate_limited_total{tenant=\"team-a\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "ember_dispatcher_tenant_rate_limited_total{tenant=\"team-b\"}"
        ),
        0.0
    );
}

/// `rabbitmq_queue_messages` of `queue` on the node's Prometheus endpoint (per-object metrics).
async fn queue_messages_metric(port: u16, queue: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics/per-object"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let wanted = format!("queue=\"{queue}\"");
    text.lines()
        .filter(|l| l.starts_with("rabbitmq_queue_messages{") && l.contains(&wanted))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_results_store_queue_stays_bounded_with_no_dispatcher_and_its_dropped_jobs_read_expired()
 {
    let _serial = common::serial().await;
    let (amqp_port, prometheus_port) = (free_port(), free_port());
    let node = ember_testkit::rabbitmq::Node::with_prometheus(
        &format!("bound{amqp_port}"),
        amqp_port,
        prometheus_port,
    );
    let url = format!("amqp://guest:guest@127.0.0.1:{amqp_port}/%2f");
    let model = ember_testkit::unique_model("bound");
    let bound = 20;
    let jobs = 30;
    let args = [
        "--amqp-url",
        &url,
        "--results-store-max-length",
        &bound.to_string(),
    ];
    let mut dispatcher = Dispatcher::start_with_dir(&model, &iris(), &args).await;
    let mut ids = Vec::new();
    for _ in 0..jobs {
        let response = dispatcher
            .post(&format!("/v1/models/{model}/jobs"))
            .json(&iris_body())
            .send()
            .await
            .unwrap();
        let (status, body) = json_of(response).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["job_id"].as_str().unwrap().to_string());
    }
    // No dispatcher: the worker answers every job (each submitted over HTTP) into
    // ember.results.stored, where only the store queue is bound.
    assert!(dispatcher.terminate().await.success());
    let worker = InProcessWorker::start_with_args(&model, &iris(), &["--amqp-url", &url]);
    let connection = lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let depth = |queue: &'static str| {
        let channel = channel.clone();
        async move {
            channel
                .queue_declare(
                    queue.into(),
                    lapin::options::QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    lapin::types::FieldTable::default(),
                )
                .await
                .unwrap()
                .message_count()
        }
    };
    let started = Instant::now();
    while depth("ember.results.expired").await < jobs - bound {
        assert!(
            started.elapsed() < PATIENCE,
            "the worker never answered every job"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every job was answered: the store queue holds its bound, the oldest went to expired.
    assert_eq!(depth("ember.results.store").await, bound);
    assert_eq!(depth("ember.results.expired").await, jobs - bound);
    let started = Instant::now();
    while queue_messages_metric(prometheus_port, "ember.results.store").await
        != Some(f64::from(bound))
    {
        assert!(
            started.elapsed() < PATIENCE,
            "RabbitMQ's metric never showed the store queue at its bound: {:?}",
            queue_messages_metric(prometheus_port, "ember.results.store").await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(worker);

    // A dispatcher again: the newest results are stored, the dropped ones' jobs read expired.
    let dispatcher = Dispatcher::start_with_dir(&model, &iris(), &args).await;
    let mut outcomes = Vec::new();
    for id in &ids {
        outcomes.push(
            dispatcher.wait_done(id).await["status"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let expired = outcomes.iter().filter(|s| *s == "expired").count();
    let done = outcomes.iter().filter(|s| *s == "done").count();
    assert_eq!(
        (done, expired),
        (bound as usize, (jobs - bound) as usize),
        "{outcomes:?}"
    );
    // (Which ones expired follows the order the worker's batches published their results in.)
    let metrics = dispatcher.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "ember_dispatcher_results_stored_total{outcome=\"expired\"}"
        ),
        f64::from(jobs - bound)
    );
    drop(dispatcher);
    drop(node);
}

/// The dispatcher's exit and stderr for `args` (it must refuse to start before serving).
fn refusal(args: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ember-dispatcher"))
        .current_dir(root())
        .args(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_dispatcher_without_tokens_or_a_callback_secret_refuses_to_start() {
    let dir = ember_testkit::tempdir!("refusals");
    let tenants = dir.join("tenants.toml");
    std::fs::write(&tenants, tenant("team-a", &["t"], &["*"], "")).unwrap();
    let tenants = tenants.to_str().unwrap();
    let table: [(&[&str], &str); 5] = [
        (&["--callback-secret", SECRET], "no tokens"),
        (
            &[
                "--auth-token",
                "t",
                "--insecure-no-auth",
                "--callback-secret",
                SECRET,
            ],
            "contradicts",
        ),
        (&["--tenants-file", tenants], "no callback secret"),
        (
            &[
                "--tenants-file",
                tenants,
                "--auth-token",
                "t",
                "--callback-secret",
                SECRET,
            ],
            "not both",
        ),
        (
            &[
                "--tenants-file",
                "/nonexistent/tenants.toml",
                "--callback-secret",
                SECRET,
            ],
            "/nonexistent/tenants.toml",
        ),
    ];
    for (args, why) in table {
        let stderr = refusal(args);
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}
