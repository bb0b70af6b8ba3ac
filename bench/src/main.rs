//! `ember-bench`: Ember's benchmarks. Each scenario runs the real parts (release binaries beside
//! this one) against the local RabbitMQ, prints its figures and writes
//! `<out>/<scenario>.json` (plots: scripts/plot_bench.py). None of this is a test.

mod chaos;
mod client;
mod cluster;
mod fleet;
mod models;
mod stats;
mod tenants;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use ember_core::amqp::Headers;
use ember_core::topology::{self, QueueSettings};
use ember_grpc::inference::ModelInferRequest;
use ember_grpc::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ember_grpc::inference::model_infer_request::InferInputTensor;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};

use crate::client::RpcClient;
use crate::stats::{across, summarise};

#[derive(Debug, Parser)]
#[command(name = "ember-bench", about = "Ember's benchmarks")]
struct Args {
    /// Where the JSON goes.
    #[arg(long, global = true, default_value = "docs/benchmarks")]
    out: PathBuf,
    /// Repetitions of each measurement (median and spread are reported).
    #[arg(long, global = true, default_value_t = 3)]
    rounds: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Sequential jobs, the model loaded per job (--reload-per-job) vs resident.
    Residency {
        #[arg(long, default_value_t = 100)]
        jobs: usize,
    },
    /// Bare session.run in-process vs end to end through AMQP and through HTTP.
    Overhead {
        #[arg(long, default_value_t = 200)]
        jobs: usize,
    },
    /// Jobs/s with the tiny model and many publishers, against the broker's own ceiling.
    Throughput {
        #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long, default_value_t = 8)]
        publishers: usize,
        /// Jobs each publisher keeps outstanding.
        #[arg(long, default_value_t = 32)]
        window: usize,
    },
    /// SSD throughput and p95 at a fixed offered load, max batch 1, 4, 8.
    Batching {
        /// Offered load, jobs/s (open loop).
        #[arg(long, default_value_t = 60.0)]
        rate: f64,
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Local-mode autoscaling from zero: a step of steady load, then a burst.
    Scaling {
        /// Step: offered load, jobs/s.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
        step: Duration,
        /// Burst: jobs published at once.
        #[arg(long, default_value_t = 200)]
        burst: usize,
    },
    /// Per bundled model: bare session.run vs AMQP at batch 1, throughput per max batch; a raw
    /// tensor job vs an image job of the same tensor size.
    Models {
        /// Sequential jobs per latency measurement.
        #[arg(long, default_value_t = 100)]
        jobs: usize,
        /// Closed-loop seconds per throughput measurement.
        #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Faults one at a time under load, every job accounted for (docs/chaos.md).
    Chaos(chaos::ChaosArgs),
    /// Two tenants on a saturated model: the small one's latency alone and beside a 10x one.
    Tenants(tenants::TenantsArgs),
    /// Process memory idle, under load, and over a soak.
    Memory {
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        soak: Duration,
        /// Offered load during the soak, jobs/s.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
    },
}

fn sample(name: &str) -> anyhow::Result<Vec<u8>> {
    Ok(std::fs::read(
        fleet::root().join("tests/samples").join(name),
    )?)
}

fn unique(prefix: &str) -> String {
    format!(
        "bench-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

fn save(out: &PathBuf, name: &str, mut doc: Value) -> anyhow::Result<()> {
    doc["machine"] = fleet::machine();
    doc["command"] = json!(std::env::args().collect::<Vec<_>>().join(" "));
    if let Ok(extra) = std::env::var(fleet::WORKER_ARGS_ENV) {
        doc["worker_args_extra"] = json!(extra);
    }
    std::fs::create_dir_all(out)?;
    let path = out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

async fn delete_queues(model: &str) {
    if let Ok(c) = Connection::connect(client::URL, ConnectionProperties::default()).await
        && let Ok(ch) = c.create_channel().await
    {
        for q in topology::model_queues(model) {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

async fn residency(args: &Args, jobs: usize) -> anyhow::Result<()> {
    let image = sample("astronaut.png")?;
    let dir = fleet::root().join("models/ssdlite-person");
    let mut doc = json!({"jobs": jobs, "image": "astronaut.png (512x512)",
        "study": {"cpu": {"stateless_mean_s": 1.87, "stateless_sd_s": 1.062, "resident_mean_s": 0.26, "resident_sd_s": 0.012},
                  "gpu": {"stateless_mean_s": 56.55, "resident_mean_s": 0.02}}});
    for (mode, extra) in [
        ("resident", &[][..]),
        ("reload_per_job", &["--reload-per-job"][..]),
    ] {
        let mut means = Vec::new();
        let mut sds = Vec::new();
        let mut first_round = Vec::new();
        for round in 0..args.rounds {
            let model = unique("residency");
            let worker = fleet::worker(&model, &dir, extra)?;
            worker.wait_http(worker.admin, "/readyz").await?;
            let client = RpcClient::connect(&model).await?;
            let mut times = Vec::with_capacity(jobs);
            for _ in 0..jobs {
                let (seconds, result) = client.call(&model, &image, "image/png").await?;
                anyhow::ensure!(result.error.is_none(), "job failed: {result:?}");
                times.push(seconds);
            }
            let s = summarise(&times);
            println!(
                "residency {mode} round {round}: mean {:.1} ms, sd {:.1} ms",
                s.mean * 1e3,
                s.sd * 1e3
            );
            means.push(s.mean);
            sds.push(s.sd);
            if round == 0 {
                first_round = times;
            }
            drop(worker);
            delete_queues(&model).await;
        }
        doc[mode] = json!({"mean_s": across(means), "sd_s": across(sds), "per_request_s_round0": first_round});
    }
    let speedup = doc["reload_per_job"]["mean_s"]["median"]
        .as_f64()
        .unwrap_or(0.0)
        / doc["resident"]["mean_s"]["median"].as_f64().unwrap_or(1.0);
    doc["speedup"] = json!(speedup);
    println!("resident is {speedup:.1}x faster than reload-per-job");
    save(&args.out, "residency", doc)
}

/// Bare in-process figures, seconds per job: `session.run` alone, decode+resize alone, and the
/// two together (one job's decode, then its run, timed as one).
async fn bare(jobs: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    use ember_worker::engine::{Engine, EngineOptions};
    let dir = fleet::root().join("models/ssdlite-person");
    let options = EngineOptions {
        limits: ember_worker::process::InputLimits {
            max_bytes: 1 << 26,
            max_pixels: 1 << 26,
        },
        // Same setting as the worker (EMBER_WORKER_ORT_SPIN), so "bare" means the same engine.
        spin: std::env::var_os("EMBER_WORKER_ORT_SPIN").is_some(),
        ..EngineOptions::default()
    };
    let engine = tokio::task::spawn_blocking(move || Engine::load(&dir, options)).await??;
    let image = sample("astronaut.png")?;
    let mut decode = Vec::with_capacity(jobs);
    let mut prepared = None;
    for _ in 0..jobs {
        let started = Instant::now();
        let p = engine.pipeline.prepare(Some("image/png"), None, &image)?;
        decode.push(started.elapsed().as_secs_f64());
        prepared = Some(p);
    }
    let prepared = prepared.ok_or_else(|| anyhow::anyhow!("no jobs"))?;
    let mut run = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let mut job = prepared.clone();
        let output = engine.infer(vec![&mut job]).await?;
        run.push(output.inference.as_secs_f64());
    }
    let mut both = Vec::with_capacity(jobs);
    for _ in 0..jobs {
        let started = Instant::now();
        let mut job = engine.pipeline.prepare(Some("image/png"), None, &image)?;
        engine.infer(vec![&mut job]).await?;
        both.push(started.elapsed().as_secs_f64());
    }
    Ok((run, decode, both))
}

async fn overhead(args: &Args, jobs: usize) -> anyhow::Result<()> {
    let image = sample("astronaut.png")?;
    let dir = fleet::root().join("models/ssdlite-person");
    let (mut bare_p50, mut decode_p50, mut amqp_p50, mut http_p50) =
        (vec![], vec![], vec![], vec![]);
    let (mut both_p50, mut confirm_p50) = (vec![], vec![]);
    let tensor = TensorBodies::new()?;
    let mut tensor_p50: [Vec<f64>; 4] = Default::default();
    let mut detail = Vec::new();
    for round in 0..args.rounds {
        let (run, decode, both) = bare(jobs).await?;
        let model = unique("overhead");
        let worker = fleet::worker(&model, &dir, &[])?;
        worker.wait_http(worker.admin, "/readyz").await?;
        let client = RpcClient::connect(&model).await?;
        let (mut amqp, mut queue_ms, mut inference_ms, mut worker_ms) =
            (vec![], vec![], vec![], vec![]);
        let mut confirm_ms = Vec::with_capacity(jobs);
        let mut stages = Stages::default();
        for _ in 0..jobs {
            let started = Instant::now();
            let rx = client.send(&model, &image, "image/png").await?;
            confirm_ms.push(started.elapsed().as_secs_f64() * 1e3);
            let result: ember_core::protocol::JobResult = serde_json::from_slice(&rx.await?)?;
            amqp.push(started.elapsed().as_secs_f64());
            queue_ms.push(result.timing.queue_ms);
            inference_ms.push(result.timing.inference_ms);
            worker_ms.push(result.timing.worker_ms);
            stages.add(started.elapsed().as_secs_f64() * 1e3, &result.timing);
        }
        let grpc_port = fleet::free_port();
        let grpc_listen = format!("127.0.0.1:{grpc_port}");
        let (dispatcher, api) = fleet::dispatcher_with(
            &model,
            &dir,
            &["--insecure-no-auth", "--grpc-listen", &grpc_listen],
        )?;
        dispatcher.wait_http(api, "/v2/health/ready").await?;
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{api}/v1/models/{model}/jobs?wait=30s");
        let mut via_http = Vec::with_capacity(jobs);
        for _ in 0..jobs {
            let started = Instant::now();
            let response = http
                .post(&url)
                .header("content-type", "image/png")
                .body(image.clone())
                .send()
                .await?;
            anyhow::ensure!(response.status() == 200, "HTTP {}", response.status());
            let _ = response.bytes().await?;
            via_http.push(started.elapsed().as_secs_f64());
        }
        let tensors = tensor
            .run(&client, &http, &model, (api, grpc_port), jobs)
            .await?;
        for (p50s, times) in tensor_p50.iter_mut().zip(&tensors) {
            p50s.push(summarise(times).p50);
        }
        println!(
            "  300x300 UINT8 tensor p50: AMQP binary {:.2} ms | HTTP OIP binary {:.2} ms | HTTP OIP JSON {:.2} ms | gRPC OIP raw {:.2} ms",
            summarise(&tensors[0]).p50 * 1e3,
            summarise(&tensors[1]).p50 * 1e3,
            summarise(&tensors[2]).p50 * 1e3,
            summarise(&tensors[3]).p50 * 1e3
        );
        let s = |v: &[f64]| summarise(v);
        let (b, d, a, h) = (s(&run), s(&decode), s(&amqp), s(&via_http));
        println!(
            "overhead round {round}: bare run p50 {:.2} ms | decode+resize p50 {:.2} ms | AMQP p50 {:.2} p95 {:.2} p99 {:.2} ms | HTTP p50 {:.2} p95 {:.2} p99 {:.2} ms | worker stages (mean): queue {:.2}, inference {:.2}, worker {:.2} ms | publish confirm {:.2} ms",
            b.p50 * 1e3,
            d.p50 * 1e3,
            a.p50 * 1e3,
            a.p95 * 1e3,
            a.p99 * 1e3,
            h.p50 * 1e3,
            h.p95 * 1e3,
            h.p99 * 1e3,
            summarise(&queue_ms).mean,
            summarise(&inference_ms).mean,
            summarise(&worker_ms).mean,
            summarise(&confirm_ms).mean
        );
        bare_p50.push(b.p50);
        decode_p50.push(d.p50);
        both_p50.push(summarise(&both).p50);
        confirm_p50.push(summarise(&confirm_ms).p50 / 1e3);
        amqp_p50.push(a.p50);
        http_p50.push(h.p50);
        println!(
            "  one job's path, means over the round (ms): {}",
            stages.means()
        );
        detail.push(json!({"bare_run_s": b, "decode_resize_s": d, "bare_decode_and_run_s": s(&both), "amqp_s": a, "http_s": h,
            "amqp_stages_mean_ms": stages.means(),
            "worker_queue_ms": summarise(&queue_ms), "worker_inference_ms": summarise(&inference_ms), "worker_total_ms": summarise(&worker_ms),
            "client_publish_confirm_ms": summarise(&confirm_ms),
            "tensor_300_amqp_binary_s": s(&tensors[0]), "tensor_300_http_binary_s": s(&tensors[1]),
            "tensor_300_http_json_s": s(&tensors[2]), "tensor_300_grpc_raw_s": s(&tensors[3])}));
        drop(dispatcher);
        drop(worker);
        delete_queues(&model).await;
    }
    let (b, a, h) = (across(bare_p50), across(amqp_p50), across(http_p50));
    println!(
        "end-to-end / bare (p50): AMQP {:.2}x (+{:.1} ms), HTTP {:.2}x (+{:.1} ms)",
        a.median / b.median,
        (a.median - b.median) * 1e3,
        h.median / b.median,
        (h.median - b.median) * 1e3
    );
    let [t_amqp, t_binary, t_json, t_grpc] = tensor_p50.map(across);
    // Goal 4 of issue 17: what the queue adds to a lone job, against the durable enqueue.
    let (both, confirm) = (across(both_p50), across(confirm_p50));
    let gap_ms = (a.median - both.median) * 1e3;
    let budget_ms = confirm.median * 1e3 + 1.0;
    println!(
        "AMQP p50 - bare decode+run p50 = {gap_ms:.2} ms; durable enqueue (publish to confirm) p50 + 1 ms = {budget_ms:.2} ms"
    );
    println!(
        "300x300 tensor (p50): HTTP binary / AMQP binary {:.2}x, HTTP JSON / HTTP binary {:.2}x, gRPC raw / HTTP binary {:.2}x",
        t_binary.median / t_amqp.median,
        t_json.median / t_binary.median,
        t_grpc.median / t_binary.median
    );
    let doc = json!({"jobs": jobs, "image": "astronaut.png", "threads": "the worker's default in both (the cores this process may use)",
        "bare_run_p50_s": b, "decode_resize_p50_s": across(decode_p50), "amqp_p50_s": a, "http_p50_s": h,
        "ratio_amqp": a.median / b.median, "ratio_http": h.median / b.median,
        "bare_decode_and_run_p50_s": both, "client_publish_confirm_p50_s": confirm,
        "queue_cost": {"what": "median AMQP p50 minus median bare decode+run p50, against the median publish-to-confirm p50 (the durable enqueue) plus 1 ms",
            "gap_ms": gap_ms, "budget_ms": budget_ms, "within": gap_ms <= budget_ms},
        "tensor_300": {"what": "astronaut.png resized to 300x300 RGB as a [1,300,300,3] UINT8 tensor, sequential: over AMQP in the binary tensor form, over HTTP POST /v2/models/{m}/infer in the binary form (binary outputs) and in JSON (JSON outputs), over gRPC ModelInfer with raw_input_contents (raw outputs; one HTTP/2 connection kept open, as tritonclient.grpc does)",
            "amqp_binary_p50_s": t_amqp, "http_binary_p50_s": t_binary, "http_json_p50_s": t_json, "grpc_raw_p50_s": t_grpc,
            "ratio_http_binary_to_amqp": t_binary.median / t_amqp.median, "ratio_http_json_to_binary": t_json.median / t_binary.median,
            "ratio_grpc_raw_to_http_binary": t_grpc.median / t_binary.median},
        "rounds_detail": detail});
    save(&args.out, "overhead", doc)
}

/// The same image as an Open Inference Protocol tensor, four ways (`run` returns each one's
/// sequential round trips; an answer that is not `ok` / 200 stops the run).
struct TensorBodies {
    binary: Vec<u8>,
    header_length: usize,
    json: Vec<u8>,
    raw: Vec<u8>,
}

impl TensorBodies {
    const INPUT: &str = "image_tensor:0";

    fn new() -> anyhow::Result<Self> {
        let raw = image::load_from_memory(&sample("astronaut.png")?)?
            .resize_exact(300, 300, image::imageops::FilterType::Triangle)
            .into_rgb8()
            .into_raw();
        let shape = [1, 300, 300, 3];
        let head = serde_json::to_vec(&json!({
            "inputs": [{"name": Self::INPUT, "shape": shape, "datatype": "UINT8",
                        "parameters": {"binary_data_size": raw.len()}}],
            "parameters": {"binary_data_output": true}}))?;
        let header_length = head.len();
        let mut binary = head;
        binary.extend_from_slice(&raw);
        let json = serde_json::to_vec(&json!({
            "inputs": [{"name": Self::INPUT, "shape": shape, "datatype": "UINT8", "data": raw}]}))?;
        Ok(Self {
            binary,
            header_length,
            json,
            raw,
        })
    }

    async fn run(
        &self,
        client: &RpcClient,
        http: &reqwest::Client,
        model: &str,
        (api, grpc): (u16, u16),
        jobs: usize,
    ) -> anyhow::Result<[Vec<f64>; 4]> {
        let mut times: [Vec<f64>; 4] = Default::default();
        for _ in 0..jobs {
            let started = Instant::now();
            let rx = client
                .send_with(
                    topology::JOBS_EXCHANGE,
                    model,
                    &self.binary,
                    ember_core::protocol::content_type::OIP_BINARY,
                    Some(self.header_length),
                )
                .await?;
            let result: ember_core::protocol::JobResult = serde_json::from_slice(&rx.await?)?;
            times[0].push(started.elapsed().as_secs_f64());
            anyhow::ensure!(
                result.status == ember_core::protocol::Status::Ok,
                "tensor job failed: {:?}",
                result.error
            );
        }
        let url = format!("http://127.0.0.1:{api}/v2/models/{model}/infer");
        for (slot, binary) in [(1, true), (2, false)] {
            for _ in 0..jobs {
                let started = Instant::now();
                let mut request = http.post(&url).header("content-type", "application/json");
                request = if binary {
                    request
                        .header("inference-header-content-length", self.header_length)
                        .body(self.binary.clone())
                } else {
                    request.body(self.json.clone())
                };
                let response = request.send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                times[slot].push(started.elapsed().as_secs_f64());
                anyhow::ensure!(
                    status == 200,
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                );
            }
        }
        let mut client = GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{grpc}"))
            .await?
            .max_decoding_message_size(64 << 20);
        for _ in 0..jobs {
            let started = Instant::now();
            // The request is built in the loop, as a client builds each one from its tensor.
            let request = ModelInferRequest {
                model_name: model.to_string(),
                inputs: vec![InferInputTensor {
                    name: Self::INPUT.to_string(),
                    datatype: "UINT8".to_string(),
                    shape: vec![1, 300, 300, 3],
                    ..Default::default()
                }],
                raw_input_contents: vec![self.raw.clone()],
                ..Default::default()
            };
            let response = client.model_infer(request).await?.into_inner();
            times[3].push(started.elapsed().as_secs_f64());
            anyhow::ensure!(
                !response.raw_output_contents.is_empty(),
                "gRPC answer without outputs"
            );
        }
        Ok(times)
    }
}

/// One AMQP job's round trip cut into stages that add up to it, from the client's clock and the
/// result's `timing` (docs/protocol.md): submission to arrival at the worker (`queue_ms -
/// wait_ms`: the publish, the quorum queue's write, the delivery; `ember-submitted-at` is whole
/// milliseconds, so this stage reads up to 1 ms high and `reply` as much low), the job's
/// decoding (`prepare_ms`), the rest of its wait for a batch, `session.run`, the worker's work
/// after it (output decoding, the result's JSON), and the rest (the result's publish, Direct
/// Reply-to, the client waking), which is the round trip minus the others.
#[derive(Debug, Default)]
struct Stages {
    rows: Vec<[f64; 7]>,
}

impl Stages {
    const NAMES: [&'static str; 7] = [
        "round_trip",
        "submit_to_worker",
        "prepare",
        "batch_wait",
        "inference",
        "after_inference",
        "reply",
    ];

    fn add(&mut self, round_trip_ms: f64, t: &ember_core::protocol::Timing) {
        let broker_in = t.queue_ms - t.wait_ms;
        let after = t.worker_ms - t.wait_ms - t.inference_ms;
        let reply = round_trip_ms - broker_in - t.wait_ms - t.inference_ms - after;
        self.rows.push([
            round_trip_ms,
            broker_in,
            t.prepare_ms,
            t.wait_ms - t.prepare_ms,
            t.inference_ms,
            after,
            reply,
        ]);
    }

    /// Each stage's mean; the stages after the first add up to the first.
    fn means(&self) -> Value {
        let n = self.rows.len().max(1) as f64;
        let mut out = serde_json::Map::new();
        for (i, name) in Self::NAMES.iter().enumerate() {
            let mean = self.rows.iter().map(|r| r[i]).sum::<f64>() / n;
            out.insert(name.to_string(), json!((mean * 1000.0).round() / 1000.0));
        }
        Value::Object(out)
    }
}

/// The broker's own ceiling: the worker's AMQP pattern without a model. Consume (same prefetch)
/// -> publish the reply to reply_to and the result to a topic exchange, with confirms -> ack;
/// clients as in the fleet run. With `store`, the exchange routes to a durable quorum sink
/// drained with acks (a stored result: ember.results.stored to ember.results.store and the
/// dispatcher's consumer); without, nothing is bound to it (a reply-only job's ember.results).
async fn raw_ceiling(
    duration: Duration,
    publishers: usize,
    window: usize,
    body: &[u8],
    store: bool,
) -> anyhow::Result<f64> {
    let queue = unique("raw");
    let sink = format!("{queue}.sink");
    let results = format!("{queue}.results");
    let connection = Connection::connect(client::URL, ConnectionProperties::default()).await?;
    let admin = connection.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    admin
        .queue_declare(
            queue.as_str().into(),
            durable,
            topology::jobs_queue_arguments(QueueSettings::default()),
        )
        .await?;
    let mut quorum = Headers::new();
    quorum.text("x-queue-type", "quorum");
    admin
        .exchange_declare(
            results.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    if store {
        admin
            .queue_declare(sink.as_str().into(), durable, quorum.into_table())
            .await?;
        admin
            .queue_bind(
                sink.as_str().into(),
                results.as_str().into(),
                "#".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    // The consumer side, on its own connection like a worker.
    let worker_conn = Connection::connect(client::URL, ConnectionProperties::default()).await?;
    let consume = worker_conn.create_channel().await?;
    consume.basic_qos(128, BasicQosOptions::default()).await?;
    let publish = worker_conn.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut deliveries = consume
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let results_exchange = results.clone();
    let worker = tokio::spawn(async move {
        while let Some(Ok(delivery)) = deliveries.next().await {
            let publish = publish.clone();
            let results = results_exchange.clone();
            tokio::spawn(async move {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_correlation_id(
                        delivery
                            .properties
                            .correlation_id()
                            .clone()
                            .unwrap_or_else(|| "".into()),
                    );
                let reply_to = delivery
                    .properties
                    .reply_to()
                    .clone()
                    .unwrap_or_else(|| "".into());
                let body = vec![b'x'; 400];
                let a = publish
                    .basic_publish(
                        "".into(),
                        reply_to,
                        BasicPublishOptions::default(),
                        &body,
                        props.clone(),
                    )
                    .await;
                let b = publish
                    .basic_publish(
                        results.as_str().into(),
                        "tiny.ok".into(),
                        BasicPublishOptions::default(),
                        &body,
                        props,
                    )
                    .await;
                if let (Ok(a), Ok(b)) = (a, b) {
                    let _ = a.await;
                    let _ = b.await;
                }
                let _ = delivery.ack(BasicAckOptions::default()).await;
            });
        }
    });
    // Drain the sink like the dispatcher's store consumer.
    let drain = if store {
        let sink_ch = worker_conn.create_channel().await?;
        sink_ch.basic_qos(64, BasicQosOptions::default()).await?;
        let mut sink_consumer = sink_ch
            .basic_consume(
                sink.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Some(tokio::spawn(async move {
            while let Some(Ok(d)) = sink_consumer.next().await {
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        }))
    } else {
        None
    };
    let rate = drive_closed_loop(&queue, "", duration, publishers, window, body, false).await?;
    worker.abort();
    if let Some(drain) = drain {
        drain.abort();
    }
    for q in [&queue, &sink] {
        let _ = admin
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = admin
        .exchange_delete(results.as_str().into(), Default::default())
        .await;
    Ok(rate)
}

/// `publishers` clients, each keeping `window` jobs outstanding, for `duration` after a 2 s
/// warm-up; returns completed jobs/s. `exchange` "" with the queue name for raw mode, or
/// ember.jobs with the model; `store` marks each job `ember-store-result`.
async fn drive_closed_loop(
    route: &str,
    exchange: &str,
    duration: Duration,
    publishers: usize,
    window: usize,
    body: &[u8],
    store: bool,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(2) + duration;
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let mut client = RpcClient::connect_plain().await?;
        client.store_results = store;
        for _ in 0..window {
            let client = client.clone();
            let done = done.clone();
            let body = body.to_vec();
            let route = route.to_string();
            let exchange = exchange.to_string();
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    match client.send_to(&exchange, &route, &body, "image/png").await {
                        Ok(rx) => {
                            if rx.await.is_ok() {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            }));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start_count = done.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let rate =
        (done.load(Ordering::Relaxed) - start_count) as f64 / started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    Ok(rate)
}

/// An 8x8 RGB PNG (232 bytes): the tiny model's job.
fn tiny_png() -> anyhow::Result<Vec<u8>> {
    Ok(include_bytes!("tiny.png").to_vec())
}

async fn throughput(
    args: &Args,
    duration: Duration,
    publishers: usize,
    window: usize,
) -> anyhow::Result<()> {
    let body = tiny_png()?;
    let dir = fleet::root().join("models/tiny-ssd");
    // Per kind of job: (broker ceiling, fleet) jobs/s of each round.
    let kinds = [("reply_only", false), ("stored", true)];
    let mut rates: Vec<(Vec<f64>, Vec<f64>)> = vec![(vec![], vec![]); kinds.len()];
    for round in 0..args.rounds {
        let model = unique("tiny");
        let worker = fleet::worker(&model, &dir, &["--max-batch", "64", "--prefetch", "128"])?;
        worker.wait_http(worker.admin, "/readyz").await?;
        let (dispatcher, api) = fleet::dispatcher(&model, &dir)?;
        dispatcher.wait_http(api, "/v2/health/ready").await?;
        for ((kind, store), (raw, fleet_rates)) in kinds.iter().zip(rates.iter_mut()) {
            let ceiling = raw_ceiling(duration, publishers, window, &body, *store).await?;
            let rate = drive_closed_loop(
                &model,
                topology::JOBS_EXCHANGE,
                duration,
                publishers,
                window,
                &body,
                *store,
            )
            .await?;
            println!(
                "throughput round {round}, {kind}: broker ceiling {ceiling:.0} jobs/s, fleet {rate:.0} jobs/s, ratio {:.2}",
                rate / ceiling
            );
            raw.push(ceiling);
            fleet_rates.push(rate);
        }
        drop(dispatcher);
        drop(worker);
        delete_queues(&model).await;
    }
    let mut doc = json!({"publishers": publishers, "window": window, "duration_s": duration.as_secs_f64(),
        "message": "8x8 PNG job, persistent, quorum queue; replies by Direct Reply-to; reply_only: a plain AMQP job (result to ember.results, nothing bound), stored: with ember-store-result (result to ember.results.stored -> ember.results.store, drained by the dispatcher into Redis)"});
    for ((kind, _), (raw, fleet_rates)) in kinds.iter().zip(rates) {
        let (r, f) = (across(raw), across(fleet_rates));
        let ratio = f.median / r.median;
        println!(
            "{kind}: fleet / broker ceiling: {ratio:.2} ({:.0} / {:.0} jobs/s)",
            f.median, r.median
        );
        doc[*kind] = json!({"broker_ceiling_jobs_s": r, "fleet_jobs_s": f, "ratio": ratio});
    }
    save(&args.out, "throughput", doc)
}

async fn batching(args: &Args, rate: f64, duration: Duration) -> anyhow::Result<()> {
    let image = sample("astronaut.png")?;
    let dir = fleet::root().join("models/ssdlite-person");
    let mut doc = json!({"offered_jobs_s": rate, "duration_s": duration.as_secs_f64()});
    for max_batch in [1usize, 4, 8] {
        let (mut rates, mut p95s) = (vec![], vec![]);
        for round in 0..args.rounds {
            let model = unique("batch");
            let batch = max_batch.to_string();
            let worker = fleet::worker(&model, &dir, &["--max-batch", &batch])?;
            worker.wait_http(worker.admin, "/readyz").await?;
            let client = RpcClient::connect(&model).await?;
            let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
            let started = Instant::now();
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let mut tasks = Vec::new();
            while started.elapsed() < duration {
                ticker.tick().await;
                let client = client.clone();
                let image = image.clone();
                let model = model.clone();
                let latencies = latencies.clone();
                tasks.push(tokio::spawn(async move {
                    if let Ok((seconds, _)) = client.call(&model, &image, "image/png").await {
                        latencies
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(seconds);
                    }
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let latencies = latencies.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let s = summarise(&latencies);
            let served = latencies.len() as f64 / elapsed;
            println!(
                "batching max {max_batch} round {round}: {served:.1} jobs/s served, p50 {:.0} ms, p95 {:.0} ms",
                s.p50 * 1e3,
                s.p95 * 1e3
            );
            rates.push(served);
            p95s.push(s.p95);
            drop(worker);
            delete_queues(&model).await;
        }
        doc[format!("max_batch_{max_batch}")] =
            json!({"served_jobs_s": across(rates), "p95_s": across(p95s)});
    }
    save(&args.out, "batching", doc)
}

async fn memory(args: &Args, soak: Duration, rate: f64) -> anyhow::Result<()> {
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        rounds.push(memory_round(round, soak, rate).await?);
    }
    let at = |key: &str, part: &str| -> Vec<f64> {
        rounds
            .iter()
            .filter_map(|r| r[key][part].as_f64())
            .collect()
    };
    let doc = json!({"soak_s": soak.as_secs_f64(), "rate_jobs_s": rate,
        "end_worker_mb": across(at("end", "worker_mb")), "end_dispatcher_mb": across(at("end", "dispatcher_mb")),
        "peak_worker_mb": across(at("peak", "worker_mb")), "peak_dispatcher_mb": across(at("peak", "dispatcher_mb")),
        "rounds": rounds});
    save(&args.out, "memory", doc)
}

/// What became of the soak's jobs: by client and outcome (`ok`, `error:<code>`, `refused`,
/// `unanswered`, `transport_error`).
type Outcomes = Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>;

fn count(outcomes: &Outcomes, key: String) {
    *outcomes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default() += 1;
}

/// One soak: a fresh worker and dispatcher, `rate` jobs/s for `soak` (half AMQP RPC, half HTTP
/// async jobs into the result store), RSS every 5 s, and every job's outcome.
async fn memory_round(round: usize, soak: Duration, rate: f64) -> anyhow::Result<Value> {
    let image = sample("astronaut.png")?;
    let dir = fleet::root().join("models/ssdlite-person");
    let model = unique("memory");
    let worker = fleet::worker(&model, &dir, &[])?;
    worker.wait_http(worker.admin, "/readyz").await?;
    let (dispatcher, api) = fleet::dispatcher(&model, &dir)?;
    dispatcher.wait_http(api, "/v2/health/ready").await?;
    let mb = |pid| {
        fleet::rss(pid)
            .map(|b| b as f64 / 1048576.0)
            .unwrap_or(f64::NAN)
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = json!({"worker_mb": mb(worker.pid()), "dispatcher_mb": mb(dispatcher.pid())});
    println!("round {round}: idle RSS: {idle}");
    let client = RpcClient::connect(&model).await?;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{api}/v1/models/{model}/jobs");
    let outcomes: Outcomes = Arc::default();
    let http_ids = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut next_sample = Instant::now();
    let mut sent = 0u64;
    let mut tasks = Vec::new();
    while started.elapsed() < soak {
        ticker.tick().await;
        sent += 1;
        let outcomes = outcomes.clone();
        if sent.is_multiple_of(2) {
            let client = client.clone();
            let (image, model) = (image.clone(), model.clone());
            tasks.push(tokio::spawn(async move {
                let outcome = match client.call(&model, &image, "image/png").await {
                    Ok((_, result)) => match &result.error {
                        None => "amqp ok".to_string(),
                        Some(error) => format!("amqp error:{}", error.code.as_str()),
                    },
                    Err(error) => format!("amqp unanswered ({error})"),
                };
                count(&outcomes, outcome);
            }));
        } else {
            let request = http
                .post(&url)
                .header("content-type", "image/png")
                .body(image.clone());
            let ids = http_ids.clone();
            tasks.push(tokio::spawn(async move {
                match request.send().await {
                    Ok(response) if response.status() == 202 => {
                        let doc: Value = response.json().await.unwrap_or(Value::Null);
                        if let Some(id) = doc["job_id"].as_str() {
                            ids.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(id.to_string());
                        }
                    }
                    Ok(response) => count(
                        &outcomes,
                        format!("http refused {}", response.status().as_u16()),
                    ),
                    Err(_) => count(&outcomes, "http transport_error".into()),
                }
            }));
        }
        if Instant::now() >= next_sample {
            let s = (
                started.elapsed().as_secs_f64(),
                mb(worker.pid()),
                mb(dispatcher.pid()),
            );
            samples.push(s);
            next_sample += Duration::from_secs(5);
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    // The HTTP jobs' results, from the store (at most a minute for the last ones).
    let ids = http_ids.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let settle = Instant::now();
    let mut pending = ids;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for id in pending {
            let doc: Value = match http
                .get(format!("http://127.0.0.1:{api}/v1/jobs/{id}"))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            match doc["status"].as_str() {
                Some("done") => count(&outcomes, "http ok".into()),
                Some("failed") => count(
                    &outcomes,
                    format!(
                        "http error:{}",
                        doc["result"]["error"]["code"].as_str().unwrap_or("")
                    ),
                ),
                _ if settle.elapsed() > Duration::from_secs(60) => {
                    count(&outcomes, "http unanswered".into())
                }
                _ => still.push(id),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let first = samples
        .iter()
        .find(|s| s.0 >= 30.0)
        .copied()
        .unwrap_or(samples[0]);
    let last = *samples.last().unwrap_or(&first);
    let peak_w = samples.iter().map(|s| s.1).fold(0.0, f64::max);
    let peak_d = samples.iter().map(|s| s.2).fold(0.0, f64::max);
    println!(
        "round {round}: soak {:?} at {rate}/s: worker {:.1} -> {:.1} MB (peak {peak_w:.1}), dispatcher {:.1} -> {:.1} MB (peak {peak_d:.1}); {sent} jobs sent: {outcomes:?}",
        soak, first.1, last.1, first.2, last.2
    );
    drop(dispatcher);
    drop(worker);
    delete_queues(&model).await;
    Ok(
        json!({"jobs_sent": sent, "outcomes": outcomes, "idle": idle,
        "after_30s": {"worker_mb": first.1, "dispatcher_mb": first.2}, "end": {"worker_mb": last.1, "dispatcher_mb": last.2},
        "peak": {"worker_mb": peak_w, "dispatcher_mb": peak_d}, "samples": samples}),
    )
}

fn gauge(text: &str, name: &str, model: &str) -> f64 {
    let prefix = format!("{name}{{model=\"{model}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Publishes `jobs` (all at once, or at `rate`/s), collects every result, and samples the
/// autoscaler every 50 ms: first decision, first result, drain, replica-seconds.
async fn scaling_phase(
    admin: u16,
    model: &str,
    jobs: usize,
    rate: Option<f64>,
) -> anyhow::Result<Value> {
    let image = sample("astronaut.png")?;
    let client = RpcClient::connect(model).await?;
    let http = reqwest::Client::new();
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    let started = Instant::now();
    let results = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let publisher = {
        let (client, model, image, results) = (
            client.clone(),
            model.to_string(),
            image.clone(),
            results.clone(),
        );
        tokio::spawn(async move {
            let mut tasks = Vec::new();
            let mut ticker = rate.map(|r| tokio::time::interval(Duration::from_secs_f64(1.0 / r)));
            for _ in 0..jobs {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let rx = client.send(&model, &image, "image/png").await;
                let results = results.clone();
                tasks.push(tokio::spawn(async move {
                    if let Ok(rx) = rx
                        && rx.await.is_ok()
                    {
                        results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(started.elapsed().as_secs_f64());
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    let (mut first_decision, mut replica_seconds, mut peak) = (None, 0.0, 0.0f64);
    let mut last = Instant::now();
    while !publisher.is_finished() {
        let text = http.get(&metrics_url).send().await?.text().await?;
        let replicas = gauge(&text, "ember_autoscaler_ready_replicas", model)
            + gauge(&text, "ember_autoscaler_starting_replicas", model);
        replica_seconds += replicas * last.elapsed().as_secs_f64();
        last = Instant::now();
        let desired = gauge(&text, "ember_autoscaler_desired_replicas", model);
        peak = peak.max(desired);
        if desired > 0.0 && first_decision.is_none() {
            first_decision = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let times = results.lock().unwrap_or_else(|e| e.into_inner()).clone();
    anyhow::ensure!(times.len() == jobs, "{} of {jobs} answered", times.len());
    let first = times.iter().copied().fold(f64::INFINITY, f64::min);
    let drained = times.iter().copied().fold(0.0, f64::max);
    Ok(
        json!({"jobs": jobs, "rate": rate, "first_decision_s": first_decision, "first_result_s": first,
        "drained_s": drained, "replica_seconds_until_drained": replica_seconds, "peak_replicas": peak}),
    )
}

async fn wait_zero(admin: u16, model: &str) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        let text = http
            .get(format!("http://127.0.0.1:{admin}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        let replicas = gauge(&text, "ember_autoscaler_ready_replicas", model)
            + gauge(&text, "ember_autoscaler_starting_replicas", model);
        if replicas == 0.0 && text.contains("ember_autoscaler_desired_replicas") {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "never back to zero"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn scaling(args: &Args, rate: f64, step: Duration, burst: usize) -> anyhow::Result<()> {
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        let model = unique("scaling");
        let admin = fleet::free_port();
        let a: Vec<String> = [
            "--model-dir",
            "models/ssdlite-person",
            "--model-name",
            &model,
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
            "--tick",
            "200ms",
            "--min-replicas",
            "0",
            "--max-replicas",
            "3",
            "--scale-down-window",
            "3s",
            "--idle-to-zero",
            "3s",
            "--scale-down-step",
            "3",
            "--worker-arg",
            "--log warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let autoscaler = fleet::Proc::start("ember-autoscaler", &a, admin)?;
        autoscaler.wait_http(admin, "/readyz").await?;
        wait_zero(admin, &model).await?;
        let jobs = (rate * step.as_secs_f64()).round() as usize;
        let step_result = scaling_phase(admin, &model, jobs, Some(rate)).await?;
        wait_zero(admin, &model).await?;
        let burst_result = scaling_phase(admin, &model, burst, None).await?;
        println!(
            "scaling round {round}: step {step_result}\n                 burst {burst_result}"
        );
        rounds.push(json!({"step": step_result, "burst": burst_result}));
        drop(autoscaler);
        delete_queues(&model).await;
    }
    let pick = |phase: &str, key: &str| {
        across(
            rounds
                .iter()
                .filter_map(|r| r[phase][key].as_f64())
                .collect(),
        )
    };
    let summary = json!({
        "step": {"first_decision_s": pick("step", "first_decision_s"), "first_result_s": pick("step", "first_result_s"),
                 "drained_s": pick("step", "drained_s"), "replica_seconds": pick("step", "replica_seconds_until_drained")},
        "burst": {"first_decision_s": pick("burst", "first_decision_s"), "first_result_s": pick("burst", "first_result_s"),
                  "drained_s": pick("burst", "drained_s"), "replica_seconds": pick("burst", "replica_seconds_until_drained")},
    });
    println!("{summary}");
    save(
        &args.out,
        "scaling",
        json!({"rate": rate, "step_s": step.as_secs_f64(), "burst": burst,
        "autoscaler": "local backend, tick 200 ms, min 0, max 3, scale-down window 3 s, idle-to-zero 3 s",
        "summary": summary, "rounds": rounds}),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match &args.scenario {
        Scenario::Residency { jobs } => residency(&args, *jobs).await,
        Scenario::Overhead { jobs } => overhead(&args, *jobs).await,
        Scenario::Throughput {
            duration,
            publishers,
            window,
        } => throughput(&args, *duration, *publishers, *window).await,
        Scenario::Batching { rate, duration } => batching(&args, *rate, *duration).await,
        Scenario::Memory { soak, rate } => memory(&args, *soak, *rate).await,
        Scenario::Scaling { rate, step, burst } => scaling(&args, *rate, *step, *burst).await,
        Scenario::Models { jobs, duration } => {
            let doc = models::run(args.rounds, *jobs, *duration).await?;
            save(&args.out, "models", doc)
        }
        Scenario::Chaos(chaos) => chaos::run(&args.out, chaos).await,
        Scenario::Tenants(tenants) => tenants::run(&args.out, args.rounds, tenants).await,
    }
}
