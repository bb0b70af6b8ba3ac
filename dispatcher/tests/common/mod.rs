//! The dispatcher's own test glue: the real dispatcher binary (or the dispatcher in this
//! process), a real worker in this process (through the same `ember_worker::run` its binary
//! calls), the Python clients, RabbitMQ and Redis. What other crates' tests share too (the callback
//! receiver, the fake Redis, the scripted resolver, processes) is in `ember-testkit`.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use ember_testkit::process::Process;
use ember_testkit::{PATIENCE, free_port, root};
use tokio_util::sync::CancellationToken;

/// Every dispatcher consumes the one shared `ember.callbacks` queue (that is the design: any
/// replica delivers any callback), so a test's callbacks could be taken by another test's
/// dispatcher with other retry settings. The tests of this binary therefore run one at a time.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}
pub const SECRET: &str = "whsec_dGVzdC1zZWNyZXQtZm9yLWVtYmVyLWNhbGxiYWNrcw==";

/// The dispatcher as a process serving a model directory under `model`.
pub struct Dispatcher {
    process: Process,
    pub url: String,
    pub port: u16,
    pub admin_port: u16,
    pub http: reqwest::Client,
}

impl Dispatcher {
    /// Serving the bundled SSD (models/ssdlite-person).
    pub async fn start(model: &str, extra: &[&str]) -> Self {
        Self::start_with_dir(model, &root().join("models/ssdlite-person"), extra).await
    }

    /// Serving `model_dir` (a bundled model, or a directory holding only `model.onnx`).
    pub async fn start_with_dir(model: &str, model_dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(model, model_dir, extra, &[]).await
    }

    /// The same, with more environment variables (e.g. `OTEL_*`).
    pub async fn start_with_env(
        model: &str,
        model_dir: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let admin_port = free_port();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{model}-dispatcher-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let process = Process::spawn(
            Command::new(env!("CARGO_BIN_EXE_ember-dispatcher"))
                .current_dir(root())
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
                .arg("--model-dir")
                .arg(model_dir)
                .args(["--model-name", model])
                .args(["--callback-allow-net", "127.0.0.1/32"])
                .args([
                    "--callback-initial-backoff",
                    "100ms",
                    "--callback-secret",
                    SECRET,
                ])
                .args(insecure_unless_tokens(extra))
                .args(extra)
                .env("EMBER_LOG", "info,ember_dispatcher=debug")
                .envs(env.iter().copied()),
            log,
        );
        let dispatcher = Self {
            process,
            url: format!("http://127.0.0.1:{port}"),
            port,
            admin_port,
            http: reqwest::Client::new(),
        };
        let started = Instant::now();
        loop {
            if let Ok(r) = dispatcher.get("/v2/health/ready").await
                && r.status() == 200
            {
                return dispatcher;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "dispatcher not ready: {}",
                dispatcher.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub async fn get(&self, path: &str) -> reqwest::Result<reqwest::Response> {
        self.http.get(format!("{}{path}", self.url)).send().await
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    /// Submits a sample photo as a job.
    pub async fn submit(
        &self,
        model: &str,
        sample: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .post(&format!("/v1/models/{model}/jobs"))
            .header("content-type", "image/png")
            .body(std::fs::read(root().join("tests/samples").join(sample)).unwrap());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }

    /// Polls GET /v1/jobs/{id} until it is no longer queued.
    pub async fn wait_done(&self, job_id: &str) -> serde_json::Value {
        let started = Instant::now();
        loop {
            let view: serde_json::Value = self
                .get(&format!("/v1/jobs/{job_id}"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if view["status"] != "queued" {
                return view;
            }
            assert!(started.elapsed() < PATIENCE, "job {job_id} never finished");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a worker of `model` reports ready.
    pub async fn wait_model_ready(&self, model: &str) {
        let started = Instant::now();
        while self
            .get(&format!("/v2/models/{model}/ready"))
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(
                started.elapsed() < PATIENCE,
                "no worker of {model} became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The admin server's /metrics text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// SIGTERM, then the exit status (bounded by PATIENCE).
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.process.signal("TERM");
        self.process.exited().await
    }

    pub fn kill(&mut self) {
        self.process.stop();
    }
}

/// A worker for `model`, running in this process; stopped (drained) on drop.
pub struct InProcessWorker {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessWorker {
    /// Serving the bundled SSD (models/ssdlite-person).
    pub fn start(model: &str) -> Self {
        Self::start_with_dir(model, &root().join("models/ssdlite-person"))
    }

    /// Serving `model_dir` under `model`.
    pub fn start_with_dir(model: &str, model_dir: &Path) -> Self {
        Self::start_with_args(model, model_dir, &[])
    }

    /// Serving `model_dir` under `model`, with more flags (e.g. `--amqp-url`).
    pub fn start_with_args(model: &str, model_dir: &Path, extra: &[&str]) -> Self {
        let mut args = vec![
            "ember-worker",
            "--model-dir",
            model_dir.to_str().unwrap(),
            "--model-name",
            model,
            "--admin-addr",
            "127.0.0.1:0",
            "--intra-threads",
            "1",
            "--heartbeat-interval",
            "200ms",
        ];
        args.extend_from_slice(extra);
        let config = ember_worker::Config::try_parse_from(args).unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = ember_worker::run(config, token).await {
                panic!("worker failed: {error}");
            }
        });
        Self {
            stop,
            task: Some(task),
        }
    }
}

impl Drop for InProcessWorker {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Runs a Python client from tests/clients with the project's venv.
pub fn python(script: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = python_verdict(script, args);
    assert!(ok, "{script} failed: {stderr}");
    stdout
}

/// Runs a Python client from tests/clients with the project's venv: whether it exited 0, its
/// stdout and its stderr (for clients that print a verdict either way).
pub fn python_verdict(script: &str, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(root().join(".venv/bin/python"))
        .current_dir(root())
        .arg(root().join("tests/clients").join(script))
        .args(args)
        .output()
        .expect("run scripts/setup first: it creates .venv");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The graph's inputs and outputs as ONNX Runtime in Python reads `dir/model.onnx`:
/// `{"inputs": [{"name", "datatype", "shape"}], "outputs": [...]}`, OIP datatypes, `-1` for a
/// dynamic dimension; what the model metadata must say.
pub fn graph_io(dir: &Path) -> serde_json::Value {
    const SCRIPT: &str = r#"
import json, sys
import onnxruntime as ort
TYPES = {"tensor(float)": "FP32", "tensor(double)": "FP64", "tensor(float16)": "FP16",
         "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
         "tensor(int64)": "INT64", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
         "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(bool)": "BOOL",
         "tensor(string)": "BYTES"}
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
d = lambda a: {"name": a.name, "datatype": TYPES[a.type],
               "shape": [x if isinstance(x, int) and x >= 0 else -1 for x in a.shape]}
print(json.dumps({"inputs": [d(a) for a in s.get_inputs()],
                  "outputs": [d(a) for a in s.get_outputs()]}))
"#;
    let output = Command::new(root().join(".venv/bin/python"))
        .arg("-c")
        .arg(SCRIPT)
        .arg(dir.join("model.onnx"))
        .output()
        .expect("run scripts/setup first: it creates .venv");
    assert!(
        output.status.success(),
        "graph_io {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// astronaut.png resized to 300x300 RGB, as raw bytes.
pub fn astronaut_300() -> Vec<u8> {
    image::open(root().join("tests/samples/astronaut.png"))
        .unwrap()
        .resize_exact(300, 300, image::imageops::FilterType::Triangle)
        .into_rgb8()
        .into_raw()
}

/// Waits for `job_id`'s callback in `ember.callbacks.dead` (on the machine's broker), acks it and
/// returns it; other runs' leftovers are put back.
pub async fn dead_lettered_callback(job_id: &str) -> lapin::message::Delivery {
    use futures_util::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions};
    let connection = ember_testkit::amqp::connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            "ember.callbacks.dead".into(),
            "".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let dead = loop {
        let delivery = tokio::time::timeout(PATIENCE, consumer.next())
            .await
            .expect("a dead-lettered callback in time")
            .unwrap()
            .unwrap();
        let ours = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str())
            == Some(job_id);
        if ours {
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            break delivery;
        }
        // Another run's leftover: leave it for whoever owns it.
        delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
            .unwrap();
    };
    let _ = connection.close(200, "done".into()).await;
    dead
}

/// The dispatcher in this process (through `ember_dispatcher::run_with_resolver`, what its
/// binary's `run` calls with the system resolver), resolving callback hosts with `names`.
pub struct InProcessDispatcher {
    pub url: String,
    pub http: reqwest::Client,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InProcessDispatcher {
    pub async fn start(model: &str, extra: &[&str], names: Arc<dyn reqwest::dns::Resolve>) -> Self {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let model_dir = root().join("models/ssdlite-person");
        let mut args = vec![
            "ember-dispatcher",
            "--listen",
            &listen,
            "--admin-addr",
            "127.0.0.1:0",
            "--model-dir",
            model_dir.to_str().unwrap(),
            "--model-name",
            model,
            "--callback-initial-backoff",
            "100ms",
            "--callback-secret",
            SECRET,
        ];
        args.extend_from_slice(insecure_unless_tokens(extra));
        args.extend_from_slice(extra);
        let config = ember_dispatcher::Config::try_parse_from(args).unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            if let Err(error) = ember_dispatcher::run_with_resolver(config, names, token).await {
                panic!("dispatcher failed: {error}");
            }
        });
        let dispatcher = Self {
            url: format!("http://{listen}"),
            http: reqwest::Client::new(),
            stop,
            task: Some(task),
        };
        let started = Instant::now();
        loop {
            if let Ok(r) = dispatcher
                .http
                .get(format!("{}/v2/health/ready", dispatcher.url))
                .send()
                .await
                && r.status() == 200
            {
                return dispatcher;
            }
            assert!(started.elapsed() < PATIENCE, "dispatcher not ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Submits a sample photo as a job.
    pub async fn submit(
        &self,
        model: &str,
        sample: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/v1/models/{model}/jobs", self.url))
            .header("content-type", "image/png")
            .body(std::fs::read(root().join("tests/samples").join(sample)).unwrap());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.unwrap()
    }
}

impl Drop for InProcessDispatcher {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// `--insecure-no-auth` for a dispatcher started without tokens (it refuses to start otherwise).
pub fn insecure_unless_tokens(extra: &[&str]) -> &'static [&'static str] {
    if extra
        .iter()
        .any(|a| matches!(*a, "--auth-token" | "--tenants-file"))
    {
        &[]
    } else {
        &["--insecure-no-auth"]
    }
}
