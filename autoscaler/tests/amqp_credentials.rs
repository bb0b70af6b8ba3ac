//! The broker password never reaches the logs: the real autoscaler binary, at trace level, over
//! amqps to a private RabbitMQ node (scripts/rabbitmq-node) with a user whose password is
//! distinctive, through a connection, the node going away and coming back, a refused login and
//! `--help`; the URL and password also come from files.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const NODE: &str = "ember-amqp-creds";
const AMQP_PORT: u16 = 5693;
const TLS_PORT: u16 = 5694;
const USER: &str = "ember-creds-user";
/// Distinctive enough that finding it anywhere in the output means it leaked.
const PASSWORD: &str = "Xq7-vL2pR9-unmistakable-93kT";
const PATIENCE: Duration = Duration::from_secs(90);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rabbitmq_node(args: &[&str]) -> Output {
    let out = Command::new(root().join("scripts/rabbitmq-node"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/rabbitmq-node {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The private node; stopped when dropped, also when the test fails.
struct Node;

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/rabbitmq-node"))
            .args(["stop", NODE])
            .output();
    }
}

/// The autoscaler process, its stdout and stderr in one file; SIGTERM on drop.
struct Autoscaler {
    child: Child,
    log: PathBuf,
}

impl Autoscaler {
    fn start(name: &str, envs: &[(&str, &str)]) -> Autoscaler {
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("amqp-creds-{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let admin = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ember-autoscaler"))
            .current_dir(root())
            .args(["--model-dir", "models/ssdlite-person"])
            .args(["--model-name", &format!("creds-{name}")])
            .args(["--min-replicas", "0", "--max-replicas", "0"])
            .args(["--worker-bin", "/bin/true"])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--amqp-min-backoff", "50ms", "--amqp-max-backoff", "500ms"])
            .env("EMBER_LOG", "trace")
            .envs(envs.iter().copied())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Autoscaler { child, log }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// Waits until `needle` appears `times` times in the output.
    fn wait_for(&self, needle: &str, times: usize) {
        let deadline = Instant::now() + PATIENCE;
        while self.output().matches(needle).count() < times {
            assert!(
                Instant::now() < deadline,
                "no {times}x {needle:?} in the output:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops it (SIGTERM) and returns everything it wrote.
    fn stop(mut self) -> String {
        terminate(&mut self.child);
        self.output()
    }
}

fn terminate(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

impl Drop for Autoscaler {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

fn assert_no_password(output: &str, what: &str) {
    assert!(
        !output.contains(PASSWORD),
        "the password leaked ({what}):\n{output}"
    );
    // Nor in the percent-encoded or any partial form long enough to matter.
    assert!(
        !output.contains("unmistakable"),
        "part of the password leaked ({what}):\n{output}"
    );
}

fn certificates(dir: &Path) -> PathBuf {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "creds CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(params, ca_key);
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = server.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_pem).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    dir.join("ca.pem")
}

#[test]
fn the_broker_password_never_appears_in_the_output() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("amqp-creds");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = certificates(&dir);
    let ca = ca.to_str().unwrap();
    rabbitmq_node(&[
        "start",
        NODE,
        &AMQP_PORT.to_string(),
        &TLS_PORT.to_string(),
        dir.to_str().unwrap(),
    ]);
    let _node = Node;
    rabbitmq_node(&["ctl", NODE, "add_user", USER, PASSWORD]);
    rabbitmq_node(&[
        "ctl",
        NODE,
        "set_permissions",
        "-p",
        "/",
        USER,
        ".*",
        ".*",
        ".*",
    ]);
    let url = format!("amqps://{USER}:{PASSWORD}@127.0.0.1:{TLS_PORT}/%2f");
    let shown = format!("amqps://{USER}:***@127.0.0.1:{TLS_PORT}/%2f");

    // `--help` shows no environment values.
    let help = Command::new(env!("CARGO_BIN_EXE_ember-autoscaler"))
        .arg("--help")
        .env("EMBER_AMQP_URL", &url)
        .output()
        .unwrap();
    let help =
        String::from_utf8_lossy(&help.stdout).into_owned() + &String::from_utf8_lossy(&help.stderr);
    assert!(help.contains("--amqp-url-file"), "{help}");
    assert_no_password(&help, "--help");

    // Connects over amqps (the URL in the environment), loses the node, reconnects.
    let autoscaler = Autoscaler::start(
        "env",
        &[("EMBER_AMQP_URL", &url), ("EMBER_AMQP_CA_FILE", ca)],
    );
    autoscaler.wait_for("connected to the broker", 1);
    rabbitmq_node(&["ctl", NODE, "stop_app"]);
    autoscaler.wait_for("broker connection failed", 2);
    rabbitmq_node(&["ctl", NODE, "start_app"]);
    autoscaler.wait_for("connected to the broker", 2);
    let output = autoscaler.stop();
    assert!(output.contains(&shown), "{output}");
    assert!(output.contains("TRACE"), "not at trace level:\n{output}");
    assert_no_password(&output, "connected, node stopped, reconnected");

    // The URL from a file without a password, the password from another file: a vhost that does
    // not exist is refused after the login (so the password from the file was right).
    let url_file = dir.join("url");
    std::fs::write(
        &url_file,
        format!("amqps://{USER}@127.0.0.1:{TLS_PORT}/no-such-vhost\n"),
    )
    .unwrap();
    let password_file = dir.join("password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    let autoscaler = Autoscaler::start(
        "files",
        &[
            ("EMBER_AMQP_URL_FILE", url_file.to_str().unwrap()),
            ("EMBER_AMQP_PASSWORD_FILE", password_file.to_str().unwrap()),
            ("EMBER_AMQP_CA_FILE", ca),
        ],
    );
    autoscaler.wait_for("broker connection failed", 2);
    let output = autoscaler.stop();
    assert!(output.contains("no-such-vhost"), "{output}");
    assert!(!output.contains("ACCESS_REFUSED"), "{output}");
    assert_no_password(&output, "wrong vhost");

    // A wrong password in the URL: refused, and neither it nor the right one is shown.
    let wrong = format!("amqps://{USER}:{PASSWORD}-but-wrong@127.0.0.1:{TLS_PORT}/%2f");
    let autoscaler = Autoscaler::start(
        "refused",
        &[("EMBER_AMQP_URL", &wrong), ("EMBER_AMQP_CA_FILE", ca)],
    );
    autoscaler.wait_for("broker connection failed", 2);
    let output = autoscaler.stop();
    assert!(output.contains("ACCESS_REFUSED"), "{output}");
    assert_no_password(&output, "login refused");
}
