//! A private RabbitMQ node of a test's own (`scripts/rabbitmq-node`): restarts, TLS.

use std::path::Path;
use std::process::{Command, Output};

use crate::root;

/// Runs `scripts/rabbitmq-node` with `args`; fails the test if it fails.
pub fn rabbitmq_node(args: &[&str]) -> Output {
    rabbitmq_node_with(args, &[])
}

/// [`rabbitmq_node`] with environment variables for the script.
fn rabbitmq_node_with(args: &[&str], env: &[(&str, String)]) -> Output {
    let out = Command::new(root().join("scripts/rabbitmq-node"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
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
#[derive(Debug)]
pub struct Node {
    name: String,
}

impl Node {
    /// Starts node `name` with plain AMQP on `amqp_port` and amqps on `tls_port` (127.0.0.1),
    /// its certificates from `certs` (ca.pem, server.pem, server.key), and waits until it serves.
    pub fn with_tls(name: &str, amqp_port: u16, tls_port: u16, certs: &Path) -> Node {
        rabbitmq_node(&[
            "start",
            name,
            &amqp_port.to_string(),
            &tls_port.to_string(),
            certs.to_str().unwrap(),
        ]);
        Node {
            name: name.to_string(),
        }
    }

    /// Starts node `name` with plain AMQP on `amqp_port` and RabbitMQ's Prometheus endpoint on
    /// `prometheus_port` (127.0.0.1), and waits until it serves.
    pub fn with_prometheus(name: &str, amqp_port: u16, prometheus_port: u16) -> Node {
        rabbitmq_node_with(
            &["start", name, &amqp_port.to_string()],
            &[("EMBER_NODE_PROMETHEUS_PORT", prometheus_port.to_string())],
        );
        Node {
            name: name.to_string(),
        }
    }

    /// `rabbitmqctl args…` against this node (stop_app, start_app, add_user, …).
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut all = vec!["ctl", self.name.as_str()];
        all.extend_from_slice(args);
        rabbitmq_node(&all)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Not `rabbitmq_node`: a failed stop must not panic while a failed test unwinds.
        let _ = Command::new(root().join("scripts/rabbitmq-node"))
            .args(["stop", &self.name])
            .output();
    }
}
