//! Jobs pinned to a model version (`ember-model-version`, routing key `<model>@<version>`),
//! against a real worker and broker: served by that version, forwarded to a version that is
//! coming, answered `model_version_not_found` for one that is not served, and, once a version
//! is retired, the jobs waiting for it are answered rather than lost.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Client, JobOptions, Worker};
use ember_core::protocol::{ErrorCode, JobResult, Status};
use ember_core::topology::{self, QueueSettings, Retired};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;

fn iris_job() -> Vec<u8> {
    let (rows, _) = ember_testkit::iris_rows();
    serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": &rows[..4]}]
    }))
    .unwrap()
}

fn options<'a>(pin: Option<&'a str>, to_version: Option<&'a str>) -> JobOptions<'a> {
    JobOptions {
        content_type: Some("application/json"),
        pin,
        to_version,
        ..JobOptions::default()
    }
}

fn assert_version_not_found(result: &JobResult) {
    assert_eq!(result.status, Status::Error, "{result:?}");
    let error = result.error.as_ref().unwrap();
    assert_eq!(error.code, ErrorCode::ModelVersionNotFound, "{result:?}");
    assert_eq!(result.model_version, None, "no version ran it: {result:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pinned_jobs_are_answered_by_their_version_or_told_it_is_not_served() {
    let model = ember_testkit::unique_model("pin");
    let worker = Worker::start(
        &model,
        &[
            "--model-dir",
            "models/iris-classifier",
            "--heartbeat-interval",
            "200ms",
        ],
    );
    let mut client = Client::new(&model).await;
    let body = iris_job();

    // Version 1 (model.toml's default) is served: unpinned, pinned by header, and sent to its
    // queue by routing key are all answered by it, naming it.
    let unpinned = client.submit(&body, options(None, None)).await;
    let by_header = client.submit(&body, options(Some("1"), None)).await;
    let by_key = client.submit(&body, options(None, Some("1"))).await;
    // Version 9 has no queue: the worker cannot forward it and says so.
    let nobody = client.submit(&body, options(Some("9"), None)).await;
    let ids = [unpinned, by_header, by_key, nobody.clone()];
    client.collect(&ids).await;
    for id in &ids[..3] {
        let result = client.result(id);
        assert_eq!(result.status, Status::Ok, "{result:?}");
        assert_eq!(result.model_version.as_deref(), Some("1"));
    }
    assert_version_not_found(client.result(&nobody));

    // Version 2 is coming (a rollout declared its queue; no worker of it yet): a job pinned to
    // it is forwarded there and waits, unanswered.
    topology::declare_version(&client.channel, &model, "2", QueueSettings::default())
        .await
        .unwrap();
    let coming = client.submit(&body, options(Some("2"), None)).await;
    let version_two = topology::version_queue(&model, "2");
    let deadline = std::time::Instant::now() + ember_testkit::PATIENCE;
    while topology::ready_messages(&client.channel, &version_two)
        .await
        .unwrap()
        == 0
    {
        assert!(std::time::Instant::now() < deadline, "never forwarded");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    client
        .drain_for(std::time::Duration::from_millis(500))
        .await;
    assert!(
        !client.results.contains_key(&coming),
        "no version 1 answer for a version 2 job"
    );

    // Version 2 is retired after all (a rollback): its waiting job moves back, marked, and is
    // answered model_version_not_found by the worker left; nothing stays in a dead queue.
    let retired = topology::retire_version(&client.connection, &model, "2")
        .await
        .unwrap();
    assert_eq!(retired, Retired::Done { moved: 1 });
    client.collect(std::slice::from_ref(&coming)).await;
    assert_version_not_found(client.result(&coming));
    assert_eq!(client.results[&coming].len(), 1, "answered once");

    // A retired version's queue is gone: a publish by routing key is unroutable now.
    let probe = client.connection.create_channel().await.unwrap();
    let gone = probe
        .queue_declare(
            version_two.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(gone.is_err(), "the retired queue was deleted");

    // The worker's own version cannot be retired while it consumes it.
    let busy = topology::retire_version(&client.connection, &model, "1")
        .await
        .unwrap();
    assert_eq!(busy, Retired::InUse { moved: 0 });

    drop(worker);
    let channel = client.channel.clone();
    client.cleanup().await;
    let _ = channel
        .queue_delete(
            topology::version_queue(&model, "1").as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_pinned_by_routing_key_keeps_its_pin_when_it_comes_back_through_the_retry_lane() {
    let model = ember_testkit::unique_model("pinlane");
    let iris = [
        "--model-dir",
        "models/iris-classifier",
        "--heartbeat-interval",
        "200ms",
    ];
    // A v1 worker that dies on the job (the chaos marker), and a v2 worker beside it.
    let mut crashing =
        Worker::spawn_with_env(&model, &iris, &[("EMBER_WORKER_CHAOS_CRASH_ON", "kill-me")]);
    crashing.wait_ready();
    let v2 = [&iris[..], &["--model-version", "2"]].concat();
    let _two = Worker::start(&model, &v2);
    let mut client = Client::new(&model).await;
    let (rows, _) = ember_testkit::iris_rows();
    let body = serde_json::to_vec(&json!({
        "id": "kill-me",
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": &rows[..4]}]
    }))
    .unwrap();
    // Pinned by routing key alone: no header says "1".
    let job = client.submit(&body, options(None, Some("1"))).await;
    let status = crashing.exited().await;
    assert!(!status.success(), "the marked job killed the v1 worker");
    // A v1 worker without the marker takes the job back from v1's queue (redelivered), moves it
    // to the model's retry lane, which the v2 worker consumes too: the pin must go with it,
    // or v2 may answer it.
    let _one = Worker::start(&model, &iris);
    client.collect(std::slice::from_ref(&job)).await;
    client
        .drain_for(std::time::Duration::from_millis(500))
        .await;
    let answers = &client.results[&job];
    assert_eq!(answers.len(), 1, "{answers:?}");
    let result = &answers[0];
    assert_eq!(result.status, Status::Ok, "{result:?}");
    assert_eq!(result.model_version.as_deref(), Some("1"), "{result:?}");
    assert!(result.attempt >= 2, "it was redelivered: {result:?}");
    let channel = client.channel.clone();
    client.cleanup().await;
    for version in ["1", "2"] {
        let _ = channel
            .queue_delete(
                topology::version_queue(&model, version).as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
}
