//! The chaos suite at small counts: `ember-bench chaos` runs every fault against a fleet of the
//! real binaries on a private RabbitMQ node (its own test binary: it restarts that node), and
//! every job must be answered once or rejected up front. docs/chaos.md has the larger run.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use serde_json::Value;

#[test]
fn every_fault_loses_nothing_and_answers_nothing_twice() {
    let bench = Path::new(env!("CARGO_BIN_EXE_ember-bench"));
    for part in ["ember-worker", "ember-dispatcher", "ember-autoscaler"] {
        assert!(
            bench.with_file_name(part).is_file(),
            "{part} is missing beside {}: run the tests with --workspace (scripts/test does) so every binary is built",
            bench.display()
        );
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos");
    let root = ember_testkit::root();
    let status = Command::new(bench)
        .current_dir(&root)
        .args(["--out", out.to_str().unwrap(), "chaos"])
        .args(["--jobs", "24", "--rate", "15", "--overload", "8s"])
        .args(["--settle", "90s", "--amqp-port", "5683"])
        .status()
        .unwrap();
    assert!(status.success(), "ember-bench chaos failed: {status:?}");
    let doc: Value =
        serde_json::from_slice(&std::fs::read(out.join("chaos.json")).unwrap()).unwrap();
    let faults = doc["faults"].as_array().unwrap();
    assert_eq!(faults.len(), 11, "every fault ran: {doc:#}");
    let mut failures = Vec::new();
    for f in faults {
        let name = f["fault"].as_str().unwrap();
        let n = |k: &str| f[k].as_u64().unwrap_or(u64::MAX);
        if n("lost") != 0 {
            failures.push(format!(
                "{name}: {} accepted job(s) never answered (examples {}; notes {})",
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
        if n("accepted") == 0 {
            failures.push(format!("{name}: nothing was accepted"));
        }
        match name {
            "scale-in" if n("scale_ins") == 0 => {
                failures.push("scale-in: the pool never scaled in during the phase".into())
            }
            "poison" if n("dead_lettered_poison") != 2 => failures.push(format!(
                "poison: {} of 2 poison jobs dead-lettered with a reason",
                n("dead_lettered_poison")
            )),
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
                // Quorum queues apply x-max-length a little late (the publishes in flight when
                // the limit is reached still land: 308 to 352 seen against 300). Bounded means
                // near the limit, not the thousands that 10x for the whole phase would queue.
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
