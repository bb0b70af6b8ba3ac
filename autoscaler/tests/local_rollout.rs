//! A rollout with the local backend, end to end: the real autoscaler binary, real workers, the
//! real broker. Under 20 jobs/s for 30 s the pool moves from version 1 to version 2 of the iris
//! classifier: every job is answered once, none is lost, unpinned jobs go from v1 answers to v2
//! answers, and a job pinned to a version is never answered by another. Then a version 3
//! whose model file is broken: the pool stays on version 2 and its status says why.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ember_core::protocol::{ErrorCode, JobResult, Status, header};
use ember_core::topology::{self, QueueSettings};
use ember_testkit::process::Process;
use ember_testkit::{PATIENCE, free_port, root, unique_model};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};

/// A copy of the iris classifier whose model.toml says `version`; `broken` replaces its graph
/// with bytes that are not ONNX.
fn iris_version(parent: &Path, version: &str, broken: bool) -> PathBuf {
    let dir = ember_testkit::fresh_dir(parent, &format!("iris-v{version}"));
    let source = root().join("models/iris-classifier");
    for file in ["model.onnx", "model.toml"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let toml = std::fs::read_to_string(dir.join("model.toml")).unwrap();
    std::fs::write(
        dir.join("model.toml"),
        format!("version = \"{version}\"\n{toml}"),
    )
    .unwrap();
    if broken {
        std::fs::write(dir.join("model.onnx"), b"not an onnx graph").unwrap();
    }
    dir
}

/// `dir` packed as a model artifact (a .tar.gz of the directory), and its SHA-256.
fn artifact(dir: &Path) -> (PathBuf, String) {
    let archive = dir.with_extension("tar.gz");
    let packed = Command::new("tar")
        .arg("czf")
        .arg(&archive)
        .arg("-C")
        .arg(dir)
        .arg(".")
        .status()
        .unwrap();
    assert!(packed.success());
    let sum = Command::new("sha256sum").arg(&archive).output().unwrap();
    let digest = String::from_utf8(sum.stdout).unwrap();
    (
        archive,
        digest.split_whitespace().next().unwrap().to_string(),
    )
}

/// The pools file with one pool: `source` and the rest of its entry (TOML lines).
fn write_pools(path: &Path, model: &str, source: &str, rest: &str) {
    // Written beside and renamed, as a ConfigMap update is: never read half-written.
    let temporary = path.with_extension("new");
    std::fs::write(
        &temporary,
        format!("[[pool]]\nmodel = \"{model}\"\nsource = \"{source}\"\n{rest}"),
    )
    .unwrap();
    std::fs::rename(&temporary, path).unwrap();
}

fn status(path: &Path, model: &str) -> Value {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .map(|status| status["pools"][model].clone())
        .unwrap_or(Value::Null)
}

/// Waits (bounded) until the pool's status satisfies `done`.
async fn wait_status(
    path: &Path,
    model: &str,
    what: &str,
    log: &dyn Fn() -> String,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let now = status(path, model);
        if done(&now) {
            return now;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: never; status {now:#}\nlog:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a job asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Pin {
    None,
    V1,
    V2,
}

struct Sent {
    pin: Pin,
    /// Sent after the rollout to version 2 was asked for: a job pinned to version 1 may then
    /// find version 1 gone (its workers drained, its queue retired) before it is taken.
    after_asked: bool,
}

async fn publish(channel: &Channel, model: &str, reply_queue: &str, id: &str, pin: Pin) {
    let (rows, _) = ember_testkit::iris_rows();
    let body = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": &rows[..4]}]
    }))
    .unwrap();
    let mut headers = FieldTable::default();
    let version = match pin {
        Pin::None => None,
        Pin::V1 => Some("1"),
        Pin::V2 => Some("2"),
    };
    if let Some(version) = version {
        headers.insert(
            ShortString::from(header::MODEL_VERSION),
            AMQPValue::LongString(LongString::from(version)),
        );
    }
    let confirm = channel
        .basic_publish(
            topology::JOBS_EXCHANGE.into(),
            model.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_message_id(id.into())
                .with_correlation_id(id.into())
                .with_reply_to(reply_queue.into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "job {id} not confirmed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_rolls_from_v1_to_v2_under_load_losing_nothing_and_refuses_a_broken_v3() {
    let model = unique_model("rollout");
    let scratch = ember_testkit::fresh_dir(Path::new(env!("CARGO_TARGET_TMPDIR")), &model);
    let (v1, v2, v3) = (
        iris_version(&scratch, "1", false),
        iris_version(&scratch, "2", false),
        iris_version(&scratch, "3", true),
    );
    // v2 comes as an artifact pinned by its digest (the worker fetches, verifies and unpacks it
    // into its cache), v1 and v3 as directories.
    let (v2_archive, v2_digest) = artifact(&v2);
    let v2_source = format!("file://{}", v2_archive.display());
    let v2_rest = format!("sha256 = \"{v2_digest}\"\nversion = \"2\"\n");
    let cache = scratch.join("cache");
    let pools = scratch.join("pools.toml");
    let status_file = scratch.join("pools.status.json");
    write_pools(&pools, &model, v1.to_str().unwrap(), "");
    let admin = free_port();
    let autoscaler = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_ember-autoscaler"))
            .current_dir(root())
            .args(["--pools-file", pools.to_str().unwrap()])
            .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
            .args([
                "--min-replicas",
                "2",
                "--max-replicas",
                "2",
                "--tick",
                "200ms",
            ])
            .args(["--rollout-deadline", "90s"])
            .args([
                "--worker-arg",
                &format!(
                    "--intra-threads 1 --heartbeat-interval 200ms --model-cache-dir {}",
                    cache.display()
                ),
            ])
            .env("EMBER_LOG", "info,ort=warn,lapin::returned_messages=error"),
        scratch.join("autoscaler.log"),
    )
    .terminate_on_drop();
    let log = || autoscaler.log_text();

    let connection = ember_testkit::amqp::connect().await;
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    topology::declare_model(&channel, &model, QueueSettings::default())
        .await
        .unwrap();
    let (reply_queue, mut replies) = ember_testkit::amqp::reply_queue(&channel).await;
    wait_status(&status_file, &model, "v1 ready", &log, |s| {
        s["phase"] == "Stable" && s["workers"]["ready"] == 2
    })
    .await;

    // 20 jobs/s for 30 s: every 5th pinned to v1, and, once v2's rollout has begun, every 5th
    // (another one) pinned to v2. The rollout to v2 is asked for after 5 s.
    let mut sent: HashMap<String, Sent> = HashMap::new();
    let mut answers: HashMap<String, Vec<(JobResult, Instant)>> = HashMap::new();
    let load_started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    let (mut asked, mut rolling, mut complete) = (false, false, false);
    let mut completed_at = None;
    for i in 0..600u32 {
        ticker.tick().await;
        if !asked && load_started.elapsed() >= Duration::from_secs(5) {
            write_pools(&pools, &model, &v2_source, &v2_rest);
            asked = true;
        }
        if asked && (!rolling || !complete) {
            let now = status(&status_file, &model);
            rolling |= !now["rollout"].is_null() || now["current"]["version"] == "2";
            if !complete && now["phase"] == "Stable" && now["current"]["version"] == "2" {
                complete = true;
                completed_at = Some(Instant::now());
            }
        }
        let pin = match i % 5 {
            1 => Pin::V1,
            3 if rolling => Pin::V2,
            _ => Pin::None,
        };
        let id = format!("job-{i}");
        publish(&channel, &model, &reply_queue, &id, pin).await;
        sent.insert(
            id,
            Sent {
                pin,
                after_asked: asked,
            },
        );
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::ZERO, replies.next()).await
        {
            let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
            answers
                .entry(result.job_id.clone())
                .or_default()
                .push((result, Instant::now()));
        }
    }
    let deadline = Instant::now() + PATIENCE;
    while answers.len() < sent.len() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, replies.next()).await {
            Ok(Some(Ok(delivery))) => {
                let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
                answers
                    .entry(result.job_id.clone())
                    .or_default()
                    .push((result, Instant::now()));
            }
            _ => panic!(
                "{} of {} jobs answered\n{}",
                answers.len(),
                sent.len(),
                log()
            ),
        }
    }
    // Late duplicates would arrive now.
    while let Ok(Some(Ok(delivery))) =
        tokio::time::timeout(Duration::from_secs(1), replies.next()).await
    {
        let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
        answers
            .entry(result.job_id.clone())
            .or_default()
            .push((result, Instant::now()));
    }
    let final_status = wait_status(&status_file, &model, "v2 complete", &log, |s| {
        s["phase"] == "Stable" && s["current"]["version"] == "2"
    })
    .await;

    let mut by_version: std::collections::BTreeMap<(Pin, String), u32> = Default::default();
    let (mut last_v1, mut first_v2) = (None::<Instant>, None::<Instant>);
    for (id, Sent { pin, after_asked }) in &sent {
        let got = &answers[id];
        assert_eq!(got.len(), 1, "{id} answered {} times: {got:?}", got.len());
        let (result, at) = &got[0];
        let version = result.model_version.clone().unwrap_or_default();
        *by_version.entry((*pin, version.clone())).or_default() += 1;
        match (pin, result.status) {
            (Pin::None, Status::Ok) => {
                if version == "1" {
                    last_v1 = last_v1.max(Some(*at));
                } else {
                    first_v2 = Some(first_v2.map_or(*at, |t: Instant| t.min(*at)));
                }
            }
            (Pin::V1, Status::Ok) => assert_eq!(version, "1", "{id}: {result:?}"),
            (Pin::V2, Status::Ok) => assert_eq!(version, "2", "{id}: {result:?}"),
            // Only a job pinned to v1 and sent once v1 was on its way out may be refused, and
            // only so.
            (Pin::V1, Status::Error) if *after_asked => {
                let code = result.error.as_ref().unwrap().code;
                assert_eq!(code, ErrorCode::ModelVersionNotFound, "{id}: {result:?}");
            }
            _ => panic!("{id} ({pin:?}): {result:?}"),
        }
        assert!(
            matches!(version.as_str(), "1" | "2" | ""),
            "{id}: {result:?}"
        );
    }
    let count = |pin, version: &str| by_version.get(&(pin, version.to_string())).copied();
    assert!(count(Pin::None, "1").unwrap_or(0) > 0, "{by_version:?}");
    assert!(count(Pin::None, "2").unwrap_or(0) > 0, "{by_version:?}");
    assert!(count(Pin::V2, "2").unwrap_or(0) > 0, "{by_version:?}");
    // The newest unpinned jobs are all v2's: the rollout finished under load.
    let mut unpinned: Vec<(u32, String)> = sent
        .iter()
        .filter(|(_, s)| s.pin == Pin::None)
        .map(|(id, _)| {
            let n = id.trim_start_matches("job-").parse().unwrap();
            (
                n,
                answers[id][0].0.model_version.clone().unwrap_or_default(),
            )
        })
        .collect();
    unpinned.sort();
    assert!(
        unpinned.iter().rev().take(20).all(|(_, v)| v == "2"),
        "{unpinned:?}"
    );
    let events = final_status["events"].as_array().unwrap();
    for reason in ["RolloutStarted", "RolloutComplete"] {
        assert!(
            events.iter().any(|e| e["reason"] == reason),
            "{reason}: {events:#?}"
        );
    }
    println!(
        "rollout v1 -> v2 under load: {} jobs sent, each answered once; by (pin, version): {by_version:?}; \
         v1/v2 answer overlap {:?}; complete {:?} after the load began",
        sent.len(),
        match (last_v1, first_v2) {
            (Some(last), Some(first)) => last.saturating_duration_since(first),
            _ => Duration::ZERO,
        },
        completed_at.map(|t| t - load_started)
    );

    // Version 3 cannot load: its workers exit; the pool is rolled back to v2 and says why,
    // and jobs sent meanwhile are answered by v2.
    write_pools(&pools, &model, v3.to_str().unwrap(), "");
    let mut during = Vec::new();
    let rolled_back = {
        let started = Instant::now();
        loop {
            let now = status(&status_file, &model);
            if now["phase"] == "RolledBack" {
                break now;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "never rolled back: {now:#}\n{}",
                log()
            );
            let id = format!("during-v3-{}", during.len());
            publish(&channel, &model, &reply_queue, &id, Pin::None).await;
            during.push(id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(rolled_back["current"]["version"], "2", "{rolled_back:#}");
    assert_eq!(rolled_back["desired"]["version"], "3", "{rolled_back:#}");
    let reason = rolled_back["failed"]["reason"].as_str().unwrap();
    assert!(reason.contains("exited"), "{reason}");
    let warning = rolled_back["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["reason"] == "RolledBack")
        .unwrap_or_else(|| panic!("no RolledBack event: {rolled_back:#}"));
    assert_eq!(warning["type"], "Warning");
    println!("v3 rolled back: {}", warning["message"]);
    let mut v3_answers: HashMap<String, JobResult> = HashMap::new();
    let deadline = Instant::now() + PATIENCE;
    while v3_answers.len() < during.len() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(Ok(delivery))) = tokio::time::timeout(remaining, replies.next()).await else {
            panic!(
                "{} of {} answered during v3",
                v3_answers.len(),
                during.len()
            );
        };
        let result: JobResult = serde_json::from_slice(&delivery.data).unwrap();
        v3_answers.insert(result.job_id.clone(), result);
    }
    for id in &during {
        let result = &v3_answers[id];
        assert_eq!(result.status, Status::Ok, "{result:?}");
        assert_eq!(result.model_version.as_deref(), Some("2"), "{result:?}");
    }
    // It stays on v2: the failed spec is not tried again until it changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = status(&status_file, &model);
    assert_eq!(later["phase"], "RolledBack", "{later:#}");
    assert_eq!(later["workers"]["by_version"], json!({"2": 2}), "{later:#}");
    assert_eq!(later["current"]["sha256"], v2_digest.as_str(), "{later:#}");
    println!("final status: {later:#}");

    let mut autoscaler = autoscaler;
    autoscaler.signal("TERM");
    assert!(
        autoscaler.wait_exit().success(),
        "{}",
        autoscaler.log_text()
    );
    let mut queues = topology::model_queues(&model).to_vec();
    queues.extend(["1", "2", "3"].map(|v| topology::version_queue(&model, v)));
    for queue in queues {
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}
