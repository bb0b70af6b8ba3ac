//! Any model over HTTP (issue 13): a directory holding only an ONNX file no test knows, made at
//! test time, is inferred through the dispatcher by `tritonclient[http]` with binary and JSON
//! tensors and gives ONNX Runtime's numbers; the bundled models answer their known answers
//! (tests/known_answers.json, by ONNX Runtime in Python) and their metadata is the graph's; bad
//! tensors get 400 `invalid_input` saying what was expected, and the worker keeps serving; the
//! versioned OIP routes. The real dispatcher binary, a real worker (in this process), RabbitMQ,
//! Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{Dispatcher, InProcessWorker};
use ember_testkit::root;
use serde_json::{Value, json};

/// A dispatcher and a worker of `model_dir` under a fresh name, the worker ready.
async fn serve(test: &str, model_dir: &Path) -> (String, Dispatcher, InProcessWorker) {
    let model = ember_testkit::unique_model(test);
    let dispatcher = Dispatcher::start_with_dir(&model, model_dir, &[]).await;
    let worker = InProcessWorker::start_with_dir(&model, model_dir);
    dispatcher.wait_model_ready(&model).await;
    (model, dispatcher, worker)
}

async fn json_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

/// `GET /v2/models/{model}` once a worker has reported: the graph's tensors as ONNX Runtime in
/// Python reads them, and version "1" (no model.toml says otherwise).
async fn assert_metadata_is_the_graphs(dispatcher: &Dispatcher, model: &str, dir: &Path) {
    let (status, meta) = json_of(
        dispatcher
            .get(&format!("/v2/models/{model}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{meta}");
    let graph = common::graph_io(dir);
    assert_eq!(meta["name"], model);
    assert_eq!(meta["inputs"], graph["inputs"], "{meta}");
    assert_eq!(meta["outputs"], graph["outputs"], "{meta}");
    assert_eq!(meta["versions"], json!(["1"]), "{meta}");
    assert!(meta["parameters"].get("note").is_none(), "{meta}");
}

/// A random two-input graph no test knows, written by make_bare_model.py: its dir and seed.
fn bare_model() -> (PathBuf, u32) {
    let dir = ember_testkit::tempdir!("bare-model");
    let seed = (uuid::Uuid::new_v4().as_u128() % 1_000_000_007) as u32;
    common::python(
        "make_bare_model.py",
        &[dir.to_str().unwrap(), "--seed", &seed.to_string()],
    );
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(files, ["model.onnx"], "only the graph, no model.toml");
    (dir, seed)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_with_only_an_onnx_file_no_test_knows_is_inferred_by_tritonclient_with_binary_and_json_tensors()
 {
    let _serial = common::serial().await;
    let (dir, seed) = bare_model();
    let model = ember_testkit::unique_model("bare");
    let dispatcher = Dispatcher::start_with_dir(&model, &dir, &[]).await;

    // Before any worker: the directory's name and version, no tensors yet.
    let (status, meta) = json_of(
        dispatcher
            .get(&format!("/v2/models/{model}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(meta["inputs"], json!([]));
    assert!(meta["parameters"]["note"].is_string(), "{meta}");

    let _worker = InProcessWorker::start_with_dir(&model, &dir);
    dispatcher.wait_model_ready(&model).await;
    assert_metadata_is_the_graphs(&dispatcher, &model, &dir).await;
    let (_, meta) = json_of(
        dispatcher
            .get(&format!("/v2/models/{model}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(meta["parameters"]["input"], "tensor");
    assert_eq!(meta["parameters"]["decoder"], "tensor");

    let url = dispatcher.url.clone();
    let dir_arg = dir.to_str().unwrap().to_string();
    for (encoding, batch) in [("--binary", "3"), ("--json", "2")] {
        let seed = seed.to_string();
        let args = [
            "--url",
            &url,
            "--model",
            &model,
            "--model-dir",
            &dir_arg,
            "--seed",
            &seed,
            "--batch",
            batch,
            encoding,
        ];
        let (ok, stdout, stderr) = common::python_verdict("bare_model_check.py", &args);
        let verdict: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("seed {seed} {encoding}: {e}: {stdout} {stderr}"));
        assert!(ok, "seed {seed} {encoding}: {verdict} {stderr}");
        assert_eq!(verdict["ok"], true, "{verdict}");
        assert_eq!(verdict["problems"], json!([]), "{verdict}");
        assert_eq!(verdict["encoding"], &encoding[2..]);
        for output in ["scores", "index"] {
            assert_eq!(
                verdict["outputs"][output]["ok"], true,
                "{output}: {verdict}"
            );
        }
        assert_eq!(
            verdict["outputs"]["scores"]["shape"],
            json!([batch.parse::<u64>().unwrap(), 4])
        );
    }
    std::fs::remove_dir_all(dir).ok();
}

/// A 400 `invalid_input` whose message names each of `names` (what the model expects).
async fn assert_invalid_input(what: &str, response: reqwest::Response, names: &[&str]) {
    let (status, body) = json_of(response).await;
    assert_eq!(status, 400, "{what}: {body}");
    let (code, message) = oip_error(&body);
    assert_eq!(code, "invalid_input", "{what}: {body}");
    for name in names {
        assert!(
            message.contains(name),
            "{what}: `{message}` does not name {name}"
        );
    }
}

fn output<'a>(response: &'a Value, name: &str) -> &'a Value {
    response["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no output `{name}`: {response}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_iris_classifier_answers_its_known_answers_over_oip_json_and_its_metadata_is_the_graphs()
 {
    let _serial = common::serial().await;
    let dir = root().join("models/iris-classifier");
    let (model, dispatcher, _worker) = serve("iris", &dir).await;
    assert_metadata_is_the_graphs(&dispatcher, &model, &dir).await;
    let (_, meta) = json_of(
        dispatcher
            .get(&format!("/v2/models/{model}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        meta["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 4]}])
    );
    assert_eq!(meta["parameters"]["decoder"], "classification");
    assert_eq!(meta["parameters"]["labels"]["2"], "virginica");

    let (rows, expected) = ember_testkit::iris_rows();
    let response = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .json(&json!({
            "id": "iris-known",
            "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows}]
        }))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_name"], model);
    assert_eq!(body["model_version"], "1");
    assert_eq!(body["id"], "iris-known");
    let probabilities = output(&body, "probabilities");
    assert_eq!(probabilities["datatype"], "FP32");
    assert_eq!(probabilities["shape"], json!([3, 3]));
    let label = output(&body, "label");
    assert_eq!(label["datatype"], "INT64");
    assert_eq!(label["shape"], json!([3]));
    let got: Vec<f64> = serde_json::from_value(probabilities["data"].clone()).unwrap();
    let labels: Vec<i64> = serde_json::from_value(label["data"].clone()).unwrap();
    let names = &meta["parameters"]["labels"];
    for (row, (name, want)) in expected.iter().enumerate() {
        for (k, p) in want.iter().enumerate() {
            let g = got[row * 3 + k];
            assert!(
                (g - p).abs() < 1e-5,
                "row {row} class {k}: {g} vs ONNX Runtime's {p}"
            );
        }
        assert_eq!(names[labels[row].to_string()], name.as_str(), "row {row}");
    }

    // `outputs` selects: only the label comes back.
    let response = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .json(&json!({
            "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": &rows[..4]}],
            "outputs": [{"name": "label"}]
        }))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["outputs"],
        json!([{"name": "label", "datatype": "INT64", "shape": [1], "data": [0]}])
    );
}

/// A PNG through `POST /v1/models/{model}/jobs?wait=`: the job view, done.
async fn png_job(dispatcher: &Dispatcher, model: &str, image: &str) -> Value {
    let response = dispatcher
        .post(&format!("/v1/models/{model}/jobs?wait=60s"))
        .header("content-type", "image/png")
        .body(std::fs::read(root().join(image)).unwrap())
        .send()
        .await
        .unwrap();
    let (status, view) = json_of(response).await;
    assert_eq!(status, 200, "{image}: {view}");
    assert_eq!(view["status"], "done", "{image}: {view}");
    view
}

#[tokio::test(flavor = "multi_thread")]
async fn the_text_line_classifier_reads_upright_and_turned_pngs_through_jobs_and_its_metadata_is_the_graphs()
 {
    let _serial = common::serial().await;
    let dir = root().join("models/ppocr-textline-orientation");
    let (model, dispatcher, _worker) = serve("textline", &dir).await;
    assert_metadata_is_the_graphs(&dispatcher, &model, &dir).await;

    let known = ember_testkit::known_answers("ppocr-textline-orientation");
    for case in known["cases"].as_array().unwrap() {
        let view = png_job(&dispatcher, &model, case["image"].as_str().unwrap()).await;
        let outputs = &view["result"]["outputs"];
        assert!(
            outputs.get("tensors").is_none(),
            "an image job gets the processor's answer"
        );
        let classes = outputs["classes"][0].as_array().unwrap();
        assert_eq!(
            classes[0]["label"], case["expected_label"],
            "{}: {view}",
            case["name"]
        );
        assert_eq!(classes[0]["class_id"], case["expected_class"]);
        // Every class's score, within 0.01 (Pillow's bilinear resize made the known answers).
        let want = case["probabilities"].as_array().unwrap();
        assert_eq!(classes.len(), want.len(), "{view}");
        for class in classes {
            let id = class["class_id"].as_u64().unwrap() as usize;
            let (got, want) = (class["score"].as_f64().unwrap(), want[id].as_f64().unwrap());
            assert!(
                (got - want).abs() < 0.01,
                "{}: class {id}: {got} vs {want}",
                case["name"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ssd_finds_the_known_people_in_pngs_through_jobs_and_its_metadata_is_the_graphs() {
    let _serial = common::serial().await;
    let dir = root().join("models/ssdlite-person");
    let (model, dispatcher, _worker) = serve("ssd", &dir).await;
    assert_metadata_is_the_graphs(&dispatcher, &model, &dir).await;
    let (_, meta) = json_of(
        dispatcher
            .get(&format!("/v2/models/{model}"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(meta["inputs"][0]["name"], "image_tensor:0");
    assert_eq!(meta["inputs"][0]["datatype"], "UINT8");
    assert_eq!(meta["outputs"].as_array().unwrap().len(), 4);

    let known = ember_testkit::known_answers("ssdlite-person");
    let cases = known["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let image = case["image"].as_str().unwrap();
        let (width, height) = image::image_dimensions(root().join(image)).unwrap();
        let (width, height) = (f64::from(width), f64::from(height));
        let view = png_job(&dispatcher, &model, image).await;
        let people: Vec<&Value> = view["result"]["outputs"]["detections"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["label"] == "person")
            .collect();
        let want = case["detections"].as_array().unwrap();
        assert_eq!(people.len(), want.len(), "{}: {view}", case["name"]);
        assert_eq!(
            people.len() as u64,
            case["expected_persons"].as_u64().unwrap()
        );
        for (got, want) in people.iter().zip(want) {
            let (g, w) = (
                got["score"].as_f64().unwrap(),
                want["score"].as_f64().unwrap(),
            );
            assert!(
                (g - w).abs() < 0.01,
                "{}: person score {g} vs {w}",
                case["name"]
            );
            // The known box is (ymin, xmin, ymax, xmax) in 0..1; ours [x1, y1, x2, y2] in pixels.
            let b: Vec<f64> = serde_json::from_value(want["box"].clone()).unwrap();
            let wanted = [b[1] * width, b[0] * height, b[3] * width, b[2] * height];
            let scale = [width, height, width, height];
            for k in 0..4 {
                let g = got["box"][k].as_f64().unwrap();
                assert!(
                    (g - wanted[k]).abs() / scale[k] < 0.02,
                    "{}: box[{k}] {g} vs {} px",
                    case["name"],
                    wanted[k]
                );
            }
        }
    }
}

/// An OIP error body: its code and message.
fn oip_error(body: &Value) -> (&str, &str) {
    let code = body["code"].as_str().unwrap_or_else(|| panic!("{body}"));
    let error = body["error"].as_str().unwrap();
    let message = error
        .strip_prefix(&format!("{code}: "))
        .unwrap_or_else(|| panic!("{body}"));
    (code, message)
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tensors_get_400_invalid_input_saying_what_was_expected_and_the_worker_keeps_serving() {
    let _serial = common::serial().await;
    let dir = root().join("models/iris-classifier");
    let (model, dispatcher, _worker) = serve("badtensor", &dir).await;
    let four = json!([5.1, 3.5, 1.4, 0.2]);
    let request = |name: &str, datatype: &str, shape: Value, data: Value| json!({"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": data}]});
    // (what, request, what the message must name)
    let cases: Vec<(&str, Value, Vec<&str>)> = vec![
        (
            "wrong name",
            request("x", "FP32", json!([1, 4]), four.clone()),
            vec!["`input` FP32 [-1, 4]"],
        ),
        (
            "wrong datatype",
            request("input", "FP64", json!([1, 4]), four.clone()),
            vec!["FP32", "FP64"],
        ),
        (
            "wrong width",
            request("input", "FP32", json!([1, 5]), json!([1, 2, 3, 4, 5])),
            vec!["FP32 [-1, 4]", "[1, 5]"],
        ),
        (
            "wrong rank",
            request("input", "FP32", json!([4]), four.clone()),
            vec!["FP32 [-1, 4]", "[4]"],
        ),
        (
            "an output the graph lacks",
            json!({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": four.clone()}],
                   "outputs": [{"name": "logits"}]}),
            vec!["`label`", "`probabilities`"],
        ),
    ];
    for (what, body, names) in &cases {
        let response = dispatcher
            .post(&format!("/v2/models/{model}/infer"))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_invalid_input(what, response, names).await;
    }

    // Binary tensors the dispatcher passes on as they came: the worker's check answers.
    let binary = |datatype: &str, shape: Value, data: &[u8]| {
        let mut body =
            serde_json::to_vec(&json!({"inputs": [{"name": "input", "datatype": datatype,
            "shape": shape, "parameters": {"binary_data_size": data.len()}}]}))
            .unwrap();
        let length = body.len();
        body.extend_from_slice(data);
        (body, length)
    };
    let f64s: Vec<u8> = [5.1f64, 3.5, 1.4, 0.2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let f32s: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2, 0.0, 0.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    for (what, (body, length), names) in [
        (
            "binary FP64",
            binary("FP64", json!([1, 4]), &f64s),
            ["FP32", "FP64"],
        ),
        (
            "binary [2, 3]",
            binary("FP32", json!([2, 3]), &f32s),
            ["FP32 [-1, 4]", "[2, 3]"],
        ),
    ] {
        let response = dispatcher
            .post(&format!("/v2/models/{model}/infer"))
            .header("inference-header-content-length", length.to_string())
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_invalid_input(what, response, &names).await;
    }

    // The same through the jobs API: a failed job, 400, its error saying what was expected.
    let response = dispatcher
        .post(&format!("/v1/models/{model}/jobs?wait=60s"))
        .json(&cases[1].1)
        .send()
        .await
        .unwrap();
    let (status, view) = json_of(response).await;
    assert_eq!(status, 400, "{view}");
    assert_eq!(view["status"], "failed");
    assert_eq!(view["result"]["error"]["code"], "invalid_input");
    let message = view["result"]["error"]["message"].as_str().unwrap();
    assert!(message.contains("FP32 [-1, 4]"), "{message}");

    // The worker keeps serving: a good request after all that.
    let (rows, expected) = ember_testkit::iris_rows();
    let response = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .json(&request("input", "FP32", json!([3, 4]), json!(rows)))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<f64> =
        serde_json::from_value(output(&body, "probabilities")["data"].clone()).unwrap();
    for (row, (_, want)) in expected.iter().enumerate() {
        for (k, p) in want.iter().enumerate() {
            assert!((got[row * 3 + k] - p).abs() < 1e-5, "row {row} class {k}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_versioned_routes_pin_a_version_and_404_for_a_version_without_a_queue() {
    let _serial = common::serial().await;
    let dir = root().join("models/iris-classifier");
    let model = ember_testkit::unique_model("versions");
    let dispatcher = Dispatcher::start_with_dir(&model, &dir, &[]).await;
    // Before any worker: the directory's version is known but not ready; others are not found.
    let response = dispatcher
        .get(&format!("/v2/models/{model}/versions/1/ready"))
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("model_not_ready")),
        "{body}"
    );

    let _worker = InProcessWorker::start_with_dir(&model, &dir);
    dispatcher.wait_model_ready(&model).await;
    let (status, body) = json_of(
        dispatcher
            .get(&format!("/v2/models/{model}/versions/1/ready"))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["ready"], true);
    assert_eq!(body["version"], "1");
    assert_eq!(body["workers"], 1);

    let (rows, expected) = ember_testkit::iris_rows();
    let request =
        json!({"inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows}]});
    let response = dispatcher
        .post(&format!("/v2/models/{model}/versions/1/infer"))
        .json(&request)
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_version"], "1");
    let got: Vec<f64> =
        serde_json::from_value(output(&body, "probabilities")["data"].clone()).unwrap();
    for (row, (_, want)) in expected.iter().enumerate() {
        for (k, p) in want.iter().enumerate() {
            assert!((got[row * 3 + k] - p).abs() < 1e-5, "row {row} class {k}");
        }
    }

    // A version with no queue bound (no worker of it, none coming): the pinned job is
    // unroutable and refused at once, 404 model_version_not_found; a model not served is 404
    // model_not_found before anything is published; a version that cannot be a routing key
    // is 400.
    // (route, pinned by header, status, where the code is in the body, code)
    let cases = [
        (
            format!("/v2/models/{model}/versions/2/infer"),
            None,
            404,
            "/code",
            "model_version_not_found",
        ),
        (
            format!("/v1/models/{model}/jobs?wait=10s"),
            Some("2"),
            404,
            "/error/code",
            "model_version_not_found",
        ),
        (
            format!("/v2/models/{model}/versions/1/infer"),
            None,
            200,
            "/model_version",
            "1",
        ),
        (
            "/v2/models/no-such-model/versions/1/infer".to_string(),
            None,
            404,
            "/code",
            "model_not_found",
        ),
        (
            format!("/v2/models/{model}/versions/a%20b/infer"),
            None,
            400,
            "/code",
            "invalid_version",
        ),
    ];
    for (path, pin, want, pointer, code) in cases {
        let mut post = dispatcher
            .post(&path)
            .header("content-type", "application/json");
        if let Some(version) = pin {
            post = post.header("ember-model-version", version);
        }
        let (status, body) = json_of(post.json(&request).send().await.unwrap()).await;
        assert_eq!(
            (status, body.pointer(pointer)),
            (want, Some(&json!(code))),
            "{path}: {body}"
        );
    }
    for path in [
        format!("/v2/models/{model}/versions/2/ready"),
        format!("/v2/models/{model}/versions/2"),
        "/v2/models/no-such-model/versions/1/ready".to_string(),
    ] {
        let (status, body) = json_of(dispatcher.get(&path).await.unwrap()).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert_eq!(body["code"], "model_not_found", "{path}: {body}");
    }
    let metrics = dispatcher.metrics().await;
    assert_eq!(
        ember_testkit::metric(&metrics, "ember_dispatcher_publish_confirm_seconds_count"),
        4.0,
        "published: the two version 1 infers and the two unroutable version 2 jobs"
    );
}

/// A directory holding a one-node graph, `y = Log(x)`, FP32 `[-1]`: Log(0) is -inf, which the
/// worker's JSON result cannot carry (it writes `null`).
fn log_model() -> PathBuf {
    let dir = ember_testkit::tempdir!("log-model");
    let script = r#"
import sys, onnx
from onnx import TensorProto, helper
g = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
onnx.save(m, sys.argv[1] + "/model.onnx")
"#;
    let status = std::process::Command::new(root().join(".venv/bin/python"))
        .args(["-c", script, dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

/// JSON has no infinity: a model's `-inf` (Log(0)) travels as `null` and is answered, over OIP
/// and through the jobs API, as a result like any other (it once made the result unreadable:
/// a 504 after the infer timeout, a job `queued` forever).
#[tokio::test(flavor = "multi_thread")]
async fn a_model_s_infinities_are_answered_as_null_at_once_not_a_timeout_nor_queued_forever() {
    let _serial = common::serial().await;
    let dir = log_model();
    let (model, dispatcher, _worker) = serve("log", &dir).await;
    let request =
        |x: Value| json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": x}]});
    let fine = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .json(&request(json!([1.0, 2.0])))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(fine).await;
    assert_eq!(status, 200, "{body}");
    let y: Vec<f64> = serde_json::from_value(output(&body, "y")["data"].clone()).unwrap();
    assert!(
        y[0].abs() < 1e-6 && (y[1] - 2f64.ln()).abs() < 1e-6,
        "{y:?}"
    );

    // Log(0) = -inf: `null` where the float would be, the other value as it is.
    let started = std::time::Instant::now();
    let response = dispatcher
        .post(&format!("/v2/models/{model}/infer"))
        .json(&request(json!([0.0, 1.0])))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 200, "{body}");
    let y = output(&body, "y")["data"].clone();
    assert!(y[0].is_null(), "{body}");
    assert!(y[1].as_f64().is_some_and(|v| v.abs() < 1e-6), "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "answered when the result came, not after the infer timeout"
    );

    // Through the jobs API: the job is done once its result is in, not `queued`.
    let response = dispatcher
        .post(&format!("/v1/models/{model}/jobs"))
        .json(&request(json!([0.0, 1.0])))
        .send()
        .await
        .unwrap();
    let (status, body) = json_of(response).await;
    assert_eq!(status, 202, "{body}");
    let job_id = body["job_id"].as_str().unwrap();
    let started = std::time::Instant::now();
    let (status, body) = loop {
        let (status, body) =
            json_of(dispatcher.get(&format!("/v1/jobs/{job_id}")).await.unwrap()).await;
        if !(status == 200 && body["status"] == "queued") {
            break (status, body);
        }
        assert!(
            started.elapsed() < ember_testkit::PATIENCE,
            "job {job_id} stayed queued"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "done", "{body}");
    assert!(
        body["result"]["outputs"]["tensors"][0]["data"][0].is_null(),
        "{body}"
    );
    std::fs::remove_dir_all(dir).ok();
}
