//! Starting and stopping the parts as processes (the release binaries beside this one).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    let mut dir = std::env::current_dir().unwrap_or_default();
    while !dir.join("models").is_dir() {
        if !dir.pop() {
            return std::env::current_dir().unwrap_or_default();
        }
    }
    dir
}

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

/// A child process, killed on drop.
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

    /// Waits until `path` on the admin port answers 200.
    pub async fn wait_http(&self, port: u16, path: &str) -> anyhow::Result<()> {
        let started = Instant::now();
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await
                && r.status().is_success()
            {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(60),
                "{path} on {port} never ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    /// SIGTERM first (an autoscaler then stops the workers it started; a SIGKILL would orphan
    /// them), SIGKILL after 15 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
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

/// Resident set size of a process, in bytes.
pub fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A worker for `model` from `model_dir` with extra args.
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
    Proc::start("ember-worker", &args, admin)
}

/// A dispatcher serving `model`; returns it and its API port.
pub fn dispatcher(model: &str, model_dir: &Path) -> anyhow::Result<(Proc, u16)> {
    let admin = free_port();
    let api = free_port();
    let args: Vec<String> = vec![
        "--model-dir".into(),
        model_dir.display().to_string(),
        "--model-name".into(),
        model.into(),
        "--admin-addr".into(),
        format!("127.0.0.1:{admin}"),
        "--listen".into(),
        format!("127.0.0.1:{api}"),
    ];
    Ok((Proc::start("ember-dispatcher", &args, admin)?, api))
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
