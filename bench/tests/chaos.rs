//! The chaos suite at small counts: `ember-bench chaos` runs every fault against a fleet of the
//! real binaries on a private RabbitMQ node (its own test binary: it restarts that node). Every
//! job is counted by its final outcome, and every ordinary job must end `ok` or in an outcome its
//! fault explains (a refusal under overload, say); never an error, a dead letter, no answer or
//! two different answers. docs/chaos.md has the larger run.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs `ember-bench chaos` with `args` into a directory of its own; its chaos.json.
fn run_chaos(name: &str, args: &[&str]) -> (Value, std::path::PathBuf) {
    let bench = Path::new(env!("CARGO_BIN_EXE_ember-bench"));
    for part in ["ember-worker", "ember-dispatcher", "ember-autoscaler"] {
        assert!(
            bench.with_file_name(part).is_file(),
            "{part} is missing beside {}: run the tests with --workspace (scripts/test does) so every binary is built",
            bench.display()
        );
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let root = ember_testkit::root();
    let status = Command::new(bench)
        .current_dir(&root)
        .args(["--out", out.to_str().unwrap(), "chaos"])
        .args([
            "--jobs",
            "24",
            "--rate",
            "15",
            "--overload",
            "8s",
            "--settle",
            "90s",
        ])
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "ember-bench chaos failed: {status:?}");
    let doc: Value =
        serde_json::from_slice(&std::fs::read(out.join("chaos.json")).unwrap()).unwrap();
    (doc, out)
}

#[test]
fn every_fault_loses_nothing_and_answers_nothing_twice() {
    let (doc, out) = run_chaos("chaos", &["--amqp-port", "5683"]);
    let faults = doc["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 11, "every fault ran: {doc:#}");
    check(faults, &out);
}

/// A three-node cluster losing its queue leader (killed, frozen past the net tick time), a
/// follower stopped, a node killed and brought back: no confirmed job lost, none answered twice.
#[test]
fn a_broker_cluster_losing_a_node_loses_nothing() {
    let (doc, out) = run_chaos("chaos-cluster", &["--cluster", "--amqp-port", "5693"]);
    let faults = doc["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 4, "every cluster fault ran: {doc:#}");
    check(faults, &out);
}

/// Every fault's row: applied; every ordinary job `ok` or in an outcome its fault explains; none
/// lost or answered twice; each fault's own checks.
fn check(faults: &[Value], out: &Path) {
    let mut failures = Vec::new();
    for f in faults {
        let name = f["fault"].as_str().unwrap();
        let n = |k: &str| f[k].as_u64().unwrap_or(u64::MAX);
        if f["fault_applied"] != true {
            failures.push(format!(
                "{name}: the fault was not applied ({})",
                f["notes"]
            ));
        }
        // Every ordinary job ends `ok`, or in an outcome its fault explains (the row lists
        // them, with why): an error answer, a refusal, a dead letter or no answer fails.
        let unexpected = f["unexpected_outcomes"].as_object().unwrap();
        if !unexpected.is_empty() {
            failures.push(format!(
                "{name}: ordinary jobs ended in {} (allowed besides ok: {}; examples {})",
                f["unexpected_outcomes"], f["allowed_outcomes"], f["lost_examples"]
            ));
        }
        if n("lost") != 0 {
            failures.push(format!(
                "{name}: {} accepted job(s) without a final answer (examples {}; notes {})",
                n("lost"),
                f["lost_examples"],
                f["notes"]
            ));
        }
        if n("duplicate_answers") != 0 {
            failures.push(format!(
                "{name}: {} job(s) answered twice with different answers",
                n("duplicate_answers")
            ));
        }
        if f["outcomes"]["ok"].as_u64().unwrap_or(0) == 0 {
            failures.push(format!("{name}: no job was answered ok"));
        }
        match name {
            "scale-in" if n("scale_ins") == 0 => {
                failures.push("scale-in: the pool never scaled in during the phase".into())
            }
            "poison" => {
                // Both poison jobs dead-lettered for their delivery limit, each client told
                // once, with the error `dead_lettered`.
                let poison = f["poison"].as_array().unwrap();
                let told_right = poison
                    .iter()
                    .filter(|p| {
                        p["outcome"] == "dead_lettered"
                            && p["x_death_reason"] == "delivery_limit"
                            && p["client_told"] == serde_json::json!(["error:dead_lettered"])
                    })
                    .count();
                if poison.len() != 2 || told_right != 2 {
                    failures.push(format!("poison: {}", f["poison"]));
                }
            }
            "overload" => {
                let o = &f["overload"];
                let (n429, with_retry) = (
                    o["answered_429"].as_u64().unwrap_or(0),
                    o["with_retry_after"].as_u64().unwrap_or(0),
                );
                if n429 == 0 || n429 != with_retry {
                    failures.push(format!(
                        "overload: {n429} answered 429, {with_retry} of them with Retry-After"
                    ));
                }
                // docs/protocol.md: a quorum queue applies x-max-length as its leader applies
                // publishes, so publishes in flight when the bound is reached still land
                // (measured peaks 312 to 352 against 300, docs/chaos.md). The promise is that
                // bound plus what is in flight, not the thousands 10x would queue unbounded.
                let (depth, bound) = (
                    o["peak_queue_depth"].as_u64().unwrap_or(u64::MAX),
                    o["queue_max_length"].as_u64().unwrap_or(0),
                );
                if depth > bound + bound / 2 {
                    failures.push(format!(
                        "overload: queue depth {depth} over its bound {bound}"
                    ));
                }
            }
            _ => {}
        }
    }
    assert!(
        failures.is_empty(),
        "chaos suite failures:\n{}\n\nfull report: {}",
        failures.join("\n"),
        out.join("chaos.md").display()
    );
}
