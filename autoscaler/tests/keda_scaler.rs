//! KEDA's external scaler end to end: the real autoscaler binary in signal-only mode against the
//! real broker, asked by a client generated from KEDA's own proto. Its answers are the numbers
//! its decisions log and its metrics carry, as the backlog and the workers' in-flight jobs move.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_core::protocol::{Heartbeat, WorkerState};
use ember_core::topology::{self, QueueSettings};
use ember_grpc::externalscaler::external_scaler_client::ExternalScalerClient;
use ember_grpc::externalscaler::{GetMetricsRequest, ScaledObjectRef};
use ember_testkit::process::Process;
use ember_testkit::{PATIENCE, free_port, metric, unique_model};
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use tonic::transport::Channel;

type Client = ExternalScalerClient<Channel>;

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

/// The `replicas` of every "scaling decision" line the autoscaler logged for `model`, in order.
fn logged_decisions(log: &str, model: &str) -> Vec<(u64, u64)> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["fields"]["message"] == "scaling decision" && line["fields"]["model"] == model
        })
        .map(|line| {
            let fields = &line["fields"];
            (
                fields["replicas"].as_u64().unwrap(),
                fields["in_flight"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn scaled_object(metadata: &[(&str, &str)]) -> ScaledObjectRef {
    ScaledObjectRef {
        name: "ember-worker".into(),
        namespace: "ember".into(),
        scaler_metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

/// What KEDA would be told now: (metric value, active), or the error.
async fn ask(client: &mut Client, model: &str) -> Result<(f64, bool), tonic::Status> {
    let object = scaled_object(&[("model", model)]);
    let metrics = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(object.clone()),
            metric_name: format!("ember-{model}-replicas"),
        })
        .await?
        .into_inner();
    assert_eq!(metrics.metric_values.len(), 1, "{metrics:?}");
    let value = &metrics.metric_values[0];
    assert_eq!(value.metric_name, format!("ember-{model}-replicas"));
    assert_eq!(value.metric_value as f64, value.metric_value_float);
    let active = client.is_active(object).await?.into_inner().result;
    Ok((value.metric_value_float, active))
}

/// Fake heartbeats of one ready worker of `model` holding `in_flight` jobs, every 200 ms, until
/// the task is aborted.
fn heartbeats(
    channel: lapin::Channel,
    model: String,
    in_flight: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let beat = Heartbeat {
                worker: "fake-worker-1".into(),
                model: model.clone(),
                state: WorkerState::Ready,
                in_flight,
                completed: 0,
                busy_seconds: 0.0,
                model_load_seconds: 0.1,
                at_ms: 0,
                device: None,
                device_fallback: false,
                gpu: None,
                model_info: None,
            };
            channel
                .basic_publish(
                    topology::TELEMETRY_EXCHANGE.into(),
                    format!("{model}.fake-worker-1").as_str().into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&beat).unwrap(),
                    BasicProperties::default().with_expiration("5000".into()),
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn keda_is_answered_with_the_replicas_the_autoscaler_decides_from_backlog_and_in_flight_jobs()
{
    let model = unique_model("keda");
    let admin = free_port();
    let grpc = free_port();
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{model}-autoscaler.log"));
    let autoscaler = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_ember-autoscaler"))
            .args(["--backend", "signal", "--signal-model", &model])
            .args(["--keda-listen", &format!("127.0.0.1:{grpc}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args(["--tick", "200ms", "--heartbeat-timeout", "1s"])
            .args(["--min-replicas", "0", "--max-replicas", "8"])
            // One replica plans 5 * 0.8 = 4 jobs/s; a backlog is to go within 2 s.
            .args(["--initial-service-rate", "5", "--target-drain-time", "2s"])
            .args(["--scale-down-window", "1s", "--idle-to-zero", "1s"])
            .args(["--log-format", "json"])
            .env("EMBER_LOG", "info"),
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

    let started = Instant::now();
    let mut client = loop {
        match Client::connect(format!("http://127.0.0.1:{grpc}")).await {
            Ok(client) => break client,
            Err(error) => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "the external scaler never listened ({error}): {}",
                    log_text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };

    // Bad input: no model, an unknown one, a metric that is not the model's.
    let error = client
        .is_active(scaled_object(&[("queue", &model)]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error:?}");
    assert!(error.message().contains("names no model"), "{error:?}");
    let error = client
        .get_metric_spec(scaled_object(&[("model", "no-such-model")]))
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");
    assert!(error.message().contains("no-such-model"), "{error:?}");
    let error = client
        .get_metrics(GetMetricsRequest {
            scaled_object_ref: Some(scaled_object(&[("model", &model)])),
            metric_name: "rabbitmq-queue-length".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound, "{error:?}");

    let spec = client
        .get_metric_spec(scaled_object(&[("model", &model)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(spec.metric_specs.len(), 1, "{spec:?}");
    assert_eq!(
        spec.metric_specs[0].metric_name,
        format!("ember-{model}-replicas")
    );
    assert_eq!(spec.metric_specs[0].target_size_float, 1.0);
    assert_eq!(spec.metric_specs[0].target_size, 1);

    // Every value KEDA is told must be one the autoscaler logged as a decision.
    let mut told = BTreeSet::new();
    // Waits until KEDA's answer, the last logged decision and the desired-replicas gauge all
    // say `want`; returns the log's last decision (replicas, in flight).
    let mut settle = async |client: &mut Client, want: u64, what: &str| -> (u64, u64) {
        let gauge = format!("ember_autoscaler_desired_replicas{{model=\"{model}\"}}");
        loop {
            let answer = ask(client, &model).await;
            let last = logged_decisions(&log_text(), &model).last().copied();
            let text = metrics(admin).await;
            let desired = text
                .lines()
                .any(|line| line.starts_with(&format!("{gauge} ")))
                .then(|| metric(&text, &gauge));
            if let Ok((value, active)) = answer {
                told.insert(value as u64);
                assert_eq!(active, value > 0.0, "active iff replicas are wanted");
                if value == want as f64
                    && last.map(|(r, _)| r) == Some(want)
                    && desired == Some(want as f64)
                {
                    return last.unwrap();
                }
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{what}: KEDA told {answer:?}, last decision {last:?}, gauge {desired:?}, want {want}: {}",
                log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };

    // Idle: nothing wanted.
    settle(&mut client, 0, "idle").await;
    let mut stream = client
        .stream_is_active(scaled_object(&[("model", &model)]))
        .await
        .unwrap()
        .into_inner();
    let mut next_active = async || {
        tokio::time::timeout(PATIENCE, stream.next())
            .await
            .expect("StreamIsActive sent nothing")
            .expect("StreamIsActive ended")
            .unwrap()
            .result
    };
    assert!(
        !next_active().await,
        "the stream starts with the current value"
    );

    // A backlog of 20 ready jobs: 20 / 2 s / 4 jobs/s per replica = 2.5 -> 3 replicas once
    // the burst's arrival rate has decayed (it asks for more first).
    for i in 0..20 {
        let confirm = channel
            .basic_publish(
                topology::JOBS_EXCHANGE.into(),
                model.as_str().into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default()
                    .with_message_id(format!("job-{i}").as_str().into())
                    .with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
    }
    assert!(next_active().await, "the stream says active once jobs wait");
    settle(&mut client, 3, "backlog of 20").await;

    // One worker holding 12 jobs and an empty queue: KEDA's RabbitMQ scaler would see zero;
    // Ember counts the in-flight jobs: 12 / 2 / 4 = 1.5 -> 2 replicas.
    let beats = heartbeats(
        connection.create_channel().await.unwrap(),
        model.clone(),
        12,
    );
    // The worker is counted (20 ready + 12 in flight asks for more than 3) before the queue
    // empties, so that activity never drops in between.
    while !logged_decisions(&log_text(), &model)
        .iter()
        .any(|&(_, in_flight)| in_flight == 12)
    {
        assert!(
            started.elapsed() < PATIENCE,
            "the worker's heartbeats were never counted: {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let queue = topology::jobs_queue(&model);
    channel
        .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    let (_, in_flight) = settle(&mut client, 2, "12 jobs in flight, none ready").await;
    assert_eq!(in_flight, 12, "the decision counted the worker's jobs");
    assert_eq!(topology::ready_messages(&channel, &queue).await.unwrap(), 0);
    assert!(
        ask(&mut client, &model).await.unwrap().1,
        "active with an empty queue"
    );

    // The worker is gone (no heartbeat for --heartbeat-timeout) and nothing waits: zero.
    beats.abort();
    assert!(
        !next_active().await,
        "the stream says inactive once no work is left"
    );
    settle(&mut client, 0, "no work").await;

    let logged: BTreeSet<u64> = logged_decisions(&log_text(), &model)
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    assert!(
        told.is_subset(&logged),
        "KEDA was told {told:?}; the autoscaler decided {logged:?}"
    );
    drop(autoscaler);
    for queue in topology::model_queues(&model) {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
