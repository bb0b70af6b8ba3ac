//! Helpers for the dispatcher's end-to-end tests: the real dispatcher binary, a real worker (in
//! this process, through the same `ember_worker::run` its binary calls), RabbitMQ, Redis, and a
//! scripted callback receiver on 127.0.0.1.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use clap::Parser;
use tokio_util::sync::CancellationToken;

pub const PATIENCE: Duration = Duration::from_secs(120);

/// Every dispatcher consumes the one shared `ember.callbacks` queue (that is the design: any
/// replica delivers any callback), so a test's callbacks could be taken by another test's
/// dispatcher with other retry settings. The tests of this binary therefore run one at a time.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}
pub const SECRET: &str = "whsec_dGVzdC1zZWNyZXQtZm9yLWVtYmVyLWNhbGxiYWNrcw==";

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn unique_model(test: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("http-{test}-{}", &id[..8])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The dispatcher as a process serving a model directory under `model`.
pub struct Dispatcher {
    pub child: Child,
    pub url: String,
    pub port: u16,
    pub admin_port: u16,
    pub log: PathBuf,
    pub http: reqwest::Client,
}

impl Dispatcher {
    /// Serving the bundled SSD (models/ssdlite-person).
    pub async fn start(model: &str, extra: &[&str]) -> Self {
        Self::start_with_dir(model, &root().join("models/ssdlite-person"), extra).await
    }

    /// Serving `model_dir` (a bundled model, or a directory holding only `model.onnx`).
    pub async fn start_with_dir(model: &str, model_dir: &Path, extra: &[&str]) -> Self {
        let port = free_port();
        let admin_port = free_port();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "{model}-dispatcher-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_ember-dispatcher"))
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
            .args(extra)
            .env("EMBER_LOG", "info,ember_dispatcher=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let dispatcher = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
            admin_port,
            log,
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
        std::fs::read_to_string(&self.log).unwrap_or_default()
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
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "dispatcher did not exit: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.kill();
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
        let config = ember_worker::Config::try_parse_from([
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
        ])
        .unwrap();
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

/// What a callback receiver does with one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// Status with a Retry-After header (seconds).
    RetryAfter(u16, u64),
    /// Never answers.
    Hang,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: String,
    pub at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    plan: Vec<Reply>,
    default: Option<Reply>,
    deliveries: Vec<Delivery>,
}

/// A callback receiver on 127.0.0.1 that answers by a script (then 200) and records everything.
#[derive(Clone)]
pub struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
    pub addr: SocketAddr,
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let reply = {
        let mut state = state.lock().unwrap();
        state.deliveries.push(Delivery {
            headers,
            body,
            at: Instant::now(),
        });
        if state.plan.is_empty() {
            state.default.unwrap_or(Reply::Status(200))
        } else {
            state.plan.remove(0)
        }
    };
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::RetryAfter(code, seconds) => (
            StatusCode::from_u16(code).unwrap(),
            [("retry-after", seconds.to_string())],
        )
            .into_response(),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
    }
}

impl Receiver {
    pub async fn start(plan: Vec<Reply>, default: Option<Reply>) -> Self {
        Self::start_on("127.0.0.1", plan, default).await
    }

    /// On another loopback address (all of 127/8 is loopback on Linux).
    pub async fn start_on(ip: &str, plan: Vec<Reply>, default: Option<Reply>) -> Self {
        let state = Arc::new(Mutex::new(ReceiverState {
            plan,
            default,
            deliveries: Vec::new(),
        }));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { state, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_default(&self, reply: Reply) {
        self.state.lock().unwrap().default = Some(reply);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().deliveries.clone()
    }

    /// Deliveries whose body is the result of `job_id`.
    pub fn for_job(&self, job_id: &str) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| {
                serde_json::from_str::<serde_json::Value>(&d.body)
                    .map(|v| v["job_id"] == job_id)
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Waits until `done(deliveries)` holds.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[Delivery]) -> bool) {
        let started = Instant::now();
        while !done(&self.deliveries()) {
            assert!(started.elapsed() < PATIENCE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Sum of a metric's samples whose line starts with `prefix`.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs a Python client from tests/clients with the project's venv.
pub fn python(script: &str, args: &[&str]) -> String {
    let output = Command::new(root().join(".venv/bin/python"))
        .current_dir(root())
        .arg(root().join("tests/clients").join(script))
        .args(args)
        .output()
        .expect("run scripts/setup first: it creates .venv");
    assert!(
        output.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
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

/// The known answers of a bundled model (tests/known_answers.json, by ONNX Runtime in Python).
pub fn known_answers(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/known_answers.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all["models"][model].clone()
}

/// A fresh directory under the target's temporary directory.
pub fn tempdir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
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
    let connection = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
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

/// A resolver playing DNS: each name answers its script in turn, the last answer from then on.
#[derive(Default)]
pub struct ScriptedNames {
    answers: Mutex<std::collections::HashMap<String, Vec<Vec<std::net::IpAddr>>>>,
    pub lookups: Mutex<Vec<String>>,
}

impl ScriptedNames {
    pub fn answer(self, name: &str, script: &[&[&str]]) -> Self {
        let script = script
            .iter()
            .map(|ips| ips.iter().map(|ip| ip.parse().unwrap()).collect())
            .collect();
        self.answers
            .lock()
            .unwrap()
            .insert(name.to_string(), script);
        self
    }
}

impl reqwest::dns::Resolve for ScriptedNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        self.lookups.lock().unwrap().push(name.as_str().to_string());
        let answer: Option<Vec<std::net::IpAddr>> = {
            let mut answers = self.answers.lock().unwrap();
            answers.get_mut(name.as_str()).map(|script| {
                if script.len() > 1 {
                    script.remove(0)
                } else {
                    script[0].clone()
                }
            })
        };
        let host = name.as_str().to_string();
        Box::pin(async move {
            let ips = answer.ok_or_else(|| format!("no such name: {host}"))?;
            let addrs: Vec<SocketAddr> = ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A "Redis" on 127.0.0.1 that answers PING and the connection set-up like Redis, and every
/// other command with an error carrying `FakeRedis::MARKER`: internal text that must not reach
/// API clients.
pub struct FakeRedis {
    pub url: String,
    task: tokio::task::JoinHandle<()>,
}

impl FakeRedis {
    pub const MARKER: &str = "fake-redis-internal-detail 10.11.12.13:6379";

    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(fake_redis_connection(stream));
            }
        });
        Self { url, task }
    }
}

impl Drop for FakeRedis {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fake_redis_connection(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
        let mut replies = Vec::new();
        while let Some((command, used)) = parse_resp_command(&buffer) {
            buffer.drain(..used);
            let name = command
                .first()
                .map(|c| c.to_ascii_uppercase())
                .unwrap_or_default();
            match name.as_slice() {
                b"PING" => replies.extend_from_slice(b"+PONG\r\n"),
                b"CLIENT" | b"SELECT" => replies.extend_from_slice(b"+OK\r\n"),
                _ => {
                    replies.extend_from_slice(format!("-ERR {}\r\n", FakeRedis::MARKER).as_bytes())
                }
            }
        }
        if stream.write_all(&replies).await.is_err() {
            return;
        }
    }
}

/// One RESP command (`*N` then N bulk strings) from the front of `buffer`, and its length.
fn parse_resp_command(buffer: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buffer: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buffer[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buffer[at..end], end + 2))
    }
    let (header, mut at) = line(buffer, 0)?;
    let count: usize = std::str::from_utf8(header.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut parts = Vec::with_capacity(count);
    for _ in 0..count {
        let (length, next) = line(buffer, at)?;
        let length: usize = std::str::from_utf8(length.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if buffer.len() < next + length + 2 {
            return None;
        }
        parts.push(buffer[next..next + length].to_vec());
        at = next + length + 2;
    }
    Some((parts, at))
}
