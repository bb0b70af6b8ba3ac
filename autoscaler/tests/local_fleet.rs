//! The local backend end to end: the real autoscaler binary starting and stopping real workers
//! against the real broker, under a burst.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_core::protocol::JobResult;
use ember_core::topology::{self, QueueSettings};
use ember_testkit::process::Process;
use ember_testkit::{free_port, metric, root, unique_model};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};

const PATIENCE: Duration = Duration::from_secs(180);

async fn metrics(port: u16) -> String {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await;
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text).await;
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_scales_from_zero_drains_and_returns_to_zero_losing_nothing() {
    let root = root();
    let worker = Path::new(env!("CARGO_BIN_EXE_ember-autoscaler")).with_file_name("ember-worker");
    assert!(
        worker.is_file(),
        "{} is missing: run the tests with --workspace (scripts/test does) so the worker is built",
        worker.display()
    );
    let model = unique_model("scale");
    let admin = free_port();
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{model}-autoscaler.log"));
    // On drop (a failed assertion included) it gets SIGTERM, so that it stops the workers it
    // started instead of leaving them running.
    let mut autoscaler = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_ember-autoscaler"))
            .current_dir(&root)
            .args([
                "--model-dir",
                "models/ssdlite-person",
                "--model-name",
                &model,
            ])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args([
                "--min-replicas",
                "0",
                "--max-replicas",
                "3",
                "--tick",
                "200ms",
            ])
            .args(["--initial-service-rate", "5", "--target-drain-time", "2s"])
            .args([
                "--scale-down-window",
                "2s",
                "--idle-to-zero",
                "3s",
                "--scale-down-step",
                "3",
            ])
            .args([
                "--worker-arg",
                "--intra-threads 1 --heartbeat-interval 200ms --max-batch 4",
            ])
            .env("EMBER_LOG", "info,ort=warn"),
        log,
    )
    .terminate_on_drop();
    let log_text = || autoscaler.log_text();

    let connection = ember_testkit::amqp::connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology::declare_model(&channel, &model, QueueSettings::default())
        .await
        .unwrap();
    let (reply_queue, mut replies) = ember_testkit::amqp::reply_queue(&channel).await;
    // Idle at zero replicas first: the gauge is there (the autoscaler has ticked) and says 0.
    let started = Instant::now();
    let idle = format!("ember_autoscaler_desired_replicas{{model=\"{model}\"}} 0");
    while !metrics(admin).await.lines().any(|line| line == idle) {
        assert!(
            started.elapsed() < PATIENCE,
            "autoscaler never ticked: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !log_text().contains("worker started"),
        "replicas before any job"
    );

    // The burst.
    let body = std::fs::read(root.join("tests/samples/astronaut.png")).unwrap();
    let burst_at = Instant::now();
    let jobs = 80;
    for i in 0..jobs {
        let confirm = channel
            .basic_publish(
                topology::JOBS_EXCHANGE.into(),
                model.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default()
                    .with_message_id(format!("job-{i}").as_str().into())
                    .with_correlation_id(format!("job-{i}").as_str().into())
                    .with_reply_to(reply_queue.as_str().into())
                    .with_content_type("image/png".into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    let mut first_decision = None;
    let mut first_result = None;
    let mut peak = 0.0f64;
    let mut results: HashMap<String, Vec<JobResult>> = HashMap::new();
    let deadline = Instant::now() + PATIENCE;
    while results.len() < jobs {
        tokio::select! {
            next = replies.next() => {
                let delivery = next.unwrap().unwrap();
                let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
                first_result.get_or_insert_with(|| burst_at.elapsed());
                results.entry(result.job_id.clone()).or_default().push(result);
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                let text = metrics(admin).await;
                let desired = metric(&text, &format!("ember_autoscaler_desired_replicas{{model=\"{model}\"}}"));
                if desired > 0.0 {
                    first_decision.get_or_insert_with(|| burst_at.elapsed());
                }
                peak = peak.max(desired);
                assert!(Instant::now() < deadline, "{} of {jobs} answered: {}", results.len(), log_text());
            }
        }
    }
    let drained_after = burst_at.elapsed();
    assert!(
        peak >= 2.0,
        "the burst did not scale out (peak {peak}): {}",
        log_text()
    );
    for (job, answers) in &results {
        // attempt 1 everywhere: no job was redelivered, so no worker was stopped holding one.
        assert!(
            answers.iter().all(|r| r.attempt == 1 && r.error.is_none()),
            "{job}: {answers:?}"
        );
    }
    // Back to zero once idle.
    let started = Instant::now();
    loop {
        let text = metrics(admin).await;
        let desired = metric(
            &text,
            &format!("ember_autoscaler_desired_replicas{{model=\"{model}\"}}"),
        );
        let ready = metric(
            &text,
            &format!("ember_autoscaler_ready_replicas{{model=\"{model}\"}}"),
        );
        if desired == 0.0
            && ready == 0.0
            && log_text().matches("worker drained and exited").count() >= peak as usize
        {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "never returned to zero: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!log_text().contains("worker died"), "{}", log_text());
    println!(
        "burst of {jobs}: first scale decision after {:?}, first result after {:?}, drained after {:?}, peak {peak} replicas",
        first_decision.unwrap(),
        first_result.unwrap(),
        drained_after
    );
    autoscaler.signal("TERM");
    let status = autoscaler.wait_exit();
    assert!(status.success(), "{status:?}");
    for queue in topology::model_queues(&model) {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
