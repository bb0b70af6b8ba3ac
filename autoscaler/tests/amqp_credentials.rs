//! The broker password never reaches the logs: the real autoscaler binary, at trace level, over
//! amqps to a private RabbitMQ node (scripts/rabbitmq-node) with a user whose password is
//! distinctive, through a connection, the node going away and coming back, a refused login and
//! `--help`; the URL and password also come from files.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ember_testkit::process::Process;
use ember_testkit::rabbitmq::Node;
use ember_testkit::{free_port, root};
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

/// The autoscaler process, its stdout and stderr in one file; SIGTERM on drop.
struct Autoscaler(Process);

impl Autoscaler {
    fn start(name: &str, envs: &[(&str, &str)]) -> Autoscaler {
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("amqp-creds-{name}.log"));
        let admin = free_port();
        let process = Process::spawn(
            Command::new(env!("CARGO_BIN_EXE_ember-autoscaler"))
                .current_dir(root())
                .args(["--model-dir", "models/ssdlite-person"])
                .args(["--model-name", &format!("creds-{name}")])
                .args(["--min-replicas", "0", "--max-replicas", "0"])
                .args(["--worker-bin", "/bin/true"])
                .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
                .args(["--amqp-min-backoff", "50ms", "--amqp-max-backoff", "500ms"])
                .env("EMBER_LOG", "trace")
                .envs(envs.iter().copied()),
            log,
        );
        Autoscaler(process.terminate_on_drop())
    }

    fn output(&self) -> String {
        self.0.log_text()
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
        self.0.stop();
        self.output()
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
    let node = Node::with_tls(NODE, AMQP_PORT, TLS_PORT, &dir);
    node.ctl(&["add_user", USER, PASSWORD]);
    node.ctl(&["set_permissions", "-p", "/", USER, ".*", ".*", ".*"]);
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
    node.ctl(&["stop_app"]);
    autoscaler.wait_for("broker connection failed", 2);
    node.ctl(&["start_app"]);
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
