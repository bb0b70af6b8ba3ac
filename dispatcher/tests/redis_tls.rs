//! The dispatcher's Redis over TLS with a password, as docs/deploy.md sets it up: a real
//! `redis-server` with only a TLS port and `requirepass`, its certificate from a CA made here.
//! The URL (password inside) comes from a file; the right CA and password serve jobs, a wrong CA
//! or a wrong password is a startup error that names the store and shows no password.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Dispatcher;
use ember_testkit::tls::{ExtendedKeyUsagePurpose, ca, leaf};
use ember_testkit::{PATIENCE, free_port, root};

const PASSWORD: &str = "s3cret-redis-password";

/// `redis-server` with TLS only (no plain port), `requirepass`, nothing on disk.
struct TlsRedis {
    child: Child,
    port: u16,
}

impl TlsRedis {
    fn start(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .current_dir(dir)
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .args(["--tls-auth-clients", "no"])
            .args(["--requirepass", PASSWORD])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < PATIENCE, "redis-server never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// The dispatcher's stderr when it refuses to start with `args`.
fn refusal(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_ember-dispatcher"))
        .current_dir(root())
        .args(["--listen", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--insecure-no-auth"])
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success(), "{args:?} started");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_store_over_tls_with_a_password_serves_and_a_wrong_ca_or_password_does_not_start() {
    let _serial = common::serial().await;
    let dir = ember_testkit::tempdir!("redis-tls");
    let good = ca("ember redis CA");
    let other = ca("someone else's CA");
    let (cert, key) = leaf(
        &good,
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let cert = write(&dir, "server.pem", &cert);
    let key = write(&dir, "server.key", &key);
    let ca_file = write(&dir, "ca.pem", &good.pem);
    let other_ca = write(&dir, "other-ca.pem", &other.pem);
    let redis = TlsRedis::start(&dir, Path::new(&cert), Path::new(&key), Path::new(&ca_file));
    let url = |password: &str| format!("rediss://:{password}@127.0.0.1:{}/0", redis.port);
    let url_file = write(&dir, "redis-url", &format!("{}\n", url(PASSWORD)));

    let model = ember_testkit::unique_model("redis-tls");
    let dispatcher = Dispatcher::start(
        &model,
        &["--redis-url-file", &url_file, "--redis-ca-file", &ca_file],
    )
    .await;
    // Ready means the store answered PING over TLS.
    let ready = Instant::now();
    while dispatcher.get("/v2/health/ready").await.unwrap().status() != 200 {
        assert!(
            ready.elapsed() < PATIENCE,
            "never ready: {}",
            dispatcher.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A job is recorded in the TLS store: its status reads back.
    let response = dispatcher.submit(&model, "astronaut.png", &[]).await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    let id = body["job_id"].as_str().unwrap();
    let view: serde_json::Value = dispatcher
        .get(&format!("/v1/jobs/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["status"], "queued", "{view}");
    drop(dispatcher);

    // The server's certificate from another CA: refused, and the password is not shown.
    let model_dir = root().join("models/ssdlite-person");
    let model_dir = model_dir.to_str().unwrap();
    let stderr = refusal(&[
        "--model-dir",
        model_dir,
        "--redis-url-file",
        &url_file,
        "--redis-ca-file",
        &other_ca,
    ]);
    assert!(stderr.contains("result store"), "{stderr}");
    assert!(!stderr.contains(PASSWORD), "{stderr}");
    // The right CA, a wrong password.
    let wrong = write(&dir, "wrong-url", &url("not-the-password"));
    let stderr = refusal(&[
        "--model-dir",
        model_dir,
        "--redis-url-file",
        &wrong,
        "--redis-ca-file",
        &ca_file,
    ]);
    assert!(stderr.contains("result store"), "{stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
}
