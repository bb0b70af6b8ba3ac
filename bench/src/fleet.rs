//! The fleet's parts as local processes (the binaries built beside this one), for the benchmarks
//! and the chaos suite alike: one part's process ([`Proc`]), a worker or dispatcher with the
//! benchmarks' defaults ([`worker`], [`dispatcher`]), a RabbitMQ node of its own
//! ([`BrokerNode`]), an autoscaler and the workers it runs ([`Autoscaler`]), a dispatcher that can
//! be stopped and started again on its ports ([`RestartableDispatcher`]), and one model's parts on
//! a node of their own ([`IsolatedFleet`], the chaos suite's fleet).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The repository root: the nearest directory above the current one with a `models/` in it.
pub fn root() -> PathBuf {
    let mut dir = std::env::current_dir().unwrap_or_default();
    while !dir.join("models").is_dir() {
        if !dir.pop() {
            return std::env::current_dir().unwrap_or_default();
        }
    }
    dir
}

/// A part's binary, beside this one.
pub fn binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .map(|me| me.with_file_name(name))
        .unwrap_or_else(|_| PathBuf::from(name))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Waits until `http://127.0.0.1:{port}{path}` answers 2xx, asking every `every` (each ask
/// given 2 s), for at most `within`.
pub async fn wait_ready(
    port: u16,
    path: &str,
    within: Duration,
    every: Duration,
) -> anyhow::Result<()> {
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
        anyhow::ensure!(started.elapsed() < within, "{path} on {port} never ready");
        tokio::time::sleep(every).await;
    }
}

/// Sends `sig` ("TERM", "KILL", …) to `pid`.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Resident set size of a process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- one part

/// A part's process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub admin: u16,
    /// Where its stderr goes.
    pub log: PathBuf,
}

impl Proc {
    pub fn start(binary_name: &str, args: &[String], admin: u16) -> anyhow::Result<Self> {
        Self::start_env(binary_name, args, admin, &[])
    }

    /// Started with extra environment variables (`EMBER_LOG` defaults to warn).
    pub fn start_env(
        binary_name: &str,
        args: &[String],
        admin: u16,
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("ember-bench-{binary_name}-{admin}.log"));
        let child = Command::new(binary(binary_name))
            .current_dir(root())
            .args(args)
            .env("EMBER_LOG", "warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Self { child, admin, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits (up to 60 s) until `path` on `port` answers 200.
    pub async fn wait_http(&self, port: u16, path: &str) -> anyhow::Result<()> {
        wait_ready(
            port,
            path,
            Duration::from_secs(60),
            Duration::from_millis(50),
        )
        .await
    }

    /// What it has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    /// SIGTERM first (an autoscaler then stops the workers it started; a SIGKILL would orphan
    /// them), SIGKILL after 15 s.
    fn drop(&mut self) {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker for `model` from `model_dir` with extra args.
/// Flags added to every worker a benchmark starts (whitespace-separated), to measure a setting
/// without changing the scenario; recorded in the JSON as `worker_args_extra`.
pub const WORKER_ARGS_ENV: &str = "EMBER_BENCH_WORKER_ARGS";

pub fn worker(model: &str, model_dir: &Path, extra: &[&str]) -> anyhow::Result<Proc> {
    let admin = free_port();
    let mut args: Vec<String> = vec![
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--model-name".into(),
        model.into(),
        "--admin-addr".into(),
        format!("127.0.0.1:{admin}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    if let Ok(more) = std::env::var(WORKER_ARGS_ENV) {
        args.extend(more.split_whitespace().map(str::to_string));
    }
    Proc::start("ember-worker", &args, admin)
}

/// A dispatcher serving `model` without tokens (a benchmark on loopback); returns it and its API
/// port.
pub fn dispatcher(model: &str, model_dir: &Path) -> anyhow::Result<(Proc, u16)> {
    dispatcher_with(model, model_dir, &["--insecure-no-auth"])
}

/// A dispatcher serving `model` with `extra` flags (which must say how it authenticates).
pub fn dispatcher_with(
    model: &str,
    model_dir: &Path,
    extra: &[&str],
) -> anyhow::Result<(Proc, u16)> {
    let admin = free_port();
    let api = free_port();
    let mut args: Vec<String> = vec![
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--model-name".into(),
        model.into(),
        "--admin-addr".into(),
        format!("127.0.0.1:{admin}"),
        "--listen".into(),
        format!("127.0.0.1:{api}"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Ok((Proc::start("ember-dispatcher", &args, admin)?, api))
}

// ---------------------------------------------------------------- a broker of its own

/// A private RabbitMQ node (`scripts/rabbitmq-node`) on one port, stopped on drop, so broker
/// faults disturb no other test or the machine's broker.
pub struct BrokerNode {
    port: u16,
}

/// Runs `scripts/rabbitmq-node` with `args`.
fn rabbitmq_node(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(root().join("scripts/rabbitmq-node"))
        .current_dir(root())
        .args(args)
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "scripts/rabbitmq-node {args:?} failed");
    Ok(())
}

impl BrokerNode {
    /// Starts the node (waiting until it serves).
    pub fn start(port: u16) -> anyhow::Result<Self> {
        rabbitmq_node(&["start", &Self::name_for(port), &port.to_string()])?;
        Ok(Self { port })
    }

    /// The node's name: one per port, so runs on different ports never share a node.
    fn name_for(port: u16) -> String {
        format!("chaos{port}")
    }

    pub fn name(&self) -> String {
        Self::name_for(self.port)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(
            root()
                .join("target/rabbitmq-nodes")
                .join(self.name())
                .join("pid"),
        )
        .ok()?
        .trim()
        .parse()
        .ok()
    }

    /// `rabbitmqctl <command>` against the node (`stop_app`, `start_app`, `await_startup`).
    pub async fn ctl(&self, command: &str) -> anyhow::Result<()> {
        self.script(vec!["ctl".into(), self.name(), command.into()])
            .await
    }

    /// Stops the node (its data kept).
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.script(vec!["stop".into(), self.name()]).await
    }

    /// Starts the stopped node again with its settings and data; returns once it serves.
    pub async fn launch(&self) -> anyhow::Result<()> {
        self.script(vec!["launch".into(), self.name()]).await
    }

    async fn script(&self, args: Vec<String>) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || {
            rabbitmq_node(&args.iter().map(String::as_str).collect::<Vec<_>>())
        })
        .await?
    }
}

impl Drop for BrokerNode {
    fn drop(&mut self) {
        let _ = rabbitmq_node(&["stop", &self.name()]);
    }
}

// ---------------------------------------------------------------- the autoscaler and its workers

/// An autoscaler (local backend), whose workers are its child processes; what they do is read
/// from its log.
pub struct Autoscaler {
    process: Proc,
}

impl Autoscaler {
    pub fn start(args: &[String], admin: u16, env: &[(String, String)]) -> anyhow::Result<Self> {
        Ok(Self {
            process: Proc::start_env("ember-autoscaler", args, admin, env)?,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Waits (up to 90 s) until its admin port says ready.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_ready(
            self.process.admin,
            "/readyz",
            Duration::from_secs(90),
            Duration::from_millis(100),
        )
        .await
    }

    /// What it has logged so far.
    pub fn log(&self) -> String {
        self.process.log_text()
    }

    /// Lines of its log so far that contain `event` ("worker died", "worker drained and exited").
    pub fn count(&self, event: &str) -> usize {
        self.log().matches(event).count()
    }

    /// Live workers: (pid, worker id) of its children, ids from its "worker started" lines.
    pub fn workers(&self) -> Vec<(u32, String)> {
        let log = self.log();
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
        children(self.pid())
            .into_iter()
            .filter_map(|pid| Some((pid, ids.get(&pid)?.clone())))
            .collect()
    }
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

// ---------------------------------------------------------------- a dispatcher that restarts

/// A dispatcher that can be stopped and started again with the same arguments on the same ports.
pub struct RestartableDispatcher {
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Its API port.
    pub api: u16,
    admin: u16,
    running: Mutex<Option<Proc>>,
}

impl RestartableDispatcher {
    /// Not started yet; `args` name the ports `api` and `admin`.
    pub fn new(args: Vec<String>, env: Vec<(String, String)>, api: u16, admin: u16) -> Self {
        Self {
            args,
            env,
            api,
            admin,
            running: Mutex::new(None),
        }
    }

    pub fn start(&self) -> anyhow::Result<()> {
        let process = Proc::start_env("ember-dispatcher", &self.args, self.admin, &self.env)?;
        *lock(&self.running) = Some(process);
        Ok(())
    }

    /// The running process, handed over (dropping it stops it).
    pub fn take(&self) -> Option<Proc> {
        lock(&self.running).take()
    }

    pub fn pid(&self) -> Option<u32> {
        lock(&self.running).as_ref().map(Proc::pid)
    }

    /// Waits (up to 90 s) until its API is ready.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        wait_ready(
            self.api,
            "/v2/health/ready",
            Duration::from_secs(90),
            Duration::from_millis(100),
        )
        .await
    }
}

// ---------------------------------------------------------------- the isolated fleet

/// A fleet's broker: one node, or a three-node cluster.
pub enum Broker {
    Node(BrokerNode),
    Cluster(crate::cluster::BrokerCluster),
}

impl Broker {
    /// What the parts are given: the node's URL, or the cluster's, comma-separated (each
    /// connection attempt takes the next).
    pub fn url(&self) -> String {
        self.urls().join(",")
    }

    pub fn urls(&self) -> Vec<String> {
        match self {
            Broker::Node(node) => vec![node.url()],
            Broker::Cluster(cluster) => cluster.urls(),
        }
    }

    /// The broker's processes (each node's VM).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Broker::Node(node) => node.pid().into_iter().collect(),
            Broker::Cluster(cluster) => cluster
                .node_names()
                .iter()
                .filter_map(|n| cluster.pid(n))
                .collect(),
        }
    }

    pub fn node(&self) -> anyhow::Result<&BrokerNode> {
        match self {
            Broker::Node(node) => Ok(node),
            Broker::Cluster(_) => anyhow::bail!("this fault needs a single broker node"),
        }
    }

    pub fn cluster(&self) -> anyhow::Result<&crate::cluster::BrokerCluster> {
        match self {
            Broker::Cluster(cluster) => Ok(cluster),
            Broker::Node(_) => anyhow::bail!("this fault needs a broker cluster (--cluster)"),
        }
    }
}

pub use ember_core::topology::ready_messages;

/// A connection to the first of `urls` that takes one (a cluster's live node).
pub async fn connect_any(urls: &[String]) -> anyhow::Result<lapin::Connection> {
    let mut last = None;
    for url in urls {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            lapin::Connection::connect(url, lapin::ConnectionProperties::default()),
        )
        .await;
        match attempt {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(error)) => last = Some(error.to_string()),
            Err(_) => last = Some(format!("{url}: no answer in 5 s")),
        }
    }
    anyhow::bail!("no broker node answered: {}", last.unwrap_or_default())
}

/// One model's parts on a broker of their own (a node or a cluster): an autoscaler (which runs
/// the workers) and a dispatcher that can be restarted. Dropped in field order: the processes,
/// then the broker.
pub struct IsolatedFleet {
    pub model: String,
    pub dispatcher: RestartableDispatcher,
    pub autoscaler: Autoscaler,
    /// Last: stopped after the processes that use it.
    pub broker: Broker,
}

/// The machine, for the record.
pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    serde_json::json!({"cpu": model, "cores": cores, "date": date})
}
