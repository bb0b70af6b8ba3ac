//! Broker restart during load. Its own test binary: it stops the broker's app, which would
//! disturb any test running beside it (test binaries run one after another).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{JobOptions, Worker};
use ember_core::protocol::JobResult;
use ember_core::topology;
use ember_testkit::metric;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{FieldTable, ShortString};

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl").args(args).status().unwrap();
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Starts the broker's app again however the test ends.
struct RestoreBroker;

impl Drop for RestoreBroker {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").status();
        let _ = Command::new("rabbitmqctl").arg("await_startup").status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_reconnects_after_a_broker_restart_and_every_confirmed_job_is_answered() {
    let model = ember_testkit::unique_model("restart");
    let results_queue = format!("{model}.results");
    let _restore = RestoreBroker;
    let client = common::Client::new(&model).await;
    // A durable queue for the results, so results published before the restart survive it.
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        common::long_string("quorum"),
    );
    client
        .channel
        .queue_declare(
            results_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap();
    client
        .channel
        .queue_bind(
            results_queue.as_str().into(),
            topology::RESULTS_EXCHANGE.into(),
            format!("{model}.*").as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let worker = Worker::start(&model, &["--max-batch", "4", "--amqp-max-backoff", "1s"]);
    let astronaut = common::sample("astronaut.png");
    let mut ids = HashSet::new();
    for _ in 0..60 {
        let id = client
            .submit(
                &astronaut,
                JobOptions {
                    content_type: Some("image/png"),
                    ..JobOptions::default()
                },
            )
            .await;
        ids.insert(id);
    }
    // Every job above is confirmed. Restart the broker while the worker is busy with them.
    let started = Instant::now();
    while metric(&worker.metrics(), "ember_worker_jobs_total") < 5.0 {
        assert!(
            started.elapsed() < ember_testkit::PATIENCE,
            "the worker never got going"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(client);
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    let connection = ember_testkit::amqp::connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            results_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut answered = HashSet::new();
    let deadline = Instant::now() + ember_testkit::PATIENCE;
    while !ids.is_subset(&answered) {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, consumer.next()).await {
            Ok(Some(Ok(delivery))) => {
                let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
                answered.insert(result.job_id);
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
            other => panic!(
                "{} of {} jobs answered; then {other:?}; worker log:\n{}",
                ids.intersection(&answered).count(),
                ids.len(),
                worker.log_text()
            ),
        }
    }
    assert!(metric(&worker.metrics(), "ember_worker_broker_reconnects_total") >= 1.0);
    assert!(worker.log_text().contains("reconnecting to the broker"));
    drop(worker);
    for queue in std::iter::once(results_queue).chain(topology::model_queues(&model)) {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
