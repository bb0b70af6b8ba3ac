//! The job path end to end: real RabbitMQ, the real worker binary, the real SSD model.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Client, JobOptions, Worker};
use ember_core::protocol::{ErrorCode, Status};
use ember_core::topology;
use ember_testkit::{metric, root};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicRejectOptions};
use lapin::types::FieldTable;

#[tokio::test(flavor = "multi_thread")]
async fn the_sample_photos_give_their_known_answers() {
    let model = ember_testkit::unique_model("samples");
    let worker = Worker::start(&model, &[]);
    let mut client = Client::new(&model).await;
    let mut ids = Vec::new();
    for name in ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"] {
        ids.push((name, client.submit_png(name).await));
    }
    let all: Vec<String> = ids.iter().map(|(_, id)| id.clone()).collect();
    client.collect(&all).await;

    for (name, id) in &ids {
        let result = client.result(id);
        assert_eq!(result.status, Status::Ok, "{name}: {result:?}");
        assert_eq!(result.model, model);
        assert_eq!(result.attempt, 1);
        assert!(result.timing.inference_ms > 0.0 && result.timing.batch_size >= 1);
        let detections = &result
            .outputs
            .as_ref()
            .unwrap()
            .detections
            .as_ref()
            .unwrap();
        let people: Vec<_> = detections.iter().filter(|d| d.label == "person").collect();
        match *name {
            "astronaut.png" | "camera.png" => {
                assert_eq!(people.len(), 1, "{name}: {detections:?}");
                let person = people[0];
                assert!(person.score > 0.8, "{name}: {person:?}");
                let [x1, y1, x2, y2] = person.bbox;
                // Both photos are 512x512 with the person filling the middle: the box is large,
                // inside the image and covers its centre.
                let covers_centre = |low: f32, high: f32| {
                    (0.0..256.0).contains(&low) && (256.0..=512.0).contains(&high)
                };
                assert!(covers_centre(x1, x2) && covers_centre(y1, y2), "{person:?}");
                assert!((x2 - x1) * (y2 - y1) > 0.25 * 512.0 * 512.0, "{person:?}");
            }
            _ => assert!(people.is_empty(), "{name}: {detections:?}"),
        }
    }
    drop(worker);
    client.cleanup().await;
}

fn python_client(model: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let python = root().join(".venv/bin/python");
    let output = Command::new(python)
        .current_dir(root())
        .arg("tests/clients/rpc_client.py")
        .args(["--model", model, "--timeout", "60"])
        .args(extra)
        .args(["tests/samples/astronaut.png", "tests/samples/coffee.png"])
        .output()
        .expect("run scripts/setup first: it creates .venv with pika");
    assert!(
        output.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_pika_rpc_client_gets_detections_with_a_reply_queue_and_with_direct_reply_to() {
    let model = ember_testkit::unique_model("pika");
    let worker = Worker::start(&model, &[]);
    // The worker declared the topology; the Python client only publishes and waits.
    for extra in [&[][..], &["--direct-reply-to"][..]] {
        let results = python_client(&model, extra);
        assert_eq!(results.len(), 2, "{extra:?}");
        let astronaut = &results[0]["outputs"]["detections"];
        assert_eq!(
            astronaut.as_array().unwrap().len(),
            1,
            "{extra:?}: {astronaut}"
        );
        assert_eq!(astronaut[0]["label"], "person");
        assert!(astronaut[0]["score"].as_f64().unwrap() > 0.8);
        assert_eq!(
            results[1]["outputs"]["detections"]
                .as_array()
                .unwrap()
                .len(),
            0
        );
    }
    drop(worker);
    Client::new(&model).await.cleanup().await;
}

fn png_header_claiming(width: u32, height: u32) -> Vec<u8> {
    // A valid 1x1 PNG whose IHDR then claims a huge size (with its CRC fixed up).
    let mut png = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut png),
        &[0u8; 3],
        1,
        1,
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let mut crc = 0xffff_ffffu32;
    for &byte in &png[12..29] {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    png[29..33].copy_from_slice(&(!crc).to_be_bytes());
    png
}

#[tokio::test(flavor = "multi_thread")]
async fn every_malformed_job_gets_its_error_code_and_the_worker_keeps_serving() {
    let model = ember_testkit::unique_model("malformed");
    let worker = Worker::start(&model, &["--max-input-bytes", "1000000"]);
    let mut client = Client::new(&model).await;
    let astronaut = common::sample("astronaut.png");
    let png = |ct| JobOptions {
        content_type: Some(ct),
        ..JobOptions::default()
    };
    let cases: Vec<(&str, Vec<u8>, JobOptions, ErrorCode)> = vec![
        (
            "empty body",
            vec![],
            png("image/png"),
            ErrorCode::InvalidInput,
        ),
        (
            "garbage bytes",
            b"definitely not an image".to_vec(),
            png("image/png"),
            ErrorCode::InvalidImage,
        ),
        (
            "truncated png",
            astronaut[..astronaut.len() / 3].to_vec(),
            png("image/png"),
            ErrorCode::InvalidImage,
        ),
        (
            "zero-size png",
            png_header_claiming(0, 0),
            png("image/png"),
            ErrorCode::InvalidImage,
        ),
        (
            "png claiming 100000x100000 pixels",
            png_header_claiming(100_000, 100_000),
            png("image/png"),
            ErrorCode::InputTooLarge,
        ),
        (
            "body over the byte limit",
            {
                let mut big = astronaut.clone();
                big.resize(1_500_000, 0);
                big
            },
            png("image/png"),
            ErrorCode::InputTooLarge,
        ),
        (
            "unsupported content type",
            astronaut.clone(),
            png("text/plain"),
            ErrorCode::UnsupportedContentType,
        ),
        (
            "jpeg content type on png bytes",
            astronaut.clone(),
            png("image/jpeg"),
            ErrorCode::InvalidImage,
        ),
        (
            "expired deadline",
            astronaut.clone(),
            JobOptions {
                content_type: Some("image/png"),
                deadline_ms: Some(ember_core::amqp::unix_ms() - 1_000),
                ..JobOptions::default()
            },
            ErrorCode::DeadlineExceeded,
        ),
    ];
    let mut ids = Vec::new();
    for (what, body, options, code) in cases {
        ids.push((what, client.submit(&body, options).await, code));
    }
    // A good job after all the bad ones, and one without a content type (sniffed).
    let good = client.submit_png("camera.png").await;
    let sniffed = client.submit(&astronaut, JobOptions::default()).await;
    let mut all: Vec<String> = ids.iter().map(|(_, id, _)| id.clone()).collect();
    all.extend([good.clone(), sniffed.clone()]);
    client.collect(&all).await;

    for (what, id, code) in &ids {
        let result = client.result(id);
        assert_eq!(result.status, Status::Error, "{what}: {result:?}");
        let error = result.error.as_ref().unwrap();
        assert_eq!(error.code, *code, "{what}: {}", error.message);
        assert!(!error.message.is_empty());
        assert!(result.outputs.is_none());
    }
    for id in [&good, &sniffed] {
        let result = client.result(id);
        assert_eq!(result.status, Status::Ok, "{result:?}");
        assert_eq!(
            result
                .outputs
                .as_ref()
                .unwrap()
                .detections
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }
    // Every bad job was acked: nothing is left in the queue or in flight, nothing dead-lettered.
    client.drain_for(Duration::from_millis(500)).await;
    let metrics = worker.metrics();
    assert_eq!(metric(&metrics, "ember_worker_jobs_in_flight"), 0.0);
    assert_eq!(
        metric(&metrics, "ember_worker_jobs_total{outcome=\"ok\"}"),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            "ember_worker_jobs_total{outcome=\"input_too_large\"}"
        ),
        2.0
    );
    assert!(client.results.values().all(|results| results.len() == 1));
    drop(worker);
    client.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_larger_than_one_form_under_load() {
    let model = ember_testkit::unique_model("batching");
    // Jobs are published before the worker starts, so a full prefetch is waiting for it.
    let mut client = Client::new(&model).await;
    let names = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"];
    let mut ids = Vec::new();
    for i in 0..48 {
        ids.push(client.submit_png(names[i % 4]).await);
    }
    let worker = Worker::start(&model, &["--max-batch", "8", "--max-batch-delay", "20ms"]);
    client.collect(&ids).await;

    let batch_sizes: Vec<u32> = ids
        .iter()
        .map(|id| client.result(id).timing.batch_size)
        .collect();
    assert!(
        batch_sizes.iter().all(|&b| (1..=8).contains(&b)),
        "{batch_sizes:?}"
    );
    assert!(batch_sizes.iter().any(|&b| b > 1), "{batch_sizes:?}");
    let metrics = worker.metrics();
    let batches = metric(&metrics, "ember_worker_batch_size_count");
    let jobs = metric(&metrics, "ember_worker_batch_size_sum");
    assert_eq!(jobs, 48.0);
    assert!(
        batches < jobs,
        "batches {batches} for {jobs} jobs: no batching"
    );
    assert!(
        metric(&metrics, "ember_worker_batch_size_bucket{le=\"1\"}") < batches,
        "every batch had one job"
    );
    // Same answers whatever the batch: each astronaut result has one person.
    for (i, id) in ids.iter().enumerate() {
        let detections = &client
            .result(id)
            .outputs
            .as_ref()
            .unwrap()
            .detections
            .as_ref()
            .unwrap();
        let expected = usize::from(i % 4 < 2);
        assert_eq!(detections.len(), expected, "job {i} ({})", names[i % 4]);
    }
    drop(worker);
    client.cleanup().await;
}

async fn wait_in_flight(worker: &Worker) {
    let started = std::time::Instant::now();
    while started.elapsed() < ember_testkit::PATIENCE {
        if metric(&worker.metrics(), "ember_worker_jobs_in_flight") > 0.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker never had jobs in hand");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sigkilled_worker_loses_nothing_a_second_worker_answers_every_job() {
    let model = ember_testkit::unique_model("sigkill");
    let mut client = Client::new(&model).await;
    let mut first = Worker::start(&model, &["--max-batch", "4"]);
    let mut ids = Vec::new();
    for i in 0..40 {
        let name = if i % 2 == 0 {
            "astronaut.png"
        } else {
            "coffee.png"
        };
        ids.push(client.submit_png(name).await);
    }
    wait_in_flight(&first).await;
    first.signal("KILL");
    first.wait_exit();

    let second = Worker::start(&model, &["--max-batch", "4"]);
    client.collect(&ids).await;
    for id in &ids {
        assert_eq!(client.result(id).status, Status::Ok);
    }
    // The jobs the first worker held were redelivered to the second (attempt 2+).
    let redelivered = ids
        .iter()
        .filter(|id| client.results[*id].iter().any(|r| r.attempt >= 2))
        .count();
    assert!(
        redelivered > 0,
        "no job was redelivered: the kill did not catch any in hand"
    );
    drop(second);
    client.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_load_answers_the_jobs_in_hand_exits_0_and_loses_nothing() {
    let model = ember_testkit::unique_model("sigterm");
    let mut client = Client::new(&model).await;
    let mut first = Worker::start(&model, &["--max-batch", "4"]);
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(client.submit_png("astronaut.png").await);
    }
    wait_in_flight(&first).await;
    first.signal("TERM");
    let status = first.wait_exit();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        first.log_text()
    );
    let log = first.log_text();
    assert!(log.contains("draining"), "{log}");
    client.drain_for(Duration::from_millis(500)).await;
    let answered_by_first = client.results.len();
    assert!(answered_by_first > 0);
    assert!(
        answered_by_first < ids.len(),
        "the first worker answered everything before TERM"
    );

    let second = Worker::start(&model, &["--max-batch", "4"]);
    client.collect(&ids).await;
    client.drain_for(Duration::from_millis(500)).await;
    // Every job answered exactly once: what the first worker answered it also acked.
    for id in &ids {
        assert_eq!(client.results[id].len(), 1, "job {id} answered twice");
        assert_eq!(client.result(id).status, Status::Ok);
    }
    drop(second);
    client.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_keeps_failing_is_dead_lettered_by_the_delivery_limit() {
    // The queue's own guarantee: a consumer that requeues a job again and again (as the worker
    // does on a transient failure) sees it dead-lettered after the delivery limit.
    let model = ember_testkit::unique_model("poison");
    let client = Client::new(&model).await;
    let id = client.submit_png("coffee.png").await;
    let channel = client.connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            topology::jobs_queue(&model).as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut deliveries = 0;
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
    {
        deliveries += 1;
        delivery
            .reject(BasicRejectOptions { requeue: true })
            .await
            .unwrap();
    }
    assert_eq!(
        deliveries, 6,
        "first delivery + x-delivery-limit (5) redeliveries"
    );
    let dead = common::get_one(&channel, &topology::dead_letter_queue(&model)).await;
    assert_eq!(
        dead.properties.message_id().as_ref().map(|m| m.to_string()),
        Some(id.clone())
    );
    let headers = dead.properties.headers().as_ref().unwrap();
    assert!(
        headers.inner().contains_key("x-death")
            || headers.inner().contains_key("x-first-death-reason")
    );
    // Its client is told: a worker answers the dead letter's copy with a `dead_lettered` error.
    drop(consumer);
    let _worker = Worker::start(&model, &[]);
    let mut client = client;
    client.collect(std::slice::from_ref(&id)).await;
    let result = client.result(&id);
    assert_eq!(result.status, Status::Error);
    let error = result.error.as_ref().unwrap();
    assert_eq!(error.code, ErrorCode::DeadLettered);
    assert!(
        error.message.contains("delivery_limit"),
        "{}",
        error.message
    );
    client.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn asking_for_cuda_without_a_gpu_is_a_startup_error_unless_fallback_is_asked_for() {
    let model = ember_testkit::unique_model("cuda");
    let mut refused = Worker::spawn(&model, &["--device", "cuda:0"]);
    let status = refused.wait_exit();
    assert!(!status.success());
    let log = refused.log_text();
    assert!(log.contains("CUDA cannot be used"), "{log}");
    // The error names what is missing: the CPU wheel has no CUDA provider library.
    assert!(
        log.contains("libonnxruntime_providers_cuda.so is missing"),
        "{log}"
    );
    assert!(log.contains("--allow-cpu-fallback"), "{log}");

    // With the fallback it serves on CPU and says so in logs, metrics and heartbeats.
    let mut client = Client::new(&model).await;
    let mut consumer = common::heartbeats(&client.channel, &model).await;
    let mut fallback = Worker::spawn(
        &model,
        &[
            "--device",
            "cuda:0",
            "--allow-cpu-fallback",
            "--heartbeat-interval",
            "200ms",
        ],
    );
    fallback.wait_ready();
    let log = fallback.log_text();
    assert!(log.contains("RUNNING ON CPU"), "{log}");
    // No NVIDIA driver here: one line, no GPU fields, no GPU series.
    assert_eq!(log.matches("no GPU telemetry").count(), 1, "{log}");
    let metrics = fallback.metrics();
    assert!(
        metrics.contains(r#"ember_worker_device_info{device="cpu",requested="cuda:0"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains("ember_worker_gpu_"), "{metrics}");
    let delivery = tokio::time::timeout(ember_testkit::PATIENCE, consumer.next())
        .await
        .expect("a heartbeat comes")
        .unwrap()
        .unwrap();
    let beat: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(beat["device"], "cpu");
    assert_eq!(beat["device_fallback"], true);
    assert!(beat["gpu"].is_null(), "{beat}");
    // And it answers jobs.
    let id = client.submit_png("astronaut.png").await;
    client.collect(std::slice::from_ref(&id)).await;
    assert_eq!(client.result(&id).status, ember_core::protocol::Status::Ok);
    fallback.signal("TERM");
    assert!(fallback.wait_exit().success());
    client.cleanup().await;
}

#[test]
fn a_missing_onnx_runtime_library_is_a_clear_startup_error() {
    let model = ember_testkit::unique_model("noort");
    let mut worker = Worker::spawn(
        &model,
        &["--ort-dylib-path", "/nonexistent/libonnxruntime.so"],
    );
    let status = worker.wait_exit();
    assert!(!status.success());
    let log = worker.log_text();
    assert!(
        log.contains("/nonexistent/libonnxruntime.so") && log.contains("scripts/setup"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_worker_publishes_a_heartbeat_every_interval() {
    let model = ember_testkit::unique_model("heartbeat");
    let client = Client::new(&model).await;
    let mut consumer = common::heartbeats(&client.channel, &model).await;
    let worker = Worker::start(
        &model,
        &[
            "--worker-id",
            "hb-worker-1",
            "--heartbeat-interval",
            "200ms",
        ],
    );
    let id = client.submit_png("coffee.png").await;
    // Read heartbeats until one shows the job completed.
    let deadline = std::time::Instant::now() + ember_testkit::PATIENCE;
    let mut seen = 0;
    loop {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        let delivery = tokio::time::timeout(remaining, consumer.next())
            .await
            .expect("heartbeats keep coming")
            .unwrap()
            .unwrap();
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("{model}.hb-worker-1")
        );
        let beat: ember_core::protocol::Heartbeat = serde_json::from_slice(&delivery.data).unwrap();
        seen += 1;
        assert_eq!(beat.model, model);
        assert_eq!(beat.worker, "hb-worker-1");
        assert_eq!(beat.state, ember_core::protocol::WorkerState::Ready);
        assert!(beat.model_load_seconds > 0.0);
        assert!(beat.gpu.is_none(), "no NVIDIA driver here");
        assert_eq!(beat.device.as_deref(), Some("cpu"));
        assert!(!beat.device_fallback);
        if beat.completed == 1 {
            assert_eq!(beat.in_flight, 0);
            assert!(beat.busy_seconds > 0.0);
            break;
        }
    }
    assert!(seen >= 1);
    let _ = id;
    drop(worker);
    client.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oip_tensor_job_gets_the_raw_output_tensors() {
    let model = ember_testkit::unique_model("tensor");
    let worker = Worker::start(&model, &[]);
    let mut client = Client::new(&model).await;
    let image = image::load_from_memory(&common::sample("astronaut.png"))
        .unwrap()
        .resize_exact(300, 300, image::imageops::FilterType::Triangle)
        .into_rgb8();
    let request = serde_json::json!({
        "id": "oip-1",
        "inputs": [{"name": "image_tensor:0", "shape": [1, 300, 300, 3], "datatype": "UINT8",
                    "data": image.as_raw()}]
    });
    let id = client
        .submit(
            &serde_json::to_vec(&request).unwrap(),
            JobOptions {
                content_type: Some("application/json"),
                ..JobOptions::default()
            },
        )
        .await;
    client.collect(std::slice::from_ref(&id)).await;
    let result = client.result(&id);
    assert_eq!(result.status, Status::Ok, "{result:?}");
    let outputs = result.outputs.as_ref().unwrap();
    assert!(outputs.detections.is_none());
    let tensors = outputs.tensors.as_ref().unwrap();
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "num_detections:0",
            "detection_boxes:0",
            "detection_scores:0",
            "detection_classes:0"
        ]
    );
    assert_eq!(tensors[1].shape, vec![1, 100, 4]);
    assert_eq!(tensors[1].data.len(), 400);
    let (scores, classes) = (tensors[2].data.to_f64(), tensors[3].data.to_f64());
    assert!(scores[0] > 0.8, "top score {}", scores[0]);
    assert_eq!(classes[0], 1.0, "top class is person");
    drop(worker);
    client.cleanup().await;
}
