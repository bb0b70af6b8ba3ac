//! Model sources against real servers: an S3-compatible store (moto in server mode, with IAM
//! authentication enforced, over the S3 REST API with SigV4) and a local HTTPS server with a CA
//! made for the test, which counts the requests it answers. The real `ember-worker` binary
//! resolves `--model-uri` and says what it found (`--check`), or serves the model through the
//! real broker. The model: models/iris-classifier packed into an archive here.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Client, JobOptions, http_get};
use ember_core::protocol::Status;
use ember_testkit::amqp::AMQP_URL;
use ember_testkit::process::Process;
use ember_testkit::tls::{ExtendedKeyUsagePurpose, ca, leaf};
use ember_testkit::{PATIENCE, free_port, root};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Variables of the machine that would change where the worker's requests go.
const FOREIGN_ENV: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
];

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// models/iris-classifier as a `.tar.gz` whose one top-level directory is `iris-classifier/`:
/// the file's path, its bytes and their SHA-256.
fn iris_archive(dir: &Path) -> (PathBuf, Vec<u8>, String) {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for file in ["model.onnx", "model.toml"] {
        builder
            .append_path_with_name(
                root().join("models/iris-classifier").join(file),
                format!("iris-classifier/{file}"),
            )
            .unwrap();
    }
    let bytes = builder.into_inner().unwrap().finish().unwrap();
    let path = dir.join("iris-classifier.tar.gz");
    std::fs::write(&path, &bytes).unwrap();
    let digest = sha256(&bytes);
    (path, bytes, digest)
}

/// What `ember-worker --check` said: exit status, the verdict (stdout) and the log (stderr).
struct Verdict {
    ok: bool,
    json: Value,
    log: String,
}

impl Verdict {
    fn error(&self) -> &str {
        assert!(!self.ok, "expected a failure: {}", self.json);
        self.json["error"].as_str().unwrap()
    }
}

async fn check(args: &[&str], env: &[(&str, &str)]) -> Verdict {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ember-worker"));
    command
        .current_dir(root())
        .args(["--check", "--intra-threads", "1"])
        .args(args)
        .env("EMBER_LOG", "info,ort=warn")
        .kill_on_drop(true);
    for name in FOREIGN_ENV {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    let output = tokio::time::timeout(PATIENCE, command.output())
        .await
        .expect("--check ends by itself")
        .unwrap();
    let (stdout, log) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: stdout {stdout:?}, stderr {log}"));
    Verdict {
        ok: output.status.success(),
        json,
        log,
    }
}

/// A worker started with extra environment; killed on drop.
struct Worker {
    process: Process,
    admin_port: u16,
}

impl Worker {
    fn spawn(model: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let admin_port = free_port();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{model}-{}.log", uuid::Uuid::new_v4().simple()));
        let mut command = Command::new(env!("CARGO_BIN_EXE_ember-worker"));
        command
            .current_dir(root())
            .args(["--model-name", model, "--intra-threads", "1"])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
            .args(["--amqp-url", AMQP_URL])
            .args(args)
            .env("EMBER_LOG", "info,ort=warn");
        for name in FOREIGN_ENV {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        Self {
            process: Process::spawn(&mut command, log),
            admin_port,
        }
    }

    async fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < PATIENCE {
            if let Some((200, _)) = http_get(self.admin_port, "/readyz") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "worker not ready in time; log:\n{}",
            self.process.log_text()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// S3: moto in server mode

/// Creates an IAM user allowed s3:GetObject with an access key, the bucket `models` with the
/// archive at `iris/iris-classifier.tar.gz`, then makes moto check every request's signature
/// against its IAM (reset-auth 0). Prints the key as JSON.
const MOTO_SETUP: &str = r#"
import json, ssl, sys, urllib.request
import boto3
endpoint, archive = sys.argv[1], sys.argv[2]
ca = sys.argv[3] if len(sys.argv) > 3 else None
anyone = dict(endpoint_url=endpoint, region_name="us-east-1", verify=ca,
              aws_access_key_id="setup", aws_secret_access_key="setup")
iam, s3 = boto3.client("iam", **anyone), boto3.client("s3", **anyone)
iam.create_user(UserName="ember-worker")
iam.put_user_policy(UserName="ember-worker", PolicyName="read-models", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::models/*"}]}))
key = iam.create_access_key(UserName="ember-worker")["AccessKey"]
s3.create_bucket(Bucket="models")
with open(archive, "rb") as f:
    s3.put_object(Bucket="models", Key="iris/iris-classifier.tar.gz", Body=f.read())
urllib.request.urlopen(urllib.request.Request(
    endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
    headers={"Content-Type": "text/plain"}), context=ssl.create_default_context(cafile=ca)).read()
print(json.dumps({"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}))
"#;

struct Moto {
    _process: Process,
    endpoint: String,
    ca_file: Option<PathBuf>,
    key_id: String,
    secret: String,
}

impl Moto {
    /// Starts moto on a free port, over TLS with a certificate of a CA made here when `tls` names
    /// a directory for the PEM files, and sets it up (see [`MOTO_SETUP`]).
    fn start(archive: &Path, tls: Option<&Path>) -> Self {
        let port = free_port();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("moto-{}.log", uuid::Uuid::new_v4().simple()));
        let mut command = Command::new(root().join(".venv/bin/moto_server"));
        command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let ca_file = tls.map(|dir| {
            let ca = ca("ember moto CA");
            let (cert, key) = leaf(&ca, &["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth);
            for (name, pem) in [
                ("moto-ca.pem", &ca.pem),
                ("moto.pem", &cert),
                ("moto.key", &key),
            ] {
                std::fs::write(dir.join(name), pem).unwrap();
            }
            command.arg("-c").arg(dir.join("moto.pem"));
            command.arg("-k").arg(dir.join("moto.key"));
            dir.join("moto-ca.pem")
        });
        let process = Process::spawn(&mut command, log);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < PATIENCE,
                "moto_server did not listen in time (is `moto[server]` in .venv? run \
                 scripts/setup): {}",
                process.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let scheme = if ca_file.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{port}");
        let mut setup = Command::new(root().join(".venv/bin/python"));
        setup
            .args(["-c", MOTO_SETUP, &endpoint, archive.to_str().unwrap()])
            .args(&ca_file)
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        for name in FOREIGN_ENV {
            setup.env_remove(name);
        }
        let output = setup.output().unwrap();
        assert!(
            output.status.success(),
            "moto setup: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let key: Value = serde_json::from_slice(&output.stdout).unwrap();
        Self {
            _process: process,
            endpoint,
            ca_file,
            key_id: key["id"].as_str().unwrap().to_string(),
            secret: key["secret"].as_str().unwrap().to_string(),
        }
    }

    /// The worker's environment for this store with this key. The instance metadata endpoint
    /// points at a closed local port, so that nothing here can reach 169.254.169.254.
    fn env<'a>(&'a self, key_id: &'a str, secret: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ACCESS_KEY_ID", key_id),
            ("AWS_SECRET_ACCESS_KEY", secret),
            ("AWS_METADATA_ENDPOINT", "http://127.0.0.1:9"),
        ]
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_model_is_served_and_each_store_failure_is_a_clear_startup_error() {
    let dir = ember_testkit::tempdir!("s3");
    let (archive, _, digest) = iris_archive(&dir);
    let moto = Moto::start(&archive, None);
    let env = moto.env(&moto.key_id, &moto.secret);
    let uri = "s3://models/iris/iris-classifier.tar.gz";
    let cache = dir.join("cache");
    let cache_arg = cache.to_str().unwrap();

    // Served through the broker, pinned by digest, with the version given on the command line.
    let model = ember_testkit::unique_model("s3");
    let worker = Worker::spawn(
        &model,
        &[
            "--model-uri",
            uri,
            "--model-sha256",
            &digest,
            "--model-cache-dir",
            cache_arg,
            "--model-version",
            "2024-06",
        ],
        &env,
    );
    worker.wait_ready().await;
    assert!(
        cache
            .join(format!("sha256-{digest}/iris-classifier/model.onnx"))
            .is_file(),
        "unpacked into the cache under its digest"
    );
    let mut client = Client::new(&model).await;
    let (rows, expected) = ember_testkit::iris_rows();
    let body = serde_json::to_vec(&json!({
        "inputs": [{"name": "input", "shape": [3, 4], "datatype": "FP32", "data": rows}]
    }))
    .unwrap();
    let id = client
        .submit(
            &body,
            JobOptions {
                content_type: Some("application/json"),
                ..JobOptions::default()
            },
        )
        .await;
    client.collect(std::slice::from_ref(&id)).await;
    let result = client.result(&id);
    assert_eq!(result.status, Status::Ok, "{result:?}");
    let classes = result.outputs.as_ref().unwrap().classes.as_ref().unwrap();
    let labels: Vec<_> = classes.iter().map(|row| row[0].label.clone()).collect();
    let want: Vec<_> = expected.iter().map(|(label, _)| label.clone()).collect();
    assert_eq!(labels, want);
    assert_eq!(result.model_version.as_deref(), Some("2024-06"));
    drop(worker);
    client.cleanup().await;

    // Without a digest: downloaded again (S3 is not pinned), the same cache entry reused.
    let verdict = check(&["--model-uri", uri, "--model-cache-dir", cache_arg], &env).await;
    assert!(verdict.ok, "{}\n{}", verdict.json, verdict.log);
    assert_eq!(verdict.json["model"], "iris-classifier");

    // A fresh cache for each failure, so that none is answered from the cache.
    let fresh = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let missing = check(
        &[
            "--model-uri",
            "s3://models/iris/nope.tar.gz",
            "--model-cache-dir",
            &fresh("c1"),
        ],
        &env,
    )
    .await;
    let error = missing.error();
    assert!(
        error.contains("model source s3://models/iris/nope.tar.gz: not found")
            && error.contains("NoSuchKey"),
        "{error}"
    );

    let wrong_secret = moto.env(&moto.key_id, "not-the-secret");
    let denied = check(
        &["--model-uri", uri, "--model-cache-dir", &fresh("c2")],
        &wrong_secret,
    )
    .await;
    let error = denied.error();
    assert!(
        error.contains("access denied") && error.contains("SignatureDoesNotMatch"),
        "{error}"
    );
    assert!(!error.contains("not-the-secret") && !denied.log.contains("not-the-secret"));

    let unknown_key = moto.env("AKIAEMBERNOSUCHKEY00", "whatever");
    let denied = check(
        &["--model-uri", uri, "--model-cache-dir", &fresh("c3")],
        &unknown_key,
    )
    .await;
    let error = denied.error();
    assert!(
        error.contains("access denied") && error.contains("InvalidAccessKeyId"),
        "{error}"
    );

    let wrong = "0".repeat(64);
    let mismatch = check(
        &[
            "--model-uri",
            uri,
            "--model-sha256",
            &wrong,
            "--model-cache-dir",
            &fresh("c4"),
        ],
        &env,
    )
    .await;
    let error = mismatch.error();
    assert!(
        error.contains(&format!(
            "digest mismatch: expected sha256 {wrong}, got {digest}"
        )),
        "{error}"
    );
    assert!(
        !dir.join("c4").join(format!("sha256-{wrong}")).exists()
            && !dir.join("c4").join(format!("sha256-{digest}")).exists(),
        "nothing unverified is cached"
    );

    let closed = format!("http://127.0.0.1:{}", free_port());
    let mut unreachable_env = moto.env(&moto.key_id, &moto.secret);
    unreachable_env[0] = ("AWS_ENDPOINT", closed.as_str());
    let unreachable = check(
        &["--model-uri", uri, "--model-cache-dir", &fresh("c5")],
        &unreachable_env,
    )
    .await;
    let error = unreachable.error();
    assert!(
        error.contains("unreachable") && error.contains("Connection refused"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTPS: a local server with a CA made here

/// What the server answers on a path.
#[derive(Clone)]
enum Reply {
    Body(Vec<u8>),
    Status(u16),
    /// Announces `announced` bytes, sends `body` (fewer), closes.
    Short {
        body: Vec<u8>,
        announced: usize,
    },
    /// `status` to the first `times` requests, then the body.
    FailFirst {
        status: u16,
        times: usize,
        body: Vec<u8>,
    },
}

/// An HTTPS server on 127.0.0.1 (HTTP/1.1, one request per connection) that records every
/// request target it is sent; stopped on drop.
struct HttpsServer {
    port: u16,
    ca_file: PathBuf,
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    async fn start(dir: &Path, routes: Vec<(&str, Reply)>) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let ca = ca("ember sources test CA");
        let (cert, key) = leaf(
            &ca,
            &["127.0.0.1", "localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, &ca.pem).unwrap();
        let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<HashMap<String, Reply>> = Arc::new(
            routes
                .into_iter()
                .map(|(path, reply)| (path.to_string(), reply))
                .collect(),
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (acceptor, routes, seen) = (acceptor.clone(), routes.clone(), seen.clone());
                    tokio::spawn(async move {
                        let _ = answer(stream, acceptor, &routes, &seen).await;
                    });
                }
            }
        });
        Self {
            port,
            ca_file,
            seen,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    /// Requests seen for `path` (query strings ignored).
    fn requests(&self, path: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|target| target.split('?').next() == Some(path))
            .count()
    }

    fn targets(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

async fn answer(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    routes: &HashMap<String, Reply>,
    seen: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    let mut tls = acceptor.accept(stream).await?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buffer).await?;
        if n == 0 || head.len() > 65536 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..n]);
    }
    let target = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let nth = {
        let mut seen = seen.lock().unwrap();
        seen.push(target);
        seen.iter()
            .filter(|t| t.split('?').next() == Some(path.as_str()))
            .count()
    };
    let (status, body, announced) = match routes.get(&path).cloned() {
        Some(Reply::Body(body)) => (200, body.clone(), body.len()),
        Some(Reply::Status(status)) => (status, Vec::new(), 0),
        Some(Reply::Short { body, announced }) => (200, body, announced),
        Some(Reply::FailFirst {
            status,
            times,
            body,
        }) => {
            if nth <= times {
                (status, Vec::new(), 0)
            } else {
                (200, body.clone(), body.len())
            }
        }
        None => (404, Vec::new(), 0),
    };
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {announced}\r\nContent-Type: \
         application/octet-stream\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(&body).await?;
    tls.shutdown().await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_digest_pinned_https_download_is_used_from_the_cache_on_the_second_start() {
    let dir = ember_testkit::tempdir!("https-cache");
    let (_, bytes, digest) = iris_archive(&dir);
    let server = HttpsServer::start(&dir, vec![("/m/iris.tar.gz", Reply::Body(bytes))]).await;
    let cache = dir.join("cache");
    let url = server.url("/m/iris.tar.gz");
    let args = [
        "--model-uri",
        url.as_str(),
        "--model-sha256",
        digest.as_str(),
        "--model-ca-file",
        server.ca_file.to_str().unwrap(),
        "--model-cache-dir",
        cache.to_str().unwrap(),
    ];
    let first = check(&args, &[]).await;
    assert!(first.ok, "{}\n{}", first.json, first.log);
    assert_eq!(first.json["model"], "iris-classifier");
    assert_eq!(server.requests("/m/iris.tar.gz"), 1);

    let second = check(&args, &[]).await;
    assert!(second.ok, "{}\n{}", second.json, second.log);
    assert_eq!(second.json["model"], "iris-classifier");
    assert!(
        second.log.contains("model from the cache"),
        "{}",
        second.log
    );
    assert_eq!(
        server.requests("/m/iris.tar.gz"),
        1,
        "the second start made no request"
    );
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        entries,
        [format!("sha256-{digest}")],
        "one entry, no temporary files left"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn https_failures_are_clear_startup_errors_and_only_transient_ones_are_tried_again() {
    let dir = ember_testkit::tempdir!("https-failures");
    let (_, bytes, digest) = iris_archive(&dir);
    let server = HttpsServer::start(
        &dir,
        vec![
            ("/ok.tar.gz", Reply::Body(bytes.clone())),
            (
                "/short.tar.gz",
                Reply::Short {
                    body: bytes[..bytes.len() / 2].to_vec(),
                    announced: bytes.len(),
                },
            ),
            ("/gone.tar.gz", Reply::Status(404)),
            ("/forbidden.tar.gz", Reply::Status(403)),
            (
                "/flaky.tar.gz",
                Reply::FailFirst {
                    status: 503,
                    times: 1,
                    body: bytes.clone(),
                },
            ),
        ],
    )
    .await;
    let ca = server.ca_file.to_str().unwrap().to_string();
    let run = |path: &str, extra: &[&str]| {
        let mut args = vec![
            "--model-uri".to_string(),
            server.url(path),
            "--model-ca-file".to_string(),
            ca.clone(),
            "--model-cache-dir".to_string(),
            dir.join(format!("cache-{}", uuid::Uuid::new_v4().simple()))
                .to_str()
                .unwrap()
                .to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            check(&args, &[]).await
        }
    };
    let pin = ["--model-sha256", digest.as_str()];

    let wrong = "f".repeat(64);
    let verdict = run("/ok.tar.gz", &["--model-sha256", &wrong]).await;
    assert!(
        verdict.error().contains(&format!(
            "digest mismatch: expected sha256 {wrong}, got {digest}"
        )),
        "{}",
        verdict.json
    );
    assert_eq!(
        server.requests("/ok.tar.gz"),
        1,
        "a mismatch is not retried"
    );

    let verdict = run("/short.tar.gz", &pin).await;
    let error = verdict.error();
    assert!(
        error.contains(&format!(
            "truncated download: got {} of {} bytes",
            bytes.len() / 2,
            bytes.len()
        )) && error.contains("gave up after 4 tries"),
        "{error}"
    );
    assert_eq!(server.requests("/short.tar.gz"), 4);

    let verdict = run("/gone.tar.gz", &pin).await;
    assert!(
        verdict.error().contains("not found: HTTP 404 Not Found"),
        "{}",
        verdict.json
    );
    assert_eq!(server.requests("/gone.tar.gz"), 1, "a 404 is not retried");

    let verdict = run("/forbidden.tar.gz", &pin).await;
    assert!(
        verdict
            .error()
            .contains("access denied: HTTP 403 Forbidden"),
        "{}",
        verdict.json
    );
    assert_eq!(server.requests("/forbidden.tar.gz"), 1);

    let verdict = run("/flaky.tar.gz", &pin).await;
    assert!(verdict.ok, "{}\n{}", verdict.json, verdict.log);
    assert_eq!(
        server.requests("/flaky.tar.gz"),
        2,
        "one 503, then the model"
    );
    assert!(verdict.log.contains("HTTP 503"), "the retry is logged");

    // Unverified: refused without asking the server, unless asked for in so many words.
    let before = server.targets().len();
    let verdict = run("/ok.tar.gz", &[]).await;
    assert!(
        verdict
            .error()
            .contains("needs --model-sha256 (or --allow-unverified-model"),
        "{}",
        verdict.json
    );
    assert_eq!(server.targets().len(), before, "no request made");
    let verdict = run("/ok.tar.gz", &["--allow-unverified-model"]).await;
    assert!(verdict.ok, "{}\n{}", verdict.json, verdict.log);

    // A server whose CA is not given is not trusted, and that is said, once.
    let untrusted = check(
        &[
            "--model-uri",
            &server.url("/ok.tar.gz"),
            "--model-sha256",
            &digest,
            "--model-cache-dir",
            dir.join("cache-untrusted").to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let error = untrusted.error();
    assert!(
        error.contains("TLS:") && error.contains("--model-ca-file"),
        "{error}"
    );

    // Nothing listens: connection refused, tried 4 times.
    let closed = format!("https://127.0.0.1:{}/m.tar.gz", free_port());
    let verdict = check(
        &[
            "--model-uri",
            &closed,
            "--model-sha256",
            &digest,
            "--model-cache-dir",
            dir.join("cache-closed").to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let error = verdict.error();
    assert!(
        error.contains("unreachable")
            && error.contains("Connection refused")
            && error.contains("gave up after 4 tries"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_start_names_the_cause_without_the_uris_secrets() {
    let dir = ember_testkit::tempdir!("https-secrets");
    let server = HttpsServer::start(&dir, vec![("/m/gone.tar.gz", Reply::Status(404))]).await;
    let uri = format!(
        "https://ember:hunter2@127.0.0.1:{}/m/gone.tar.gz?X-Amz-Signature=s3cr3t-signature",
        server.port
    );
    let model = ember_testkit::unique_model("secrets");
    let mut worker = Worker::spawn(
        &model,
        &[
            "--model-uri",
            &uri,
            "--model-sha256",
            &"a".repeat(64),
            "--model-ca-file",
            server.ca_file.to_str().unwrap(),
            "--model-cache-dir",
            dir.join("cache").to_str().unwrap(),
        ],
        &[],
    );
    let status = worker.process.exited().await;
    let log = worker.process.log_text();
    assert!(!status.success(), "{log}");
    let redacted = format!(
        "model source https://***@127.0.0.1:{}/m/gone.tar.gz?***: not found: HTTP 404 Not Found",
        server.port
    );
    assert!(log.contains(&redacted), "{log}");
    assert_eq!(
        log.lines().filter(|l| l.contains("model source")).count(),
        1,
        "one line says it: {log}"
    );
    assert!(
        !log.contains("hunter2") && !log.contains("s3cr3t"),
        "a secret in the log: {log}"
    );
    // The secrets did travel (the server saw the signed URL): only the log is clean of them.
    assert!(
        server
            .targets()
            .iter()
            .any(|t| t.contains("X-Amz-Signature=s3cr3t-signature")),
        "{:?}",
        server.targets()
    );

    let verdict = check(
        &[
            "--model-uri",
            &uri,
            "--model-sha256",
            &"a".repeat(64),
            "--model-ca-file",
            server.ca_file.to_str().unwrap(),
            "--model-cache-dir",
            dir.join("cache").to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let shown = format!("{}{}", verdict.json, verdict.log);
    assert!(verdict.error().contains("?***: not found"), "{shown}");
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cr3t"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_artifacts_and_a_bare_onnx_file_are_unpacked_and_a_directory_is_used_in_place() {
    let dir = ember_testkit::tempdir!("local");
    let (archive, _, digest) = iris_archive(&dir);
    let cache = dir.join("cache");
    let cache_arg = cache.to_str().unwrap();

    let file_uri = format!("file://{}", archive.display());
    let verdict = check(
        &[
            "--model-uri",
            &file_uri,
            "--model-sha256",
            &digest,
            "--model-cache-dir",
            cache_arg,
        ],
        &[],
    )
    .await;
    assert!(verdict.ok, "{}\n{}", verdict.json, verdict.log);
    assert_eq!(verdict.json["model"], "iris-classifier");
    assert!(
        cache
            .join(format!("sha256-{digest}/iris-classifier/model.toml"))
            .is_file()
    );

    // One .onnx over https (no model.toml): named by its file, raw tensors.
    let graph = std::fs::read(root().join("models/iris-classifier/model.onnx")).unwrap();
    let graph_digest = sha256(&graph);
    let server = HttpsServer::start(&dir, vec![("/flowers.onnx", Reply::Body(graph))]).await;
    let verdict = check(
        &[
            "--model-uri",
            &server.url("/flowers.onnx"),
            "--model-sha256",
            &graph_digest,
            "--model-ca-file",
            server.ca_file.to_str().unwrap(),
            "--model-cache-dir",
            cache_arg,
        ],
        &[],
    )
    .await;
    assert!(verdict.ok, "{}\n{}", verdict.json, verdict.log);
    assert_eq!(verdict.json["model"], "flowers");
    assert_eq!(
        verdict.json["decoder"], "tensor",
        "no model.toml: raw tensors"
    );

    // A directory: in place, so a digest cannot apply to it.
    let in_place = root().join("models/iris-classifier");
    let verdict = check(
        &[
            "--model-uri",
            in_place.to_str().unwrap(),
            "--model-cache-dir",
            cache_arg,
        ],
        &[],
    )
    .await;
    assert!(verdict.ok, "{}\n{}", verdict.json, verdict.log);
    let verdict = check(
        &[
            "--model-uri",
            in_place.to_str().unwrap(),
            "--model-sha256",
            &digest,
        ],
        &[],
    )
    .await;
    assert!(
        verdict.error().contains("a directory is used in place"),
        "{}",
        verdict.json
    );

    // An archive that is not a model directory is refused before it reaches the cache.
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(5);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, "notes/readme.txt", &b"hello"[..])
        .unwrap();
    let not_a_model = dir.join("notes.tar");
    std::fs::write(&not_a_model, builder.into_inner().unwrap()).unwrap();
    let verdict = check(
        &[
            "--model-uri",
            not_a_model.to_str().unwrap(),
            "--model-cache-dir",
            cache_arg,
        ],
        &[],
    )
    .await;
    assert!(
        verdict.error().contains("no model.onnx or model.toml"),
        "{}",
        verdict.json
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_model_version_flag_replaces_model_tomls_version() {
    let dir = root().join("models/iris-classifier");
    let dir = dir.to_str().unwrap();
    let verdict = check(&["--model-dir", dir], &[]).await;
    assert!(verdict.ok, "{}", verdict.json);
    assert_eq!(verdict.json["version"], "1", "model.toml's default");
    let verdict = check(&["--model-dir", dir, "--model-version", "2.1-rc"], &[]).await;
    assert!(verdict.ok, "{}", verdict.json);
    assert_eq!(verdict.json["version"], "2.1-rc");
    let verdict = check(&["--model-dir", dir, "--model-version", "v/2"], &[]).await;
    assert!(
        verdict.error().contains("model version `v/2`"),
        "{}",
        verdict.json
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_s3_compatible_store_behind_a_private_ca_is_trusted_with_the_ca_file() {
    let dir = ember_testkit::tempdir!("s3-tls");
    let (archive, _, digest) = iris_archive(&dir);
    let moto = Moto::start(&archive, Some(&dir));
    let env = moto.env(&moto.key_id, &moto.secret);
    let ca_file = moto.ca_file.as_ref().unwrap().to_str().unwrap();
    let uri = "s3://models/iris/iris-classifier.tar.gz";
    let trusted = check(
        &[
            "--model-uri",
            uri,
            "--model-sha256",
            &digest,
            "--model-ca-file",
            ca_file,
            "--model-cache-dir",
            dir.join("c1").to_str().unwrap(),
        ],
        &env,
    )
    .await;
    assert!(trusted.ok, "{}\n{}", trusted.json, trusted.log);
    assert_eq!(trusted.json["model"], "iris-classifier");
    let untrusted = check(
        &[
            "--model-uri",
            uri,
            "--model-sha256",
            &digest,
            "--model-cache-dir",
            dir.join("c2").to_str().unwrap(),
        ],
        &env,
    )
    .await;
    let error = untrusted.error();
    assert!(
        error.contains("TLS:") && error.contains("--model-ca-file"),
        "{error}"
    );
}
