//! Any model: the bundled non-SSD models answer their known answers (tests/known_answers.json,
//! made with ONNX Runtime in Python) through the queue, as JSON and binary tensors and as
//! images; a directory with only `model.onnx` is served as raw tensors; bad tensors of every
//! kind get `invalid_input` (or their own code) and the worker keeps serving; `--check` gives a
//! verdict. Real RabbitMQ, real models.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{Client, JobOptions, Worker};
use ember_core::protocol::oip::TensorData;
use ember_core::protocol::{ErrorCode, JobResult, Status};
use ember_testkit::{metric, root};
use serde_json::{Value, json};

fn json_job(request: &Value) -> (Vec<u8>, JobOptions<'static>) {
    let options = JobOptions {
        content_type: Some("application/json"),
        ..JobOptions::default()
    };
    (serde_json::to_vec(request).unwrap(), options)
}

fn assert_iris(result: &JobResult, expected: &[(String, Vec<f64>)]) {
    assert_eq!(result.status, Status::Ok, "{result:?}");
    let outputs = result.outputs.as_ref().unwrap();
    let classes = outputs
        .classes
        .as_ref()
        .expect("the classification processor ran");
    assert_eq!(classes.len(), expected.len(), "one list per row");
    let tensors = outputs
        .tensors
        .as_ref()
        .expect("a tensor job gets its tensors");
    let probabilities = tensors.iter().find(|t| t.name == "probabilities").unwrap();
    assert_eq!(probabilities.shape, vec![expected.len(), 3]);
    let got = probabilities.data.to_f64();
    let label = tensors.iter().find(|t| t.name == "label").unwrap();
    assert_eq!(label.datatype, "INT64");
    for (row, (name, want)) in expected.iter().enumerate() {
        assert_eq!(&classes[row][0].label, name, "row {row}");
        for (k, p) in want.iter().enumerate() {
            let g = got[row * 3 + k];
            assert!(
                (g - p).abs() < 1e-5,
                "row {row} class {k}: {g} vs ONNX Runtime's {p}"
            );
        }
        let best = want
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(label.data.to_f64()[row], best as f64);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_iris_classifier_answers_json_and_binary_tensor_jobs_with_its_known_answers() {
    let model = ember_testkit::unique_model("iris");
    let worker = Worker::start(&model, &["--model-dir", "models/iris-classifier"]);
    let mut client = Client::new(&model).await;
    let (rows, expected) = ember_testkit::iris_rows();

    let (body, options) = json_job(&json!({
        "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows}]
    }));
    let by_json = client.submit(&body, options).await;

    let mut binary = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32",
                    "parameters": {"binary_data_size": 48}}],
        "outputs": [{"name": "probabilities"}, {"name": "label"}]
    }))
    .unwrap();
    let header_length = binary.len();
    binary.extend(rows.iter().flat_map(|v| v.to_le_bytes()));
    let by_binary = client
        .submit(
            &binary,
            JobOptions {
                content_type: Some(ember_core::protocol::content_type::OIP_BINARY),
                header_length: Some(header_length),
                ..JobOptions::default()
            },
        )
        .await;
    // One output asked for: only that one comes back.
    let (body, options) = json_job(&json!({
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": &rows[..4]}],
        "outputs": [{"name": "label"}]
    }));
    let only_label = client.submit(&body, options).await;

    client
        .collect(&[by_json.clone(), by_binary.clone(), only_label.clone()])
        .await;
    assert_iris(client.result(&by_json), &expected);
    assert_iris(client.result(&by_binary), &expected);
    let tensors = client
        .result(&only_label)
        .outputs
        .as_ref()
        .unwrap()
        .tensors
        .clone()
        .unwrap();
    assert_eq!(tensors.len(), 1);
    assert_eq!(
        (tensors[0].name.as_str(), &tensors[0].data),
        ("label", &TensorData::I64(vec![0]))
    );
    drop(worker);
    client.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tensors_of_every_kind_are_answered_and_the_worker_keeps_serving() {
    let model = ember_testkit::unique_model("badtensor");
    let worker = Worker::start(
        &model,
        &[
            "--model-dir",
            "models/iris-classifier",
            "--max-pixels",
            "1000",
        ],
    );
    let mut client = Client::new(&model).await;
    let input = |name: &str, shape: Value, datatype: &str, data: Value| json!({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]});
    let four = json!([5.1, 3.5, 1.4, 0.2]);
    let cases: Vec<(&str, Value, ErrorCode)> = vec![
        (
            "wrong name",
            input("x", json!([1, 4]), "FP32", four.clone()),
            ErrorCode::InvalidInput,
        ),
        (
            "wrong type",
            input("input", json!([1, 4]), "FP64", four.clone()),
            ErrorCode::InvalidInput,
        ),
        (
            "wrong width",
            input("input", json!([1, 5]), "FP32", json!([1, 2, 3, 4, 5])),
            ErrorCode::InvalidInput,
        ),
        (
            "wrong rank",
            input("input", json!([4]), "FP32", four.clone()),
            ErrorCode::InvalidInput,
        ),
        (
            "too few values",
            input("input", json!([1, 4]), "FP32", json!([1, 2, 3])),
            ErrorCode::InvalidInput,
        ),
        (
            "not numbers",
            input("input", json!([1, 4]), "FP32", json!(["a", "b", "c", "d"])),
            ErrorCode::InvalidInput,
        ),
        (
            "unknown datatype",
            input("input", json!([1, 4]), "FP8", four.clone()),
            ErrorCode::InvalidInput,
        ),
        (
            "negative dimension",
            input("input", json!([-1, 4]), "FP32", four.clone()),
            ErrorCode::InvalidInput,
        ),
        (
            "more rows than max_batch",
            input("input", json!([65, 4]), "FP32", json!(vec![0.5; 260])),
            ErrorCode::InvalidInput,
        ),
        (
            "over the element limit",
            input("input", json!([1000, 4]), "FP32", json!([1])),
            ErrorCode::InputTooLarge,
        ),
        (
            "two inputs",
            json!({"inputs": [
                {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": four.clone()},
                {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1]}]}),
            ErrorCode::InvalidInput,
        ),
        (
            "unknown output",
            json!({"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": four.clone()}],
                   "outputs": [{"name": "logits"}]}),
            ErrorCode::InvalidInput,
        ),
        (
            "not a request",
            json!({"hello": 1}),
            ErrorCode::InvalidInput,
        ),
    ];
    let mut ids = Vec::new();
    for (what, request, code) in &cases {
        let (body, options) = json_job(request);
        ids.push((*what, client.submit(&body, options).await, *code));
    }
    // An image to a tensor model, binary without its header length, and a cut-short binary.
    let png = client.submit_png("astronaut.png").await;
    ids.push(("an image", png, ErrorCode::UnsupportedContentType));
    let binary = |length: Option<usize>| JobOptions {
        content_type: Some(ember_core::protocol::content_type::OIP_BINARY),
        header_length: length,
        ..JobOptions::default()
    };
    let head = serde_json::to_vec(&json!({"inputs": [{"name": "input", "shape": [1, 4],
        "datatype": "FP32", "parameters": {"binary_data_size": 16}}]}))
    .unwrap();
    let mut short = head.clone();
    short.extend([0u8; 12]);
    let id = client.submit(&short, binary(Some(head.len()))).await;
    ids.push(("binary cut short", id, ErrorCode::InvalidInput));
    let id = client.submit(&short, binary(None)).await;
    ids.push((
        "binary without its header length",
        id,
        ErrorCode::InvalidInput,
    ));

    let (rows, expected) = ember_testkit::iris_rows();
    let (body, options) = json_job(&json!({
        "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows}]
    }));
    let good = client.submit(&body, options).await;
    let mut all: Vec<String> = ids.iter().map(|(_, id, _)| id.clone()).collect();
    all.push(good.clone());
    client.collect(&all).await;
    for (what, id, code) in &ids {
        let result = client.result(id);
        assert_eq!(result.status, Status::Error, "{what}: {result:?}");
        let error = result.error.as_ref().unwrap();
        assert_eq!(error.code, *code, "{what}: {}", error.message);
        assert!(!error.message.is_empty());
    }
    assert_iris(client.result(&good), &expected);
    client
        .drain_for(std::time::Duration::from_millis(500))
        .await;
    let metrics = worker.metrics();
    assert_eq!(metric(&metrics, "ember_worker_jobs_in_flight"), 0.0);
    assert_eq!(
        metric(&metrics, "ember_worker_jobs_total{outcome=\"ok\"}"),
        1.0
    );
    assert!(
        client.results.values().all(|results| results.len() == 1),
        "nothing requeued"
    );
    drop(worker);
    client.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_text_line_classifier_reads_upright_and_turned_text_from_png_jobs() {
    let model = ember_testkit::unique_model("textline");
    let worker = Worker::start(
        &model,
        &["--model-dir", "models/ppocr-textline-orientation"],
    );
    let mut client = Client::new(&model).await;
    let cases = ember_testkit::known_answers("ppocr-textline-orientation")["cases"]
        .as_array()
        .unwrap()
        .clone();
    let mut ids = Vec::new();
    for case in &cases {
        let body = std::fs::read(root().join(case["image"].as_str().unwrap())).unwrap();
        let options = JobOptions {
            content_type: Some("image/png"),
            ..JobOptions::default()
        };
        ids.push(client.submit(&body, options).await);
    }
    client.collect(&ids).await;
    for (case, id) in cases.iter().zip(&ids) {
        let result = client.result(id);
        assert_eq!(result.status, Status::Ok, "{result:?}");
        let outputs = result.outputs.as_ref().unwrap();
        assert!(
            outputs.tensors.is_none(),
            "an image job gets the processor's answer"
        );
        let top = &outputs.classes.as_ref().unwrap()[0][0];
        assert_eq!(
            top.label,
            case["expected_label"].as_str().unwrap(),
            "{}",
            case["name"]
        );
        let want = case["top_k"][0]["score"].as_f64().unwrap();
        // Pillow's bilinear resize (the known answers) and the worker's differ by rounding.
        assert!(
            (f64::from(top.score) - want).abs() < 0.01,
            "{} vs {want}",
            top.score
        );
    }
    drop(worker);
    client.cleanup().await;
}

/// A directory holding only the iris graph: served under the directory's name as raw tensors,
/// batching on (the graph's first dimensions are dynamic), every output returned.
#[tokio::test(flavor = "multi_thread")]
async fn a_directory_with_only_model_onnx_is_served_as_raw_tensors() {
    let dir = ember_testkit::tempdir!("bare");
    std::fs::copy(
        root().join("models/iris-classifier/model.onnx"),
        dir.join("model.onnx"),
    )
    .unwrap();
    let model = ember_testkit::unique_model("bare");
    let dir_arg = dir.to_str().unwrap().to_string();
    let worker = Worker::start(&model, &["--model-dir", &dir_arg]);
    let mut client = Client::new(&model).await;
    let (rows, expected) = ember_testkit::iris_rows();
    let (body, options) = json_job(&json!({
        "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows}]
    }));
    let id = client.submit(&body, options).await;
    client.collect(std::slice::from_ref(&id)).await;
    let result = client.result(&id);
    assert_eq!(result.status, Status::Ok, "{result:?}");
    let outputs = result.outputs.as_ref().unwrap();
    assert!(
        outputs.classes.is_none(),
        "no processor declared: raw tensors only"
    );
    let tensors = outputs.tensors.as_ref().unwrap();
    let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["label", "probabilities"],
        "every output, in graph order"
    );
    let probabilities = tensors[1].data.to_f64();
    for (row, (_, want)) in expected.iter().enumerate() {
        for (k, p) in want.iter().enumerate() {
            assert!((probabilities[row * 3 + k] - p).abs() < 1e-5);
        }
    }
    assert!(
        worker.log_text().contains("\"accepts\":\"raw tensors\"")
            || worker.log_text().contains("raw tensors")
    );
    drop(worker);
    client.cleanup().await;
    std::fs::remove_dir_all(dir).ok();
}

fn check(dir: &std::path::Path) -> (bool, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_ember-worker"))
        .current_dir(root())
        .args(["--check", "--model-dir", dir.to_str().unwrap()])
        .env("EMBER_LOG", "warn")
        .output()
        .unwrap();
    let verdict = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    (output.status.success(), verdict)
}

#[test]
fn check_gives_a_verdict_naming_the_graph_and_both_sides_of_a_mismatch() {
    let (ok, verdict) = check(&root().join("models/ssdlite-person"));
    assert!(ok, "{verdict}");
    assert_eq!(verdict["verdict"], "ok");
    assert_eq!(verdict["inputs"][0]["name"], "image_tensor:0");
    assert_eq!(verdict["inputs"][0]["datatype"], "UINT8");
    assert_eq!(verdict["inputs"][0]["shape"], json!([-1, -1, -1, 3]));
    assert_eq!(verdict["outputs"].as_array().unwrap().len(), 4);
    assert_eq!(verdict["batching"], true);

    let dir = ember_testkit::tempdir!("mismatch");
    std::fs::copy(
        root().join("models/iris-classifier/model.onnx"),
        dir.join("model.onnx"),
    )
    .unwrap();
    std::fs::write(
        dir.join("model.toml"),
        "[output]\ndecoder = \"classification\"\ntensor = \"scores\"\n",
    )
    .unwrap();
    let (ok, verdict) = check(&dir);
    assert!(!ok, "{verdict}");
    let error = verdict["error"].as_str().unwrap();
    assert!(
        error.contains("`scores`") && error.contains("`probabilities`"),
        "{error}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `--instances 2`: two sessions, each with its share of the cores, take batches from one queue;
/// batches sent together run on both and answer exactly what one instance answers.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_the_batches_and_answer_alike() {
    use ember_worker::engine::{Engine, EngineOptions, cpu_share};

    let dir = root().join("models/ssdlite-person");
    let options = EngineOptions {
        instances: 2,
        ..EngineOptions::default()
    };
    let engine = tokio::task::spawn_blocking(move || Engine::load(&dir, options))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(engine.instances, 2);
    assert_eq!(engine.intra_threads, cpu_share(2));
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(cpu_share(2), (cores / 2).max(1));
    assert_eq!(cpu_share(1), cores);
    let image = std::fs::read(root().join("tests/samples/astronaut.png")).unwrap();
    let prepared = engine
        .pipeline
        .prepare(Some("image/png"), None, &image)
        .unwrap();
    let runs = (0..8).map(|_| {
        let engine = engine.clone();
        let mut job = prepared.clone();
        tokio::spawn(async move { engine.infer(vec![&mut job]).await.unwrap() })
    });
    let outputs: Vec<_> = futures_util::future::join_all(runs)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut used: Vec<usize> = outputs.iter().map(|o| o.instance).collect();
    used.sort_unstable();
    used.dedup();
    assert_eq!(used, [0, 1], "8 batches sent at once ran on both instances");
    for output in &outputs[1..] {
        assert_eq!(output.outputs, outputs[0].outputs, "instances answer alike");
    }
}

/// A worker with `--instances 2 --max-batch 1`: jobs through the queue are answered once each,
/// all finding the astronaut, with no batch larger than one.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_with_two_instances_answers_every_job_once() {
    let model = ember_testkit::unique_model("instances");
    let _worker = Worker::start(&model, &["--instances", "2", "--max-batch", "1"]);
    let mut client = Client::new(&model).await;
    let mut ids = Vec::new();
    for _ in 0..12 {
        ids.push(client.submit_png("astronaut.png").await);
    }
    client.collect(&ids).await;
    client
        .drain_for(std::time::Duration::from_millis(500))
        .await;
    for id in &ids {
        assert_eq!(client.results[id].len(), 1, "answered once");
        let result = client.result(id);
        assert_eq!(result.status, Status::Ok, "{result:?}");
        assert_eq!(result.timing.batch_size, 1);
        let detections = result
            .outputs
            .as_ref()
            .unwrap()
            .detections
            .as_ref()
            .unwrap();
        assert_eq!(detections[0].label, "person");
    }
    client.cleanup().await;
}
