//! The `local` backend: `ember-worker` processes on this machine. Scale-out spawns; scale-in
//! sends SIGTERM to workers that hold nothing (still-loading ones first, then idle ready ones,
//! from heartbeats) and lets them drain; a worker that dies is replaced at the next tick.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;

use tokio::process::{Child, Command};

use crate::signals::ModelView;

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
