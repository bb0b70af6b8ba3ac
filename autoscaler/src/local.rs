//! The `local` backend: `ember-worker` processes on this machine. Scale-out spawns; scale-in
//! sends SIGTERM to workers that hold nothing (still-loading ones first, then idle ready ones,
//! from heartbeats) and lets them drain; a worker that dies is replaced at the next tick.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use ember_core::model::ModelSpec;
use tokio::process::{Child, Command};

use crate::backend::{Backend, Context, Observed, Scaled, Target};
use crate::policy::{self, PolicyState, Settings, Signals};
use crate::signals::ModelView;
use crate::{Config, Error};

/// The `local` backend: a [`LocalPool`] per `--model-dir`, all deciding with the flags' policy
/// settings.
#[derive(Debug)]
pub struct LocalBackend {
    settings: Settings,
    models: Vec<LocalModel>,
}

#[derive(Debug)]
struct LocalModel {
    name: String,
    pool: LocalPool,
    /// The replicas decided at the last tick, to log changes only.
    last: Option<u32>,
}

impl LocalBackend {
    /// A pool per model directory, its workers started from `--worker-bin` (default: the
    /// `ember-worker` beside this binary).
    pub fn new(config: &Config) -> Result<Self, Error> {
        let program = worker_program(config.worker_bin.as_ref())?;
        if config.model.model_name.is_some() && config.model.model_dirs.len() != 1 {
            return Err(Error::Config(
                "--model-name needs exactly one --model-dir".into(),
            ));
        }
        let mut models = Vec::new();
        for dir in &config.model.model_dirs {
            let spec = ModelSpec::load(dir).map_err(Error::Config)?;
            let name = config.model.model_name.clone().unwrap_or(spec.name);
            ember_core::model::check_name(&name).map_err(Error::Config)?;
            let command = WorkerCommand {
                program: program.clone(),
                model_dir: std::fs::canonicalize(dir)?,
                args: config.worker_args.clone(),
            };
            models.push(LocalModel {
                pool: LocalPool::new(&name, command),
                name,
                last: None,
            });
        }
        Ok(Self {
            settings: config.settings(),
            models,
        })
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
        let targets = self.models.iter().enumerate();
        targets
            .map(|(index, model)| Target {
                key: model.name.clone(),
                model: model.name.clone(),
                spec: index,
                versions: Vec::new(),
            })
            .collect()
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
        let applied = model.pool.apply(decision.replicas, view).await;
        let scaled = Scaled { signals, decision };
        let changed = model.last != Some(scaled.decision.replicas)
            || !applied.started.is_empty()
            || !applied.stopped.is_empty();
        if changed {
            report(ctx, model, &scaled, view, &applied);
        }
        model.last = Some(scaled.decision.replicas);
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
    let direction = match model.last {
        Some(last) if decision.replicas > last => "up",
        Some(last) if decision.replicas < last => "down",
        None if decision.replicas > 0 => "up",
        _ => "hold",
    };
    let reason = decision
        .reasons
        .first()
        .map(|r| r.as_str())
        .unwrap_or("steady");
    ctx.metrics
        .decisions
        .with_label_values(&[&model.name, direction, reason])
        .inc();
}

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub model_dir: PathBuf,
    /// Extra arguments for every worker.
    pub args: Vec<String>,
}

struct Process {
    child: Child,
    started: Instant,
    draining: bool,
}

/// One model's worker processes.
pub struct LocalPool {
    model: String,
    command: WorkerCommand,
    processes: HashMap<String, Process>,
    serial: u64,
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
        }
    }

    /// Reaps exited processes and counts the rest against the heartbeats.
    pub fn counts(&mut self, view: &ModelView, died: &mut Vec<String>) -> PoolCounts {
        self.processes
            .retain(|id, process| match process.child.try_wait() {
                Ok(Some(status)) => {
                    if !process.draining {
                        tracing::warn!(worker = %id, %status, "worker died; it will be replaced");
                        died.push(id.clone());
                    } else {
                        tracing::info!(worker = %id, %status, "worker drained and exited");
                    }
                    false
                }
                _ => true,
            });
        let mut counts = PoolCounts::default();
        for (id, process) in &self.processes {
            if process.draining {
                counts.draining += 1;
            } else if view.ready_ids.iter().any(|w| w == id) {
                counts.ready += 1;
            } else {
                counts.starting += 1;
            }
        }
        counts
    }

    /// Brings the number of live (not draining) workers to `desired`.
    pub async fn apply(&mut self, desired: u32, view: &ModelView) -> Applied {
        let mut applied = Applied::default();
        let counts = self.counts(view, &mut applied.died);
        let live = counts.ready + counts.starting;
        if desired > live {
            for _ in live..desired {
                match self.spawn() {
                    Ok(id) => applied.started.push(id),
                    Err(error) => {
                        tracing::error!(%error, model = %self.model, "cannot start a worker");
                        break;
                    }
                }
            }
        } else if desired < live {
            let victims = self.pick_victims((live - desired) as usize, view);
            for id in victims {
                if let Some(process) = self.processes.get_mut(&id) {
                    terminate(&process.child).await;
                    process.draining = true;
                    applied.stopped.push(id);
                }
            }
        }
        applied
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

    fn spawn(&mut self) -> std::io::Result<String> {
        self.serial += 1;
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let id = format!("{}-{}-{}", self.model, self.serial, &suffix[..6]);
        let child = Command::new(&self.command.program)
            .arg("--model-dir")
            .arg(&self.command.model_dir)
            .args(["--model-name", &self.model, "--worker-id", &id])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(&self.command.args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        tracing::info!(worker = %id, pid = child.id(), "worker started");
        self.processes.insert(
            id.clone(),
            Process {
                child,
                started: Instant::now(),
                draining: false,
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

async fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
}
