//! Replays the fuzz corpus of the `oip` target (see docs/fuzzing.md) through the dispatcher's
//! parser without a fuzzer: every input must come back (Ok or a clear 4xx) without a panic, and
//! the named seeds must give their named outcome.
//! `cargo test -p ember-dispatcher --test fuzz_corpus -- --ignored write_seeds` rewrites the seeds.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/src/corpus.rs"]
mod corpus;
#[allow(dead_code)]
#[path = "../../fuzz/src/image.rs"]
mod image;
#[allow(dead_code)]
#[path = "../../fuzz/src/oip.rs"]
mod oip;

use std::path::PathBuf;

use axum::http::StatusCode;
use ember_core::protocol::content_type;
use serde_json::json;

fn fuzz_dir() -> PathBuf {
    ember_testkit::root().join("fuzz")
}

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    corpus::inputs(&fuzz_dir(), target)
}

#[test]
fn the_oip_corpus_parses_without_panics_and_seeds_give_their_outcome() {
    let inputs = inputs("oip");
    assert!(inputs.len() >= 10, "only {} inputs", inputs.len());
    for (name, data) in &inputs {
        let outcome = oip::dispatch(data);
        if let Err(error) = &outcome {
            assert!(
                error.status.is_client_error(),
                "{name}: {} {}",
                error.status,
                error.message
            );
        }
        let Some(seed) = name.strip_prefix("seeds/") else {
            continue;
        };
        let mut parts = seed.split('-');
        let (expected, detail) = (parts.next().unwrap(), parts.next().unwrap());
        match (expected, outcome) {
            ("ok", Ok(parsed)) => {
                // The worker takes the job as the seed says.
                let prepared = oip::worker(&parsed).unwrap_or_else(|e| panic!("{name}: {e}"));
                let (width, height) = image::dims(&prepared);
                assert_eq!(format!("{width}x{height}"), detail, "{name}");
            }
            ("worker", Ok(parsed)) => {
                let error = oip::worker(&parsed).expect_err(name);
                let code = serde_json::to_value(error.code()).unwrap();
                assert_eq!(code, detail, "{name}: {error}");
            }
            ("rejected", Err(error)) => {
                assert_eq!(error.status, StatusCode::BAD_REQUEST, "{name}");
                assert_eq!(error.code, detail, "{name}: {}", error.message);
            }
            (_, outcome) => panic!("{name}: unexpected {outcome:?}"),
        }
    }
}

#[test]
fn a_binary_request_is_published_as_it_came() {
    let data = std::fs::read(fuzz_dir().join("seeds/oip/ok-2x2-binary")).unwrap();
    let parsed = oip::dispatch(&data).unwrap();
    assert_eq!(parsed.content_type, content_type::OIP_BINARY);
    let length = usize::try_from(parsed.header_length.unwrap()).unwrap();
    assert_eq!(&parsed.body[length..], &(1..=12).collect::<Vec<u8>>()[..]);
    assert!(parsed.request.inputs[0].data.is_none());
}

fn binary(head: serde_json::Value, tail: &[u8], length: Option<&str>) -> Vec<u8> {
    let head = serde_json::to_vec(&head).unwrap();
    let length = length.map_or_else(|| head.len().to_string(), str::to_string);
    let mut out = format!("#{length}\n").into_bytes();
    out.extend_from_slice(&head);
    out.extend_from_slice(tail);
    out
}

fn input(shape: serde_json::Value, datatype: &str, size: usize) -> serde_json::Value {
    json!({
        "inputs": [{"name": "image_tensor:0", "shape": shape, "datatype": datatype,
                    "parameters": {"binary_data_size": size}}],
        "outputs": [{"name": "detection_boxes:0", "parameters": {"binary_data": true}}]
    })
}

#[test]
#[ignore = "writes fuzz/seeds; run by hand"]
fn write_seeds() {
    let twelve: Vec<u8> = (1..=12).collect();
    let json_ok = serde_json::to_vec(&json!({
        "id": "r1",
        "inputs": [{"name": "image_tensor:0", "shape": [1, 1, 2, 3], "datatype": "UINT8",
                    "data": [[1, 2, 3], [4, 5, 6]]}],
        "outputs": [{"name": "num_detections:0"}],
        "parameters": {"binary_data_output": false}
    }))
    .unwrap();
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("ok-2x1-json", json_ok.clone()),
        ("ok-2x2-binary", binary(input(json!([1, 2, 2, 3]), "UINT8", 12), &twelve, None)),
        ("ok-1x1-binary-padded-length", {
            let head = serde_json::to_vec(&input(json!([1, 1, 1, 3]), "UINT8", 3)).unwrap();
            binary(input(json!([1, 1, 1, 3]), "UINT8", 3), &[9, 8, 7], Some(&format!(" {} ", head.len())))
        }),
        ("rejected-invalid_request-shape-past-size", binary(input(json!([1, 100000, 100000, 3]), "UINT8", 0), &[], None)),
        ("rejected-invalid_request-size-mismatch", binary(input(json!([1, 2, 2, 3]), "UINT8", 3), &[1, 2, 3], None)),
        ("worker-invalid_input-fp32-json", br#"{"inputs":[{"name":"image_tensor:0","shape":[1,1,1,3],"datatype":"FP32","data":[0.5,1,2]}]}"#.to_vec()),
        ("worker-invalid_input-no-inputs", br#"{"inputs":[]}"#.to_vec()),
        ("rejected-invalid_request-broken-json", b"{\"inputs\": [".to_vec()),
        ("rejected-invalid_request-not-a-length", binary(input(json!([1, 1, 1, 3]), "UINT8", 3), &[1, 2, 3], Some("12x"))),
        ("rejected-invalid_request-length-past-body", binary(input(json!([1, 1, 1, 3]), "UINT8", 3), &[1, 2, 3], Some("99999"))),
        ("rejected-invalid_request-short-tail", binary(input(json!([1, 2, 2, 3]), "UINT8", 12), &twelve[..5], None)),
        ("rejected-invalid_request-trailing-bytes", binary(input(json!([1, 1, 1, 3]), "UINT8", 3), &twelve, None)),
        ("rejected-invalid_request-huge-size", binary(input(json!([1, 1, 1, 3]), "UINT8", usize::MAX), &[1, 2, 3], None)),
        ("worker-invalid_input-fp32-binary", binary(input(json!([1, 1, 1, 3]), "FP32", 12), &twelve, None)),
        ("rejected-unsupported_datatype-float-binary", binary(input(json!([1, 1, 1, 3]), "FLOAT", 12), &twelve, None)),
        ("rejected-invalid_request-empty", Vec::new()),
    ];
    let dir = fuzz_dir().join("seeds/oip");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
