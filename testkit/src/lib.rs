//! # ember-testkit
//!
//! The helpers the crates' integration tests share (a dev-dependency only, never shipped): where
//! the repository is, free ports and unique names, reading a `/metrics` page, and the fakes and
//! process managers the end-to-end tests run the real binaries with. What only one crate's tests
//! use (its binary's flags, its client) stays in that crate's `tests/common`.
//!
//! # Layout
//!
//! - this file: [`root`], [`PATIENCE`], [`free_port`], [`unique_model`], [`metric`],
//!   [`known_answers`], [`tempdir!`].
//! - [`amqp`]: the machine's broker: its URL, a connection that waits for it, a reply queue.
//! - [`rabbitmq`]: a private RabbitMQ node of a test's own (`scripts/rabbitmq-node`).
//! - [`process`]: a binary under test as a child process, its output in a log file.
//! - [`callbacks`]: a callback receiver on 127.0.0.1 that answers by a script.
//! - [`resolver`]: a DNS resolver that answers by a script.
//! - [`fake_redis`]: a "Redis" that fails every command with a recognisable error.
//! - [`tls`]: a CA and the certificates it signs, made at test time.
#![allow(
    clippy::unwrap_used,
    reason = "test helpers: a step that fails fails the test, with its own message"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

pub mod amqp;
pub mod callbacks;
pub mod fake_redis;
pub mod otlp;
pub mod process;
pub mod rabbitmq;
pub mod resolver;
pub mod tls;

/// Bound on every wait in the tests; a wait that runs out fails the test with what it saw.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// The repository root (models/, tests/samples, scripts/), from this crate's own directory.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A TCP port on 127.0.0.1 that nothing listens on just now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A model name no other test uses, so each test has its own queues (`test-<test>-<8 hex>`;
/// scripts/sweep_queues.py removes what killed runs leave behind).
pub fn unique_model(test: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("test-{test}-{}", &id[..8])
}

/// Sum of a metric's samples whose line starts with `prefix` (e.g.
/// `ember_worker_batch_size_count`); 0 where there is none.
pub fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The known answers of a bundled model (tests/known_answers.json, by ONNX Runtime in Python).
pub fn known_answers(model: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/known_answers.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all["models"][model].clone()
}

/// The iris rows of the known answers (one per class) as the values of one `[3, 4]` FP32
/// tensor, and per row the expected label and ONNX Runtime's probabilities.
pub fn iris_rows() -> (Vec<f32>, Vec<(String, Vec<f64>)>) {
    let known = known_answers("iris-classifier");
    let mut data = Vec::new();
    let mut expected = Vec::new();
    for case in known["cases"].as_array().unwrap() {
        for v in case["input"]["data"].as_array().unwrap() {
            data.push(v.as_f64().unwrap() as f32);
        }
        let probabilities = case["probabilities"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_f64().unwrap())
            .collect();
        expected.push((
            case["expected_label"].as_str().unwrap().to_string(),
            probabilities,
        ));
    }
    (data, expected)
}

/// A fresh directory `<name>-<uuid>` under the calling test's `CARGO_TARGET_TMPDIR` (a macro:
/// cargo sets that variable for integration tests only, not for this library).
#[macro_export]
macro_rules! tempdir {
    ($name:expr) => {
        $crate::fresh_dir(::std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), $name)
    };
}

/// A fresh directory `<name>-<uuid>` under `parent` (see [`tempdir!`]).
pub fn fresh_dir(parent: &Path, name: &str) -> PathBuf {
    let dir = parent.join(format!("{name}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
