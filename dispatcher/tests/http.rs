//! The dispatcher end to end: real HTTP on 127.0.0.1, RabbitMQ, Redis, a real worker and model.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Dispatcher, InProcessWorker, python};
use ember_testkit::callbacks::{Receiver, Reply};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn tritonclient_infers_the_person_in_astronaut_with_json_and_binary_tensors() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("triton");
    let dispatcher = Dispatcher::start(&model, &[]).await;
    let _worker = InProcessWorker::start(&model);
    dispatcher.wait_model_ready(&model).await;
    let raw = std::env::temp_dir().join(format!("{model}.rgb"));
    std::fs::write(&raw, common::astronaut_300()).unwrap();
    let url = format!("127.0.0.1:{}", dispatcher.port);
    // The third run pins the version as tritonclient does (`model_version`: the
    // /v2/models/<m>/versions/<v>/... routes).
    for extra in [&[][..], &["--binary"][..], &["--version", "1"][..]] {
        let mut args = vec![raw.to_str().unwrap(), "--url", &url, "--model", &model];
        args.extend_from_slice(extra);
        let out: Value = serde_json::from_str(&python("triton_infer.py", &args)).unwrap();
        assert_eq!(out["model_name"], model.as_str(), "{extra:?}");
        assert_eq!(out["model_version"], "1", "{extra:?}");
        assert_eq!(out["id"], "triton-1");
        assert_eq!(out["metadata_inputs"][0]["name"], "image_tensor:0");
        let scores: Vec<f64> = serde_json::from_value(out["scores"].clone()).unwrap();
        let classes: Vec<f64> = serde_json::from_value(out["classes"].clone()).unwrap();
        let people: Vec<usize> = (0..scores.len())
            .filter(|&i| classes[i] == 1.0 && scores[i] > 0.5)
            .collect();
        assert_eq!(people.len(), 1, "{extra:?}: {out}");
        assert!(scores[people[0]] > 0.8, "{out}");
        // Normalised (ymin, xmin, ymax, xmax): the astronaut fills the middle of the frame.
        let b: Vec<f64> = serde_json::from_value(out["boxes"][people[0]].clone()).unwrap();
        assert!(
            b[0] < 0.5 && b[1] < 0.5 && b[2] > 0.5 && b[3] > 0.5,
            "{b:?}"
        );
    }
    let _ = std::fs::remove_file(raw);
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_answer_inline_with_wait_and_by_polling() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("jobs");
    let dispatcher = Dispatcher::start(&model, &[]).await;
    let _worker = InProcessWorker::start(&model);
    dispatcher.wait_model_ready(&model).await;

    let inline = dispatcher
        .post(&format!("/v1/models/{model}/jobs?wait=30s"))
        .header("content-type", "image/png")
        .body(std::fs::read(ember_testkit::root().join("tests/samples/camera.png")).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(inline.status(), 200);
    let view: Value = inline.json().await.unwrap();
    assert_eq!(view["status"], "done");
    assert_eq!(
        view["result"]["outputs"]["detections"][0]["label"],
        "person"
    );

    let accepted = dispatcher.submit(&model, "coffee.png", &[]).await;
    assert_eq!(accepted.status(), 202);
    let location = accepted.headers()["location"].to_str().unwrap().to_string();
    let body: Value = accepted.json().await.unwrap();
    let job_id = body["job_id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/jobs/{job_id}"));
    assert_eq!(body["status_url"], location);
    let view = dispatcher.wait_done(&job_id).await;
    assert_eq!(view["status"], "done");
    assert_eq!(
        view["result"]["outputs"]["detections"]
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // A bad image is a failed job with the worker's code.
    let bad = dispatcher
        .post(&format!("/v1/models/{model}/jobs?wait=30s"))
        .header("content-type", "image/png")
        .body(b"not a png".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let view: Value = bad.json().await.unwrap();
    assert_eq!(view["status"], "failed");
    assert_eq!(view["result"]["error"]["code"], "invalid_image");

    // Another replica answers for the same job (the store is shared), before and after.
    let other = Dispatcher::start(&model, &[]).await;
    let seen: Value = other
        .get(&format!("/v1/jobs/{job_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let here: Value = dispatcher
        .get(&format!("/v1/jobs/{job_id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(seen["status"], "done");
    assert_eq!(seen, here);

    let missing = dispatcher.get("/v1/jobs/no-such-job").await.unwrap();
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "job_not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_arrives_once_and_verifies_with_the_standard_webhooks_library() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("callback");
    let receiver = Receiver::start(vec![], None).await;
    let dispatcher = Dispatcher::start(&model, &[]).await;
    let _worker = InProcessWorker::start(&model);
    let url = receiver.url();
    let mut ids = Vec::new();
    for sample in ["astronaut.png", "chelsea.png"] {
        let response = dispatcher
            .submit(&model, sample, &[("x-callback-url", &url)])
            .await;
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        ids.push(body["job_id"].as_str().unwrap().to_string());
    }
    receiver
        .wait_until("both callbacks", |d| d.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        assert_eq!(
            receiver.for_job(id).len(),
            1,
            "callback for {id} not exactly once"
        );
    }
    let deliveries = receiver.deliveries();
    let recorded = serde_json::json!({
        "secret": common::SECRET,
        "deliveries": deliveries.iter().map(|d| serde_json::json!({
            "body": d.body,
            "headers": {
                "webhook-id": d.headers["webhook-id"].to_str().unwrap(),
                "webhook-timestamp": d.headers["webhook-timestamp"].to_str().unwrap(),
                "webhook-signature": d.headers["webhook-signature"].to_str().unwrap(),
            },
        })).collect::<Vec<_>>(),
    });
    let file = std::env::temp_dir().join(format!("{model}-webhooks.json"));
    std::fs::write(&file, recorded.to_string()).unwrap();
    let verified = python("verify_webhook.py", &[file.to_str().unwrap()]);
    let mut verified: Vec<&str> = verified.lines().collect();
    verified.sort();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(verified, expected);
    let _ = std::fs::remove_file(file);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_failing_twice_gets_the_result_on_the_third_attempt() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("retry");
    let receiver = Receiver::start(vec![Reply::Status(500), Reply::RetryAfter(503, 1)], None).await;
    let dispatcher = Dispatcher::start(&model, &[]).await;
    let _worker = InProcessWorker::start(&model);
    let response = dispatcher
        .submit(&model, "camera.png", &[("x-callback-url", &receiver.url())])
        .await;
    let body: Value = response.json().await.unwrap();
    let job_id = body["job_id"].as_str().unwrap().to_string();
    receiver
        .wait_until("three attempts", |d| d.len() >= 3)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let attempts = receiver.for_job(&job_id);
    assert_eq!(
        attempts.len(),
        3,
        "two failures, then one success, then nothing"
    );
    // One webhook id across the retries; Retry-After: 1 was honoured before the third.
    let ids: Vec<_> = attempts
        .iter()
        .map(|d| d.headers["webhook-id"].clone())
        .collect();
    assert!(ids.iter().all(|id| *id == ids[0]));
    assert!(attempts[2].at.duration_since(attempts[1].at) >= Duration::from_millis(950));
    let metrics = dispatcher.metrics().await;
    assert_eq!(
        ember_testkit::metric(
            &metrics,
            "ember_dispatcher_callbacks_total{outcome=\"delivered\"}"
        ),
        1.0
    );
    assert!(ember_testkit::metric(&metrics, "ember_dispatcher_callback_attempts_total") >= 3.0);
    assert!(
        ember_testkit::metric(
            &metrics,
            "ember_dispatcher_http_requests_total{method=\"POST\",route=\"/v1/models/{model}/jobs\",status=\"202\"}"
        ) >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_that_never_answers_ends_in_the_callback_dead_letter_queue() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("deadcb");
    let receiver = Receiver::start(vec![], Some(Reply::Hang)).await;
    let dispatcher = Dispatcher::start(
        &model,
        &[
            "--callback-max-attempts",
            "2",
            "--callback-timeout",
            "300ms",
        ],
    )
    .await;
    let _worker = InProcessWorker::start(&model);
    let response = dispatcher
        .submit(&model, "coffee.png", &[("x-callback-url", &receiver.url())])
        .await;
    let body: Value = response.json().await.unwrap();
    let job_id = body["job_id"].as_str().unwrap().to_string();

    let dead = common::dead_lettered_callback(&job_id).await;
    let headers = dead.properties.headers().as_ref().unwrap();
    let error = ember_core::amqp::header_str(Some(headers), "ember-callback-error").unwrap();
    assert!(error.contains("after 2 attempts"), "{error}");
    assert_eq!(receiver.for_job(&job_id).len(), 2);
    let result: Value = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(result["job_id"], job_id.as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn one_idempotency_key_gives_one_job_one_result_one_callback() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("idem");
    let receiver = Receiver::start(vec![], None).await;
    let dispatcher = Dispatcher::start(&model, &[]).await;
    let _worker = InProcessWorker::start(&model);
    let key = uuid::Uuid::new_v4().to_string();
    let url = receiver.url();
    let headers = [
        ("idempotency-key", key.as_str()),
        ("x-callback-url", url.as_str()),
    ];
    let first: Value = dispatcher
        .submit(&model, "astronaut.png", &headers)
        .await
        .json()
        .await
        .unwrap();
    let second: Value = dispatcher
        .submit(&model, "astronaut.png", &headers)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["job_id"], second["job_id"]);
    let job_id = first["job_id"].as_str().unwrap();
    assert_eq!(dispatcher.wait_done(job_id).await["status"], "done");
    receiver.wait_until("the callback", |d| !d.is_empty()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.deliveries().len(), 1, "one callback");

    // A key whose first request died between its claim and its publish confirm (a dispatcher
    // killed mid-request) is left pending: the client's retry must not be told "accepted" for
    // a job that never reached the queue. It publishes the job under the claimed id.
    let ghost = uuid::Uuid::new_v4().to_string();
    let key = uuid::Uuid::new_v4().to_string();
    let mut redis = redis::Client::open("redis://127.0.0.1:6379/")
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("SET")
        // Without auth the tenant part of the key is empty.
        .arg(format!("ember:idem::{model}:{key}"))
        .arg(format!("pending:{ghost}"))
        .arg("EX")
        .arg(120)
        .query_async::<()>(&mut redis)
        .await
        .unwrap();
    let headers = [
        ("idempotency-key", key.as_str()),
        ("x-callback-url", url.as_str()),
    ];
    let retried: Value = dispatcher
        .submit(&model, "astronaut.png", &headers)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(retried["job_id"], ghost.as_str());
    assert_eq!(dispatcher.wait_done(&ghost).await["status"], "done");
    // Now committed: a further retry gets the job without publishing it again.
    let again: Value = dispatcher
        .submit(&model, "astronaut.png", &headers)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(again["job_id"], ghost.as_str());
    receiver
        .wait_until("the retried job's callback", |d| d.len() >= 2)
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(receiver.for_job(&ghost).len(), 1, "one callback");
    assert_eq!(receiver.deliveries().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_their_status_and_code() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("errors");
    // No worker: the queue (max length 2) fills up.
    let dispatcher = Dispatcher::start(
        &model,
        &[
            "--queue-max-length",
            "2",
            "--max-body-bytes",
            "1000000",
            "--infer-timeout",
            "1s",
        ],
    )
    .await;
    let code = |v: &Value| v["error"]["code"].as_str().unwrap_or_default().to_string();

    // Quorum queues apply x-max-length a little late (the limit is checked as the log is
    // applied), so a few publishes may pass the limit; then the broker refuses and the
    // dispatcher answers 429.
    let mut accepted = 0;
    let full = loop {
        let response = dispatcher.submit(&model, "coffee.png", &[]).await;
        if response.status() != 202 {
            break response;
        }
        accepted += 1;
        assert!(accepted < 50, "the queue never refused a publish");
    };
    assert!(accepted >= 2, "refused before the limit: {accepted}");
    assert_eq!(full.status(), 429);
    assert_eq!(full.headers()["retry-after"], "1");
    assert_eq!(code(&full.json().await.unwrap()), "queue_full");

    let big = dispatcher
        .post(&format!("/v1/models/{model}/jobs"))
        .header("content-type", "image/png")
        .body(vec![0u8; 2_000_000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    assert_eq!(big.headers()["connection"], "close");
    let big: Value = big.json().await.unwrap();
    assert_eq!(code(&big), "body_too_large");
    assert_eq!(
        big["error"]["message"],
        "the body is larger than the limit of 1000000 bytes"
    );

    let unknown = dispatcher.submit("no-such-model", "coffee.png", &[]).await;
    assert_eq!(unknown.status(), 404);
    assert_eq!(code(&unknown.json().await.unwrap()), "model_not_found");

    for url in [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:8080/hook",
        "http://[::ffff:10.0.0.1]/hook",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[fe80::1]/hook",
        "http://[fc00::1]/hook",
        "http://[fd00:ec2::254]/",
        "http://100.64.0.1/hook",
        "http://2130706434/hook",
    ] {
        let refused = dispatcher
            .submit(&model, "coffee.png", &[("x-callback-url", url)])
            .await;
        assert_eq!(refused.status(), 400, "{url}");
        assert_eq!(
            code(&refused.json().await.unwrap()),
            "callback_url_forbidden",
            "{url}"
        );
    }
    let text = dispatcher
        .post(&format!("/v1/models/{model}/jobs"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(text.status(), 415);

    let not_ready = dispatcher
        .get(&format!("/v2/models/{model}/ready"))
        .await
        .unwrap();
    assert_eq!(not_ready.status(), 503);
    let garbage = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(garbage.status(), 400);
    // Open Inference Protocol routes answer {"error": "<string>"} (with the code beside it).
    let body: Value = garbage.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not an inference request")
    );
    assert_eq!(body["code"], "invalid_request");
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_guard_the_api_but_not_health() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("auth");
    let dispatcher = Dispatcher::start(&model, &["--auth-token", "s3cret,other"]).await;
    assert_eq!(
        dispatcher.get("/v2/health/live").await.unwrap().status(),
        200
    );
    let denied = dispatcher
        .get(&format!("/v2/models/{model}"))
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let wrong = dispatcher
        .http
        .get(format!("{}/v2/models/{model}", dispatcher.url))
        .bearer_auth("s3cre")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let allowed = dispatcher
        .http
        .get(format!("{}/v2/models/{model}", dispatcher.url))
        .bearer_auth("other")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn pending_callbacks_survive_a_dispatcher_restart() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("restart");
    let receiver = Receiver::start(vec![], Some(Reply::Status(503))).await;
    let mut dispatcher = Dispatcher::start(&model, &["--callback-max-attempts", "1000"]).await;
    let _worker = InProcessWorker::start(&model);
    let url = receiver.url();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let body: Value = dispatcher
            .submit(&model, "chelsea.png", &[("x-callback-url", &url)])
            .await
            .json()
            .await
            .unwrap();
        ids.push(body["job_id"].as_str().unwrap().to_string());
    }
    // Every callback is in hand and failing.
    let all = ids.clone();
    receiver
        .wait_until("a failed attempt per job", move |d| {
            all.iter()
                .all(|id| d.iter().any(|x| x.body.contains(id.as_str())))
        })
        .await;
    // A graceful stop hands the callbacks in hand back to the queue; a crash (SIGKILL) leaves
    // them unacked, which the broker requeues too. Both, one after the other.
    let status = dispatcher.terminate().await;
    assert!(status.success(), "{status:?}: {}", dispatcher.log_text());
    let mut second = Dispatcher::start(&model, &["--callback-max-attempts", "1000"]).await;
    let before = receiver.deliveries().len();
    receiver
        .wait_until("attempts by the second dispatcher", move |d| {
            d.len() >= before + 5
        })
        .await;
    second.kill();
    receiver.set_default(Reply::Status(200));
    let restarted = Dispatcher::start(&model, &["--callback-max-attempts", "1000"]).await;
    let started = std::time::Instant::now();
    loop {
        let delivered = ember_testkit::metric(
            &restarted.metrics().await,
            "ember_dispatcher_callbacks_total{outcome=\"delivered\"}",
        );
        if delivered >= ids.len() as f64 {
            assert_eq!(delivered, ids.len() as f64);
            break;
        }
        assert!(
            started.elapsed() < ember_testkit::PATIENCE,
            "{delivered} of {} delivered",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every job's callback reached the receiver while it answered 200.
    for id in &ids {
        assert!(
            receiver.for_job(id).len() >= 3,
            "job {id}: failing attempts, then a delivery"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_job_is_skipped_and_reported_cancelled() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("cancel");
    let dispatcher = Dispatcher::start(&model, &[]).await;
    let _worker = InProcessWorker::start(&model);
    dispatcher.wait_model_ready(&model).await;
    // A backlog in front, so the cancelled job is still queued when the DELETE lands.
    let mut backlog = Vec::new();
    for _ in 0..30 {
        let body: Value = dispatcher
            .submit(&model, "astronaut.png", &[])
            .await
            .json()
            .await
            .unwrap();
        backlog.push(body["job_id"].as_str().unwrap().to_string());
    }
    let body: Value = dispatcher
        .submit(&model, "camera.png", &[])
        .await
        .json()
        .await
        .unwrap();
    let job_id = body["job_id"].as_str().unwrap().to_string();
    let deleted = dispatcher
        .http
        .delete(format!("{}/v1/jobs/{job_id}", dispatcher.url))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 202);
    for id in &backlog {
        dispatcher.wait_done(id).await;
    }
    let started = std::time::Instant::now();
    let view = loop {
        let view: Value = dispatcher
            .get(&format!("/v1/jobs/{job_id}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view.get("result").is_some() {
            break view;
        }
        assert!(started.elapsed() < ember_testkit::PATIENCE);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["status"], "cancelled", "{view}");
    assert_eq!(view["result"]["error"]["code"], "cancelled");
    // A finished job cannot be cancelled.
    let late = dispatcher
        .http
        .delete(format!("{}/v1/jobs/{}", dispatcher.url, backlog[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(late.status(), 409);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_callback_host_that_rebinds_to_loopback_after_submit_is_never_connected_to() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("rebind");
    // The receiver the rebinding name points at: loopback, not allow-listed.
    let inside = Receiver::start(vec![], None).await;
    // A receiver that is allow-listed, reached through a name too: proves the names resolve
    // through the injected resolver when the client connects.
    let allowed = Receiver::start_on("127.0.0.2", vec![], None).await;
    let names = Arc::new(
        ember_testkit::resolver::ScriptedNames::default()
            .answer("rebind.test", &[&["203.0.113.7"], &["127.0.0.1"]])
            .answer("allowed.test", &[&["127.0.0.2"]]),
    );
    let dispatcher = common::InProcessDispatcher::start(
        &model,
        &["--callback-allow-net", "127.0.0.2/32"],
        names.clone(),
    )
    .await;
    let _worker = InProcessWorker::start(&model);

    let rebinding = format!("http://rebind.test:{}/hook", inside.addr.port());
    let response = dispatcher
        .submit(&model, "camera.png", &[("x-callback-url", &rebinding)])
        .await;
    assert_eq!(response.status(), 202, "public at submit time");
    let body: Value = response.json().await.unwrap();
    let rebound_job = body["job_id"].as_str().unwrap().to_string();
    let good = format!("http://allowed.test:{}/hook", allowed.addr.port());
    let body: Value = dispatcher
        .submit(&model, "camera.png", &[("x-callback-url", &good)])
        .await
        .json()
        .await
        .unwrap();
    let good_job = body["job_id"].as_str().unwrap().to_string();

    allowed
        .wait_until("the allow-listed callback", |d| {
            d.iter().any(|d| d.body.contains(&good_job))
        })
        .await;
    let dead = common::dead_lettered_callback(&rebound_job).await;
    let headers = dead.properties.headers().as_ref().unwrap();
    let error = ember_core::amqp::header_str(Some(headers), "ember-callback-error").unwrap();
    assert!(
        error.contains("refused") && error.contains("rebind.test") && error.contains("127.0.0.1"),
        "{error}"
    );
    let attempts = headers.inner().get("ember-callback-attempts").cloned();
    assert_eq!(
        attempts,
        Some(lapin::types::AMQPValue::LongInt(1)),
        "given up at once"
    );
    assert!(
        inside.deliveries().is_empty(),
        "the loopback receiver got a request"
    );
    let lookups = names.lookups.lock().unwrap().clone();
    assert!(
        lookups.iter().filter(|n| *n == "rebind.test").count() >= 2,
        "resolved at submit and at connect: {lookups:?}"
    );
    // Submitted now, the name's loopback answer is refused at the door.
    let refused = dispatcher
        .submit(&model, "camera.png", &[("x-callback-url", &rebinding)])
        .await;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "callback_url_forbidden");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_failures_answer_a_code_and_an_error_id_but_never_the_store_error() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("leak");
    let redis = ember_testkit::fake_redis::FakeRedis::start().await;
    let dispatcher = Dispatcher::start(&model, &["--redis-url", &redis.url]).await;
    let marker = ember_testkit::fake_redis::FakeRedis::MARKER;

    let mut ids = Vec::new();
    let submitted = dispatcher.submit(&model, "coffee.png", &[]).await;
    let status = dispatcher
        .get("/v1/jobs/00000000-0000-0000-0000-000000000000")
        .await
        .unwrap();
    for (route, response) in [("submit", submitted), ("status", status)] {
        assert_eq!(response.status(), 503, "{route}");
        assert_eq!(response.headers()["retry-after"], "1", "{route}");
        let text = response.text().await.unwrap();
        assert!(
            !text.contains("fake-redis") && !text.contains("10.11.12.13"),
            "{route}: {text}"
        );
        let body: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(body["error"]["code"], "store_unavailable", "{text}");
        ids.push(body["error"]["error_id"].as_str().unwrap().to_string());
    }
    let infer = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .json(&serde_json::json!({
            "inputs": [{"name": "image_tensor:0", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(infer.status(), 503);
    let text = infer.text().await.unwrap();
    assert!(
        !text.contains("fake-redis") && !text.contains("10.11.12.13"),
        "{text}"
    );
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["code"], "store_unavailable");
    let id = body["error_id"].as_str().unwrap().to_string();
    assert!(body["error"].as_str().unwrap().contains(&id), "{text}");
    ids.push(id);

    // The operator finds each one in the log, with the detail.
    let log = dispatcher.log_text();
    for id in &ids {
        let line = log
            .lines()
            .find(|l| l.contains(id.as_str()))
            .unwrap_or_else(|| panic!("error id {id} not logged: {log}"));
        assert!(line.contains(marker), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431_and_a_token_over_its_rate_gets_429() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("limits");
    let dispatcher = Dispatcher::start(
        &model,
        &[
            "--auth-token",
            "first,second",
            "--rate-limit",
            "3/h",
            "--max-headers",
            "16",
            "--max-header-bytes",
            "2048",
        ],
    )
    .await;
    let metadata = format!("{}/v2/models/{model}", dispatcher.url);
    let get = |token: &str| dispatcher.http.get(&metadata).bearer_auth(token);

    // Too many fields: the protocol's error format on /v2.
    let mut many = get("first");
    for i in 0..20 {
        many = many.header(format!("x-extra-{i}"), "1");
    }
    let many = many.send().await.unwrap();
    assert_eq!(many.status(), 431);
    let body: Value = many.json().await.unwrap();
    assert_eq!(body["code"], "headers_too_large");
    assert!(
        body["error"].as_str().unwrap().contains("at most 16"),
        "{body}"
    );
    // Too many bytes: the jobs' error format on /v1.
    let large = dispatcher
        .post(&format!("/v1/models/{model}/jobs"))
        .bearer_auth("first")
        .header("x-large", "a".repeat(4000))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(large.status(), 431);
    let body: Value = large.json().await.unwrap();
    assert_eq!(body["error"]["code"], "headers_too_large");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 2048"),
        "{body}"
    );
    // Past hyper's own limit (100 fields), still 431.
    let mut hundreds = dispatcher.http.get(&metadata);
    for i in 0..150 {
        hundreds = hundreds.header(format!("x-extra-{i}"), "1");
    }
    assert_eq!(hundreds.send().await.unwrap().status(), 431);

    // The rate limit: the three refused above did not count (refused before it); three
    // requests pass, the fourth is refused with Retry-After. 3/h refills one per 20 minutes.
    for i in 0..3 {
        assert_eq!(
            get("first").send().await.unwrap().status(),
            200,
            "request {i}"
        );
    }
    let limited = get("first").send().await.unwrap();
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1200).contains(&retry_after), "{retry_after}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // Plain --auth-token tokens are one tenant (`default`) with one bucket: the second token is
    // over the rate too (tenants.rs shows tenants' buckets apart); health is exempt; a wrong
    // token is refused before.
    assert_eq!(get("second").send().await.unwrap().status(), 429);
    for _ in 0..5 {
        let live = dispatcher
            .http
            .get(format!("{}/v2/health/live", dispatcher.url))
            .bearer_auth("first")
            .send()
            .await
            .unwrap();
        assert_eq!(live.status(), 200);
    }
    let wrong = get("firs").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(wrong.headers()["www-authenticate"], "Bearer");
    let metrics = dispatcher.metrics().await;
    assert_eq!(
        ember_testkit::metric(
            &metrics,
            "ember_dispatcher_http_requests_total{method=\"GET\",route=\"/v2/models/{model}\",status=\"429\"}"
        ),
        2.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_auth_the_rate_limit_is_per_client_address() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("ratelimit");
    let dispatcher =
        Dispatcher::start(&model, &["--rate-limit", "2/h", "--rate-limit-burst", "2"]).await;
    let path = format!("/v2/models/{model}");
    for _ in 0..2 {
        assert_eq!(dispatcher.get(&path).await.unwrap().status(), 200);
    }
    let limited = dispatcher.get(&path).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    // The job routes share the client's bucket, with their own error format.
    let job = dispatcher.get("/v1/jobs/unknown").await.unwrap();
    assert_eq!(job.status(), 429);
    let body: Value = job.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(
        dispatcher.get("/v2/health/ready").await.unwrap().status(),
        200
    );
}

#[test]
fn an_empty_auth_token_is_a_startup_error() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ember-dispatcher"))
        .current_dir(ember_testkit::root())
        .args(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--auth-token", "s3cret,"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("empty --auth-token"), "{stderr}");
}

/// Results are stored (pollable) only when the job asked: a job over HTTP always, an AMQP job
/// with `ember-store-result` (a boolean or the text `true`) or a callback URL; a plain AMQP job
/// gets its reply and a publish to `ember.results`, and no durable copy.
#[tokio::test(flavor = "multi_thread")]
async fn an_amqp_job_is_stored_only_when_it_asks() {
    use ember_core::amqp::Headers;
    use ember_core::topology;
    use futures_util::StreamExt;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueBindOptions};
    use lapin::types::{AMQPValue, FieldTable};

    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("stored");
    let dispatcher = Dispatcher::start(&model, &[]).await;
    let _worker = InProcessWorker::start(&model);
    dispatcher.wait_model_ready(&model).await;
    let connection = ember_testkit::amqp::connect().await;
    let channel = connection.create_channel().await.unwrap();
    // A test broker that ran dispatchers from before results were stored only when asked still
    // binds the store to ember.results; dispatchers leave it for upgrades (docs/deploy.md).
    channel
        .queue_unbind(
            "ember.results.store".into(),
            topology::RESULTS_EXCHANGE.into(),
            "#".into(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (reply_to, mut replies) = ember_testkit::amqp::reply_queue(&channel).await;
    // A user's own subscriptions, one on each results exchange.
    let watch = connection.create_channel().await.unwrap();
    let mut seen = Vec::new();
    for exchange in [
        topology::RESULTS_EXCHANGE,
        topology::RESULTS_STORED_EXCHANGE,
    ] {
        let (queue, consumer) = topology::private_queue(&watch).await.unwrap();
        watch
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                format!("{model}.*").as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        seen.push(consumer);
    }
    let image = std::fs::read(ember_testkit::root().join("tests/samples/astronaut.png")).unwrap();
    let cases: [(&str, Option<AMQPValue>); 3] = [
        ("plain", None),
        ("flag", Some(AMQPValue::Boolean(true))),
        ("text", Some(AMQPValue::LongString("true".into()))),
    ];
    for (name, flag) in &cases {
        let mut headers = Headers::new().into_table();
        if let Some(flag) = flag {
            headers.insert(
                ember_core::protocol::header::STORE_RESULT.into(),
                flag.clone(),
            );
        }
        let properties = lapin::BasicProperties::default()
            .with_content_type("image/png".into())
            .with_message_id(format!("{model}-{name}").as_str().into())
            .with_reply_to(reply_to.as_str().into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                topology::JOBS_EXCHANGE.into(),
                model.as_str().into(),
                BasicPublishOptions::default(),
                &image,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    // Every job is answered by its reply, and the stored ones can be polled.
    for _ in &cases {
        let reply = tokio::time::timeout(ember_testkit::PATIENCE, replies.next())
            .await
            .expect("a reply")
            .unwrap()
            .unwrap();
        let result: Value = serde_json::from_slice(&reply.data).unwrap();
        assert_eq!(result["status"], "ok", "{result}");
    }
    for name in ["flag", "text"] {
        // A job published straight to the queue has no record until its result is stored
        // (404 till then; the reply may come first).
        let started = std::time::Instant::now();
        let view = loop {
            let response = dispatcher
                .get(&format!("/v1/jobs/{model}-{name}"))
                .await
                .unwrap();
            let view: Value = response.json().await.unwrap();
            if view["status"] == "done" {
                break view;
            }
            assert!(
                started.elapsed() < ember_testkit::PATIENCE,
                "{name} was never stored: {view}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            view["result"]["outputs"]["detections"][0]["label"],
            "person"
        );
    }
    // The plain job's result went to ember.results only, and was not stored.
    let mut ids = Vec::new();
    for consumer in &mut seen {
        let mut got = Vec::new();
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
        {
            let result: Value = serde_json::from_slice(&delivery.data).unwrap();
            got.push(result["job_id"].as_str().unwrap().to_string());
        }
        got.sort();
        ids.push(got);
    }
    assert_eq!(
        ids,
        [
            vec![format!("{model}-plain")],
            vec![format!("{model}-flag"), format!("{model}-text")]
        ]
    );
    let plain = dispatcher
        .get(&format!("/v1/jobs/{model}-plain"))
        .await
        .unwrap();
    assert_eq!(plain.status(), 404);
}
