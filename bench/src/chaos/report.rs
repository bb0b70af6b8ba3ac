//! The accounting: every job of a phase counted (answered, lost, rejected, answered twice), the
//! processes' peak memory, the dead letters, and the run's `chaos.json` and `chaos.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_core::topology;
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use serde_json::{Value, json};

use super::clients::{Job, Kind, lock};
use super::{ChaosArgs, Harness};
use crate::fleet::{self, Autoscaler, IsolatedFleet};

/// Peak resident memory per role (MB) while it runs.
pub(super) type Peaks = Arc<Mutex<BTreeMap<String, f64>>>;

/// Samples every process's memory every 250 ms until `stop`.
pub(super) fn sample_memory(fleet: Arc<IsolatedFleet>, stop: Arc<AtomicBool>) -> Peaks {
    let peaks: Peaks = Arc::default();
    let out = peaks.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let mut roles: Vec<(String, u32)> = vec![("autoscaler".into(), fleet.autoscaler.pid())];
            roles.push(("chaos client".into(), std::process::id()));
            if let Some(pid) = fleet.dispatcher.pid() {
                roles.push(("dispatcher".into(), pid));
            }
            for pid in fleet.broker.pids() {
                roles.push(("rabbitmq (each node)".into(), pid));
            }
            for (pid, _) in fleet.autoscaler.workers() {
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

/// Jobs in ember.dead.<model>: (job id, x-death reason).
pub(super) async fn dead_letters(
    urls: &[String],
    model: &str,
) -> anyhow::Result<Vec<(String, String)>> {
    let c = fleet::connect_any(urls).await?;
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

/// Ready messages in each of the model's queues, the retry lane, the dead letters and the shared
/// queues after a phase (a queue that cannot be read shows as null).
pub(super) async fn queue_depths(urls: &[String], model: &str) -> Value {
    let Ok(c) = fleet::connect_any(urls).await else {
        return Value::Null;
    };
    let mut depths = serde_json::Map::new();
    let mut queues: Vec<String> = topology::model_queues(model).to_vec();
    queues.extend(
        [
            "ember.results.store",
            "ember.results.expired",
            topology::CALLBACKS_QUEUE,
            "ember.callbacks.dead",
        ]
        .map(str::to_string),
    );
    for queue in queues {
        // A failed passive declare closes its channel: one channel per queue.
        let depth = match c.create_channel().await {
            Ok(ch) => fleet::ready_messages(&ch, &queue)
                .await
                .map(|n| json!(n))
                .unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        depths.insert(queue, depth);
    }
    Value::Object(depths)
}

/// Whether a job is settled: answered (HTTP: a callback and a visible result; AMQP: a reply).
pub(super) fn answered(job: &Job) -> bool {
    match job.kind {
        Kind::Amqp => !job.deliveries.is_empty(),
        Kind::HttpAsync | Kind::HttpSync => !job.deliveries.is_empty() && job.visible.is_some(),
    }
}

/// What a fault may cause besides `ok` for an ordinary job, and why. Anything else an ordinary
/// job ends in fails the suite (bench/tests/chaos.rs). No phase sets deadlines, so
/// `error:deadline_exceeded` is never expected.
pub(super) fn allowed_outcomes(fault: &str) -> &'static [(&'static str, &'static str)] {
    match fault {
        "overload" => &[
            (
                "refused:queue_full",
                "the phase's point: 10x the capacity against the bounded queue (HTTP 429 with Retry-After)",
            ),
            (
                "refused:nacked",
                "the same for AMQP clients: a nack at the bound",
            ),
        ],
        "scale-in" => &[
            (
                "refused:queue_full",
                "the burst that scales the pool out is twice the queue's bound (HTTP 429)",
            ),
            (
                "refused:nacked",
                "the same burst's AMQP jobs: a nack at the bound",
            ),
        ],
        "cluster-kill-leader"
        | "cluster-freeze-leader"
        | "cluster-stop-follower"
        | "cluster-kill-rejoin" => &[
            (
                "refused:nacked",
                "an AMQP publish the cluster refused while the queue had no leader (or its node was going): the client was told",
            ),
            (
                "refused:unconfirmed",
                "an AMQP publish on a connection to the node that went: its confirm never came, the client was told",
            ),
            (
                "refused:unconfirmed+answered",
                "such a publish that had reached the queue: answered, though its client was told it may not have been",
            ),
        ],
        "broker-stop-app" | "broker-restart" => &[
            (
                "refused:unconfirmed",
                "an AMQP publish in flight as the broker went: its confirm never came, the client was told",
            ),
            (
                "refused:unconfirmed+answered",
                "such a publish that had reached the queue: answered, though its client was told it may not have been (a retry would run it twice)",
            ),
        ],
        _ => &[],
    }
}

/// A refusal's category, from the reason the client recorded.
fn refusal(reason: &str) -> String {
    if reason.starts_with("429 queue_full") {
        "refused:queue_full".into()
    } else if reason.starts_with("nacked") {
        "refused:nacked".into()
    } else if reason.starts_with("unconfirmed") {
        "refused:unconfirmed".into()
    } else if reason.starts_with("gave up") || reason.starts_with("broker unavailable") {
        "refused:gave_up".into()
    } else {
        format!(
            "refused:{}",
            reason
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join("_")
        )
    }
}

/// A job's final outcome: `ok`; `error:<code>`; `dead_lettered`; `refused:<why>` (with
/// `+answered` when it was answered all the same); `never_answered`; or, for an HTTP job with
/// only one of its two answers (the callback, the visible result), `incomplete:<missing>`.
pub(super) fn outcome(job: &Job, dead: &HashMap<String, String>) -> String {
    if let Some(reason) = &job.rejected {
        let refused = refusal(reason);
        let answered_anyway =
            !job.deliveries.is_empty() || job.inline.is_some() || job.visible.is_some();
        return if answered_anyway {
            format!("{refused}+answered")
        } else {
            refused
        };
    }
    let id = job.accepted.as_deref().unwrap_or_default();
    if dead.contains_key(id) {
        return "dead_lettered".into();
    }
    match job.kind {
        Kind::Amqp => job
            .deliveries
            .first()
            .map(|a| a.outcome())
            .unwrap_or_else(|| "never_answered".into()),
        Kind::HttpAsync | Kind::HttpSync => match (job.deliveries.first(), &job.visible) {
            (Some(callback), Some(_)) => callback.outcome(),
            (None, None) => "never_answered".into(),
            (Some(_), None) => "incomplete:no_visible_result".into(),
            (None, Some(_)) => "incomplete:no_callback".into(),
        },
    }
}

/// What the autoscaler has logged so far: workers that died, workers scaled in.
pub(super) struct AutoscalerEvents {
    restarts: usize,
    scale_ins: usize,
}

impl AutoscalerEvents {
    pub(super) fn read(autoscaler: &Autoscaler) -> Self {
        Self {
            restarts: autoscaler.count("worker died"),
            scale_ins: autoscaler.count("worker drained and exited"),
        }
    }
}

/// A phase, run: what its row is made of besides the ledger.
pub(super) struct PhaseRecord<'a> {
    pub(super) fault: &'a str,
    pub(super) phase: usize,
    pub(super) began: Instant,
    /// Whether the fault was applied as meant (a worker fault needs a worker holding jobs).
    pub(super) applied: bool,
    /// When the fault took effect (the process gone, the broker down): recovery counts from
    /// here.
    pub(super) effect_at: Instant,
    /// How long the broken part was unavailable (broker, dispatcher, receiver), if it was.
    pub(super) downtime_s: Option<f64>,
    /// The autoscaler's events before the phase.
    pub(super) before: AutoscalerEvents,
    /// The overload's figures (null for the other faults).
    pub(super) overload: Value,
    pub(super) notes: Vec<String>,
    /// The dead letters read after the phase: (job id, x-death reason).
    pub(super) dead_letters: Vec<(String, String)>,
    /// The broker's queues after the phase (name -> ready messages).
    pub(super) queues: Value,
    pub(super) peaks: Peaks,
}

/// The phase's row of chaos.json (docs/chaos.md explains the fields).
pub(super) fn phase_row(harness: &Harness, record: PhaseRecord<'_>) -> Value {
    let mut notes = record.notes;
    let dead: HashMap<String, String> = record.dead_letters.into_iter().collect();
    let allowed = allowed_outcomes(record.fault);
    let (tally, recovery) = {
        let ledger = lock(&harness.ledger);
        let jobs: Vec<&Job> = ledger
            .values()
            .filter(|j| j.phase == record.phase)
            .collect();
        (Tally::of(&jobs, &dead), recovery(&jobs, record.effect_at))
    };
    let after = AutoscalerEvents::read(&harness.fleet.autoscaler);
    let restarts = after.restarts - record.before.restarts;
    let scale_ins = after.scale_ins - record.before.scale_ins;
    if restarts > 0 {
        notes.push(format!("{restarts} worker(s) died and were replaced"));
    }
    let unexpected: BTreeMap<&String, &usize> = tally
        .outcomes
        .iter()
        .filter(|(o, _)| *o != "ok" && !allowed.iter().any(|(a, _)| a == o))
        .collect();
    let peaks = lock(&record.peaks).clone();
    json!({
        "fault": record.fault,
        "fault_applied": record.applied,
        "sent": tally.sent,
        "accepted": tally.accepted,
        "outcomes": tally.outcomes,
        "allowed_outcomes": allowed.iter().map(|(o, why)| json!({"outcome": o, "why": why})).collect::<Vec<_>>(),
        "unexpected_outcomes": unexpected,
        "rejected_reasons": tally.rejected_reasons,
        "lost": tally.lost,
        "lost_examples": tally.lost_examples,
        "poison": tally.poison,
        "duplicate_deliveries": tally.duplicate_deliveries,
        "jobs_with_duplicate_deliveries": tally.jobs_with_duplicate_deliveries,
        "duplicate_answers": tally.duplicate_answers,
        "downtime_s": record.downtime_s,
        "recovery_s": recovery,
        "phase_s": record.began.elapsed().as_secs_f64(),
        "queues_after": record.queues,
        "peak_rss_mb": peaks,
        "overload": record.overload,
        "scale_ins": scale_ins,
        "notes": notes,
    })
}

/// From the moment the fault took effect to the first answer after it, in seconds.
fn recovery(jobs: &[&Job], effect_at: Instant) -> Option<f64> {
    jobs.iter()
        .flat_map(|j| j.deliveries.iter().chain(j.inline.iter()).map(|a| a.at))
        .filter(|at| *at >= effect_at)
        .min()
        .map(|at| at.duration_since(effect_at).as_secs_f64())
}

/// One phase's jobs, counted by final outcome.
#[derive(Default)]
struct Tally {
    sent: usize,
    accepted: usize,
    /// Ordinary jobs by final outcome ([`outcome`]).
    outcomes: BTreeMap<String, usize>,
    rejected_reasons: BTreeMap<String, usize>,
    /// Accepted ordinary jobs that got no final answer (never answered, incomplete, or
    /// dead-lettered).
    lost: usize,
    lost_examples: Vec<String>,
    /// Each poison job: its outcome, its x-death reason, and what its client was told.
    poison: Vec<Value>,
    duplicate_deliveries: usize,
    jobs_with_duplicate_deliveries: usize,
    /// Jobs whose client saw two different answers (ids or outcomes).
    duplicate_answers: usize,
}

impl Tally {
    fn of(jobs: &[&Job], dead: &HashMap<String, String>) -> Self {
        let mut tally = Self {
            sent: jobs.len(),
            accepted: jobs.iter().filter(|j| j.accepted.is_some()).count(),
            ..Self::default()
        };
        for why in jobs.iter().filter_map(|j| j.rejected.as_ref()) {
            *tally.rejected_reasons.entry(why.clone()).or_default() += 1;
        }
        for job in jobs {
            let id = job.accepted.clone().unwrap_or_default();
            let outcome = outcome(job, dead);
            if job.poison {
                tally.poison.push(json!({
                    "kind": format!("{:?}", job.kind),
                    "outcome": outcome,
                    "x_death_reason": dead.get(&id),
                    "client_told": job.deliveries.iter().map(|a| a.outcome()).collect::<Vec<_>>(),
                }));
                continue;
            }
            if matches!(
                outcome.split(':').next(),
                Some("never_answered" | "incomplete" | "dead_lettered")
            ) {
                tally.lost += 1;
                if tally.lost_examples.len() < 5 {
                    tally.lost_examples.push(format!(
                        "{:?} {id}: {outcome}; {} deliveries, visible {:?}, inline {:?}",
                        job.kind,
                        job.deliveries.len(),
                        job.visible,
                        job.inline.as_ref().map(|a| a.outcome())
                    ));
                }
            }
            *tally.outcomes.entry(outcome).or_default() += 1;
            tally.count_duplicates(job, &id);
        }
        tally
    }

    /// Raw duplicate deliveries (at-least-once callbacks), and answers that disagree.
    fn count_duplicates(&mut self, job: &Job, id: &str) {
        if job.deliveries.len() > 1 {
            self.duplicate_deliveries += job.deliveries.len() - 1;
            self.jobs_with_duplicate_deliveries += 1;
        }
        if job.accepted.is_none() {
            return;
        }
        let answers = || job.deliveries.iter().chain(job.inline.iter());
        let ids: HashSet<&str> = answers()
            .map(|a| a.job_id.as_str())
            .chain(std::iter::once(id))
            .collect();
        let outcomes: HashSet<String> = answers()
            .map(|a| a.outcome())
            .chain(job.visible.iter().cloned())
            .collect();
        if ids.len() > 1 || outcomes.len() > 1 {
            self.duplicate_answers += 1;
        }
    }
}

// ---------------------------------------------------------------- the run's files

/// Prints the tables and writes `<out>/chaos.json` and `<out>/chaos.md`.
pub(super) fn write(
    out: &Path,
    args: &ChaosArgs,
    rows: Vec<Value>,
    run_started: Instant,
) -> anyhow::Result<()> {
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
        "broker": if args.cluster { "three-node RabbitMQ cluster (scripts/rabbitmq-cluster; quorum queues on all three, net_ticktime 10 s, autoheal), every part given all three nodes" } else { "private RabbitMQ node (scripts/rabbitmq-node)" },
        "fleet": "ember-autoscaler local backend (min 2, tick 200 ms), workers --intra-threads 1 --max-batch 4, one ember-dispatcher (callback timeout 1 s), Redis DB of its own",
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
    Ok(())
}

/// The faults table of chaos.md: every job by final outcome.
fn table(rows: &[Value]) -> String {
    let mut out = String::from(
        "| fault | applied | sent | ok | refused | errors | dead-lettered | never answered | duplicate answers | downtime s | recovery s | notes |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let seconds = |v: &Value| {
        v.as_f64()
            .map(|s| format!("{s:.2}"))
            .unwrap_or_else(|| "-".into())
    };
    for r in rows {
        let outcomes = r["outcomes"].as_object().cloned().unwrap_or_default();
        let sum_of = |pick: &dyn Fn(&str) -> bool| -> Vec<String> {
            outcomes
                .iter()
                .filter(|(k, _)| pick(k))
                .map(|(k, v)| format!("{v} {k}"))
                .collect()
        };
        let count = |key: &str| outcomes.get(key).and_then(Value::as_u64).unwrap_or(0);
        let refused = sum_of(&|k| k.starts_with("refused:"));
        let errors = sum_of(&|k| k.starts_with("error:"));
        let never: u64 = outcomes
            .iter()
            .filter(|(k, _)| k.starts_with("never_answered") || k.starts_with("incomplete"))
            .filter_map(|(_, v)| v.as_u64())
            .sum();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r["fault"].as_str().unwrap_or(""),
            if r["fault_applied"].as_bool().unwrap_or(false) {
                "yes"
            } else {
                "**no**"
            },
            r["sent"],
            count("ok"),
            if refused.is_empty() {
                "0".into()
            } else {
                refused.join(", ")
            },
            if errors.is_empty() {
                "0".into()
            } else {
                errors.join(", ")
            },
            count("dead_lettered"),
            never,
            r["duplicate_answers"],
            seconds(&r["downtime_s"]),
            seconds(&r["recovery_s"]),
            table_notes(r).join("; ").replace('|', "/")
        ));
    }
    out
}

/// A row's notes, each once, and its rejection reasons.
fn table_notes(row: &Value) -> Vec<String> {
    let notes: Vec<String> = row["notes"]
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
    if let Some(reasons) = row["rejected_reasons"].as_object()
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
    notes
}

/// The peak-memory table of chaos.md: one column per role.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::clients::Answer;

    fn answer(id: &str, outcome: &str) -> Answer {
        let (status, code) = match outcome.split_once(':') {
            Some((status, code)) => (status, Some(code.to_string())),
            None => (outcome, None),
        };
        Answer {
            job_id: id.to_string(),
            status: status.to_string(),
            code,
            at: Instant::now(),
        }
    }

    fn job(kind: Kind, poison: bool, accepted: Option<&str>, answers: &[(&str, &str)]) -> Job {
        let http = kind != Kind::Amqp;
        Job {
            kind,
            phase: 0,
            poison,
            accepted: accepted.map(str::to_string),
            rejected: accepted.is_none().then(|| "429 queue_full".to_string()),
            inline: None,
            deliveries: answers.iter().map(|(id, o)| answer(id, o)).collect(),
            visible: (http && !answers.is_empty()).then(|| answers[0].1.to_string()),
        }
    }

    #[test]
    fn every_job_is_counted_by_its_final_outcome() {
        let mut callback_only = job(Kind::HttpAsync, false, Some("f"), &[("f", "ok")]);
        callback_only.visible = None;
        let mut unconfirmed = job(Kind::Amqp, false, None, &[("u", "ok")]);
        unconfirmed.rejected = Some("unconfirmed: no confirm in 30 s".into());
        let jobs = [
            job(Kind::Amqp, false, Some("a"), &[("a", "ok")]),
            job(Kind::Amqp, false, Some("b"), &[]),
            job(
                Kind::HttpAsync,
                false,
                Some("c"),
                &[("c", "ok"), ("c", "ok")],
            ),
            job(
                Kind::HttpAsync,
                false,
                Some("d"),
                &[("d", "ok"), ("x", "ok")],
            ),
            job(Kind::HttpSync, false, None, &[]),
            job(Kind::Amqp, false, Some("e"), &[("e", "error:internal")]),
            callback_only,
            unconfirmed,
            // An ordinary job dead-lettered beside the poison: not answered, whatever it got.
            job(
                Kind::Amqp,
                false,
                Some("g"),
                &[("g", "error:dead_lettered")],
            ),
            job(Kind::Amqp, true, Some("p"), &[("p", "error:dead_lettered")]),
        ];
        let jobs: Vec<&Job> = jobs.iter().collect();
        let dead = HashMap::from([
            ("p".to_string(), "delivery_limit".to_string()),
            ("g".to_string(), "delivery_limit".to_string()),
        ]);
        let t = Tally::of(&jobs, &dead);
        assert_eq!((t.sent, t.accepted), (10, 8));
        let outcomes: Vec<(&str, usize)> =
            t.outcomes.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(
            outcomes,
            [
                ("dead_lettered", 1),
                ("error:internal", 1),
                ("incomplete:no_visible_result", 1),
                ("never_answered", 1),
                ("ok", 3),
                ("refused:queue_full", 1),
                ("refused:unconfirmed+answered", 1),
            ]
        );
        assert_eq!((t.lost, t.lost_examples.len()), (3, 3));
        assert_eq!(
            (t.duplicate_deliveries, t.jobs_with_duplicate_deliveries),
            (2, 2)
        );
        assert_eq!(
            t.duplicate_answers, 1,
            "only the job answered under two ids"
        );
        assert_eq!(t.poison.len(), 1);
        assert_eq!(t.poison[0]["outcome"], "dead_lettered");
        assert_eq!(t.poison[0]["x_death_reason"], "delivery_limit");
        assert_eq!(t.poison[0]["client_told"], json!(["error:dead_lettered"]));
    }

    #[test]
    fn refusals_fall_into_categories_and_only_some_faults_explain_them() {
        assert_eq!(refusal("429 queue_full"), "refused:queue_full");
        assert_eq!(refusal("nacked"), "refused:nacked");
        assert_eq!(refusal("unconfirmed: io error"), "refused:unconfirmed");
        assert_eq!(refusal("gave up after 30 s: 503 x"), "refused:gave_up");
        assert_eq!(refusal("500 internal"), "refused:500_internal");
        let explains = |fault: &str, o: &str| allowed_outcomes(fault).iter().any(|(a, _)| *a == o);
        assert!(explains("overload", "refused:queue_full"));
        assert!(!explains("worker-sigkill", "refused:queue_full"));
        assert!(explains("broker-restart", "refused:unconfirmed"));
        assert!(!explains("dispatcher-sigkill", "refused:unconfirmed"));
        for fault in super::super::FAULTS
            .iter()
            .chain(super::super::CLUSTER_FAULTS)
        {
            assert!(!explains(fault, "error:internal"), "{fault}");
            assert!(!explains(fault, "never_answered"), "{fault}");
        }
    }

    #[test]
    fn the_table_lists_each_note_once_and_the_rejection_reasons() {
        let row = json!({"fault": "overload", "fault_applied": true, "notes": ["a", "b", "a"],
            "outcomes": {"ok": 5, "refused:queue_full": 3, "error:internal": 1},
            "rejected_reasons": {"429 queue_full": 3}});
        assert_eq!(table_notes(&row), ["a", "b", "rejected: 3 429 queue_full"]);
        let table = table(&[row]);
        assert!(
            table.contains(
                "| overload | yes | null | 5 | 3 refused:queue_full | 1 error:internal |"
            ),
            "{table}"
        );
    }
}
