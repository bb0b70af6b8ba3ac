//! The local backend end to end: the real autoscaler binary starting and stopping real workers
//! against the real broker, under a burst.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_core::protocol::JobResult;
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const PATIENCE: Duration = Duration::from_secs(180);

/// The autoscaler process; on drop (a failed assertion included) it gets SIGTERM so that it
/// stops the workers it started instead of leaving them running.
struct Autoscaler(std::process::Child);

impl Drop for Autoscaler {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let worker = Path::new(env!("CARGO_BIN_EXE_ember-autoscaler")).with_file_name("ember-worker");
    assert!(
        worker.is_file(),
        "{} is missing: run the tests with --workspace (scripts/test does) so the worker is built",
        worker.display()
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let model = format!("scale-{}", &id[..8]);
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{model}-autoscaler.log"));
    let autoscaler = Command::new(env!("CARGO_BIN_EXE_ember-autoscaler"))
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
        .env("EMBER_LOG", "info,ort=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut autoscaler = Autoscaler(autoscaler);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let connection = Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology::declare_model(&channel, &model, QueueSettings::default())
        .await
        .unwrap();
    let reply = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut replies = channel
        .basic_consume(
            reply.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Idle at zero replicas first.
    let started = Instant::now();
    while metric(
        &metrics(admin).await,
        &format!("ember_autoscaler_desired_replicas{{model=\"{model}\"}}"),
    ) != Some(0.0)
    {
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
                    .with_reply_to(reply.name().clone())
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
                let desired = metric(&text, &format!("ember_autoscaler_desired_replicas{{model=\"{model}\"}}")).unwrap_or(0.0);
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
        if desired == Some(0.0)
            && ready == Some(0.0)
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
    let _ = Command::new("kill")
        .args(["-TERM", &autoscaler.0.id().to_string()])
        .status();
    let status = autoscaler.0.wait().unwrap();
    assert!(status.success(), "{status:?}");
    for queue in topology::model_queues(&model) {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
