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
use lapin::{Connection, ConnectionProperties};
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
            if let Some(pid) = fleet.node.pid() {
                roles.push(("rabbitmq".into(), pid));
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
pub(super) async fn dead_letters(url: &str, model: &str) -> anyhow::Result<Vec<(String, String)>> {
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
pub(super) fn answered(job: &Job) -> bool {
    match job.kind {
        Kind::Amqp => !job.deliveries.is_empty(),
        Kind::HttpAsync | Kind::HttpSync => !job.deliveries.is_empty() && job.visible.is_some(),
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
    /// When the fault was injected (recovery counts from here).
    pub(super) fault_started: Instant,
    /// The autoscaler's events before the phase.
    pub(super) before: AutoscalerEvents,
    /// The overload's figures (null for the other faults).
    pub(super) overload: Value,
    pub(super) notes: Vec<String>,
    pub(super) dead_letters: Vec<(String, String)>,
    pub(super) peaks: Peaks,
}

/// The phase's row of chaos.json (docs/chaos.md explains the fields).
pub(super) fn phase_row(harness: &Harness, record: PhaseRecord<'_>) -> Value {
    let mut notes = record.notes;
    let dead_ids: HashMap<String, String> = record.dead_letters.into_iter().collect();
    let (tally, recovery) = {
        let ledger = lock(&harness.ledger);
        let jobs: Vec<&Job> = ledger
            .values()
            .filter(|j| j.phase == record.phase)
            .collect();
        let tally = Tally::of(&jobs, &dead_ids, &mut notes);
        (tally, recovery(&jobs, record.fault_started))
    };
    let after = AutoscalerEvents::read(&harness.fleet.autoscaler);
    let restarts = after.restarts - record.before.restarts;
    let scale_ins = after.scale_ins - record.before.scale_ins;
    if restarts > 0 {
        notes.push(format!("{restarts} worker(s) died and were replaced"));
    }
    if tally.ordinary_dead_lettered > 0 {
        notes.push(format!(
            "{} ordinary job(s) dead-lettered beside the poison (counted lost)",
            tally.ordinary_dead_lettered
        ));
    }
    if tally.unconfirmed_answered > 0 {
        notes.push(format!(
            "{} job(s) whose publish was not confirmed were answered anyway",
            tally.unconfirmed_answered
        ));
    }
    let peaks = lock(&record.peaks).clone();
    json!({
        "fault": record.fault,
        "sent": tally.sent,
        "accepted": tally.accepted,
        "rejected": tally.rejected,
        "rejected_reasons": tally.rejected_reasons,
        "answered": tally.answered + tally.dead_lettered_poison,
        "dead_lettered_poison": tally.dead_lettered_poison,
        "poison_not_dead_lettered": tally.poison_not_dead_lettered,
        "lost": tally.lost + tally.poison_not_dead_lettered,
        "ordinary_jobs_dead_lettered": tally.ordinary_dead_lettered,
        "lost_examples": tally.lost_examples,
        "duplicate_deliveries": tally.duplicate_deliveries,
        "jobs_with_duplicate_deliveries": tally.jobs_with_duplicate_deliveries,
        "duplicate_answers": tally.duplicate_answers,
        "recovery_s": recovery,
        "phase_s": record.began.elapsed().as_secs_f64(),
        "peak_rss_mb": peaks,
        "overload": record.overload,
        "scale_ins": scale_ins,
        "notes": notes,
    })
}

/// From the fault's start to the first answer to a job sent after it, in seconds.
fn recovery(jobs: &[&Job], fault_started: Instant) -> Option<f64> {
    jobs.iter()
        .filter(|j| j.sent_at >= fault_started)
        .flat_map(|j| j.deliveries.iter().chain(j.inline.iter()).map(|a| a.at))
        .min()
        .map(|at| at.duration_since(fault_started).as_secs_f64())
}

/// One phase's jobs, counted.
#[derive(Default)]
struct Tally {
    sent: usize,
    accepted: usize,
    rejected: usize,
    rejected_reasons: BTreeMap<String, usize>,
    /// Not confirmed, yet answered.
    unconfirmed_answered: usize,
    /// Ordinary jobs answered.
    answered: usize,
    /// Ordinary jobs accepted and never answered.
    lost: usize,
    lost_examples: Vec<String>,
    dead_lettered_poison: usize,
    poison_not_dead_lettered: usize,
    ordinary_dead_lettered: usize,
    duplicate_deliveries: usize,
    jobs_with_duplicate_deliveries: usize,
    duplicate_answers: usize,
}

impl Tally {
    /// Counts `jobs`; notes what became of the poison jobs.
    fn of(jobs: &[&Job], dead_ids: &HashMap<String, String>, notes: &mut Vec<String>) -> Self {
        let mut tally = Self {
            sent: jobs.len(),
            rejected: jobs.iter().filter(|j| j.rejected.is_some()).count(),
            unconfirmed_answered: jobs
                .iter()
                .filter(|j| j.accepted.is_none() && !j.deliveries.is_empty())
                .count(),
            ..Self::default()
        };
        for why in jobs.iter().filter_map(|j| j.rejected.as_ref()) {
            *tally.rejected_reasons.entry(why.clone()).or_default() += 1;
        }
        for job in jobs.iter().filter(|j| j.accepted.is_some()) {
            tally.accepted += 1;
            let id = job.accepted.clone().unwrap_or_default();
            if job.poison {
                tally.count_poison(job, dead_ids.get(&id), notes);
            } else {
                tally.count_ordinary(job, &id, dead_ids);
            }
        }
        tally
    }

    /// A poison job must be dead-lettered, kept for operators, and its client told once with an
    /// error.
    fn count_poison(&mut self, job: &Job, dead_reason: Option<&String>, notes: &mut Vec<String>) {
        let told = answered(job)
            && job.deliveries.len() == 1
            && job.deliveries.iter().all(|a| a.status == "error");
        match dead_reason {
            Some(reason) if told => {
                self.dead_lettered_poison += 1;
                notes.push(format!(
                    "poison job ({:?}) dead-lettered, x-death reason `{reason}`, its client answered `error`",
                    job.kind
                ));
            }
            Some(reason) => {
                self.poison_not_dead_lettered += 1;
                notes.push(format!(
                    "poison job ({:?}) dead-lettered (`{reason}`) but its client got {} answer(s)",
                    job.kind,
                    job.deliveries.len()
                ));
            }
            None => self.poison_not_dead_lettered += 1,
        }
    }

    /// An ordinary job must be answered, once, with one job id and one status.
    fn count_ordinary(&mut self, job: &Job, id: &str, dead_ids: &HashMap<String, String>) {
        if dead_ids.contains_key(id) {
            self.ordinary_dead_lettered += 1;
        }
        if answered(job) {
            self.answered += 1;
        } else {
            self.lost += 1;
            if self.lost_examples.len() < 5 {
                self.lost_examples.push(format!(
                    "{:?} {id}: {} deliveries, visible {:?}, inline {:?}",
                    job.kind,
                    job.deliveries.len(),
                    job.visible,
                    job.inline.as_ref().map(|a| &a.status)
                ));
            }
        }
        if job.deliveries.len() > 1 {
            self.duplicate_deliveries += job.deliveries.len() - 1;
            self.jobs_with_duplicate_deliveries += 1;
        }
        let answers = || job.deliveries.iter().chain(job.inline.iter());
        let ids: HashSet<&str> = answers()
            .map(|a| a.job_id.as_str())
            .chain(std::iter::once(id))
            .collect();
        let statuses: HashSet<&str> = answers().map(|a| a.status.as_str()).collect();
        if ids.len() > 1 || statuses.len() > 1 {
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
    Ok(())
}

/// The faults table of chaos.md.
fn table(rows: &[Value]) -> String {
    let mut out = String::from(
        "| fault | sent | accepted | rejected | answered | lost | duplicate deliveries | duplicate answers | recovery s | notes |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let recovery = r["recovery_s"]
            .as_f64()
            .map(|s| format!("{s:.2}"))
            .unwrap_or_else(|| "-".into());
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

    fn job(kind: Kind, poison: bool, accepted: Option<&str>, answers: &[(&str, &str)]) -> Job {
        Job {
            kind,
            phase: 0,
            poison,
            sent_at: Instant::now(),
            accepted: accepted.map(str::to_string),
            rejected: accepted.is_none().then(|| "429 queue_full".to_string()),
            inline: None,
            deliveries: answers
                .iter()
                .map(|(id, status)| Answer {
                    job_id: id.to_string(),
                    status: status.to_string(),
                    at: Instant::now(),
                })
                .collect(),
            visible: Some("done".into()),
        }
    }

    #[test]
    fn a_tally_tells_lost_duplicated_rejected_and_dead_lettered_jobs_apart() {
        let jobs = [
            job(Kind::Amqp, false, Some("a"), &[("a", "done")]),
            job(Kind::Amqp, false, Some("b"), &[]),
            job(
                Kind::HttpAsync,
                false,
                Some("c"),
                &[("c", "done"), ("c", "done")],
            ),
            job(
                Kind::HttpAsync,
                false,
                Some("d"),
                &[("d", "done"), ("x", "done")],
            ),
            job(Kind::HttpSync, false, None, &[]),
            job(Kind::Amqp, true, Some("p"), &[("p", "error")]),
            job(Kind::Amqp, true, Some("q"), &[("q", "error")]),
        ];
        let jobs: Vec<&Job> = jobs.iter().collect();
        let dead = HashMap::from([("p".to_string(), "delivery_limit".to_string())]);
        let mut notes = Vec::new();
        let t = Tally::of(&jobs, &dead, &mut notes);
        assert_eq!((t.sent, t.accepted, t.rejected), (7, 6, 1));
        assert_eq!(t.rejected_reasons.get("429 queue_full"), Some(&1));
        assert_eq!((t.answered, t.lost, t.lost_examples.len()), (3, 1, 1));
        assert_eq!(
            (t.duplicate_deliveries, t.jobs_with_duplicate_deliveries),
            (2, 2)
        );
        assert_eq!(
            t.duplicate_answers, 1,
            "only the job answered under two ids"
        );
        assert_eq!((t.dead_lettered_poison, t.poison_not_dead_lettered), (1, 1));
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    #[test]
    fn the_table_lists_each_note_once_and_the_rejection_reasons() {
        let row = json!({"fault": "overload", "notes": ["a", "b", "a"],
            "rejected_reasons": {"429 queue_full": 3}});
        assert_eq!(table_notes(&row), ["a", "b", "rejected: 3 429 queue_full"]);
        assert!(table(&[row]).contains("| overload |"));
    }
}
