//! Scenario `models`: per bundled model, in one run with the same ONNX Runtime threads:
//! bare `session.run` (the engine in-process, batch 1) against end to end through AMQP at batch 1
//! (sequential jobs), then closed-loop throughput at each max batch; and, for the SSD, a raw
//! tensor job against an image job of the same tensor size (`[1, 300, 300, 3]` UINT8: a PNG
//! already at the model's size, the same pixels as a binary tensor, and as a JSON tensor).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ember_core::protocol::{JobResult, Status, content_type};
use ember_worker::engine::{Engine, EngineOptions};
use serde_json::{Value, json};

use crate::client::RpcClient;
use crate::stats::{across, summarise};
use crate::{delete_queues, fleet, sample, unique};

/// One job kind: its body, content type and binary header length.
#[derive(Debug, Clone)]
struct Body {
    bytes: Vec<u8>,
    content_type: &'static str,
    header_length: Option<usize>,
}

/// A bundled model and the job it is measured with.
struct Case {
    dir: &'static str,
    job: Body,
    batches: &'static [usize],
}

fn png(rgb: &[u8], width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut out),
        rgb,
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

/// The OIP binary form of one tensor: (body, header length).
fn binary_tensor(name: &str, shape: &[usize], datatype: &str, raw: &[u8]) -> (Vec<u8>, usize) {
    let head = serde_json::to_vec(&json!({"inputs": [{"name": name, "shape": shape,
        "datatype": datatype, "parameters": {"binary_data_size": raw.len()}}]}))
    .unwrap_or_default();
    let length = head.len();
    let mut body = head;
    body.extend_from_slice(raw);
    (body, length)
}

fn cases() -> anyhow::Result<Vec<Case>> {
    let iris = serde_json::to_vec(&json!({"inputs": [{"name": "input", "shape": [1, 4],
        "datatype": "FP32", "data": [6.0, 2.2, 4.0, 1.0]}]}))?;
    Ok(vec![
        Case {
            dir: "models/ssdlite-person",
            job: Body {
                bytes: sample("astronaut.png")?,
                content_type: content_type::PNG,
                header_length: None,
            },
            batches: &[1, 4, 8],
        },
        Case {
            dir: "models/ppocr-textline-orientation",
            job: Body {
                bytes: std::fs::read(fleet::root().join("tests/samples/text/text_upright.png"))?,
                content_type: content_type::PNG,
                header_length: None,
            },
            batches: &[1, 4, 16],
        },
        Case {
            dir: "models/iris-classifier",
            job: Body {
                bytes: iris,
                content_type: content_type::JSON,
                header_length: None,
            },
            batches: &[1, 8, 64],
        },
    ])
}

/// Bare `session.run` p50 of batch 1, the engine in this process, on the job's prepared input.
async fn bare(dir: &Path, job: &Body, jobs: usize) -> anyhow::Result<f64> {
    let (dir, options) = (dir.to_path_buf(), EngineOptions::default());
    let engine = tokio::task::spawn_blocking(move || Engine::load(&dir, options)).await??;
    let header = job.header_length.map(|n| n.to_string());
    let prepared =
        engine
            .pipeline
            .prepare(Some(job.content_type), header.as_deref(), &job.bytes)?;
    let mut runs = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let mut one = prepared.clone();
        runs.push(engine.infer(vec![&mut one]).await?.inference.as_secs_f64());
    }
    Ok(summarise(&runs).p50)
}

/// Sequential jobs through the queue: round-trip p50 (seconds); every answer must be `ok`.
async fn sequential(
    client: &RpcClient,
    model: &str,
    job: &Body,
    jobs: usize,
) -> anyhow::Result<f64> {
    let mut trips = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let started = Instant::now();
        let rx = client
            .send_with(
                ember_core::topology::JOBS_EXCHANGE,
                model,
                &job.bytes,
                job.content_type,
                job.header_length,
            )
            .await?;
        let result: JobResult = serde_json::from_slice(&rx.await?)?;
        anyhow::ensure!(result.status == Status::Ok, "{model}: {:?}", result.error);
        trips.push(started.elapsed().as_secs_f64());
    }
    Ok(summarise(&trips).p50)
}

/// Jobs/s answered `ok` with `outstanding` jobs kept in flight for `duration` (after 2 s warm).
async fn closed_loop(
    client: &RpcClient,
    model: &str,
    job: &Body,
    outstanding: usize,
    duration: Duration,
) -> anyhow::Result<(f64, u64)> {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Instant::now() + Duration::from_secs(2) + duration;
    let mut tasks = Vec::with_capacity(outstanding);
    for _ in 0..outstanding {
        let (client, job, model) = (client.clone(), job.clone(), model.to_string());
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < stop {
                let sent = client
                    .send_with(
                        ember_core::topology::JOBS_EXCHANGE,
                        &model,
                        &job.bytes,
                        job.content_type,
                        job.header_length,
                    )
                    .await;
                let answer = match sent {
                    Ok(rx) => rx.await.ok(),
                    Err(_) => None,
                };
                let good = answer
                    .and_then(|b| serde_json::from_slice::<JobResult>(&b).ok())
                    .is_some_and(|r| r.status == Status::Ok);
                let counter = if good { &ok } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = ok.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let rate = (ok.load(Ordering::Relaxed) - start) as f64 / started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    }
    Ok((rate, failed.load(Ordering::Relaxed)))
}

/// One model: bare vs AMQP at batch 1 (medians over rounds), throughput per max batch.
async fn one(case: &Case, rounds: usize, jobs: usize, duration: Duration) -> anyhow::Result<Value> {
    let dir = fleet::root().join(case.dir);
    let (mut bare_p50, mut amqp_p50) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        bare_p50.push(bare(&dir, &case.job, jobs).await?);
        let model = unique("models");
        let worker = fleet::worker(&model, &dir, &["--max-batch", "1"])?;
        worker.wait_http(worker.admin, "/readyz").await?;
        let client = RpcClient::connect(&model).await?;
        amqp_p50.push(sequential(&client, &model, &case.job, jobs).await?);
        drop(worker);
        delete_queues(&model).await;
    }
    let mut throughput = Vec::new();
    for &max_batch in case.batches {
        let model = unique("models");
        let batch = max_batch.to_string();
        let worker = fleet::worker(&model, &dir, &["--max-batch", &batch])?;
        worker.wait_http(worker.admin, "/readyz").await?;
        let client = RpcClient::connect(&model).await?;
        let mut rates = Vec::new();
        let mut failed = 0;
        for _ in 0..rounds {
            let (rate, bad) = closed_loop(&client, &model, &case.job, 16, duration).await?;
            rates.push(rate);
            failed += bad;
        }
        let rates = across(rates);
        println!(
            "{}: max batch {max_batch}: {:.1} jobs/s (median of {rounds})",
            case.dir, rates.median
        );
        throughput.push(json!({"max_batch": max_batch, "jobs_per_s": rates, "not_ok": failed}));
        drop(worker);
        delete_queues(&model).await;
    }
    let (b, a) = (across(bare_p50), across(amqp_p50));
    println!(
        "{}: bare session.run p50 {:.2} ms | AMQP batch-1 round trip p50 {:.2} ms",
        case.dir,
        b.median * 1e3,
        a.median * 1e3
    );
    Ok(
        json!({"model_dir": case.dir, "job_content_type": case.job.content_type,
        "bare_run_p50_s": b, "amqp_batch1_p50_s": a, "throughput_16_outstanding": throughput}),
    )
}

/// A raw tensor job against an image job of the same tensor size, through AMQP, batch 1.
async fn raw_vs_image(rounds: usize, jobs: usize) -> anyhow::Result<Value> {
    let dir = fleet::root().join("models/ssdlite-person");
    let photo = image::load_from_memory(&sample("astronaut.png")?)?
        .resize_exact(300, 300, image::imageops::FilterType::Triangle)
        .into_rgb8();
    let pixels = photo.as_raw();
    let (binary, length) = binary_tensor("image_tensor:0", &[1, 300, 300, 3], "UINT8", pixels);
    let json_tensor = serde_json::to_vec(&json!({"inputs": [{"name": "image_tensor:0",
        "shape": [1, 300, 300, 3], "datatype": "UINT8", "data": pixels}]}))?;
    let kinds = [
        (
            "png_300x300",
            Body {
                bytes: png(pixels, 300, 300)?,
                content_type: content_type::PNG,
                header_length: None,
            },
        ),
        (
            "binary_tensor",
            Body {
                bytes: binary,
                content_type: content_type::OIP_BINARY,
                header_length: Some(length),
            },
        ),
        (
            "json_tensor",
            Body {
                bytes: json_tensor,
                content_type: content_type::JSON,
                header_length: None,
            },
        ),
    ];
    let mut out = serde_json::Map::new();
    for (name, body) in &kinds {
        let mut p50 = Vec::new();
        for _ in 0..rounds {
            let model = unique("rawvsimage");
            let worker = fleet::worker(&model, &dir, &["--max-batch", "1"])?;
            worker.wait_http(worker.admin, "/readyz").await?;
            let client = RpcClient::connect(&model).await?;
            p50.push(sequential(&client, &model, body, jobs).await?);
            drop(worker);
            delete_queues(&model).await;
        }
        let p50 = across(p50);
        println!(
            "ssdlite-person, {name} ({} bytes): AMQP p50 {:.2} ms",
            body.bytes.len(),
            p50.median * 1e3
        );
        out.insert(
            name.to_string(),
            json!({"body_bytes": body.bytes.len(), "amqp_p50_s": p50}),
        );
    }
    Ok(Value::Object(out))
}

/// Jobs of two shapes interleaved (SSD raw UINT8 tensors of 300x300 and 320x320, 16 outstanding,
/// half of each): bucketed batches (max batch 8: equal shapes share a run) against every job run
/// apart (max batch 1).
async fn mixed_shapes(rounds: usize, duration: Duration) -> anyhow::Result<Value> {
    let dir = fleet::root().join("models/ssdlite-person");
    let photo = image::load_from_memory(&sample("astronaut.png")?)?;
    let body = |side: u32| {
        let pixels = photo
            .resize_exact(side, side, image::imageops::FilterType::Triangle)
            .into_rgb8();
        let side = side as usize;
        let (bytes, length) = binary_tensor(
            "image_tensor:0",
            &[1, side, side, 3],
            "UINT8",
            pixels.as_raw(),
        );
        Body {
            bytes,
            content_type: content_type::OIP_BINARY,
            header_length: Some(length),
        }
    };
    let (small, large) = (body(300), body(320));
    let mut out = serde_json::Map::new();
    for (name, max_batch) in [("bucketed_max_batch_8", "8"), ("apart_max_batch_1", "1")] {
        let model = unique("mixed");
        let worker = fleet::worker(&model, &dir, &["--max-batch", max_batch])?;
        worker.wait_http(worker.admin, "/readyz").await?;
        let client = RpcClient::connect(&model).await?;
        let mut rates = Vec::new();
        let mut failed = 0;
        for _ in 0..rounds {
            let (a, b) = tokio::join!(
                closed_loop(&client, &model, &small, 8, duration),
                closed_loop(&client, &model, &large, 8, duration)
            );
            let ((ra, fa), (rb, fb)) = (a?, b?);
            rates.push(ra + rb);
            failed += fa + fb;
        }
        let rates = across(rates);
        println!(
            "ssdlite-person, mixed 300/320 tensors, {name}: {:.1} jobs/s",
            rates.median
        );
        out.insert(name.into(), json!({"jobs_per_s": rates, "not_ok": failed}));
        drop(worker);
        delete_queues(&model).await;
    }
    Ok(Value::Object(out))
}

/// The whole scenario.
pub async fn run(rounds: usize, jobs: usize, duration: Duration) -> anyhow::Result<Value> {
    let mut models = Vec::new();
    for case in cases()? {
        models.push(one(&case, rounds, jobs, duration).await?);
    }
    let raw = raw_vs_image(rounds, jobs).await?;
    let mixed = mixed_shapes(rounds, duration).await?;
    Ok(
        json!({"ssd_mixed_shapes": mixed, "jobs": jobs, "rounds": rounds, "closed_loop_seconds": duration.as_secs_f64(),
        "outstanding": 16, "threads": "ONNX Runtime default (one per core) in both the bare engine and the worker",
        "models": models, "ssd_raw_tensor_vs_image": raw}),
    )
}
