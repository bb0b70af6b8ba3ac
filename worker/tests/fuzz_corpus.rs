//! Replays the fuzz corpora of the worker's targets (`job`, `image`; see docs/fuzzing.md)
//! through the same harness code the fuzzer runs, without a fuzzer: every input must come back
//! (Ok or a clear error) without a panic, and the named seeds must give their named outcome.
//! `cargo test -p ember-worker --test fuzz_corpus -- --ignored write_seeds` rewrites the seeds.
#![allow(clippy::unwrap_used)]

#[path = "../../fuzz/src/corpus.rs"]
mod corpus;
#[allow(dead_code)]
#[path = "../../fuzz/src/image.rs"]
mod image;
#[allow(dead_code)]
#[path = "../../fuzz/src/job.rs"]
mod job;
#[allow(dead_code)]
mod oip {
    //! The `split` of the `oip` target (the rest of that file needs the dispatcher).
    pub fn split(data: &[u8]) -> (Option<&str>, &[u8]) {
        if let Some(rest) = data.strip_prefix(b"#")
            && let Some(end) = rest.iter().take(40).position(|&b| b == b'\n')
        {
            return (std::str::from_utf8(&rest[..end]).ok(), &rest[end + 1..]);
        }
        (None, data)
    }
}
#[allow(dead_code)]
#[path = "../../fuzz/src/tensor.rs"]
mod tensor;

use std::path::PathBuf;

use ember_core::protocol::ErrorCode;
use ember_worker::Error;
use ember_worker::process::Prepared;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};

fn fuzz_dir() -> PathBuf {
    ember_testkit::root().join("fuzz")
}

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    corpus::inputs(&fuzz_dir(), target)
}

/// The outcome a seed's name promises: `ok-WxH-...`, `toolarge-...`, `invalid_image-...`, ...
fn check_named(name: &str, result: &Result<Prepared, Error>) {
    // Seeds and regressions are named for their outcome; the fuzzer's corpus is not.
    let Some(seed) = name
        .strip_prefix("seeds/")
        .or_else(|| name.strip_prefix("regressions/"))
    else {
        return;
    };
    let mut parts = seed.split('-');
    let expected = parts.next().unwrap();
    let code = |expected: ErrorCode| match result {
        Err(error) => assert_eq!(error.code(), expected, "{name}: {error}"),
        Ok(_) => panic!("{name}: decoded, expected {expected:?}"),
    };
    match expected {
        "ok" => {
            let dims = parts.next().unwrap();
            let prepared = result.as_ref().unwrap_or_else(|e| panic!("{name}: {e}"));
            let (w, h) = image::dims(prepared);
            assert_eq!(format!("{w}x{h}"), dims, "{name}");
        }
        "toolarge" => code(ErrorCode::InputTooLarge),
        "invalid_image" => code(ErrorCode::InvalidImage),
        "invalid_input" => code(ErrorCode::InvalidInput),
        "unsupported" => code(ErrorCode::UnsupportedContentType),
        "unparsed" => panic!("{name}: the properties parsed"),
        other => panic!("{name}: unknown seed kind `{other}`"),
    }
}

#[test]
fn the_image_corpus_decodes_without_panics_and_seeds_give_their_outcome() {
    let inputs = inputs("image");
    assert!(inputs.len() >= 15, "only {} inputs", inputs.len());
    let mut ok = 0;
    for (name, data) in &inputs {
        let Some(result) = image::run(data) else {
            continue;
        };
        ok += usize::from(result.is_ok());
        check_named(name, &result);
    }
    assert!(ok >= 5, "only {ok} inputs decoded");
}

#[test]
fn the_job_corpus_decodes_without_panics_and_seeds_give_their_outcome() {
    let inputs = inputs("job");
    assert!(inputs.len() >= 8, "only {} inputs", inputs.len());
    for (name, data) in &inputs {
        match job::run(data) {
            Some((_, result)) => check_named(name, &result),
            None => assert!(
                !name.starts_with("seeds/") || name.starts_with("seeds/unparsed-"),
                "{name}: the properties did not parse"
            ),
        }
    }
}

/// Every datatype, JSON and binary: seeds `ok-<DATATYPE>-<form>` decode to that datatype;
/// `invalid_input-...` and `toolarge-...` seeds give their code.
#[test]
fn the_tensor_corpus_decodes_without_panics_and_every_datatype_seed_decodes() {
    let inputs = inputs("tensor");
    let mut datatypes = std::collections::BTreeSet::new();
    for (name, data) in &inputs {
        let result = tensor::run(data);
        let Some(seed) = name.strip_prefix("seeds/") else {
            continue;
        };
        let mut parts = seed.split('-');
        match parts.next().unwrap() {
            "ok" => {
                let request = result.unwrap_or_else(|e| panic!("{name}: {e}"));
                let datatype = parts.next().unwrap();
                assert_eq!(request.inputs[0].1.dtype().oip(), datatype, "{name}");
                datatypes.insert(datatype.to_string());
            }
            "invalid_input" => {
                assert_eq!(
                    result.expect_err(name).code(),
                    ErrorCode::InvalidInput,
                    "{name}"
                )
            }
            "toolarge" => {
                assert_eq!(
                    result.expect_err(name).code(),
                    ErrorCode::InputTooLarge,
                    "{name}"
                )
            }
            other => panic!("{name}: unknown seed kind `{other}`"),
        }
    }
    assert_eq!(
        datatypes.len(),
        13,
        "a seed for every datatype: {datatypes:?}"
    );
}

#[test]
fn a_job_envelope_is_read_from_its_headers() {
    let data = std::fs::read(fuzz_dir().join("seeds/job/ok-24x24-headers")).unwrap();
    let (envelope, prepared) = job::run(&data).unwrap();
    assert!(prepared.is_ok());
    assert_eq!(envelope.job_id, "job-1");
    assert_eq!(
        envelope.attempt, 3,
        "x-delivery-count 2 is the third attempt"
    );
    assert_eq!(envelope.deadline_ms, Some(1_700_000_000_000));
    assert_eq!(envelope.submitted_at_ms, Some(1_699_999_999_000));
    assert_eq!(
        envelope.callback_url.as_ref().map(|u| u.to_string()),
        Some("http://127.0.0.1:1/cb".into())
    );
    assert_eq!(envelope.content_type.as_deref(), Some("image/png"));

    let data = std::fs::read(fuzz_dir().join("seeds/job/ok-24x24-bare-redelivered")).unwrap();
    let (envelope, _) = job::run(&data).unwrap();
    assert_eq!(envelope.attempt, 2, "redelivered without a count");
    assert!(uuid_like(&envelope.job_id), "{}", envelope.job_id);
    assert_eq!(envelope.content_type, None);
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().filter(|&c| c == '-').count() == 4
}

// ---- seed writer ----

fn png(width: u32, height: u32, color: ::image::ExtendedColorType, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ::image::ImageEncoder::write_image(
        ::image::codecs::png::PngEncoder::new(&mut out),
        bytes,
        width,
        height,
        color,
    )
    .unwrap();
    out
}

fn jpeg(width: u32, height: u32, color: ::image::ExtendedColorType, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    ::image::ImageEncoder::write_image(
        ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80),
        bytes,
        width,
        height,
        color,
    )
    .unwrap();
    out
}

/// A valid PNG whose IHDR claims `width x height` (CRC fixed): a decompression bomb's header.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut bomb = png(1, 1, ::image::ExtendedColorType::Rgb8, &[0; 3]);
    bomb[16..20].copy_from_slice(&width.to_be_bytes());
    bomb[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    bomb
}

/// A JPEG whose SOF0 claims `width x height`.
fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let mut bomb = jpeg(8, 8, ::image::ExtendedColorType::Rgb8, &[90; 192]);
    let sof = bomb
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("baseline SOF0");
    // FFC0, length (2), precision (1), height (2), width (2).
    bomb[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    bomb[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    bomb
}

/// A sample photo from tests/samples shrunk to `size x size` RGB.
fn sample(name: &str, size: u32) -> Vec<u8> {
    let path = ember_testkit::root().join("tests/samples").join(name);
    let image = ::image::open(path).unwrap().into_rgb8();
    ::image::imageops::resize(&image, size, size, ::image::imageops::FilterType::Triangle)
        .into_raw()
}

fn tensor(width: usize, height: usize, name: &str) -> Vec<u8> {
    let data: Vec<u8> = (0..width * height * 3).map(|i| (i % 251) as u8).collect();
    serde_json::to_vec(&serde_json::json!({
        "id": "seed",
        "inputs": [{"name": name, "shape": [1, height, width, 3], "datatype": "UINT8", "data": data}]
    }))
    .unwrap()
}

fn headers(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in entries {
        table.insert(ShortString::from(name), value);
    }
    table
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

#[test]
#[ignore = "writes fuzz/seeds; run by hand"]
fn write_seeds() {
    use ::image::ExtendedColorType as C;
    let rgb = |w: u32, h: u32| -> Vec<u8> { (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect() };
    let camera = sample("camera.png", 24);
    let chelsea = sample("chelsea.png", 16);
    let camera_png = png(24, 24, C::Rgb8, &camera);
    let camera_jpg = jpeg(24, 24, C::Rgb8, &camera);
    let chelsea_jpg = jpeg(16, 16, C::Rgb8, &chelsea);
    let grey_jpg = jpeg(9, 7, C::L8, &[128; 63]);
    let bomb_png = png_claiming(100_000, 100_000);
    let bomb_jpg = jpeg_claiming(65_535, 65_535);

    // Target `image`: selector byte (0 none, 1 png, 2 jpeg, 3 json, 4 octet-stream,
    // 5 `Image/JPG; q=1`, 6 text/plain), then the body.
    let image_seeds: Vec<(&str, u8, Vec<u8>)> = vec![
        ("ok-4x2-grey-png", 1, png(4, 2, C::L8, &[200; 8])),
        ("ok-3x3-rgb-png-sniffed", 0, png(3, 3, C::Rgb8, &rgb(3, 3))),
        ("ok-2x2-rgba-png", 4, png(2, 2, C::Rgba8, &[10, 20, 30, 0].repeat(4))),
        ("ok-5x1-rgb16-png", 1, png(5, 1, C::Rgb16, &[7; 30])),
        ("ok-2x3-greyalpha-png", 1, png(2, 3, C::La8, &[9; 12])),
        ("ok-24x24-camera-png", 1, camera_png.clone()),
        ("ok-24x24-camera-jpeg", 2, camera_jpg.clone()),
        ("ok-16x16-chelsea-jpeg-sniffed", 0, chelsea_jpg.clone()),
        ("ok-9x7-grey-jpeg", 5, grey_jpg.clone()),
        ("ok-2x1-tensor-json", 3, tensor(2, 1, "image_tensor:0")),
        ("ok-32x32-tensor-json", 3, tensor(32, 32, "image_tensor:0")),
        ("toolarge-100000x100000-png", 1, bomb_png.clone()),
        ("toolarge-65535x65535-jpeg", 2, bomb_jpg.clone()),
        ("toolarge-2000x1000-png", 1, png_claiming(2000, 1000)),
        ("toolarge-tensor-100000x100000", 3, br#"{"inputs":[{"name":"image_tensor:0","shape":[1,100000,100000,3],"datatype":"UINT8","data":[]}]}"#.to_vec()),
        ("invalid_image-truncated-png", 1, camera_png[..camera_png.len() / 2].to_vec()),
        ("invalid_image-truncated-jpeg", 2, camera_jpg[..camera_jpg.len() / 2].to_vec()),
        ("invalid_image-png-as-jpeg", 2, camera_png.clone()),
        ("invalid_image-garbage", 0, b"GIF89a not ours".to_vec()),
        ("invalid_image-0x0-png", 1, png_claiming(0, 0)),
        ("invalid_input-empty", 1, Vec::new()),
        ("invalid_input-tensor-wrong-name", 3, tensor(2, 1, "other")),
        ("invalid_input-tensor-short", 3, br#"{"inputs":[{"name":"image_tensor:0","shape":[1,1,1,3],"datatype":"UINT8","data":[1,2]}]}"#.to_vec()),
        ("invalid_input-tensor-300", 3, br#"{"inputs":[{"name":"image_tensor:0","shape":[1,1,1,3],"datatype":"UINT8","data":[1,2,300]}]}"#.to_vec()),
        ("invalid_input-tensor-negative", 3, br#"{"inputs":[{"name":"image_tensor:0","shape":[1,-1,-1,3],"datatype":"UINT8","data":[1]}]}"#.to_vec()),
        ("invalid_input-tensor-nested", 3, br#"{"inputs":[{"name":"image_tensor:0","shape":[1,1,1,3],"datatype":"UINT8","data":[[[[[[1]]]]],{"a":2},3]}]}"#.to_vec()),
        ("invalid_input-json-broken", 3, b"{\"inputs\":[".to_vec()),
        ("unsupported-text", 6, b"hello".to_vec()),
    ];
    let dir = fuzz_dir().join("seeds/image");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, selector, body) in image_seeds {
        let mut data = vec![selector];
        data.extend_from_slice(&body);
        std::fs::write(dir.join(name), data).unwrap();
    }

    // Target `tensor`: `#<header length>\n` for a binary request, then the body.
    let tensor_dir = fuzz_dir().join("seeds/tensor");
    std::fs::create_dir_all(&tensor_dir).unwrap();
    let typed: [(&str, serde_json::Value, Vec<u8>); 13] = [
        ("BOOL", serde_json::json!([true, false]), vec![1, 0]),
        ("UINT8", serde_json::json!([1, 255]), vec![1, 255]),
        (
            "UINT16",
            serde_json::json!([1, 65535]),
            [1u16, 65535].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            "UINT32",
            serde_json::json!([1, 7]),
            [1u32, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            "UINT64",
            serde_json::json!([1, 7]),
            [1u64, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        ("INT8", serde_json::json!([-1, 127]), vec![255, 127]),
        (
            "INT16",
            serde_json::json!([-1, 7]),
            [-1i16, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            "INT32",
            serde_json::json!([-1, 7]),
            [-1i32, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            "INT64",
            serde_json::json!([-1, 7]),
            [-1i64, 7].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        (
            "FP16",
            serde_json::json!([0.5, -2.0]),
            vec![0x00, 0x38, 0x00, 0xc0],
        ),
        (
            "FP32",
            serde_json::json!([0.5, -2.0]),
            [0.5f32, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "FP64",
            serde_json::json!([0.5, -2.0]),
            [0.5f64, -2.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        (
            "BYTES",
            serde_json::json!(["ab", ""]),
            b"\x02\0\0\0ab\0\0\0\0".to_vec(),
        ),
    ];
    for (datatype, values, bytes) in typed {
        let json = serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": datatype, "data": values}]});
        std::fs::write(
            tensor_dir.join(format!("ok-{datatype}-json")),
            serde_json::to_vec(&json).unwrap(),
        )
        .unwrap();
        let head = serde_json::to_vec(
            &serde_json::json!({"inputs": [{"name": "x", "shape": [1, 2],
            "datatype": datatype, "parameters": {"binary_data_size": bytes.len()}}]}),
        )
        .unwrap();
        let mut binary = format!("#{}\n", head.len()).into_bytes();
        binary.extend_from_slice(&head);
        binary.extend_from_slice(&bytes);
        std::fs::write(tensor_dir.join(format!("ok-{datatype}-binary")), binary).unwrap();
    }
    for (name, body) in [
        (
            "invalid_input-int8-out-of-range",
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[128]}]}"#.to_vec(),
        ),
        (
            "invalid_input-fp16-not-a-number",
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP16","data":["a"]}]}"#.to_vec(),
        ),
        ("invalid_input-bytes-cut-short", {
            let head = br#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":5}}]}"#;
            let mut body = format!("#{}\n", head.len()).into_bytes();
            body.extend_from_slice(head);
            body.extend_from_slice(b"\x09\0\0\0a");
            body
        }),
        (
            "toolarge-shape",
            br#"{"inputs":[{"name":"x","shape":[4096,4096],"datatype":"FP32","data":[]}]}"#
                .to_vec(),
        ),
    ] {
        std::fs::write(tensor_dir.join(name), body).unwrap();
    }

    // Target `job`: flag byte, AMQP basic properties as on the wire, body.
    let full = BasicProperties::default()
        .with_content_type(ShortString::from("image/png"))
        .with_message_id(ShortString::from("job-1"))
        .with_reply_to(ShortString::from("amq.rabbitmq.reply-to"))
        .with_correlation_id(ShortString::from("c-1"))
        .with_delivery_mode(2)
        .with_headers(headers(vec![
            ("x-delivery-count", AMQPValue::LongLongInt(2)),
            ("ember-deadline", long(" 1700000000000 ")),
            (
                "ember-submitted-at",
                AMQPValue::Timestamp(1_699_999_999_000),
            ),
            ("ember-callback-url", long("http://127.0.0.1:1/cb")),
            (
                "traceparent",
                long("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
            ),
        ]));
    let odd = BasicProperties::default()
        .with_content_type(ShortString::from("image/jpeg; x=y"))
        .with_message_id(ShortString::from(""))
        .with_headers(headers(vec![
            ("x-delivery-count", AMQPValue::ShortInt(-1)),
            (
                "ember-deadline",
                AMQPValue::FieldArray(FieldArray::from(vec![long("1")])),
            ),
            ("ember-submitted-at", long("soon")),
            (
                "ember-callback-url",
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
            ),
            (
                "nested",
                AMQPValue::FieldTable(headers(vec![("x", AMQPValue::Boolean(true))])),
            ),
        ]));
    let json = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_headers(headers(vec![(
            "x-delivery-count",
            long("18446744073709551615"),
        )]));
    let bare = BasicProperties::default();
    let other = BasicProperties::default().with_content_type(ShortString::from("video/mp4"));
    let job_seeds: Vec<(&str, Vec<u8>)> = vec![
        ("ok-24x24-headers", job::encode(&full, false, &camera_png)),
        (
            "ok-24x24-bare-redelivered",
            job::encode(&bare, true, &camera_jpg),
        ),
        ("ok-9x7-odd-headers", job::encode(&odd, false, &grey_jpg)),
        (
            "ok-2x1-tensor",
            job::encode(&json, false, &tensor(2, 1, "image_tensor:0")),
        ),
        ("toolarge-png-bomb", job::encode(&full, false, &bomb_png)),
        ("toolarge-jpeg-bomb", job::encode(&bare, false, &bomb_jpg)),
        (
            "invalid_image-truncated",
            job::encode(&odd, true, &camera_jpg[..100]),
        ),
        ("invalid_input-empty-body", job::encode(&full, false, b"")),
        (
            "unsupported-video",
            job::encode(&other, false, b"\0\0\0\x18ftypmp42"),
        ),
        (
            "unparsed-truncated-properties",
            job::encode(&full, false, b"")[..20].to_vec(),
        ),
    ];
    let dir = fuzz_dir().join("seeds/job");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, data) in job_seeds {
        std::fs::write(dir.join(name), data).unwrap();
    }
}
