//! The faults and the load they are injected under: one phase per fault, its steady load (or
//! burst, or overload), the injection a third of the way in, and the wait for the answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_core::topology;
use serde_json::{Value, json};

use super::Harness;
use super::clients::{Kind, kind_of, lock, send};
use super::report::{self, AutoscalerEvents, PhaseRecord};
use crate::fleet;

/// Each worker's last heartbeat: jobs in flight.
pub(super) type InFlight = Arc<Mutex<HashMap<String, (u64, Instant)>>>;

/// Follows the model's worker heartbeats (reconnecting after broker faults).
pub(super) fn watch_heartbeats(urls: Vec<String>, model: String) -> InFlight {
    let seen: InFlight = Arc::default();
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let session = async {
                let c = fleet::connect_any(&urls).await?;
                let ch = c.create_channel().await?;
                let pattern = format!("{model}.*");
                let mut beats = topology::HeartbeatFeed::subscribe(&ch, &pattern).await?;
                while let Some(Ok(beat)) = beats.next().await {
                    lock(&out).insert(beat.worker, (beat.in_flight, Instant::now()));
                }
                anyhow::Ok(())
            };
            let _ = session.await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    seen
}

/// What the fault did: whether it was applied as meant, when it took effect, how long the
/// broken part was down, and what it saw.
struct Injected {
    applied: bool,
    effect_at: Instant,
    downtime_s: Option<f64>,
    notes: Vec<String>,
}

impl Injected {
    /// Applied, in effect from `at`.
    fn at(at: Instant, note: String) -> Self {
        Self {
            applied: true,
            effect_at: at,
            downtime_s: None,
            notes: vec![note],
        }
    }

    /// Applied, in effect from `at`, the part down for `downtime`.
    fn down(at: Instant, downtime: Duration, note: String) -> Self {
        Self {
            downtime_s: Some(downtime.as_secs_f64()),
            ..Self::at(at, note)
        }
    }
}

/// One fault's phase: its load with the fault injected, the wait for the answers, and its row
/// of the report.
pub(super) async fn run_phase(
    harness: &Arc<Harness>,
    fault: &str,
    phase: usize,
) -> anyhow::Result<Value> {
    eprintln!("chaos: {fault} ...");
    let began = Instant::now();
    let mut notes = Vec::new();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = report::sample_memory(harness.fleet.clone(), stop.clone());
    let before = AutoscalerEvents::read(&harness.fleet.autoscaler);
    let (injected, overload_figures) = load_with_fault(harness, fault, phase, &mut notes).await?;
    notes.extend(injected.notes);
    settle(harness, phase).await;
    stop.store(true, Ordering::Relaxed);
    // Every phase: what is left in the broker's queues, and the dead letters (read off).
    let urls = harness.fleet.broker.urls();
    let queues = report::queue_depths(&urls, &harness.fleet.model).await;
    let dead_letters = report::dead_letters(&urls, &harness.fleet.model).await?;
    let row = report::phase_row(
        harness,
        PhaseRecord {
            fault,
            phase,
            began,
            applied: injected.applied,
            effect_at: injected.effect_at,
            downtime_s: injected.downtime_s,
            before,
            overload: overload_figures,
            notes,
            dead_letters,
            queues,
            peaks,
        },
    );
    eprintln!("chaos: {fault}: {row}");
    Ok(row)
}

/// The phase's load with its fault; for the overload, its figures too.
async fn load_with_fault(
    harness: &Arc<Harness>,
    fault: &str,
    phase: usize,
    notes: &mut Vec<String>,
) -> anyhow::Result<(Injected, Value)> {
    let args = &harness.args;
    Ok(match fault {
        "overload" => {
            let started = Instant::now();
            let figures = overload(harness, phase, notes).await?;
            let injected = Injected {
                notes: vec![],
                ..Injected::at(started, String::new())
            };
            (injected, figures)
        }
        "scale-in" => (scale_in_load(harness, phase).await?, Value::Null),
        _ => (
            steady_load(harness, fault, phase, args.jobs, args.rate).await?,
            Value::Null,
        ),
    })
}

/// A burst that scales the pool out, then the steady load while it scales in.
async fn scale_in_load(harness: &Arc<Harness>, phase: usize) -> anyhow::Result<Injected> {
    let args = &harness.args;
    harness.scale_in_baseline.store(
        harness.fleet.autoscaler.count("worker drained and exited"),
        Ordering::Relaxed,
    );
    let burst: Vec<_> = (0..args.jobs.max(60) * 2)
        .map(|i| send(harness, phase, kind_of(i), false))
        .collect();
    let rate = (args.jobs as f64 / 20.0).min(args.rate * 0.5).max(1.0);
    let injected = steady_load(harness, "scale-in", phase, args.jobs, rate).await?;
    for t in burst {
        let _ = t.await;
    }
    Ok(injected)
}

/// Sends `jobs` at `rate`, injecting the fault after a third of them.
async fn steady_load(
    harness: &Arc<Harness>,
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
            let (harness, fault) = (harness.clone(), fault.to_string());
            injection = Some(tokio::spawn(async move {
                inject(&harness, &fault, phase).await
            }));
        }
        tasks.push(send(harness, phase, kind_of(i), false));
    }
    let injected = match injection {
        Some(task) => task.await??,
        None => inject(harness, fault, phase).await?,
    };
    for task in tasks {
        let _ = task.await;
    }
    Ok(injected)
}

/// Waits for every accepted job of the phase to be answered (at most `--settle`), then gives
/// late duplicates a moment to show up.
async fn settle(harness: &Harness, phase: usize) {
    let started = Instant::now();
    loop {
        harness.http.poll_visible(phase).await;
        let pending = lock(&harness.ledger)
            .values()
            .filter(|j| j.phase == phase && j.accepted.is_some() && !report::answered(j))
            .count();
        if pending == 0 || started.elapsed() > harness.args.settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    harness.http.poll_visible(phase).await;
}

// ---------------------------------------------------------------- the injections

async fn inject(harness: &Arc<Harness>, fault: &str, phase: usize) -> anyhow::Result<Injected> {
    let started = Instant::now();
    Ok(match fault {
        "worker-sigkill" => signal_busy_worker(harness, phase, "KILL").await,
        "worker-sigterm" => signal_busy_worker(harness, phase, "TERM").await,
        "scale-in" => await_scale_in(harness).await,
        "dispatcher-restart" | "dispatcher-sigkill" => {
            restart_dispatcher(harness, fault == "dispatcher-sigkill").await?
        }
        "broker-stop-app" => {
            let node = harness.fleet.broker.node()?;
            node.ctl("stop_app").await?;
            let down = Instant::now();
            tokio::time::sleep(Duration::from_secs(3)).await;
            node.ctl("start_app").await?;
            node.ctl("await_startup").await?;
            Injected::down(
                down,
                down.elapsed(),
                format!(
                    "broker app stopped {:.1} s after the fault began",
                    (down - started).as_secs_f64()
                ),
            )
        }
        "broker-restart" => {
            let node = harness.fleet.broker.node()?;
            node.stop().await?;
            let down = Instant::now();
            node.launch().await?;
            Injected::down(
                down,
                down.elapsed(),
                "broker node stopped and started again".into(),
            )
        }
        "receiver-down" => {
            harness.receiver.down();
            let down = Instant::now();
            tokio::time::sleep(Duration::from_secs(5)).await;
            harness.receiver.up().await?;
            Injected::down(
                down,
                down.elapsed(),
                "callback receiver refused connections".into(),
            )
        }
        "receiver-slow" => {
            harness.receiver.slow.store(true, Ordering::Relaxed);
            let slow = Instant::now();
            tokio::time::sleep(Duration::from_secs(5)).await;
            harness.receiver.slow.store(false, Ordering::Relaxed);
            Injected::down(
                slow,
                slow.elapsed(),
                format!(
                    "receiver answered after {:?} (callback timeout 1 s)",
                    harness.receiver.delay
                ),
            )
        }
        "cluster-kill-leader"
        | "cluster-freeze-leader"
        | "cluster-stop-follower"
        | "cluster-kill-rejoin" => cluster_fault(harness, fault).await?,
        "poison" => {
            // One over HTTP with a callback, one by AMQP RPC: both clients must be told.
            let _ = send(harness, phase, Kind::HttpAsync, true).await;
            let _ = send(harness, phase, Kind::Amqp, true).await;
            Injected::at(started, "2 poison jobs (the worker aborts on them)".into())
        }
        _ => Injected::at(started, String::new()),
    })
}

/// A fault against one node of the cluster: the leader of the model's job queue (SIGKILL, or
/// SIGSTOP for 15 s, longer than the 10 s net_ticktime), or a follower (a graceful stop, or a
/// SIGKILL), each brought back after it and left to catch up.
async fn cluster_fault(harness: &Harness, fault: &str) -> anyhow::Result<Injected> {
    let cluster = harness.fleet.broker.cluster()?;
    let queue = topology::jobs_queue(&harness.fleet.model);
    let leader = cluster.leader(&queue).await?;
    let follower = cluster
        .node_names()
        .into_iter()
        .find(|n| *n != leader)
        .ok_or_else(|| anyhow::anyhow!("no follower"))?;
    let fallen = Instant::now();
    let (node, note) = match fault {
        "cluster-kill-leader" => {
            cluster.kill(&leader).await?;
            let (new, took) = cluster
                .new_leader(&queue, &leader, Duration::from_secs(60))
                .await?;
            (
                leader.clone(),
                format!(
                    "SIGKILL to the queue's leader {leader}; {new} leads after {:.2} s",
                    took.as_secs_f64()
                ),
            )
        }
        "cluster-freeze-leader" => {
            cluster.freeze(&leader).await?;
            let elected = cluster
                .new_leader(&queue, &leader, Duration::from_secs(14))
                .await;
            let remaining = Duration::from_secs(15).saturating_sub(fallen.elapsed());
            tokio::time::sleep(remaining).await;
            cluster.thaw(&leader).await?;
            let election = match elected {
                Ok((new, took)) => format!("{new} leads after {:.2} s", took.as_secs_f64()),
                Err(_) => "no new leader seen while it was frozen".into(),
            };
            (
                leader.clone(),
                format!(
                    "SIGSTOP to the queue's leader {leader} for 15 s (net_ticktime 10 s, autoheal); {election}"
                ),
            )
        }
        "cluster-stop-follower" => {
            cluster.stop_node(&follower).await?;
            (
                follower.clone(),
                format!("graceful stop of follower {follower}"),
            )
        }
        _ => {
            cluster.kill(&follower).await?;
            (follower.clone(), format!("SIGKILL to follower {follower}"))
        }
    };
    let frozen_for = fallen.elapsed();
    if fault != "cluster-freeze-leader" {
        // Down for a while under load, then back.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let back = Instant::now();
    // Back in the cluster (a thawed node: once autoheal has restarted it), its queue replicas
    // then catch up from their leaders.
    cluster.start_node(&node).await?;
    let downtime = if fault == "cluster-freeze-leader" {
        frozen_for
    } else {
        back - fallen
    };
    Ok(Injected::down(
        fallen,
        downtime,
        format!(
            "{note}; {node} back in the cluster {:.1} s later",
            back.elapsed().as_secs_f64()
        ),
    ))
}

/// A worker holding jobs at this moment (by a heartbeat under 500 ms old), waiting up to 10 s
/// for one; none if no worker held jobs in that time.
async fn busy_worker(harness: &Harness) -> Result<(u32, String, u64), String> {
    let started = Instant::now();
    let (mut polls, mut known, mut fresh_busy) = (0u64, 0usize, 0u64);
    while started.elapsed() < Duration::from_secs(10) {
        let workers = harness.fleet.autoscaler.workers();
        let beats = lock(&harness.heartbeats).clone();
        polls += 1;
        known = known.max(
            workers
                .iter()
                .filter(|(_, id)| beats.contains_key(id))
                .count(),
        );
        fresh_busy += beats
            .values()
            .filter(|(n, at)| *n > 0 && at.elapsed() < Duration::from_millis(500))
            .count() as u64;
        let busy = workers.iter().find_map(|(pid, id)| {
            let (n, at) = beats.get(id)?;
            (*n > 0 && at.elapsed() < Duration::from_millis(500)).then(|| (*pid, id.clone(), *n))
        });
        if let Some(busy) = busy {
            return Ok(busy);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(format!(
        "no worker held jobs within 10 s ({polls} looks; at most {known} running workers with heartbeats; {fresh_busy} fresh busy heartbeats of any worker): the fault was not applied"
    ))
}

/// Whether process `pid` is gone (no such process, or a zombie not yet reaped).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Sends `sig` to a worker with jobs in hand; the fault takes effect when the process is gone
/// (at once for SIGKILL, after its drain for SIGTERM). A release worker serves the steady load's
/// small images in a few milliseconds, idle between them at every heartbeat: a burst of jobs
/// (counted in the phase like the others) first gives the workers work to be caught holding.
async fn signal_busy_worker(harness: &Arc<Harness>, phase: usize, sig: &str) -> Injected {
    for i in 0..60 {
        drop(send(harness, phase, kind_of(i), false));
    }
    let (pid, id, n) = match busy_worker(harness).await {
        Ok(busy) => busy,
        Err(why) => {
            return Injected {
                applied: false,
                ..Injected::at(Instant::now(), why)
            };
        }
    };
    let signalled = Instant::now();
    fleet::signal(pid, sig);
    while !gone(pid) && signalled.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Injected::at(
        Instant::now(),
        format!(
            "SIG{sig} to {id} holding {n} jobs (heartbeat); process gone {:.2} s later",
            signalled.elapsed().as_secs_f64()
        ),
    )
}

/// The burst was sent at the phase's start (see `scale_in_load`); here: wait, under the steady
/// load, for the pool to scale in. In effect when the first worker has drained and exited.
async fn await_scale_in(harness: &Harness) -> Injected {
    let before = harness.scale_in_baseline.load(Ordering::Relaxed);
    let wait = Instant::now();
    let mut seen = 0;
    while wait.elapsed() < Duration::from_secs(30) {
        seen = harness.fleet.autoscaler.count("worker drained and exited") - before;
        if seen > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Injected {
        applied: seen > 0,
        ..Injected::at(
            Instant::now(),
            format!("{seen} worker(s) scaled in under load"),
        )
    }
}

/// Stops the dispatcher (SIGTERM, or SIGKILL first) and starts a new one on the same ports. In
/// effect when the old process is gone; down until the new one is ready.
async fn restart_dispatcher(harness: &Harness, kill: bool) -> anyhow::Result<Injected> {
    let dispatcher = &harness.fleet.dispatcher;
    if let Some(old) = dispatcher.take() {
        if kill {
            fleet::signal(old.pid(), "KILL");
        }
        // SIGTERM (no-op after SIGKILL) and wait for the exit.
        tokio::task::spawn_blocking(move || drop(old)).await?;
    }
    let down = Instant::now();
    dispatcher.start()?;
    dispatcher.wait_ready().await?;
    Ok(Injected::down(
        down,
        down.elapsed(),
        format!(
            "dispatcher {} and started again",
            if kill { "killed" } else { "stopped" }
        ),
    ))
}

// ---------------------------------------------------------------- the overload

/// The overload: the capacity measured by a burst, then 10x that offered over HTTP.
async fn overload(
    harness: &Arc<Harness>,
    phase: usize,
    notes: &mut Vec<String>,
) -> anyhow::Result<Value> {
    let burst = 150;
    let capacity = measure_capacity(harness, phase, burst).await;
    let target = capacity * 10.0;
    let (duration, bound) = (harness.args.overload, harness.args.queue_max_length);
    notes.push(format!(
        "capacity {capacity:.0} jobs/s (burst of {burst}); offered 10x = {target:.0} jobs/s for {duration:?}"
    ));
    let depth = DepthSampler::start(
        harness.fleet.broker.urls(),
        topology::jobs_queue(&harness.fleet.model),
    );
    let http = &harness.http;
    let before_retry_after = http.too_many_retry_after.load(Ordering::Relaxed);
    let before_429 = http.too_many.load(Ordering::Relaxed);
    let offered = offer(harness, phase, target, duration).await;
    let peak_depth = depth.stop().await;
    let n429 = http.too_many.load(Ordering::Relaxed) - before_429;
    let with_retry_after = http.too_many_retry_after.load(Ordering::Relaxed) - before_retry_after;
    notes.push(format!(
        "achieved {offered:.0} jobs/s offered ({:.1}x capacity); {n429} answered 429 ({with_retry_after} with Retry-After); peak queue depth {peak_depth} (bound {bound})",
        offered / capacity,
    ));
    Ok(json!({
        "capacity_jobs_s": capacity,
        "offered_jobs_s": offered,
        "answered_429": n429,
        "with_retry_after": with_retry_after,
        "peak_queue_depth": peak_depth,
        "queue_max_length": bound,
    }))
}

/// Jobs/s: a burst of AMQP jobs at once, timed until all are answered (at most `--settle`).
async fn measure_capacity(harness: &Arc<Harness>, phase: usize, burst: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..burst)
        .map(|_| send(harness, phase, Kind::Amqp, false))
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    loop {
        let answered = lock(&harness.ledger)
            .values()
            .filter(|j| j.phase == phase && !j.deliveries.is_empty())
            .count();
        if answered >= burst || started.elapsed() > harness.args.settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    burst as f64 / started.elapsed().as_secs_f64()
}

/// Offers HTTP jobs with callbacks at `target`/s for `duration` (missed ticks sent in a burst);
/// returns the rate achieved.
async fn offer(harness: &Arc<Harness>, phase: usize, target: f64, duration: Duration) -> f64 {
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / target));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let mut sent = 0usize;
    while started.elapsed() < duration {
        ticker.tick().await;
        tasks.push(send(harness, phase, Kind::HttpAsync, false));
        sent += 1;
    }
    let offered_for = started.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    sent as f64 / offered_for
}

/// The peak ready count of a queue, sampled every 100 ms until `stop`.
struct DepthSampler {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DepthSampler {
    fn start(urls: Vec<String>, queue: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let (stopped, depth) = (stop.clone(), peak.clone());
        let task = tokio::spawn(async move {
            let Ok(c) = fleet::connect_any(&urls).await else {
                return;
            };
            let Ok(ch) = c.create_channel().await else {
                return;
            };
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = fleet::ready_messages(&ch, &queue).await {
                    depth.fetch_max(u64::from(n), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { stop, peak, task }
    }

    /// Stops sampling; the peak seen.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.peak.load(Ordering::Relaxed)
    }
}
