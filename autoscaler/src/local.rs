//! The `local` backend: `ember-worker` processes on this machine. Scale-out spawns; scale-in
//! sends SIGTERM to workers that hold nothing (still-loading ones first, then idle ready ones,
//! from heartbeats) and lets them drain; a worker that dies is replaced at the next tick.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ember_core::amqp::unix_ms;
use ember_core::model::ModelSpec;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

use crate::backend::{Backend, Context, Observed, Scaled, Target};
use crate::policy::{self, PolicyState, Settings, Signals};
use crate::rollout::{self, Phase, Progress};
use crate::signals::ModelView;
use crate::{Config, Error};

/// The `local` backend: a [`LocalPool`] per `--model-dir` (or per pool of `--pools-file`), all
/// deciding with the flags' policy settings.
#[derive(Debug)]
pub struct LocalBackend {
    settings: Settings,
    models: Vec<LocalModel>,
    program: PathBuf,
    worker_args: Vec<String>,
    rollout_deadline: Duration,
    /// `--pools-file` and when it was last read.
    pools_file: Option<(PathBuf, Option<SystemTime>)>,
    status_file: Option<PathBuf>,
    /// The status last written, to write only changes.
    last_status: String,
}

/// Where a pool's workers get their model, and the version they serve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSource {
    /// A model directory, or a URI the worker resolves (`file://`, `https://`, `s3://`).
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    pub version: String,
}

impl ModelSource {
    /// A model directory as it is, at model.toml's version.
    fn from_dir(dir: &Path) -> Result<Self, Error> {
        let spec = ModelSpec::load(dir).map_err(Error::Config)?;
        Ok(Self {
            source: std::fs::canonicalize(dir)?.display().to_string(),
            sha256: None,
            version: spec.version,
        })
    }

    /// The worker's flags for this source.
    fn worker_args(&self) -> Vec<String> {
        let mut args = if Path::new(&self.source).is_dir() {
            vec!["--model-dir".to_string(), self.source.clone()]
        } else {
            vec!["--model-uri".to_string(), self.source.clone()]
        };
        if let Some(sha256) = &self.sha256 {
            args.extend(["--model-sha256".to_string(), sha256.clone()]);
        }
        args.extend(["--model-version".to_string(), self.version.clone()]);
        args
    }
}

/// `--pools-file`: the pools this backend runs and the model each serves. Re-read when it
/// changes; a changed source or version rolls the pool out to it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolsFile {
    #[serde(rename = "pool", default)]
    pools: Vec<PoolEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PoolEntry {
    /// The model's name (its queue, its routes).
    model: String,
    /// A model directory (relative to the pools file's directory) or a URI.
    source: String,
    #[serde(default)]
    sha256: Option<String>,
    /// Default: model.toml's, for a directory; required for a URI.
    #[serde(default)]
    version: Option<String>,
}

fn read_pools(path: &Path) -> Result<Vec<(String, ModelSource)>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let file: PoolsFile =
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut pools = Vec::new();
    for entry in file.pools {
        ember_core::model::check_name(&entry.model).map_err(Error::Config)?;
        let dir = base.join(&entry.source);
        let source = if !entry.source.contains("://") && dir.is_dir() {
            let mut source = ModelSource::from_dir(&dir)?;
            if let Some(version) = entry.version {
                source.version = version;
            }
            source.sha256 = entry.sha256;
            source
        } else {
            let version = entry.version.ok_or_else(|| {
                Error::Config(format!(
                    "pool `{}`: a version is needed for source `{}` (not a directory)",
                    entry.model, entry.source
                ))
            })?;
            ModelSource {
                source: entry.source,
                sha256: entry.sha256,
                version,
            }
        };
        ember_core::model::check_version(&source.version)
            .map_err(|e| Error::Config(format!("pool `{}`: {e}", entry.model)))?;
        if pools.iter().any(|(name, _)| *name == entry.model) {
            return Err(Error::Config(format!(
                "pool `{}` is listed twice",
                entry.model
            )));
        }
        pools.push((entry.model, source));
    }
    Ok(pools)
}

/// What the status file said of the pools when this autoscaler started (a restart): the source
/// each pool served and the one that failed, so that a restart neither forgets a rollback
/// (and starts the failed source as if it were current) nor rolls out what is running already.
#[derive(Debug, Deserialize)]
struct SavedStatus {
    pools: HashMap<String, SavedPool>,
}

#[derive(Debug, Deserialize)]
struct SavedPool {
    current: ModelSource,
    #[serde(default)]
    failed: Option<SavedFailure>,
}

#[derive(Debug, Deserialize)]
struct SavedFailure {
    source: ModelSource,
    reason: String,
}

fn read_status(path: &Path) -> Option<SavedStatus> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(status) => Some(status),
        Err(error) => {
            tracing::warn!(%error, path = %path.display(), "the status file does not parse; starting afresh");
            None
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

#[derive(Debug)]
struct LocalModel {
    name: String,
    pool: LocalPool,
    /// The replicas decided at the last tick, to log changes only.
    last: Option<u32>,
    /// The source the pool serves, and the one it is asked to serve (they differ until a
    /// rollout completes, or after one failed).
    current: Arc<ModelSource>,
    desired: Arc<ModelSource>,
    rollout: Option<Rollout>,
    /// The last source that failed to roll out, and why: not tried again until it changes.
    failed: Option<(Arc<ModelSource>, String)>,
    events: VecDeque<PoolEvent>,
    /// The workers as counted at the last tick (for the status file).
    counts: PoolCounts,
}

#[derive(Debug)]
struct Rollout {
    to: Arc<ModelSource>,
    /// When a new worker last became ready (or the rollout began): the deadline counts from
    /// there, as Kubernetes' `progressDeadlineSeconds` does.
    progressed: Instant,
    /// The most new workers seen ready at once.
    best_ready: u32,
    started_ms: u64,
    failures: u32,
    /// The last log line of the last new worker that died.
    last_failure: Option<String>,
}

/// An event in a pool's life, as Kubernetes Events are: kept in the status file (the last
/// [`EVENTS_KEPT`]) and logged.
#[derive(Debug, Clone, Serialize)]
struct PoolEvent {
    at_ms: u64,
    #[serde(rename = "type")]
    kind: &'static str,
    reason: &'static str,
    message: String,
}

const EVENTS_KEPT: usize = 50;

impl LocalModel {
    fn new(name: String, source: ModelSource, command: WorkerCommand) -> Self {
        let source = Arc::new(source);
        Self {
            pool: LocalPool::new(&name, command),
            name,
            last: None,
            current: source.clone(),
            desired: source,
            rollout: None,
            failed: None,
            events: VecDeque::new(),
            counts: PoolCounts::default(),
        }
    }

    fn event(&mut self, kind: &'static str, reason: &'static str, message: String) {
        if kind == "Warning" {
            tracing::warn!(model = %self.name, reason, %message, "pool event");
        } else {
            tracing::info!(model = %self.name, reason, %message, "pool event");
        }
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(PoolEvent {
            at_ms: unix_ms(),
            kind,
            reason,
            message,
        });
    }

    /// The versions the pool serves now: the current one, the one rolling out, and that of
    /// every worker still alive, draining ones included (a version's queue is kept until its
    /// last worker has exited: a draining worker's unacked jobs go back to it).
    fn versions(&self) -> Vec<String> {
        let mut versions = std::collections::BTreeSet::from([self.current.version.clone()]);
        if let Some(rollout) = &self.rollout {
            versions.insert(rollout.to.version.clone());
        }
        versions.extend(self.pool.versions_alive());
        versions.into_iter().collect()
    }

    /// Takes up where the status file left off: the source served before the restart is the
    /// current one (a changed file then rolls out from it), and a source that failed stays
    /// failed while the file still asks for it.
    fn resume(&mut self, saved: &SavedPool) {
        self.current = Arc::new(saved.current.clone());
        if let Some(failed) = &saved.failed {
            self.failed = Some((Arc::new(failed.source.clone()), failed.reason.clone()));
        }
        self.event(
            "Normal",
            "Resumed",
            format!(
                "restarted: serving version {} as before{}",
                self.current.version,
                match &self.failed {
                    Some((source, _)) => format!(", version {} stays rolled back", source.version),
                    None => String::new(),
                }
            ),
        );
    }

    /// The source asked for is the one that failed to roll out (not tried again).
    fn desired_failed(&self) -> bool {
        self.failed
            .as_ref()
            .is_some_and(|(source, _)| *source == self.desired)
    }

    /// Starts, supersedes or leaves alone a rollout, from what the pool is asked to serve.
    async fn begin_or_supersede(&mut self) {
        if let Some(rollout) = &self.rollout
            && rollout.to != self.desired
        {
            // Its workers stay until the next rollout's are ready (they count as old there):
            // stopping them now could leave the pool with none ready.
            let to = rollout.to.clone();
            self.rollout = None;
            self.event(
                "Normal",
                "RolloutSuperseded",
                format!(
                    "version {} is no longer asked for; its workers go as the next version's are ready",
                    to.version
                ),
            );
        }
        if self.rollout.is_none() && self.desired != self.current && !self.desired_failed() {
            let to = self.desired.clone();
            self.event(
                "Normal",
                "RolloutStarted",
                format!(
                    "version {} -> {} ({})",
                    self.current.version, to.version, to.source
                ),
            );
            self.rollout = Some(Rollout {
                to,
                progressed: Instant::now(),
                best_ready: 0,
                started_ms: unix_ms(),
                failures: 0,
                last_failure: None,
            });
        }
    }

    /// One rollout step toward `want` workers of the new version.
    async fn roll(&mut self, want: u32, view: &ModelView, deadline: Duration) -> Applied {
        let mut applied = Applied::default();
        let Some(rollout) = self.rollout.as_mut() else {
            return applied;
        };
        for death in self.pool.take_deaths() {
            // A new worker that served and then died (a poison job, an OOM) says nothing
            // against its version: only deaths before becoming ready count.
            if death.source == rollout.to && !death.was_ready {
                rollout.failures += 1;
                rollout.last_failure = Some(format!(
                    "worker {} exited ({}){}",
                    death.id,
                    death.status,
                    death
                        .last_line
                        .map(|line| format!(": {line}"))
                        .unwrap_or_default()
                ));
            }
        }
        let (new_live, new_ready) = self.pool.generation(&rollout.to, view);
        if new_ready > rollout.best_ready {
            rollout.best_ready = new_ready;
            rollout.progressed = Instant::now();
        }
        let old_live = self.pool.live_except(&rollout.to);
        let step = rollout::step(Progress {
            want,
            new_live,
            new_ready,
            old_live,
            failures: rollout.failures,
            elapsed: rollout.progressed.elapsed(),
            deadline,
        });
        let to = rollout.to.clone();
        match step.phase {
            Phase::Progressing => {
                for _ in 0..step.start {
                    match self.pool.spawn(&to) {
                        Ok(id) => applied.started.push(id),
                        Err(error) => {
                            tracing::error!(%error, model = %self.name, "cannot start a worker");
                            break;
                        }
                    }
                }
                applied.stopped = self.pool.retire_old(step.retire as usize, &to, view).await;
            }
            Phase::Complete => {
                let from = std::mem::replace(&mut self.current, to.clone());
                self.rollout = None;
                self.failed = None;
                self.event(
                    "Normal",
                    "RolloutComplete",
                    format!(
                        "version {} -> {}: {new_ready} new workers ready, the old ones drained",
                        from.version, to.version
                    ),
                );
            }
            Phase::RollBack(why) => {
                let detail = rollout.last_failure.take();
                applied.stopped = self.pool.stop_generation(&to).await;
                self.rollout = None;
                let reason = match detail {
                    Some(detail) => format!("{why}; last: {detail}"),
                    None => why,
                };
                self.event(
                    "Warning",
                    "RolledBack",
                    format!(
                        "version {} did not roll out, version {} goes on serving: {reason}",
                        to.version, self.current.version
                    ),
                );
                self.failed = Some((to, reason));
            }
        }
        applied
    }

    fn status(&self) -> serde_json::Value {
        let view_counts = self.counts;
        let phase = if self.rollout.is_some() {
            "Progressing"
        } else if self.desired_failed() {
            "RolledBack"
        } else {
            "Stable"
        };
        serde_json::json!({
            "phase": phase,
            "current": *self.current,
            "desired": *self.desired,
            "rollout": self.rollout.as_ref().map(|r| serde_json::json!({
                "to": *r.to,
                "started_at_ms": r.started_ms,
                "failures": r.failures,
            })),
            "failed": self.failed.as_ref().map(|(source, reason)| serde_json::json!({
                "source": **source,
                "reason": reason,
            })),
            "workers": {
                "ready": view_counts.ready,
                "starting": view_counts.starting,
                "draining": view_counts.draining,
                "by_version": self.pool.by_version(),
            },
            "events": self.events,
        })
    }
}

impl LocalBackend {
    /// A pool per model directory, or per pool of `--pools-file`, its workers started from
    /// `--worker-bin` (default: the `ember-worker` beside this binary).
    pub fn new(config: &Config) -> Result<Self, Error> {
        let program = worker_program(config.worker_bin.as_ref())?;
        let mut backend = Self {
            settings: config.settings(),
            models: Vec::new(),
            program,
            worker_args: config.worker_args.clone(),
            rollout_deadline: config.rollout_deadline,
            pools_file: None,
            status_file: config.status_file.clone(),
            last_status: String::new(),
        };
        if let Some(path) = &config.pools_file {
            let stamp = modified(path);
            if backend.status_file.is_none() {
                backend.status_file = Some(path.with_extension("status.json"));
            }
            let before = backend.status_file.as_deref().and_then(read_status);
            for (name, source) in read_pools(path)? {
                let saved = before.as_ref().and_then(|s| s.pools.get(&name));
                backend.add(name, source);
                if let (Some(saved), Some(model)) = (saved, backend.models.last_mut()) {
                    model.resume(saved);
                }
            }
            backend.pools_file = Some((path.clone(), stamp));
            return Ok(backend);
        }
        if config.model.model_name.is_some() && config.model.model_dirs.len() != 1 {
            return Err(Error::Config(
                "--model-name needs exactly one --model-dir".into(),
            ));
        }
        for dir in &config.model.model_dirs {
            let spec = ModelSpec::load(dir).map_err(Error::Config)?;
            let name = config.model.model_name.clone().unwrap_or(spec.name);
            ember_core::model::check_name(&name).map_err(Error::Config)?;
            backend.add(name, ModelSource::from_dir(dir)?);
        }
        Ok(backend)
    }

    fn add(&mut self, name: String, source: ModelSource) {
        let command = WorkerCommand {
            program: self.program.clone(),
            args: self.worker_args.clone(),
        };
        self.models.push(LocalModel::new(name, source, command));
    }

    /// Re-reads `--pools-file` when it changed: new pools are added, changed sources are what
    /// the pools roll out to. A file that does not parse changes nothing (logged).
    fn reload(&mut self) {
        let Some((path, stamp)) = &self.pools_file else {
            return;
        };
        let now = modified(path);
        if now == *stamp {
            return;
        }
        let path = path.clone();
        self.pools_file = Some((path.clone(), now));
        let pools = match read_pools(&path) {
            Ok(pools) => pools,
            Err(error) => {
                tracing::warn!(%error, "the pools file does not parse; nothing changes");
                return;
            }
        };
        for (name, source) in pools {
            match self.models.iter_mut().find(|m| m.name == name) {
                Some(model) => model.desired = Arc::new(source),
                None => self.add(name, source),
            }
        }
    }

    /// Writes the status file when the status changed (atomically: a reader never sees half).
    fn write_status(&mut self) {
        let Some(path) = &self.status_file else {
            return;
        };
        let pools: serde_json::Map<String, serde_json::Value> = self
            .models
            .iter()
            .map(|m| (m.name.clone(), m.status()))
            .collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({ "pools": pools }))
            .unwrap_or_default();
        if text == self.last_status {
            return;
        }
        let temporary = path.with_extension("tmp");
        let written =
            std::fs::write(&temporary, &text).and_then(|()| std::fs::rename(&temporary, path));
        match written {
            Ok(()) => self.last_status = text,
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot write the status file")
            }
        }
    }
}

fn worker_program(configured: Option<&PathBuf>) -> Result<PathBuf, Error> {
    if let Some(path) = configured {
        return Ok(path.clone());
    }
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name("ember-worker");
    if sibling.is_file() {
        Ok(sibling)
    } else {
        Err(Error::Config(format!(
            "no ember-worker beside {}; pass --worker-bin",
            me.display()
        )))
    }
}

impl Backend for LocalBackend {
    /// The model's index in `models`.
    type Spec = usize;
    type Error = Infallible;

    async fn observe(&mut self, _ctx: &Context) -> Vec<Target<usize>> {
        self.reload();
        let mut targets = Vec::with_capacity(self.models.len());
        for (index, model) in self.models.iter_mut().enumerate() {
            model.begin_or_supersede().await;
            targets.push(Target {
                key: model.name.clone(),
                model: model.name.clone(),
                spec: index,
                versions: model.versions(),
            });
        }
        targets
    }

    async fn scale(
        &mut self,
        ctx: &Context,
        target: &Target<usize>,
        observed: &Observed,
        policy: &mut PolicyState,
    ) -> Result<Scaled, Infallible> {
        let model = &mut self.models[target.spec];
        let view = &observed.view;
        let mut died = Vec::new();
        let counts = model.pool.counts(view, &mut died);
        let signals = Signals {
            ready: observed.ready,
            in_flight: view.in_flight,
            arrival_rate: observed.arrival_rate,
            service_rate_per_replica: view.service_rate,
            replicas_ready: counts.ready,
            replicas_starting: counts.starting,
            gpu_utilisation: view.gpu_utilisation,
            backlog_growing: observed.backlog_growing,
        };
        let decision = policy::decide(&self.settings, policy, &signals, ctx.started.elapsed());
        let applied = if model.rollout.is_some() {
            model
                .roll(decision.replicas, view, self.rollout_deadline)
                .await
        } else {
            model.pool.take_deaths();
            let current = model.current.clone();
            model.pool.apply(decision.replicas, view, &current).await
        };
        let scaled = Scaled { signals, decision };
        let changed = model.last != Some(scaled.decision.replicas)
            || !applied.started.is_empty()
            || !applied.stopped.is_empty();
        if changed {
            report(ctx, model, &scaled, view, &applied);
        }
        model.last = Some(scaled.decision.replicas);
        model.counts = counts;
        self.write_status();
        Ok(scaled)
    }

    async fn stop(&mut self) {
        tracing::info!("stopping the local workers");
        for model in &mut self.models {
            model.pool.shutdown().await;
        }
    }
}

/// Logs a decision that changed something and counts it by direction and first reason.
fn report(ctx: &Context, model: &LocalModel, scaled: &Scaled, view: &ModelView, applied: &Applied) {
    let Scaled { signals, decision } = scaled;
    tracing::info!(
        model = %model.name,
        replicas = decision.replicas,
        recommended = decision.recommended,
        reasons = ?decision.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        ready_jobs = signals.ready,
        in_flight = view.in_flight,
        arrival_rate = format!("{:.1}", signals.arrival_rate),
        service_rate = ?view.service_rate.map(|r| format!("{r:.1}")),
        replicas_ready = signals.replicas_ready,
        replicas_starting = signals.replicas_starting,
        started = ?applied.started,
        stopped = ?applied.stopped,
        "scaling decision"
    );
    ctx.metrics
        .count_decision(&model.name, model.last, decision);
}

/// How to start a worker (the model's flags come from its [`ModelSource`]).
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    /// Extra arguments for every worker.
    pub args: Vec<String>,
}

struct Process {
    child: Child,
    started: Instant,
    draining: bool,
    /// What it was started with: its generation in a rollout.
    source: Arc<ModelSource>,
    /// Its last line on stderr (a worker that cannot start says why there).
    last_line: Arc<Mutex<Option<String>>>,
    /// It has reported ready at least once.
    was_ready: bool,
}

/// A worker that exited without being asked to.
#[derive(Debug)]
pub struct Death {
    pub id: String,
    pub source: Arc<ModelSource>,
    pub status: String,
    pub last_line: Option<String>,
    /// It had reported ready before it died.
    pub was_ready: bool,
}

/// One model's worker processes.
pub struct LocalPool {
    model: String,
    command: WorkerCommand,
    processes: HashMap<String, Process>,
    serial: u64,
    deaths: Vec<Death>,
}

impl std::fmt::Debug for LocalPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPool")
            .field("model", &self.model)
            .field("processes", &self.processes.len())
            .finish()
    }
}

/// What the pool looks like to the policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Live, not draining, and reporting ready.
    pub ready: u32,
    /// Live, not draining, not ready yet (loading the model).
    pub starting: u32,
    pub draining: u32,
}

/// What `apply` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    /// Workers that exited without being asked to (replaced by the next scale-out).
    pub died: Vec<String>,
}

impl LocalPool {
    pub fn new(model: &str, command: WorkerCommand) -> Self {
        Self {
            model: model.to_string(),
            command,
            processes: HashMap::new(),
            serial: 0,
            deaths: Vec::new(),
        }
    }

    /// Reaps exited processes and counts the rest against the heartbeats.
    pub fn counts(&mut self, view: &ModelView, died: &mut Vec<String>) -> PoolCounts {
        let deaths = &mut self.deaths;
        self.processes
            .retain(|id, process| match process.child.try_wait() {
                Ok(Some(status)) => {
                    if !process.draining {
                        tracing::warn!(worker = %id, %status, "worker died; it will be replaced");
                        died.push(id.clone());
                        let last_line = process
                            .last_line
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .take();
                        deaths.push(Death {
                            id: id.clone(),
                            source: process.source.clone(),
                            status: status.to_string(),
                            last_line,
                            was_ready: process.was_ready,
                        });
                    } else {
                        tracing::info!(worker = %id, %status, "worker drained and exited");
                    }
                    false
                }
                _ => true,
            });
        let mut counts = PoolCounts::default();
        for (id, process) in &mut self.processes {
            if process.draining {
                counts.draining += 1;
            } else if view.ready_ids.iter().any(|w| w == id) {
                process.was_ready = true;
                counts.ready += 1;
            } else {
                counts.starting += 1;
            }
        }
        counts
    }

    /// The workers that died since the last call.
    pub fn take_deaths(&mut self) -> Vec<Death> {
        std::mem::take(&mut self.deaths)
    }

    /// `source`'s workers alive and not draining, and how many of them report ready.
    pub fn generation(&self, source: &ModelSource, view: &ModelView) -> (u32, u32) {
        let live = self.live(|p| *p.source == *source);
        let ready = live
            .iter()
            .filter(|id| view.ready_ids.iter().any(|w| w == **id))
            .count();
        (live.len() as u32, ready as u32)
    }

    /// Workers alive and not draining that serve anything but `source`.
    pub fn live_except(&self, source: &ModelSource) -> u32 {
        self.live(|p| *p.source != *source).len() as u32
    }

    fn live(&self, which: impl Fn(&Process) -> bool) -> Vec<&String> {
        self.processes
            .iter()
            .filter(|(_, p)| !p.draining && which(p))
            .map(|(id, _)| id)
            .collect()
    }

    /// The versions of every worker process still alive, draining ones included.
    pub fn versions_alive(&self) -> impl Iterator<Item = String> + '_ {
        self.processes.values().map(|p| p.source.version.clone())
    }

    /// Live workers per version served (for the status file).
    pub fn by_version(&self) -> std::collections::BTreeMap<String, u32> {
        let mut versions = std::collections::BTreeMap::new();
        for process in self.processes.values().filter(|p| !p.draining) {
            *versions.entry(process.source.version.clone()).or_default() += 1;
        }
        versions
    }

    /// Brings the number of live (not draining) workers to `desired`, starting new ones with
    /// `source`.
    pub async fn apply(
        &mut self,
        desired: u32,
        view: &ModelView,
        source: &Arc<ModelSource>,
    ) -> Applied {
        let mut applied = Applied::default();
        let counts = self.counts(view, &mut applied.died);
        let live = counts.ready + counts.starting;
        if desired > live {
            for _ in live..desired {
                match self.spawn(source) {
                    Ok(id) => applied.started.push(id),
                    Err(error) => {
                        tracing::error!(%error, model = %self.model, "cannot start a worker");
                        break;
                    }
                }
            }
        } else if desired < live {
            let victims = self.pick_victims((live - desired) as usize, view);
            applied.stopped = self.stop(victims).await;
        }
        applied
    }

    /// Stops `count` workers of other generations than `new` (a rollout's old ones): still
    /// loading first, then idle, then busy ones (they drain what they hold), youngest first.
    pub async fn retire_old(
        &mut self,
        count: usize,
        new: &ModelSource,
        view: &ModelView,
    ) -> Vec<String> {
        let mut old: Vec<(&String, &Process)> = self
            .processes
            .iter()
            .filter(|(_, p)| !p.draining && *p.source != *new)
            .collect();
        let rank = |id: &String| {
            if !view.workers.iter().any(|(w, _)| w == id) {
                0
            } else if view.idle_workers.contains(id) {
                1
            } else {
                2
            }
        };
        old.sort_by_key(|(id, p)| (rank(id), std::cmp::Reverse(p.started)));
        let victims = old
            .into_iter()
            .take(count)
            .map(|(id, _)| id.clone())
            .collect();
        self.stop(victims).await
    }

    /// Stops every worker of `source` (a rollout given up or superseded).
    pub async fn stop_generation(&mut self, source: &ModelSource) -> Vec<String> {
        let victims = self
            .live(|p| *p.source == *source)
            .into_iter()
            .cloned()
            .collect();
        self.stop(victims).await
    }

    async fn stop(&mut self, victims: Vec<String>) -> Vec<String> {
        let mut stopped = Vec::new();
        for id in victims {
            if let Some(process) = self.processes.get_mut(&id) {
                terminate(&process.child).await;
                process.draining = true;
                stopped.push(id);
            }
        }
        stopped
    }

    /// Workers to stop: still loading first (they hold no jobs), then ready ones with nothing in
    /// flight, the youngest first. Busy workers are never picked; scale-in waits for them.
    fn pick_victims(&self, count: usize, view: &ModelView) -> Vec<String> {
        let mut loading: Vec<(&String, &Process)> = self
            .processes
            .iter()
            .filter(|(id, p)| !p.draining && !view.workers.iter().any(|(w, _)| w == *id))
            .collect();
        loading.sort_by_key(|(_, p)| std::cmp::Reverse(p.started));
        let mut idle: Vec<(&String, &Process)> = self
            .processes
            .iter()
            .filter(|(id, p)| !p.draining && view.idle_workers.contains(id))
            .collect();
        idle.sort_by_key(|(_, p)| std::cmp::Reverse(p.started));
        loading
            .into_iter()
            .chain(idle)
            .map(|(id, _)| id.clone())
            .take(count)
            .collect()
    }

    fn spawn(&mut self, source: &Arc<ModelSource>) -> std::io::Result<String> {
        self.serial += 1;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{}-{}-{}", self.model, self.serial, &suffix[..6]);
        let mut child = Command::new(&self.command.program)
            .args(source.worker_args())
            .args(["--model-name", &self.model, "--worker-id", &id])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(&self.command.args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let last_line = Arc::new(Mutex::new(None));
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(relay_stderr(stderr, last_line.clone()));
        }
        tracing::info!(worker = %id, pid = child.id(), version = %source.version, "worker started");
        self.processes.insert(
            id.clone(),
            Process {
                child,
                started: Instant::now(),
                draining: false,
                source: source.clone(),
                last_line,
                was_ready: false,
            },
        );
        Ok(id)
    }

    /// SIGTERM to every worker, then waits for them to drain and exit.
    pub async fn shutdown(&mut self) {
        for process in self.processes.values_mut() {
            if !process.draining {
                terminate(&process.child).await;
                process.draining = true;
            }
        }
        for (id, process) in self.processes.iter_mut() {
            match process.child.wait().await {
                Ok(status) => tracing::info!(worker = %id, %status, "worker exited"),
                Err(error) => tracing::warn!(worker = %id, %error, "worker wait failed"),
            }
        }
        self.processes.clear();
    }
}

/// Passes a worker's stderr through to ours, remembering its last non-empty line.
async fn relay_stderr(stderr: tokio::process::ChildStderr, last: Arc<Mutex<Option<String>>>) {
    use std::io::Write;
    let mut reader = tokio::io::BufReader::new(stderr);
    let mut bytes = Vec::new();
    // Bytes, not lines of UTF-8: a line that is not UTF-8 must not end the relay (the worker
    // would then block writing to a pipe no one reads).
    while matches!(reader.read_until(b'\n', &mut bytes).await, Ok(n) if n > 0) {
        let _ = std::io::stderr().write_all(&bytes);
        let line = String::from_utf8_lossy(&bytes).trim_end().to_string();
        bytes.clear();
        if !line.trim().is_empty() {
            let mut kept: String = line.chars().take(500).collect();
            kept.truncate(kept.trim_end().len());
            *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(kept);
        }
    }
}

async fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pools(text: &str) -> Result<Vec<(String, ModelSource)>, Error> {
        let dir = std::env::temp_dir().join(format!("pools-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let iris = std::fs::canonicalize("../models/iris-classifier").unwrap();
        let path = dir.join("pools.toml");
        std::fs::write(&path, text.replace("IRIS", iris.to_str().unwrap())).unwrap();
        let read = read_pools(&path);
        let _ = std::fs::remove_dir_all(&dir);
        read
    }

    #[test]
    fn the_pools_file_takes_a_directory_at_its_version_or_a_uri_with_one() {
        let read = pools(
            "[[pool]]\nmodel = \"a\"\nsource = \"IRIS\"\n\n\
             [[pool]]\nmodel = \"b\"\nsource = \"IRIS\"\nversion = \"7\"\n\n\
             [[pool]]\nmodel = \"c\"\nsource = \"s3://bucket/m.tar.gz\"\nsha256 = \"ab\"\nversion = \"2\"\n",
        )
        .unwrap();
        assert_eq!(read[0].1.version, "1", "model.toml's default");
        assert_eq!(read[1].1.version, "7");
        assert_eq!(read[2].1.source, "s3://bucket/m.tar.gz");
        assert_eq!(
            read[2].1.worker_args(),
            [
                "--model-uri",
                "s3://bucket/m.tar.gz",
                "--model-sha256",
                "ab",
                "--model-version",
                "2"
            ]
        );
        assert_eq!(read[0].1.worker_args()[0], "--model-dir");
        for (bad, why) in [
            (
                "[[pool]]\nmodel = \"a\"\nsource = \"https://h/m.onnx\"\n",
                "a version is needed",
            ),
            (
                "[[pool]]\nmodel = \"a b\"\nsource = \"IRIS\"\n",
                "model name",
            ),
            (
                "[[pool]]\nmodel = \"a\"\nsource = \"IRIS\"\nversion = \"x/y\"\n",
                "model version",
            ),
            (
                "[[pool]]\nmodel = \"a\"\nsource = \"IRIS\"\n[[pool]]\nmodel = \"a\"\nsource = \"IRIS\"\n",
                "twice",
            ),
            (
                "[[pool]]\nmodel = \"a\"\nsource = \"IRIS\"\nreplicas = 3\n",
                "unknown field",
            ),
        ] {
            let error = pools(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }
}
