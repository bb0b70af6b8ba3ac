//! `ember-bench chaos`: the fleet (autoscaler local backend + workers + dispatcher, on a private
//! RabbitMQ node) under a steady load from real clients — HTTP jobs with callbacks to a receiver
//! run here, synchronous HTTP jobs, AMQP RPC jobs with a durable reply queue — while one fault at
//! a time is injected. Every submitted job is then checked: answered once (a visible result and a
//! callback, or a reply), or rejected up front with an error; never lost, never answered twice.
//! docs/chaos.md explains the faults and the columns.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use ember_core::protocol::{JobResult, header};
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{Value, json};

use crate::fleet::{self, Proc};

/// Every fault, in the order they run.
pub const FAULTS: &[&str] = &[
    "worker-sigkill",
    "worker-sigterm",
    "scale-in",
    "dispatcher-restart",
    "dispatcher-sigkill",
    "broker-stop-app",
    "broker-restart",
    "receiver-down",
    "receiver-slow",
    "poison",
    "overload",
];

/// The marker that makes a worker abort (EMBER_WORKER_CHAOS_CRASH_ON), appended to a PNG.
const POISON_MARKER: &str = "EMBER-CHAOS-POISON-7f3a";

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Faults to run, comma-separated, in this order (default: all).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Jobs per fault (the overload phase sends for --overload instead).
    #[arg(long, default_value_t = 300)]
    pub jobs: usize,
    /// Steady offered load, jobs/s.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// How long the overload (10x the measured capacity) lasts.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub overload: Duration,
    /// Longest wait for the answers after a fault's load.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// AMQP port of the private RabbitMQ node (`scripts/rabbitmq-node start chaos PORT`).
    #[arg(long, default_value_t = 5682)]
    pub amqp_port: u16,
    /// The dispatcher's Redis, with a database index of its own.
    #[arg(long, default_value = "redis://127.0.0.1:6379/7")]
    pub redis_url: String,
    /// The model served (ssdlite-person: the real one).
    #[arg(long, default_value = "models/ssdlite-person")]
    pub model_dir: PathBuf,
    /// `x-max-length` of the model's queue (the overload bound).
    #[arg(long, default_value_t = 300)]
    pub queue_max_length: u32,
    /// Most worker replicas (the autoscaler keeps at least 2).
    #[arg(long, default_value_t = 3)]
    pub max_replicas: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// POST /v1/models/{m}/jobs with a callback URL, then GET /v1/jobs/{id}.
    HttpAsync,
    /// The same with ?wait=10s: the result inline.
    HttpSync,
    /// AMQP RPC: reply_to a durable queue, correlation id = job id.
    Amqp,
}

#[derive(Debug, Clone)]
struct Answer {
    job_id: String,
    status: String,
    at: Instant,
}

#[derive(Debug)]
struct Job {
    kind: Kind,
    phase: usize,
    poison: bool,
    sent_at: Instant,
    accepted: Option<String>,
    rejected: Option<String>,
    /// The result returned inline (sync HTTP).
    inline: Option<Answer>,
    /// Callback deliveries (HTTP) or replies (AMQP), raw.
    deliveries: Vec<Answer>,
    /// GET /v1/jobs/{id}: "done" / "failed".
    visible: Option<String>,
}

type Ledger = Arc<Mutex<HashMap<String, Job>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- the callback receiver

struct Receiver {
    port: u16,
    slow: Arc<AtomicBool>,
    delay: Duration,
    ledger: Ledger,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

#[derive(Clone)]
struct ReceiverState {
    slow: Arc<AtomicBool>,
    delay: Duration,
    ledger: Ledger,
}

async fn callback(
    State(state): State<ReceiverState>,
    UrlPath(key): UrlPath<String>,
    body: axum::body::Bytes,
) -> &'static str {
    if let Ok(result) = serde_json::from_slice::<JobResult>(&body) {
        let mut ledger = lock(&state.ledger);
        if let Some(job) = ledger.get_mut(&key) {
            job.deliveries.push(Answer {
                job_id: result.job_id,
                status: result.status.as_str().to_string(),
                at: Instant::now(),
            });
        }
    }
    if state.slow.load(Ordering::Relaxed) {
        tokio::time::sleep(state.delay).await;
    }
    "ok"
}

impl Receiver {
    fn new(ledger: Ledger, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            port: fleet::free_port(),
            slow: Arc::default(),
            delay,
            ledger,
            stop: Mutex::new(None),
        })
    }

    /// Serves on its port (binding again after `down`).
    async fn up(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => anyhow::bail!("callback receiver cannot bind {}: {e}", self.port),
            }
        };
        let router = Router::new()
            .route("/cb/{key}", post(callback))
            .with_state(ReceiverState {
                slow: self.slow.clone(),
                delay: self.delay,
                ledger: self.ledger.clone(),
            });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        *lock(&self.stop) = Some(tx);
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(())
    }

    /// Stops listening: connections are refused until `up`.
    fn down(&self) {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }

    fn url(&self, key: &str) -> String {
        format!("http://127.0.0.1:{}/cb/{key}", self.port)
    }
}

// ---------------------------------------------------------------- the AMQP RPC client

/// An RPC client that survives broker restarts: replies go to a durable queue of its own, and
/// a supervisor reconnects and re-consumes.
struct Amqp {
    url: String,
    model: String,
    settings: QueueSettings,
    reply_queue: String,
    publisher: Mutex<Option<Channel>>,
    ledger: Ledger,
}

impl Amqp {
    fn start(url: &str, model: &str, settings: QueueSettings, ledger: Ledger) -> Arc<Self> {
        let me = Arc::new(Self {
            url: url.to_string(),
            model: model.to_string(),
            settings,
            reply_queue: format!("{model}.replies"),
            publisher: Mutex::new(None),
            ledger,
        });
        let supervisor = me.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                if let Err(error) = supervisor.session().await {
                    let error = error.to_string();
                    if error != last {
                        eprintln!("chaos: AMQP client: {error}; reconnecting");
                    }
                    last = error;
                }
                *lock(&supervisor.publisher) = None;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        me
    }

    async fn session(&self) -> anyhow::Result<()> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        topology::declare_model(&publisher, &self.model, self.settings).await?;
        publisher
            .queue_declare(
                self.reply_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        let consumer_channel = connection.create_channel().await?;
        let mut replies = consumer_channel
            .basic_consume(
                self.reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        *lock(&self.publisher) = Some(publisher);
        while let Some(delivery) = replies.next().await {
            let delivery = delivery?;
            let key = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            if let (Some(key), Ok(result)) =
                (key, serde_json::from_slice::<JobResult>(&delivery.data))
                && let Some(job) = lock(&self.ledger).get_mut(&key)
            {
                job.deliveries.push(Answer {
                    job_id: result.job_id,
                    status: result.status.as_str().to_string(),
                    at: Instant::now(),
                });
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        anyhow::bail!("the reply consumer ended")
    }

    /// Publishes with a confirm. Waits (up to 30 s) for a connection, but never publishes twice:
    /// a publish whose confirm is lost is an error (the job may still be answered).
    async fn send(&self, key: &str, body: &[u8]) -> Result<(), String> {
        let started = Instant::now();
        let channel = loop {
            if let Some(c) = lock(&self.publisher).clone()
                && c.status().connected()
            {
                break c;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err("broker unavailable".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(header::SUBMITTED_AT),
            AMQPValue::LongLongInt(ember_core::amqp::unix_ms() as i64),
        );
        let props = BasicProperties::default()
            .with_message_id(key.into())
            .with_correlation_id(key.into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_content_type("image/png".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let publish = async {
            channel
                .basic_publish(
                    topology::JOBS_EXCHANGE.into(),
                    self.model.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await?
                .await
        };
        match tokio::time::timeout(Duration::from_secs(30), publish).await {
            Ok(Ok(confirm)) if confirm.is_ack() => Ok(()),
            Ok(Ok(_)) => Err("nacked (queue full)".into()),
            Ok(Err(e)) => Err(format!("unconfirmed: {e}")),
            Err(_) => Err("unconfirmed: no confirm in 30 s".into()),
        }
    }
}

// ---------------------------------------------------------------- the HTTP client

struct Http {
    client: reqwest::Client,
    base: String,
    model: String,
    ledger: Ledger,
    receiver: Arc<Receiver>,
    /// 429s, and those carrying Retry-After.
    too_many: AtomicU64,
    too_many_retry_after: AtomicU64,
}

impl Http {
    /// Submits with an Idempotency-Key (the job's key) and retries transport errors and 503s
    /// with the same key for up to 30 s; a 429 is final (rejected at the door).
    async fn send(&self, key: &str, body: &[u8], sync: bool) {
        let url = format!(
            "{}/v1/models/{}/jobs{}",
            self.base,
            self.model,
            if sync { "?wait=10s" } else { "" }
        );
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(30) {
            let response = self
                .client
                .post(&url)
                .timeout(Duration::from_secs(20))
                .header("content-type", "image/png")
                .header("idempotency-key", key)
                .header("x-callback-url", self.receiver.url(key))
                .body(body.to_vec())
                .send()
                .await;
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    last = format!("transport: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            let status = response.status().as_u16();
            let retry_after = response.headers().contains_key("retry-after");
            let doc: Value = response.json().await.unwrap_or(Value::Null);
            if status == 429 {
                self.too_many.fetch_add(1, Ordering::Relaxed);
                if retry_after {
                    self.too_many_retry_after.fetch_add(1, Ordering::Relaxed);
                }
                self.reject(key, format!("429 {}", code(&doc)));
                return;
            }
            if status == 503 {
                last = format!("503 {}", code(&doc));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if let Some(job_id) = doc["job_id"].as_str() {
                let mut ledger = lock(&self.ledger);
                if let Some(job) = ledger.get_mut(key) {
                    job.accepted = Some(job_id.to_string());
                    if let Some(s) = doc["result"]["status"].as_str() {
                        job.inline = Some(Answer {
                            job_id: job_id.to_string(),
                            status: s.to_string(),
                            at: Instant::now(),
                        });
                    }
                }
                return;
            }
            self.reject(key, format!("{status} {}", code(&doc)));
            return;
        }
        self.reject(key, format!("gave up after 30 s: {last}"));
    }

    fn reject(&self, key: &str, why: String) {
        if let Some(job) = lock(&self.ledger).get_mut(key) {
            job.rejected = Some(why);
        }
    }

    /// GET /v1/jobs/{id} for the accepted jobs of `phase` not yet seen done.
    async fn poll_visible(&self, phase: usize) {
        let wanted: Vec<(String, String)> = lock(&self.ledger)
            .iter()
            .filter(|(_, j)| j.phase == phase && j.kind != Kind::Amqp && j.visible.is_none())
            .filter_map(|(k, j)| Some((k.clone(), j.accepted.clone()?)))
            .collect();
        let tasks = futures_util::stream::iter(wanted.into_iter().map(|(key, id)| async move {
            let doc: Option<Value> = match self
                .client
                .get(format!("{}/v1/jobs/{id}", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            (key, doc)
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let mut ledger = lock(&self.ledger);
        for (key, doc) in tasks {
            let status = doc.as_ref().and_then(|d| d["status"].as_str());
            if let (Some(s @ ("done" | "failed")), Some(job)) = (status, ledger.get_mut(&key)) {
                job.visible = Some(s.to_string());
            }
        }
    }
}

fn code(doc: &Value) -> String {
    doc["error"]["code"]
        .as_str()
        .or(doc["code"].as_str())
        .unwrap_or("")
        .to_string()
}

// ---------------------------------------------------------------- the fleet

struct Node {
    port: u16,
}

impl Node {
    fn script(args: &[&str]) -> anyhow::Result<()> {
        let status = Command::new(fleet::root().join("scripts/rabbitmq-node"))
            .current_dir(fleet::root())
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "scripts/rabbitmq-node {args:?} failed");
        Ok(())
    }

    async fn run(args: Vec<String>) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || {
            Self::script(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await?
    }

    fn start(port: u16) -> anyhow::Result<Self> {
        Self::script(&["start", &Self::name_for(port), &port.to_string()])?;
        Ok(Self { port })
    }

    /// The node's name: one per port, so runs on different ports never share a node.
    fn name_for(port: u16) -> String {
        format!("chaos{port}")
    }

    fn name(&self) -> String {
        Self::name_for(self.port)
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn pid(port: u16) -> Option<u32> {
        std::fs::read_to_string(
            fleet::root()
                .join("target/rabbitmq-nodes")
                .join(Self::name_for(port))
                .join("pid"),
        )
        .ok()?
        .trim()
        .parse()
        .ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Self::script(&["stop", &self.name()]);
    }
}

struct Fleet {
    args: ChaosArgs,
    model: String,
    env: Vec<(String, String)>,
    dispatcher: Mutex<Option<Proc>>,
    autoscaler: Proc,
    api: u16,
    dispatcher_admin: u16,
    /// Last: dropped after the processes that use it.
    node: Node,
}

impl Fleet {
    fn dispatcher_args(&self) -> Vec<String> {
        dispatcher_args(
            &self.args,
            &self.model,
            self.api,
            self.dispatcher_admin,
            &self.node.url(),
        )
    }

    fn start_dispatcher(&self) -> anyhow::Result<()> {
        let proc = Proc::start_env(
            "ember-dispatcher",
            &self.dispatcher_args(),
            self.dispatcher_admin,
            &self.env,
        )?;
        *lock(&self.dispatcher) = Some(proc);
        Ok(())
    }

    fn dispatcher_pid(&self) -> Option<u32> {
        lock(&self.dispatcher).as_ref().map(Proc::pid)
    }

    async fn wait_dispatcher(&self) -> anyhow::Result<()> {
        wait_ready(self.api, "/v2/health/ready").await
    }

    /// Live workers: (pid, worker id) of the autoscaler's children.
    fn workers(&self) -> Vec<(u32, String)> {
        let log = std::fs::read_to_string(&self.autoscaler.log).unwrap_or_default();
        let mut ids = HashMap::new();
        for line in log.lines().filter(|l| l.contains("worker started")) {
            let line = strip_ansi(line);
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|t| t.strip_prefix(name))
                    .map(str::to_string)
            };
            if let (Some(id), Some(pid)) = (field("worker="), field("pid="))
                && let Ok(pid) = pid.parse::<u32>()
            {
                ids.insert(pid, id);
            }
        }
        children(self.autoscaler.pid())
            .into_iter()
            .filter_map(|pid| Some((pid, ids.get(&pid)?.clone())))
            .collect()
    }

    fn autoscaler_log(&self) -> String {
        std::fs::read_to_string(&self.autoscaler.log).unwrap_or_default()
    }
}

fn dispatcher_args(args: &ChaosArgs, model: &str, api: u16, admin: u16, url: &str) -> Vec<String> {
    [
        "--model-dir",
        &args.model_dir.display().to_string(),
        "--model-name",
        model,
        "--listen",
        &format!("127.0.0.1:{api}"),
        "--admin-addr",
        &format!("127.0.0.1:{admin}"),
        "--amqp-url",
        url,
        "--redis-url",
        &args.redis_url,
        "--callback-allow-net",
        "127.0.0.1/32",
        "--callback-timeout",
        "1s",
        "--callback-initial-backoff",
        "200ms",
        "--callback-max-backoff",
        "2s",
        "--callback-max-attempts",
        "1000",
        "--queue-max-length",
        &args.queue_max_length.to_string(),
        "--drain-timeout",
        "10s",
        "--max-wait",
        "30s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Pids whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 2..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

async fn wait_ready(port: u16, path: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let client = reqwest::Client::new();
    loop {
        if let Ok(r) = client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "{path} on {port} never ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

// ---------------------------------------------------------------- telemetry and memory

/// Each worker's last heartbeat: jobs in flight.
type InFlight = Arc<Mutex<HashMap<String, (u64, Instant)>>>;

fn watch_heartbeats(url: String, model: String) -> InFlight {
    let seen: InFlight = Arc::default();
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let session = async {
                let c = Connection::connect(&url, ConnectionProperties::default()).await?;
                let ch = c.create_channel().await?;
                let mut consumer = topology::heartbeat_consumer(&ch, &format!("{model}.*")).await?;
                while let Some(Ok(d)) = consumer.next().await {
                    if let Ok(hb) = serde_json::from_slice::<Value>(&d.data)
                        && let (Some(w), Some(n)) =
                            (hb["worker"].as_str(), hb["in_flight"].as_u64())
                    {
                        lock(&out).insert(w.to_string(), (n, Instant::now()));
                    }
                }
                anyhow::Ok(())
            };
            let _ = session.await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    seen
}

/// Peak resident memory per role (MB) while it runs.
type Peaks = Arc<Mutex<BTreeMap<String, f64>>>;

fn sample_memory(fleet: Arc<Fleet>, stop: Arc<AtomicBool>) -> Peaks {
    let peaks: Peaks = Arc::default();
    let out = peaks.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let mut roles: Vec<(String, u32)> = vec![("autoscaler".into(), fleet.autoscaler.pid())];
            roles.push(("chaos client".into(), std::process::id()));
            if let Some(pid) = fleet.dispatcher_pid() {
                roles.push(("dispatcher".into(), pid));
            }
            if let Some(pid) = Node::pid(fleet.node.port) {
                roles.push(("rabbitmq".into(), pid));
            }
            for (pid, _) in fleet.workers() {
                roles.push(("worker (each)".into(), pid));
            }
            {
                let mut peaks = lock(&out);
                for (role, pid) in roles {
                    if let Some(bytes) = fleet::rss(pid) {
                        let mb = bytes as f64 / 1048576.0;
                        let peak = peaks.entry(role).or_insert(0.0);
                        *peak = peak.max(mb);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    peaks
}

// ---------------------------------------------------------------- one fault

struct Ctx {
    fleet: Arc<Fleet>,
    ledger: Ledger,
    http: Arc<Http>,
    amqp: Arc<Amqp>,
    receiver: Arc<Receiver>,
    heartbeats: InFlight,
    image: Vec<u8>,
    poison: Vec<u8>,
    args: ChaosArgs,
    /// Scale-ins logged before the scale-in phase began.
    scale_in_baseline: std::sync::atomic::AtomicUsize,
}

/// What the fault did: when it started and ended, and what it saw.
struct Injected {
    started: Instant,
    notes: Vec<String>,
}

fn new_job(ctx: &Ctx, phase: usize, kind: Kind, poison: bool) -> String {
    let key = uuid::Uuid::new_v4().to_string();
    lock(&ctx.ledger).insert(
        key.clone(),
        Job {
            kind,
            phase,
            poison,
            sent_at: Instant::now(),
            accepted: None,
            rejected: None,
            inline: None,
            deliveries: Vec::new(),
            visible: None,
        },
    );
    key
}

fn send(ctx: &Arc<Ctx>, phase: usize, kind: Kind, poison: bool) -> tokio::task::JoinHandle<()> {
    let key = new_job(ctx, phase, kind, poison);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let body = if poison { &ctx.poison } else { &ctx.image };
        match kind {
            Kind::HttpAsync => ctx.http.send(&key, body, false).await,
            Kind::HttpSync => ctx.http.send(&key, body, true).await,
            Kind::Amqp => {
                let outcome = ctx.amqp.send(&key, body).await;
                if let Some(job) = lock(&ctx.ledger).get_mut(&key) {
                    match outcome {
                        Ok(()) => job.accepted = Some(key.clone()),
                        Err(e) => job.rejected = Some(e),
                    }
                }
            }
        }
    })
}

fn kind_of(i: usize) -> Kind {
    match i % 3 {
        0 => Kind::HttpAsync,
        1 => Kind::HttpSync,
        _ => Kind::Amqp,
    }
}

/// A worker holding jobs (by its last heartbeat), or any worker after 5 s.
async fn busy_worker(ctx: &Ctx) -> Option<(u32, String, u64)> {
    let started = Instant::now();
    loop {
        let workers = ctx.fleet.workers();
        let beats = lock(&ctx.heartbeats).clone();
        let busy = workers.iter().find_map(|(pid, id)| {
            let (n, at) = beats.get(id)?;
            (*n > 0 && at.elapsed() < Duration::from_millis(500)).then(|| (*pid, id.clone(), *n))
        });
        if busy.is_some() {
            return busy;
        }
        if started.elapsed() > Duration::from_secs(5) {
            return workers.first().map(|(p, id)| (*p, id.clone(), 0));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn inject(ctx: &Arc<Ctx>, fault: &str, phase: usize) -> anyhow::Result<Injected> {
    let started = Instant::now();
    let mut notes = Vec::new();
    match fault {
        "worker-sigkill" | "worker-sigterm" => {
            let sig = if fault == "worker-sigkill" {
                "KILL"
            } else {
                "TERM"
            };
            match busy_worker(ctx).await {
                Some((pid, id, n)) => {
                    signal(pid, sig);
                    notes.push(format!(
                        "SIG{sig} to {id} holding {n} jobs (last heartbeat)"
                    ));
                }
                None => notes.push("no worker to signal".into()),
            }
        }
        "scale-in" => {
            // The burst was sent at the phase's start (see run_phase); here: wait, under the
            // steady load, for the pool to scale in.
            let before = ctx.scale_in_baseline.load(Ordering::Relaxed);
            let wait = Instant::now();
            let mut seen = 0;
            while wait.elapsed() < Duration::from_secs(30) {
                seen = ctx
                    .fleet
                    .autoscaler_log()
                    .matches("worker drained and exited")
                    .count()
                    - before;
                if seen > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            notes.push(format!("{seen} worker(s) scaled in under load"));
        }
        "dispatcher-restart" | "dispatcher-sigkill" => {
            let old = lock(&ctx.fleet.dispatcher).take();
            if let Some(old) = old {
                if fault == "dispatcher-sigkill" {
                    signal(old.pid(), "KILL");
                }
                // SIGTERM (no-op after SIGKILL) and wait for the exit.
                tokio::task::spawn_blocking(move || drop(old)).await?;
            }
            ctx.fleet.start_dispatcher()?;
            ctx.fleet.wait_dispatcher().await?;
            notes.push(format!(
                "dispatcher back after {:.1} s",
                started.elapsed().as_secs_f64()
            ));
        }
        "broker-stop-app" => {
            let node = ctx.fleet.node.name();
            Node::run(vec!["ctl".into(), node.clone(), "stop_app".into()]).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            Node::run(vec!["ctl".into(), node.clone(), "start_app".into()]).await?;
            Node::run(vec!["ctl".into(), node, "await_startup".into()]).await?;
            notes.push(format!(
                "broker app back after {:.1} s",
                started.elapsed().as_secs_f64()
            ));
        }
        "broker-restart" => {
            Node::run(vec!["restart".into(), ctx.fleet.node.name()]).await?;
            notes.push(format!(
                "broker node back after {:.1} s",
                started.elapsed().as_secs_f64()
            ));
        }
        "receiver-down" => {
            ctx.receiver.down();
            tokio::time::sleep(Duration::from_secs(5)).await;
            ctx.receiver.up().await?;
            notes.push("callback receiver refused connections for 5 s".into());
        }
        "receiver-slow" => {
            ctx.receiver.slow.store(true, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs(5)).await;
            ctx.receiver.slow.store(false, Ordering::Relaxed);
            notes.push(format!(
                "receiver answered after {:?} (callback timeout 1 s) for 5 s",
                ctx.receiver.delay
            ));
        }
        "poison" => {
            // One over HTTP with a callback, one by AMQP RPC: both clients must be told.
            let _ = send(ctx, phase, Kind::HttpAsync, true).await;
            let _ = send(ctx, phase, Kind::Amqp, true).await;
            notes.push("2 poison jobs (the worker aborts on them)".into());
        }
        _ => {}
    }
    Ok(Injected { started, notes })
}

/// Sends `jobs` at `rate`, injecting the fault after a third of them.
async fn steady_load(
    ctx: &Arc<Ctx>,
    fault: &str,
    phase: usize,
    jobs: usize,
    rate: f64,
) -> anyhow::Result<Injected> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut tasks = Vec::with_capacity(jobs);
    let mut injection = None;
    for i in 0..jobs {
        ticker.tick().await;
        if i == jobs / 3 {
            let (ctx, fault) = (ctx.clone(), fault.to_string());
            injection = Some(tokio::spawn(
                async move { inject(&ctx, &fault, phase).await },
            ));
        }
        tasks.push(send(ctx, phase, kind_of(i), false));
    }
    let injected = match injection {
        Some(task) => task.await??,
        None => inject(ctx, fault, phase).await?,
    };
    for task in tasks {
        let _ = task.await;
    }
    Ok(injected)
}

/// The overload: the capacity measured by a burst, then 10x that offered over HTTP.
async fn overload(ctx: &Arc<Ctx>, phase: usize, notes: &mut Vec<String>) -> anyhow::Result<Value> {
    let burst = 150;
    let started = Instant::now();
    let tasks: Vec<_> = (0..burst)
        .map(|_| send(ctx, phase, Kind::Amqp, false))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    loop {
        let answered = lock(&ctx.ledger)
            .values()
            .filter(|j| j.phase == phase && !j.deliveries.is_empty())
            .count();
        if answered >= burst || started.elapsed() > ctx.args.settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let capacity = burst as f64 / started.elapsed().as_secs_f64();
    let target = capacity * 10.0;
    notes.push(format!(
        "capacity {capacity:.0} jobs/s (burst of {burst}); offered 10x = {target:.0} jobs/s for {:?}",
        ctx.args.overload
    ));
    // Queue depth, sampled.
    let stop = Arc::new(AtomicBool::new(false));
    let depth = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, depth, url) = (stop.clone(), depth.clone(), ctx.fleet.node.url());
        let queue = topology::jobs_queue(&ctx.fleet.model);
        tokio::spawn(async move {
            let Ok(c) = Connection::connect(&url, ConnectionProperties::default()).await else {
                return;
            };
            let Ok(ch) = c.create_channel().await else {
                return;
            };
            while !stop.load(Ordering::Relaxed) {
                if let Ok(q) = ch
                    .queue_declare(
                        queue.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                {
                    depth.fetch_max(u64::from(q.message_count()), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let before_retry_after = ctx.http.too_many_retry_after.load(Ordering::Relaxed);
    let (before_429, sent_from) = (
        ctx.http.too_many.load(Ordering::Relaxed),
        lock(&ctx.ledger).len(),
    );
    let offered_started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / target));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let mut sent = 0usize;
    while offered_started.elapsed() < ctx.args.overload {
        ticker.tick().await;
        tasks.push(send(ctx, phase, Kind::HttpAsync, false));
        sent += 1;
    }
    let offered_for = offered_started.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let _ = sent_from;
    let n429 = ctx.http.too_many.load(Ordering::Relaxed) - before_429;
    notes.push(format!(
        "achieved {:.0} jobs/s offered ({:.1}x capacity); {n429} answered 429 ({} with Retry-After); peak queue depth {} (bound {})",
        sent as f64 / offered_for,
        sent as f64 / offered_for / capacity,
        ctx.http.too_many_retry_after.load(Ordering::Relaxed) - before_retry_after,
        depth.load(Ordering::Relaxed),
        ctx.args.queue_max_length
    ));
    Ok(json!({
        "capacity_jobs_s": capacity,
        "offered_jobs_s": sent as f64 / offered_for,
        "answered_429": n429,
        "with_retry_after": ctx.http.too_many_retry_after.load(Ordering::Relaxed) - before_retry_after,
        "peak_queue_depth": depth.load(Ordering::Relaxed),
        "queue_max_length": ctx.args.queue_max_length,
    }))
}

/// Jobs in ember.dead.<model>: (job id, x-death reason).
async fn dead_letters(url: &str, model: &str) -> anyhow::Result<Vec<(String, String)>> {
    let c = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = c.create_channel().await?;
    let queue = topology::dead_letter_queue(model);
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await?
    {
        let id = m
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let reason = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| match h.inner().get("x-death")? {
                AMQPValue::FieldArray(a) => match a.as_slice().first()? {
                    AMQPValue::FieldTable(t) => match t.inner().get("reason")? {
                        AMQPValue::LongString(s) => Some(s.to_string()),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            })
            .unwrap_or_default();
        out.push((id, reason));
    }
    Ok(out)
}

/// Whether a job is settled: answered (HTTP: a callback and a visible result; AMQP: a reply).
fn answered(job: &Job) -> bool {
    match job.kind {
        Kind::Amqp => !job.deliveries.is_empty(),
        Kind::HttpAsync | Kind::HttpSync => !job.deliveries.is_empty() && job.visible.is_some(),
    }
}

async fn run_phase(ctx: &Arc<Ctx>, fault: &str, phase: usize) -> anyhow::Result<Value> {
    eprintln!("chaos: {fault} ...");
    let began = Instant::now();
    let mut notes = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = sample_memory(ctx.fleet.clone(), stop.clone());
    let restarts_before = ctx.fleet.autoscaler_log().matches("worker died").count();
    let scale_ins_before = ctx
        .fleet
        .autoscaler_log()
        .matches("worker drained and exited")
        .count();
    let mut overload_figures = Value::Null;
    let injected = match fault {
        "overload" => {
            let started = Instant::now();
            overload_figures = overload(ctx, phase, &mut notes).await?;
            Injected {
                started,
                notes: vec![],
            }
        }
        "scale-in" => {
            // A burst that scales the pool out, then the steady load while it scales in.
            ctx.scale_in_baseline.store(
                ctx.fleet
                    .autoscaler_log()
                    .matches("worker drained and exited")
                    .count(),
                Ordering::Relaxed,
            );
            let burst: Vec<_> = (0..ctx.args.jobs.max(60) * 2)
                .map(|i| send(ctx, phase, kind_of(i), false))
                .collect();
            let rate = (ctx.args.jobs as f64 / 20.0)
                .min(ctx.args.rate * 0.5)
                .max(1.0);
            let injected = steady_load(ctx, fault, phase, ctx.args.jobs, rate).await?;
            for t in burst {
                let _ = t.await;
            }
            injected
        }
        _ => steady_load(ctx, fault, phase, ctx.args.jobs, ctx.args.rate).await?,
    };
    notes.extend(injected.notes);
    // Settle: wait for every accepted job to be answered.
    let settle_started = Instant::now();
    loop {
        ctx.http.poll_visible(phase).await;
        let pending = lock(&ctx.ledger)
            .values()
            .filter(|j| j.phase == phase && j.accepted.is_some() && !answered(j))
            .count();
        if pending == 0 || settle_started.elapsed() > ctx.args.settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Late duplicates get a moment to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ctx.http.poll_visible(phase).await;
    stop.store(true, Ordering::Relaxed);

    let dead = if fault == "poison" {
        dead_letters(&ctx.fleet.node.url(), &ctx.fleet.model).await?
    } else {
        Vec::new()
    };
    let dead_ids: HashMap<String, String> = dead.into_iter().collect();

    let ledger = lock(&ctx.ledger);
    let jobs: Vec<&Job> = ledger.values().filter(|j| j.phase == phase).collect();
    let sent = jobs.len();
    let accepted: Vec<&&Job> = jobs.iter().filter(|j| j.accepted.is_some()).collect();
    let rejected = jobs.iter().filter(|j| j.rejected.is_some()).count();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for j in jobs.iter().filter_map(|j| j.rejected.as_ref()) {
        *reasons.entry(j.clone()).or_default() += 1;
    }
    let unconfirmed_answered = jobs
        .iter()
        .filter(|j| j.accepted.is_none() && !j.deliveries.is_empty())
        .count();
    let (mut ok, mut lost, mut dup_deliveries, mut dup_answers, mut dead_ok, mut poison_lost) =
        (0, 0, 0, 0, 0, 0);
    let (mut innocent_dead, mut redelivered_callbacks) = (0, 0);
    let mut lost_detail = Vec::new();
    for j in &accepted {
        let id = j.accepted.clone().unwrap_or_default();
        if j.poison {
            // Dead-lettered, kept for operators, and its client told once with an error.
            let told = answered(j)
                && j.deliveries.len() == 1
                && j.deliveries.iter().all(|a| a.status == "error");
            match dead_ids.get(&id) {
                Some(reason) if told => {
                    dead_ok += 1;
                    notes.push(format!(
                        "poison job ({:?}) dead-lettered, x-death reason `{reason}`, its client answered `error`",
                        j.kind
                    ));
                }
                Some(reason) => {
                    poison_lost += 1;
                    notes.push(format!(
                        "poison job ({:?}) dead-lettered (`{reason}`) but its client got {} answer(s)",
                        j.kind,
                        j.deliveries.len()
                    ));
                }
                None => poison_lost += 1,
            }
            continue;
        }
        if dead_ids.contains_key(&id) {
            innocent_dead += 1;
        }
        if answered(j) {
            ok += 1;
        } else {
            lost += 1;
            if lost_detail.len() < 5 {
                lost_detail.push(format!(
                    "{:?} {id}: {} deliveries, visible {:?}, inline {:?}",
                    j.kind,
                    j.deliveries.len(),
                    j.visible,
                    j.inline.as_ref().map(|a| &a.status)
                ));
            }
        }
        if j.deliveries.len() > 1 {
            dup_deliveries += j.deliveries.len() - 1;
            redelivered_callbacks += 1;
        }
        let ids: HashSet<&str> = j
            .deliveries
            .iter()
            .chain(j.inline.iter())
            .map(|a| a.job_id.as_str())
            .chain(std::iter::once(id.as_str()))
            .collect();
        let statuses: HashSet<&str> = j
            .deliveries
            .iter()
            .chain(j.inline.iter())
            .map(|a| a.status.as_str())
            .collect();
        if ids.len() > 1 || statuses.len() > 1 {
            dup_answers += 1;
        }
    }
    // Recovery: from the fault's start to the first answer to a job sent after it.
    let first_after = jobs
        .iter()
        .filter(|j| j.sent_at >= injected.started)
        .flat_map(|j| j.deliveries.iter().chain(j.inline.iter()).map(|a| a.at))
        .min();
    let recovery = first_after.map(|at| at.duration_since(injected.started).as_secs_f64());
    let answered_total = ok + dead_ok;
    let accepted_n = accepted.len();
    drop(accepted);
    drop(jobs);
    drop(ledger);
    let restarts = ctx.fleet.autoscaler_log().matches("worker died").count() - restarts_before;
    let scale_ins = ctx
        .fleet
        .autoscaler_log()
        .matches("worker drained and exited")
        .count()
        - scale_ins_before;
    if restarts > 0 {
        notes.push(format!("{restarts} worker(s) died and were replaced"));
    }
    if innocent_dead > 0 {
        notes.push(format!(
            "{innocent_dead} ordinary job(s) dead-lettered beside the poison (counted lost)"
        ));
    }
    if unconfirmed_answered > 0 {
        notes.push(format!(
            "{unconfirmed_answered} job(s) whose publish was not confirmed were answered anyway"
        ));
    }
    let peaks = lock(&peaks).clone();
    let report = json!({
        "fault": fault,
        "sent": sent,
        "accepted": accepted_n,
        "rejected": rejected,
        "rejected_reasons": reasons,
        "answered": answered_total,
        "dead_lettered_poison": dead_ok,
        "poison_not_dead_lettered": poison_lost,
        "lost": lost + poison_lost,
        "ordinary_jobs_dead_lettered": innocent_dead,
        "lost_examples": lost_detail,
        "duplicate_deliveries": dup_deliveries,
        "jobs_with_duplicate_deliveries": redelivered_callbacks,
        "duplicate_answers": dup_answers,
        "recovery_s": recovery,
        "phase_s": began.elapsed().as_secs_f64(),
        "peak_rss_mb": peaks,
        "overload": overload_figures,
        "scale_ins": scale_ins,
        "notes": notes,
    });
    eprintln!("chaos: {fault}: {report}");
    Ok(report)
}

// ---------------------------------------------------------------- the run

fn table(rows: &[Value]) -> String {
    let mut out = String::from(
        "| fault | sent | accepted | rejected | answered | lost | duplicate deliveries | duplicate answers | recovery s | notes |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let recovery = r["recovery_s"]
            .as_f64()
            .map(|s| format!("{s:.2}"))
            .unwrap_or_else(|| "-".into());
        let notes: Vec<String> = r["notes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|n| n.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut notes: Vec<String> = notes.into_iter().fold(Vec::new(), |mut v: Vec<String>, n| {
            if !v.contains(&n) {
                v.push(n);
            }
            v
        });
        if let Some(reasons) = r["rejected_reasons"].as_object()
            && !reasons.is_empty()
        {
            notes.push(format!(
                "rejected: {}",
                reasons
                    .iter()
                    .map(|(k, v)| format!("{v} {k}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["fault"].as_str().unwrap_or(""),
            r["sent"],
            r["accepted"],
            r["rejected"],
            r["answered"],
            r["lost"],
            r["duplicate_deliveries"],
            r["duplicate_answers"],
            recovery,
            notes.join("; ").replace('|', "/")
        ));
    }
    out
}

fn rss_table(rows: &[Value]) -> String {
    let mut roles: Vec<String> = Vec::new();
    for r in rows {
        if let Some(m) = r["peak_rss_mb"].as_object() {
            for k in m.keys() {
                if !roles.contains(k) {
                    roles.push(k.clone());
                }
            }
        }
    }
    let mut out = format!(
        "| fault | {} |\n|---|{}\n",
        roles.join(" | "),
        "---|".repeat(roles.len())
    );
    for r in rows {
        let cells: Vec<String> = roles
            .iter()
            .map(|k| {
                r["peak_rss_mb"][k]
                    .as_f64()
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "-".into())
            })
            .collect();
        out.push_str(&format!(
            "| {} | {} |\n",
            r["fault"].as_str().unwrap_or(""),
            cells.join(" | ")
        ));
    }
    out
}

pub async fn run(out: &Path, args: &ChaosArgs) -> anyhow::Result<()> {
    let faults: Vec<String> = if args.faults.is_empty() {
        FAULTS.iter().map(|s| s.to_string()).collect()
    } else {
        args.faults.clone()
    };
    for f in &faults {
        anyhow::ensure!(
            FAULTS.contains(&f.as_str()),
            "unknown fault `{f}`; the faults: {}",
            FAULTS.join(", ")
        );
    }
    for bin in ["ember-worker", "ember-dispatcher", "ember-autoscaler"] {
        anyhow::ensure!(
            fleet::binary(bin).is_file(),
            "{} is missing: build the workspace's binaries first (cargo build --workspace)",
            fleet::binary(bin).display()
        );
    }
    let run_started = Instant::now();
    eprintln!(
        "chaos: starting the private RabbitMQ node on 127.0.0.1:{}",
        args.amqp_port
    );
    let node = Node::start(args.amqp_port)?;
    let model = format!("chaos-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let settings = QueueSettings {
        delivery_limit: 5,
        max_length: args.queue_max_length,
    };
    let env: Vec<(String, String)> = vec![
        ("EMBER_AMQP_URL".into(), node.url()),
        ("EMBER_AMQP_MAX_BACKOFF".into(), "1s".into()),
        (
            "EMBER_WORKER_QUEUE_MAX_LENGTH".into(),
            args.queue_max_length.to_string(),
        ),
        ("EMBER_WORKER_CHAOS_CRASH_ON".into(), POISON_MARKER.into()),
        ("EMBER_LOG".into(), "info,ort=warn".into()),
    ];
    let autoscaler_admin = fleet::free_port();
    let autoscaler_args: Vec<String> = [
        "--model-dir",
        &args.model_dir.display().to_string(),
        "--model-name",
        &model,
        "--admin-addr",
        &format!("127.0.0.1:{autoscaler_admin}"),
        "--min-replicas",
        "2",
        "--max-replicas",
        &args.max_replicas.max(2).to_string(),
        "--tick",
        "200ms",
        "--heartbeat-timeout",
        "3s",
        "--target-drain-time",
        "2s",
        "--scale-down-window",
        "2s",
        "--scale-down-step",
        "2",
        "--queue-max-length",
        &args.queue_max_length.to_string(),
        "--worker-arg",
        "--intra-threads 1 --max-batch 4 --heartbeat-interval 200ms --drain-timeout 10s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let autoscaler = Proc::start_env("ember-autoscaler", &autoscaler_args, autoscaler_admin, &env)?;
    let ledger: Ledger = Arc::default();
    let (api, dispatcher_admin) = (fleet::free_port(), fleet::free_port());
    let fleet = Arc::new(Fleet {
        args: args.clone(),
        model: model.clone(),
        env,
        dispatcher: Mutex::new(None),
        autoscaler,
        api,
        dispatcher_admin,
        node,
    });
    fleet.start_dispatcher()?;
    wait_ready(autoscaler_admin, "/readyz").await?;
    fleet.wait_dispatcher().await?;
    let receiver = Receiver::new(ledger.clone(), Duration::from_secs(2));
    receiver.up().await?;
    let amqp = Amqp::start(&fleet.node.url(), &model, settings, ledger.clone());
    let http = Arc::new(Http {
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()?,
        base: format!("http://127.0.0.1:{api}"),
        model: model.clone(),
        ledger: ledger.clone(),
        receiver: receiver.clone(),
        too_many: AtomicU64::new(0),
        too_many_retry_after: AtomicU64::new(0),
    });
    let heartbeats = watch_heartbeats(fleet.node.url(), model.clone());
    let image = include_bytes!("tiny.png").to_vec();
    let mut poison = image.clone();
    poison.extend_from_slice(POISON_MARKER.as_bytes());
    let ctx = Arc::new(Ctx {
        fleet: fleet.clone(),
        ledger,
        http,
        amqp,
        receiver,
        heartbeats,
        image,
        poison,
        args: args.clone(),
        scale_in_baseline: std::sync::atomic::AtomicUsize::new(0),
    });
    // Two ready workers before the first fault.
    let started = Instant::now();
    while lock(&ctx.heartbeats).len() < 2 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the workers never came up: {}",
            fleet.autoscaler_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rows = Vec::new();
    for (phase, fault) in faults.iter().enumerate() {
        rows.push(run_phase(&ctx, fault, phase).await?);
        // A quiet moment between faults: the pool back to its floor.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let table_md = table(&rows);
    let rss_md = rss_table(&rows);
    println!("{table_md}\npeak RSS (MB) per process during each fault:\n\n{rss_md}");
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = fleet::machine();
    let doc = json!({
        "command": command,
        "machine": machine,
        "model": args.model_dir.display().to_string(),
        "rate_jobs_s": args.rate,
        "jobs_per_fault": args.jobs,
        "overload_s": args.overload.as_secs_f64(),
        "queue_max_length": args.queue_max_length,
        "fleet": "private RabbitMQ node (scripts/rabbitmq-node), ember-autoscaler local backend (min 2, tick 200 ms), workers --intra-threads 1 --max-batch 4, one ember-dispatcher (callback timeout 1 s), Redis DB of its own",
        "total_s": run_started.elapsed().as_secs_f64(),
        "faults": rows,
    });
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("chaos.json"), serde_json::to_vec_pretty(&doc)?)?;
    std::fs::write(
        out.join("chaos.md"),
        format!(
            "`{command}`\n\nMachine: {} ({} cores), {}\n\n{table_md}\nPeak RSS (MB) per process during each fault:\n\n{rss_md}",
            machine["cpu"].as_str().unwrap_or(""),
            machine["cores"],
            machine["date"].as_str().unwrap_or("")
        ),
    )?;
    eprintln!("wrote {}", out.join("chaos.json").display());
    // Clean up this run's queues (the node is stopped anyway).
    if let Ok(c) = Connection::connect(&fleet.node.url(), ConnectionProperties::default()).await
        && let Ok(ch) = c.create_channel().await
    {
        for q in topology::model_queues(&model) {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    Ok(())
}
