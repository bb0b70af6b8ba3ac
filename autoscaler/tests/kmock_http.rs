//! The real binary, kubernetes backend, over HTTP against the PyPI `kmock` Kubernetes API
//! emulator with a kubeconfig (tests/clients/kmock_cluster.py, kmock_rollout.py), and the real
//! broker.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn the_binary_takes_the_lease_scales_the_deployment_and_reports_through_a_kubeconfig() {
    let root = ember_testkit::root();
    let model = format!("kmock-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let output = Command::new(root.join(".venv/bin/python"))
        .current_dir(&root)
        .arg("tests/clients/kmock_cluster.py")
        .args(["--autoscaler", env!("CARGO_BIN_EXE_ember-autoscaler")])
        .args(["--model", &model, "--jobs", "50", "--timeout", "60"])
        .output()
        .expect("run scripts/setup first: it creates .venv with kmock");
    assert!(
        output.status.success(),
        "kmock scenario failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // The script publishes the 50 jobs at once, right after the autoscaler has read the queue
    // empty: the next reading (one 200 ms tick later) sees all 50 arrive, hundreds of jobs/s on
    // top of 50 / 5 s of backlog, at an assumed 10 jobs/s per replica: far past the pool's max (4).
    assert_eq!(seen["replicas"], 4, "{seen}");
    let status = &seen["status"];
    assert_eq!(status["desiredReplicas"], 4);
    assert_eq!(status["readyJobs"], 50);
    assert_eq!(status["lastDecision"], "0 -> 4");
    assert_eq!(status["lastReason"], "wake");
    assert_eq!(seen["event"]["reason"], "ScaledUp");
    assert_eq!(seen["event"]["regarding"]["name"], "ssd");
    assert!(seen["event"]["note"].as_str().unwrap().contains("at_max"));
    // The previous holder's lease had expired: taken over, transitions counted.
    assert_eq!(seen["lease_holder"], "autoscaler-under-test");
    assert_eq!(seen["lease_transitions"], 5);
}

#[test]
fn the_binary_rolls_a_new_model_version_out_and_a_broken_one_back() {
    let root = ember_testkit::root();
    let model = format!("kmock-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let output = Command::new(root.join(".venv/bin/python"))
        .current_dir(&root)
        .arg("tests/clients/kmock_rollout.py")
        .args(["--autoscaler", env!("CARGO_BIN_EXE_ember-autoscaler")])
        .args(["--model", &model, "--timeout", "90"])
        .output()
        .expect("run scripts/setup first: it creates .venv with kmock");
    assert!(
        output.status.success(),
        "kmock rollout scenario failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    // Version 1 was on the template already: adopted without a write.
    assert_eq!(seen["adopted_generation"], 1, "{seen}");
    // v1 -> v2 completes; v3's pods never become ready: back to v2, and v3 is not tried again.
    assert_eq!(
        seen["phases"],
        serde_json::json!([
            "2:Progressing",
            "2:Complete",
            "3:Progressing",
            "3:RolledBack"
        ]),
        "{seen}"
    );
    assert_eq!(
        seen["templates"],
        serde_json::json!(["1", "2", "3", "2"]),
        "{seen}"
    );
    assert_eq!(
        seen["final_generation"], seen["rolled_back_generation"],
        "no write after the rollback"
    );
    assert_eq!(seen["final_template_version"], "2");
    let reasons: Vec<(&str, &str)> = seen["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["reason"].as_str().unwrap(), e["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("RolloutStarted", "Normal"),
            ("RolloutComplete", "Normal"),
            ("RolloutStarted", "Normal"),
            ("RolledBack", "Warning"),
        ],
        "{seen}"
    );
    let warning = seen["events"][3]["note"].as_str().unwrap();
    assert!(
        warning.starts_with("v3: 0/2 new pods ready after "),
        "{warning}"
    );
    assert!(warning.ends_with(" s; rolled back to v2"), "{warning}");
    let status = &seen["model"];
    assert_eq!(status["current"]["version"], "2");
    assert_eq!(status["previous"]["version"], "1");
    assert_eq!(status["failed"]["version"], "3");
    assert_eq!(status["rollout"]["phase"], "RolledBack");
    assert_eq!(status["rollout"]["message"], warning);
}
