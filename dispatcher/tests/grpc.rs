//! The Open Inference Protocol over gRPC (issue 16): NVIDIA's `tritonclient[grpc]`, used as its
//! examples use it, gets the same answers over gRPC as `tritonclient[http]` over REST for every
//! bundled model and for a graph no test knows; errors are gRPC status codes (with RetryInfo on
//! a full queue, DEADLINE_EXCEEDED from the client's `grpc-timeout`, UNAUTHENTICATED without a
//! token), asked with a client generated from the same proto. The real dispatcher binary, a
//! real worker (in this process), RabbitMQ, Redis.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Dispatcher, InProcessWorker};
use ember_grpc::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use ember_grpc::inference::model_infer_request::InferInputTensor;
use ember_grpc::inference::{ModelInferRequest, ModelMetadataRequest, ServerLiveRequest};
use ember_testkit::{free_port, root};
use serde_json::{Value, json};
use tonic::Code;
use tonic_types::StatusExt;

/// A dispatcher with the gRPC API on a port of its own: the dispatcher and that port.
async fn dispatcher_with_grpc(model: &str, dir: &Path, extra: &[&str]) -> (Dispatcher, u16) {
    let grpc = free_port();
    let listen = format!("127.0.0.1:{grpc}");
    let mut args = vec!["--grpc-listen", &listen];
    args.extend_from_slice(extra);
    (Dispatcher::start_with_dir(model, dir, &args).await, grpc)
}

/// Inputs for `model`'s graph as the REST metadata gives it: each `-1` dimension 2 (a batch of
/// two), the values a fixed pattern of the datatype; `shapes` overrides an input's shape.
fn inputs_from_metadata(meta: &Value, shapes: &[(&str, Vec<i64>)]) -> Value {
    let inputs = meta["inputs"].as_array().unwrap();
    assert!(!inputs.is_empty(), "no inputs in {meta}");
    let specs: Vec<Value> = inputs
        .iter()
        .map(|input| {
            let name = input["name"].as_str().unwrap();
            let shape: Vec<i64> = match shapes.iter().find(|(n, _)| *n == name) {
                Some((_, shape)) => shape.clone(),
                None => input["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_i64().unwrap())
                    .map(|d| if d < 0 { 2 } else { d })
                    .collect(),
            };
            let count = shape.iter().product::<i64>() as usize;
            let datatype = input["datatype"].as_str().unwrap();
            let data: Vec<Value> = (0..count)
                .map(|i| match datatype {
                    "FP32" | "FP64" => json!(((i * 37) % 101) as f64 / 50.0 - 1.0),
                    "UINT8" => json!((i * 31) % 256),
                    "INT64" | "INT32" => json!((i % 3) as i64),
                    "BOOL" => json!(i % 2 == 0),
                    other => panic!("no test pattern for {other}"),
                })
                .collect();
            json!({"name": name, "datatype": datatype, "shape": shape, "data": data})
        })
        .collect();
    Value::Array(specs)
}

/// Runs triton_grpc_compare.py on `inputs`: both answers and both metadata.
fn compare(model: &str, grpc: u16, http: u16, inputs: &Value) -> Value {
    let file = std::env::temp_dir().join(format!("{model}-inputs.json"));
    std::fs::write(&file, inputs.to_string()).unwrap();
    let out = common::python(
        "triton_grpc_compare.py",
        &[
            file.to_str().unwrap(),
            "--grpc-url",
            &format!("127.0.0.1:{grpc}"),
            "--http-url",
            &format!("127.0.0.1:{http}"),
            "--model",
            model,
        ],
    );
    serde_json::from_str(&out).unwrap()
}

/// Same answers over gRPC and REST, every output of the graph, the same metadata (gRPC's JSON
/// form writes int64 as strings).
fn assert_same_answers(model: &str, out: &Value) {
    let (grpc, http) = (&out["grpc"], &out["http"]);
    let names = grpc.as_object().unwrap();
    assert!(!names.is_empty(), "{model}: no outputs: {out}");
    assert_eq!(grpc, http, "{model}: gRPC and REST differ");
    for (name, tensor) in names {
        assert!(
            !tensor["data"].as_array().unwrap().is_empty(),
            "{model}: `{name}` is empty"
        );
    }
    let (g, h) = (&out["grpc_metadata"], &out["http_metadata"]);
    assert_eq!(g["name"], h["name"]);
    assert_eq!(g["platform"], "onnxruntime_onnx");
    assert_eq!(g["versions"], h["versions"]);
    for side in ["inputs", "outputs"] {
        let grpc_side: Vec<Value> = g[side]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                let shape: Vec<i64> = t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_str().unwrap().parse().unwrap())
                    .collect();
                json!({"name": t["name"], "datatype": t["datatype"], "shape": shape})
            })
            .collect();
        assert_eq!(Value::Array(grpc_side), h[side], "{model}: {side}");
    }
    assert_eq!(out["server"]["name"], "ember");
}

#[tokio::test(flavor = "multi_thread")]
async fn tritonclient_grpc_gets_the_rest_answers_for_every_bundled_model_and_a_graph_no_test_knows()
{
    let _serial = common::serial().await;
    let bare = ember_testkit::tempdir!("grpc-bare-model");
    common::python(
        "make_bare_model.py",
        &[bare.to_str().unwrap(), "--seed", "16"],
    );
    let astronaut = std::env::temp_dir().join("grpc-astronaut-300.rgb");
    std::fs::write(&astronaut, common::astronaut_300()).unwrap();
    let models: [(&str, std::path::PathBuf); 5] = [
        ("iris-classifier", root().join("models/iris-classifier")),
        ("ppocr", root().join("models/ppocr-textline-orientation")),
        ("ssdlite", root().join("models/ssdlite-person")),
        ("tiny-ssd", root().join("models/tiny-ssd")),
        ("bare", bare),
    ];
    for (short, dir) in models {
        let model = ember_testkit::unique_model(&format!("grpc-{short}"));
        let (dispatcher, grpc) = dispatcher_with_grpc(&model, &dir, &[]).await;
        let _worker = InProcessWorker::start_with_dir(&model, &dir);
        dispatcher.wait_model_ready(&model).await;
        let meta: Value = dispatcher
            .get(&format!("/v2/models/{model}"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let inputs = match short {
            "iris-classifier" => {
                let (rows, _) = ember_testkit::iris_rows();
                json!([{"name": "input", "datatype": "FP32", "shape": [3, 4], "data": rows}])
            }
            "ssdlite" => json!([{
                "name": "image_tensor:0", "datatype": "UINT8", "shape": [1, 300, 300, 3],
                "raw": astronaut,
            }]),
            "ppocr" => inputs_from_metadata(&meta, &[("x", vec![1, 3, 48, 192])]),
            "tiny-ssd" => inputs_from_metadata(&meta, &[("image_tensor:0", vec![1, 8, 8, 3])]),
            _ => inputs_from_metadata(&meta, &[]),
        };
        let out = compare(&model, grpc, dispatcher.port, &inputs);
        assert_same_answers(&model, &out);
        if short == "iris-classifier" {
            // And they are ONNX Runtime's (in Python) numbers.
            let (_, expected) = ember_testkit::iris_rows();
            let got: Vec<f64> =
                serde_json::from_value(out["grpc"]["probabilities"]["data"].clone()).unwrap();
            for (row, (_, want)) in expected.iter().enumerate() {
                for (k, p) in want.iter().enumerate() {
                    assert!((got[row * 3 + k] - p).abs() < 1e-5, "row {row} class {k}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tritonclient_grpc_finds_the_person_in_astronaut_as_over_rest() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("grpc-triton");
    let (dispatcher, grpc) =
        dispatcher_with_grpc(&model, &root().join("models/ssdlite-person"), &[]).await;
    let _worker = InProcessWorker::start(&model);
    dispatcher.wait_model_ready(&model).await;
    let raw = std::env::temp_dir().join(format!("{model}.rgb"));
    std::fs::write(&raw, common::astronaut_300()).unwrap();
    let url = format!("127.0.0.1:{grpc}");
    for extra in [&[][..], &["--version", "1"][..]] {
        let mut args = vec![
            raw.to_str().unwrap(),
            "--url",
            &url,
            "--model",
            &model,
            "--protocol",
            "grpc",
        ];
        args.extend_from_slice(extra);
        let out: Value = serde_json::from_str(&common::python("triton_infer.py", &args)).unwrap();
        assert_eq!(out["model_name"], model.as_str(), "{extra:?}");
        assert_eq!(out["model_version"], "1", "{extra:?}");
        assert_eq!(out["id"], "triton-1");
        assert_eq!(out["metadata_inputs"][0]["name"], "image_tensor:0");
        let scores: Vec<f64> = serde_json::from_value(out["scores"].clone()).unwrap();
        let classes: Vec<f64> = serde_json::from_value(out["classes"].clone()).unwrap();
        let people: Vec<usize> = (0..scores.len())
            .filter(|&i| classes[i] == 1.0 && scores[i] > 0.5)
            .collect();
        assert_eq!(people.len(), 1, "{extra:?}: {out}");
        assert!(scores[people[0]] > 0.8, "{out}");
    }
}

fn iris_request(model: &str, version: &str) -> ModelInferRequest {
    let row: Vec<u8> = [5.1f32, 3.5, 1.4, 0.2]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    ModelInferRequest {
        model_name: model.into(),
        model_version: version.into(),
        inputs: vec![InferInputTensor {
            name: "input".into(),
            datatype: "FP32".into(),
            shape: vec![1, 4],
            ..Default::default()
        }],
        raw_input_contents: vec![row],
        ..Default::default()
    }
}

/// A client of the generated code over a plain HTTP/2 client rather than tonic's channel, which
/// ends a call itself (CANCELLED) when the `grpc-timeout` it sends runs out: these calls wait
/// for the dispatcher's own answer to the header, however slow the machine.
type PlainHttp2 = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    tonic::body::Body,
>;

fn client_without_timer(port: u16) -> GrpcInferenceServiceClient<PlainHttp2> {
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let origin = format!("http://127.0.0.1:{port}").parse().unwrap();
    GrpcInferenceServiceClient::with_origin(http, origin)
}

fn with_metadata<T>(message: T, pairs: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    for (key, value) in pairs {
        request.metadata_mut().insert(*key, value.parse().unwrap());
    }
    request
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_errors_are_status_codes_with_retry_info_deadlines_and_auth() {
    let _serial = common::serial().await;
    let model = ember_testkit::unique_model("grpc-errors");
    let token = "grpc-test-token";
    // No worker: jobs stay queued, and the queue (max length 2) fills up.
    let (dispatcher, grpc) = dispatcher_with_grpc(
        &model,
        &root().join("models/iris-classifier"),
        &["--auth-token", token, "--queue-max-length", "2"],
    )
    .await;
    let mut client = client_without_timer(grpc);
    let bearer = format!("Bearer {token}");
    let auth = [("authorization", bearer.as_str())];

    // Health needs no token, as /v2/health/* over REST.
    let live = client
        .server_live(ServerLiveRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(live.live);

    // No token, a wrong one: UNAUTHENTICATED.
    let request = ModelMetadataRequest {
        name: model.clone(),
        version: String::new(),
    };
    let status = client.model_metadata(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(
        status.metadata().get("ember-error-code").unwrap(),
        "unauthorized"
    );
    let status = client
        .model_metadata(with_metadata(
            request.clone(),
            &[("authorization", "Bearer wrong")],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    // An unknown model: NOT_FOUND; a malformed version: INVALID_ARGUMENT.
    let status = client
        .model_infer(with_metadata(iris_request("no-such-model", ""), &auth))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("no-such-model"), "{status:?}");
    let status = client
        .model_infer(with_metadata(iris_request(&model, "a/b"), &auth))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Raw contents that do not fit the shape: INVALID_ARGUMENT, saying so.
    let mut short = iris_request(&model, "");
    short.raw_input_contents[0].truncate(8);
    let status = client
        .model_infer(with_metadata(short, &auth))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // The client's grpc-timeout, answered by the dispatcher itself (this client keeps no timer):
    // DEADLINE_EXCEEDED with the REST `timeout` code, the job goes on.
    let status = client
        .model_infer(with_metadata(
            iris_request(&model, ""),
            &[auth[0], ("grpc-timeout", "300m")],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.metadata().get("ember-error-code").unwrap(),
        "timeout"
    );

    // Jobs pile up until the broker refuses: RESOURCE_EXHAUSTED with a RetryInfo.
    let mut accepted = 0;
    let full = loop {
        let status = client
            .model_infer(with_metadata(
                iris_request(&model, ""),
                &[auth[0], ("grpc-timeout", "100m")],
            ))
            .await
            .unwrap_err();
        if status.code() != Code::DeadlineExceeded {
            break status;
        }
        accepted += 1;
        assert!(accepted < 50, "the queue never refused a publish");
    };
    assert_eq!(full.code(), Code::ResourceExhausted, "{full:?}");
    assert_eq!(
        full.metadata().get("ember-error-code").unwrap(),
        "queue_full"
    );
    let retry = full.get_details_retry_info().expect("a RetryInfo detail");
    assert_eq!(retry.retry_delay, Some(Duration::from_secs(1)));

    // The calls are counted under their gRPC method.
    let metrics = dispatcher.metrics().await;
    assert!(
        metrics.contains("route=\"/inference.GRPCInferenceService/ModelInfer\",status=\"429\""),
        "{metrics}"
    );
}
