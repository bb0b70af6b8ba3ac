//! `ember-offline`: the worker's decode -> batch -> infer -> postprocess path fed from files, no
//! broker — what the GPU check runs on a lent GPU machine. Here on CPU, with the real model.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

use ember_testkit::root;

fn offline(args: &[&str]) -> (Output, Option<serde_json::Value>) {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("offline-{}.json", uuid::Uuid::new_v4().simple()));
    let output = Command::new(env!("CARGO_BIN_EXE_ember-offline"))
        .current_dir(root())
        .args(["--intra-threads", "1", "--out"])
        .arg(&out)
        .args(args)
        .env("EMBER_LOG", "info,ort=warn")
        .output()
        .unwrap();
    let report = std::fs::read(&out)
        .ok()
        .map(|json| serde_json::from_slice(&json).unwrap());
    (output, report)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_offline_pipeline_measures_resident_batches_and_the_reload_baseline_on_real_images() {
    let (output, report) = offline(&["--batches", "1,3", "--jobs", "6", "--reload-jobs", "2"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let report = report.unwrap();
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["device_fallback"], false);
    assert_eq!(report["images"], 4);
    assert!(report["gpu"].is_null());
    // The sample photos' known answers, through the same path the worker serves.
    let check = report["check"].as_array().unwrap();
    let found = |image: &str| -> Vec<(String, f64)> {
        let entry = check.iter().find(|c| c["image"] == image).unwrap();
        entry["detections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["label"].as_str().unwrap().to_string(),
                    d["score"].as_f64().unwrap(),
                )
            })
            .collect()
    };
    assert!(
        matches!(found("astronaut.png").as_slice(), [(label, score)] if label == "person" && *score > 0.8)
    );
    assert!(
        matches!(found("camera.png").as_slice(), [(label, score)] if label == "person" && *score > 0.9)
    );
    assert!(found("chelsea.png").is_empty());
    assert!(found("coffee.png").is_empty());

    let resident = report["resident"].as_array().unwrap();
    let batches: Vec<(u64, u64, u64)> = resident
        .iter()
        .map(|r| {
            (
                r["batch"].as_u64().unwrap(),
                r["jobs"].as_u64().unwrap(),
                r["batches_run"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(batches, vec![(1, 6, 6), (3, 6, 2)]);
    for run in resident {
        let latency = &run["latency_ms"];
        assert!(latency["p50"].as_f64().unwrap() > 0.0);
        assert!(latency["p95"].as_f64().unwrap() >= latency["p50"].as_f64().unwrap());
        // session.run is part of each batch's round trip.
        assert!(run["inference_ms"]["p50"].as_f64().unwrap() <= latency["max"].as_f64().unwrap());
        assert!(run["throughput_jobs_per_s"].as_f64().unwrap() > 0.0);
    }
    assert_eq!(report["reload_per_job"]["jobs"], 2);
    assert!(report["reload_over_resident"].as_f64().unwrap() > 0.0);
}

#[test]
fn cuda_without_a_gpu_names_what_is_missing_and_falls_back_only_when_asked() {
    let (refused, report) = offline(&["--device", "cuda:0", "--synthetic", "1", "--jobs", "1"]);
    assert!(!refused.status.success());
    assert!(report.is_none());
    let log = stderr(&refused);
    // The CPU onnxruntime wheel has no CUDA provider library: the error says which file.
    assert!(
        log.contains("libonnxruntime_providers_cuda.so is missing"),
        "{log}"
    );
    assert!(log.contains("--allow-cpu-fallback"), "{log}");

    let (fallback, report) = offline(&[
        "--device",
        "cuda:0",
        "--allow-cpu-fallback",
        "--synthetic",
        "2",
        "--batches",
        "2",
        "--jobs",
        "2",
        "--reload-jobs",
        "0",
    ]);
    let log = stderr(&fallback);
    assert!(fallback.status.success(), "{log}");
    let report = report.unwrap();
    assert_eq!(report["requested_device"], "cuda:0");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["device_fallback"], true);
    assert!(report["gpu"].is_null());
    assert_eq!(report["resident"][0]["jobs"], 2);
    assert!(log.contains("RUNNING ON CPU"), "{log}");
    // No NVIDIA driver here: one line says there is no GPU telemetry, and that is all.
    assert_eq!(log.matches("no GPU telemetry").count(), 1, "{log}");
}
