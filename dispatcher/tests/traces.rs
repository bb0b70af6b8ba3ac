//! One trace per job across the queue (issue 16): the real dispatcher and worker binaries, with
//! the standard `OTEL_*` variables pointing at a real OTLP/gRPC receiver (the collector's
//! `TraceService` from the official protobuf definitions, `ember_testkit::otlp`), RabbitMQ and
//! Redis. A job sent over HTTP is one trace from the dispatcher's request span to the worker's
//! result publish, every span parented as designed, the client's trace id kept when it sent
//! one; each `session.run` links the job spans of its batch and they link it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use common::Dispatcher;
use ember_testkit::otlp::{OtlpReceiver, ReceivedSpan};
use ember_testkit::process::Process;
use ember_testkit::root;
use serde_json::{Value, json};

const SERVER: i32 = 2;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

fn otel_env(receiver: &OtlpReceiver) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.clone()),
        // Export every 100 ms rather than every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
    ]
}

/// The worker binary (built beside the dispatcher's by `cargo test --workspace`) as a process.
fn worker(model: &str, dir: &Path, env: &[(&str, String)], extra: &[&str]) -> Process {
    let binary = Path::new(env!("CARGO_BIN_EXE_ember-dispatcher")).with_file_name("ember-worker");
    assert!(
        binary.is_file(),
        "{} is missing: run the tests with --workspace (scripts/test does)",
        binary.display()
    );
    let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{model}-worker.log"));
    Process::spawn(
        Command::new(binary)
            .current_dir(root())
            .arg("--model-dir")
            .arg(dir)
            .args(["--model-name", model, "--admin-addr", "127.0.0.1:0"])
            .args(["--intra-threads", "1", "--heartbeat-interval", "200ms"])
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str()))),
        log,
    )
}

fn iris_request(rows: usize) -> Value {
    let data: Vec<f32> = [5.1f32, 3.5, 1.4, 0.2].repeat(rows);
    json!({"inputs": [{"name": "input", "shape": [rows, 4], "datatype": "FP32", "data": data}]})
}

fn named<'a>(spans: &'a [ReceivedSpan], trace: &str, name: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == trace && s.name == name)
        .collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], trace: &str, name: &str) -> &'a ReceivedSpan {
    let found = named(spans, trace, name);
    assert_eq!(found.len(), 1, "one `{name}` in trace {trace}: {spans:#?}");
    found[0]
}

/// The spans of one job's trace, checked: the dispatcher's request span (a child of
/// `client_parent`, or a root), its publish, then in the worker the time in the queue (under
/// the publish), the job's span (a consumer, under the publish) and its steps; the job span
/// links one `session.run`, which links it back. Returns the job span.
fn assert_job_trace<'a>(
    spans: &'a [ReceivedSpan],
    trace: &str,
    request_name: &str,
    client_parent: Option<&str>,
    queue: &str,
) -> &'a ReceivedSpan {
    let request = one(spans, trace, request_name);
    assert_eq!(request.service, "ember-dispatcher");
    assert_eq!(request.kind, SERVER);
    assert_eq!(
        request.parent_span_id,
        client_parent.unwrap_or(""),
        "{request:#?}"
    );
    let publish = one(spans, trace, "publish ember.jobs");
    assert_eq!(publish.service, "ember-dispatcher");
    assert_eq!(publish.kind, PRODUCER);
    assert_eq!(publish.parent_span_id, request.span_id);
    assert_eq!(publish.attributes["messaging.system"], "rabbitmq");
    let queued = one(spans, trace, "queue");
    assert_eq!(queued.service, "ember-worker");
    assert_eq!(
        queued.parent_span_id, publish.span_id,
        "time in the queue follows the publish"
    );
    let job = one(spans, trace, &format!("process {queue}"));
    assert_eq!(job.service, "ember-worker");
    assert_eq!(job.kind, CONSUMER);
    assert_eq!(job.parent_span_id, publish.span_id);
    assert_eq!(
        job.attributes["messaging.message.id"],
        publish.attributes["messaging.message.id"]
    );
    for step in ["decode", "batch wait", "publish result"] {
        let step = one(spans, trace, step);
        assert_eq!(step.service, "ember-worker");
        assert_eq!(step.parent_span_id, job.span_id, "{step:#?}");
    }
    // Its batch's run: a trace of its own, linked both ways.
    assert_eq!(job.links.len(), 1, "{job:#?}");
    let (run_trace, run_id) = &job.links[0];
    let run = spans
        .iter()
        .find(|s| &s.trace_id == run_trace && &s.span_id == run_id)
        .unwrap_or_else(|| panic!("the linked session.run is not among {spans:#?}"));
    assert_eq!(run.name, "session.run");
    assert!(
        run.links
            .contains(&(job.trace_id.clone(), job.span_id.clone())),
        "{run:#?}"
    );
    job
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_is_one_trace_across_dispatcher_queue_and_worker_and_a_batch_links_its_jobs() {
    let _serial = common::serial().await;
    let receiver = OtlpReceiver::start().await;
    let env = otel_env(&receiver);
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let model = ember_testkit::unique_model("traces");
    let dir = root().join("models/iris-classifier");
    let dispatcher = Dispatcher::start_with_env(&model, &dir, &[], &env_refs).await;
    let queue = format!("ember.jobs.{model}");

    // Eight jobs wait in the queue before any worker: the worker (max batch 4) takes them in
    // batches.
    let mut queued = Vec::new();
    for _ in 0..8 {
        let response = dispatcher
            .post(&format!("/v1/models/{model}/jobs"))
            .json(&iris_request(1))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202);
        let body: Value = response.json().await.unwrap();
        queued.push(body["job_id"].as_str().unwrap().to_string());
    }
    // One runtime thread: the deliveries waiting for it are all taken in before any of them is
    // decoded, so the batcher sees the others coming and batches hold four.
    let _worker = worker(
        &model,
        &dir,
        &env,
        &[
            "--max-batch",
            "4",
            "--max-batch-delay",
            "1s",
            "--runtime-threads",
            "1",
        ],
    );
    for id in &queued {
        assert_eq!(dispatcher.wait_done(id).await["status"], "done");
    }

    // One job over HTTP with the client's own trace, one without.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let response = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .header("traceparent", format!("00-{client_trace}-{client_span}-01"))
        .json(&iris_request(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let response = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .json(&iris_request(2))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let infer_route = "POST /v2/models/{model}/infer";
    let jobs_route = "POST /v1/models/{model}/jobs";
    let complete = |spans: &[ReceivedSpan]| {
        let results = spans.iter().filter(|s| s.name == "publish result").count();
        let requests = spans.iter().filter(|s| s.name == infer_route).count();
        results >= 10 && requests >= 2
    };
    let spans = receiver.wait_for(complete).await;

    // The client's trace id is kept: its span is the request span's parent.
    assert_job_trace(&spans, client_trace, infer_route, Some(client_span), &queue);
    // Without one, the request span starts the trace.
    let fresh: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.name == infer_route && s.trace_id != client_trace)
        .collect();
    assert_eq!(fresh.len(), 1, "{spans:#?}");
    assert_job_trace(&spans, &fresh[0].trace_id, infer_route, None, &queue);

    // Each queued job: its own trace, from the jobs route.
    let job_traces: Vec<String> = spans
        .iter()
        .filter(|s| s.name == jobs_route)
        .map(|s| s.trace_id.clone())
        .collect();
    assert_eq!(job_traces.len(), 8, "{spans:#?}");
    let mut job_spans = HashSet::new();
    for trace in &job_traces {
        let job = assert_job_trace(&spans, trace, jobs_route, None, &queue);
        job_spans.insert((job.trace_id.clone(), job.span_id.clone()));
    }
    // Every run links exactly the jobs it ran (its `ember.batch.jobs`), and the eight queued
    // jobs ran in batches of more than one: a batch of n links n job spans.
    let runs: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == "session.run").collect();
    let mut linked = 0;
    let mut largest = 0;
    for run in &runs {
        assert_eq!(run.service, "ember-worker");
        assert!(run.parent_span_id.is_empty(), "a run is a trace of its own");
        let jobs: usize = run.attributes["ember.batch.jobs"].parse().unwrap();
        assert_eq!(run.links.len(), jobs, "{run:#?}");
        linked += run
            .links
            .iter()
            .filter(|link| job_spans.contains(*link))
            .count();
        largest = largest.max(jobs);
    }
    assert_eq!(linked, 8, "each queued job's span is linked from one run");
    assert_eq!(
        largest, 4,
        "a batch of four links four job spans: {runs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_otel_variables_the_parts_make_no_traces_and_answer_as_before() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("untraced");
    let dir = root().join("models/iris-classifier");
    let dispatcher = Dispatcher::start_with_dir(&model, &dir, &[]).await;
    let worker = worker(&model, &dir, &[], &[]);
    dispatcher.wait_model_ready(&model).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = dispatcher
        .post(&format!("/v1/models/{model}/jobs?wait=30s"))
        .header("traceparent", traceparent)
        .json(&iris_request(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(!dispatcher.log_text().contains("traces on"));
    assert!(!worker.log_text().contains("traces on"));
    assert!(dispatcher.log_text().contains("API listening"));
}
