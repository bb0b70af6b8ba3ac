//! The real binary, kubernetes backend, over HTTP against the PyPI `kmock` Kubernetes API
//! emulator with a kubeconfig (tests/clients/kmock_cluster.py), and the real broker.
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
