//! A three-node RabbitMQ cluster of its own on this machine (`scripts/rabbitmq-cluster`), for the
//! chaos suite's broker faults: SIGKILL of the node that leads a queue, a follower stopped, a node
//! killed and brought back to catch up, a node frozen (SIGSTOP) and thawed. Like
//! [`crate::fleet::BrokerNode`], it is stopped on drop and disturbs no other test or the machine's
//! broker.
//!
//! Nodes are named by letter (`a`, `b`, `c`) or by full node name (`NAME-a@localhost`, what
//! [`BrokerCluster::leader`] returns); each listens for AMQP on 127.0.0.1 at the base port, +1
//! and +2. Every quorum queue declared after [`BrokerCluster::start`] returns has a replica on each
//! node.
// Until the chaos suite uses it (issue 15).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::fleet::root;

/// The node letters, in the order of their ports.
const NODES: [&str; 3] = ["a", "b", "c"];

/// Settings of the cluster's nodes that matter to faults (both unset: RabbitMQ's defaults).
#[derive(Clone, Debug, Default)]
pub struct ClusterOptions {
    /// Erlang's `net_ticktime` in seconds (default 60): how long a silent (frozen) node takes to
    /// be counted down by its peers, and so how long a publish routed to a frozen queue leader
    /// waits before it is refused.
    pub net_ticktime: Option<u32>,
    /// `cluster_partition_handling` (default `pause_minority`, as the Kubernetes overlay). A node
    /// frozen for longer than `net_ticktime` comes back partitioned, which `pause_minority` does
    /// not heal (RabbitMQ's partitions guide says so); `autoheal` restarts it on its return.
    pub partition_handling: Option<String>,
}

/// How a node's process is, seen from /proc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeState {
    Running,
    /// Stopped by SIGSTOP ([`BrokerCluster::freeze`]).
    Frozen,
    Down,
}

/// A three-node RabbitMQ cluster (`scripts/rabbitmq-cluster`), stopped on drop.
pub struct BrokerCluster {
    name: String,
    ports: [u16; 3],
}

/// Runs `scripts/rabbitmq-cluster` with `args` (and `env`), returning what it printed; its error
/// output is in the error.
fn rabbitmq_cluster(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<String> {
    let out = Command::new(root().join("scripts/rabbitmq-cluster"))
        .current_dir(root())
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "scripts/rabbitmq-cluster {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl BrokerCluster {
    /// Starts the cluster `name` with AMQP on `base_port`, `base_port + 1` and `base_port + 2`
    /// (Erlang distribution on each + 20000), waiting until all three serve and the cluster has
    /// three running nodes (about 15 s on two cores). A cluster of that name left running is
    /// stopped first.
    pub fn start(name: &str, base_port: u16) -> anyhow::Result<Self> {
        Self::start_with(name, base_port, &ClusterOptions::default())
    }

    /// [`BrokerCluster::start`] with node settings.
    pub fn start_with(
        name: &str,
        base_port: u16,
        options: &ClusterOptions,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "cluster name {name:?}: letters, digits, - and _ only"
        );
        let ports = [base_port, base_port + 1, base_port + 2];
        anyhow::ensure!(
            ports.iter().all(|p| u32::from(*p) + 20000 <= 65535),
            "base port {base_port}: the distribution ports (+20000) would not fit"
        );
        let mut env = Vec::new();
        if let Some(t) = options.net_ticktime {
            env.push(("EMBER_CLUSTER_NET_TICKTIME", t.to_string()));
        }
        if let Some(p) = &options.partition_handling {
            env.push(("EMBER_CLUSTER_PARTITION_HANDLING", p.clone()));
        }
        rabbitmq_cluster(&["start", name, &base_port.to_string()], &env)?;
        Ok(Self {
            name: name.to_string(),
            ports,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Each node's AMQP URL (guest over loopback), in node order a, b, c.
    pub fn urls(&self) -> Vec<String> {
        self.ports.iter().map(|p| url(*p)).collect()
    }

    /// Each node's full name (`NAME-a@localhost`, …), in the order of [`BrokerCluster::urls`].
    pub fn node_names(&self) -> Vec<String> {
        NODES.iter().map(|n| self.node_name(n)).collect()
    }

    /// The AMQP URL of one node (a letter or full node name).
    pub fn url_of(&self, node: &str) -> anyhow::Result<String> {
        Ok(url(self.ports[self.index(node)?]))
    }

    /// The AMQP port of one node.
    pub fn port_of(&self, node: &str) -> anyhow::Result<u16> {
        Ok(self.ports[self.index(node)?])
    }

    /// The full node name of a node given by letter or name.
    pub fn full_name(&self, node: &str) -> anyhow::Result<String> {
        Ok(self.node_name(NODES[self.index(node)?]))
    }

    /// The node's Erlang VM pid, while it is alive (frozen included).
    pub fn pid(&self, node: &str) -> Option<u32> {
        let letter = NODES[self.index(node).ok()?];
        let pid: u32 = std::fs::read_to_string(self.dir().join(letter).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        match process_state(pid)? {
            'Z' | 'X' => None,
            _ => Some(pid),
        }
    }

    /// Running, frozen or down.
    pub fn state(&self, node: &str) -> NodeState {
        match self.pid(node).and_then(process_state) {
            None => NodeState::Down,
            Some('T') => NodeState::Frozen,
            Some(_) => NodeState::Running,
        }
    }

    /// The full name of the node leading quorum queue `queue` (vhost `/`), as a live node knows
    /// it. Right after the leader is lost this may still name it until the election is over:
    /// [`BrokerCluster::new_leader`] waits for that.
    pub async fn leader(&self, queue: &str) -> anyhow::Result<String> {
        let out = self
            .script(vec!["leader".into(), self.name.clone(), queue.into()])
            .await?;
        let leader = out.trim();
        anyhow::ensure!(!leader.is_empty(), "no leader printed for {queue}");
        Ok(leader.to_string())
    }

    /// Waits (asking every 100 ms, for at most `within`) until `queue` is led by a node other
    /// than `old`; returns it and how long that took.
    pub async fn new_leader(
        &self,
        queue: &str,
        old: &str,
        within: Duration,
    ) -> anyhow::Result<(String, Duration)> {
        let old = self.full_name(old)?;
        let started = Instant::now();
        loop {
            if let Ok(leader) = self.leader(queue).await
                && leader != old
            {
                return Ok((leader, started.elapsed()));
            }
            anyhow::ensure!(
                started.elapsed() < within,
                "{queue} still led by {old} (or by nobody) after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL of the node's VM (its clients' connections drop; its queue replicas stop).
    pub async fn kill(&self, node: &str) -> anyhow::Result<()> {
        self.node_command("kill", node).await
    }

    /// A graceful stop of one node (`rabbitmqctl stop`).
    pub async fn stop_node(&self, node: &str) -> anyhow::Result<()> {
        self.node_command("stop-node", node).await
    }

    /// Brings a killed or stopped node back (a frozen one is thawed), waiting until it is one of
    /// the cluster's three running nodes; its quorum queue replicas then catch up from their
    /// leaders by themselves.
    pub async fn start_node(&self, node: &str) -> anyhow::Result<()> {
        self.node_command("start-node", node).await
    }

    /// SIGSTOP of the node's VM: it holds its connections but answers nothing.
    pub async fn freeze(&self, node: &str) -> anyhow::Result<()> {
        self.node_command("freeze", node).await
    }

    /// SIGCONT of a frozen node.
    pub async fn thaw(&self, node: &str) -> anyhow::Result<()> {
        self.node_command("thaw", node).await
    }

    /// `rabbitmqctl ARGS` against one node; what it printed.
    pub async fn ctl(&self, node: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["ctl".to_string(), self.name.clone(), self.full_name(node)?];
        all.extend(args.iter().map(|a| a.to_string()));
        self.script(all).await
    }

    fn node_name(&self, letter: &str) -> String {
        format!("{}-{letter}@localhost", self.name)
    }

    /// The index of a node given by letter or full name.
    fn index(&self, node: &str) -> anyhow::Result<usize> {
        let short = node.strip_suffix("@localhost").unwrap_or(node);
        let letter = short
            .strip_prefix(self.name.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .unwrap_or(short);
        NODES
            .iter()
            .position(|n| *n == letter)
            .ok_or_else(|| anyhow::anyhow!("no node {node} in cluster {}", self.name))
    }

    fn dir(&self) -> PathBuf {
        root().join("target/rabbitmq-nodes").join(&self.name)
    }

    async fn node_command(&self, command: &str, node: &str) -> anyhow::Result<()> {
        let node = self.full_name(node)?;
        self.script(vec![command.into(), self.name.clone(), node])
            .await
            .map(drop)
    }

    async fn script(&self, args: Vec<String>) -> anyhow::Result<String> {
        tokio::task::spawn_blocking(move || {
            rabbitmq_cluster(&args.iter().map(String::as_str).collect::<Vec<_>>(), &[])
        })
        .await?
    }
}

impl Drop for BrokerCluster {
    fn drop(&mut self) {
        let _ = rabbitmq_cluster(&["stop", &self.name], &[]);
    }
}

fn url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// The state letter of a process in /proc/PID/stat (R, S, D, T, Z, …), if it exists.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cluster() -> BrokerCluster {
        BrokerCluster {
            name: "c1".into(),
            ports: [36000, 36001, 36002],
        }
    }

    #[test]
    fn nodes_are_named_by_letter_or_full_name() {
        let c = cluster();
        assert_eq!(
            c.node_names(),
            ["c1-a@localhost", "c1-b@localhost", "c1-c@localhost"]
        );
        assert_eq!(c.full_name("b").unwrap(), "c1-b@localhost");
        assert_eq!(c.full_name("c1-c@localhost").unwrap(), "c1-c@localhost");
        assert_eq!(c.port_of("c1-c@localhost").unwrap(), 36002);
        assert_eq!(
            c.url_of("a").unwrap(),
            "amqp://guest:guest@127.0.0.1:36000/%2f"
        );
        assert_eq!(c.urls().len(), 3);
        assert!(c.full_name("d").is_err());
        assert!(c.full_name("other-a@localhost").is_err());
        // Not started: no pid, down (and dropping it stops nothing that runs).
        assert_eq!(c.pid("a"), None);
        assert_eq!(c.state("a"), NodeState::Down);
    }

    #[test]
    fn process_state_reads_proc() {
        assert!(matches!(
            process_state(std::process::id()),
            Some('R' | 'S' | 'D')
        ));
        assert_eq!(process_state(u32::MAX), None);
    }

    /// The real thing (about 40 s, three RabbitMQ nodes): `cargo test -p ember-bench --
    /// --ignored cluster`. Kills the leader of a quorum queue holding confirmed messages and
    /// checks that another node leads it with every message, that the node comes back, and
    /// that freeze and thaw work.
    #[tokio::test(flavor = "multi_thread")]
    #[ignore = "starts three RabbitMQ nodes (about 40 s)"]
    async fn a_cluster_survives_losing_its_leader() {
        let c = BrokerCluster::start("bench-cluster-test", 36400).unwrap();
        let queue = "ember.cluster.test";
        let conn = lapin::Connection::connect(&c.urls()[0], lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut args = lapin::types::FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        for i in 0..20 {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    Default::default(),
                    format!("m{i}").as_bytes(),
                    Default::default(),
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack());
        }
        let _ = conn.close(200, "done".into()).await;

        let leader = c.leader(queue).await.unwrap();
        assert!(c.node_names().contains(&leader), "{leader}");
        let pid = c.pid(&leader).unwrap();
        c.kill(&leader).await.unwrap();
        assert_eq!(c.state(&leader), NodeState::Down);
        // Gone, or a zombie until its parent (init) reaps it.
        assert!(matches!(process_state(pid), None | Some('Z' | 'X')));
        let (new, took) = c
            .new_leader(queue, &leader, Duration::from_secs(30))
            .await
            .unwrap();
        assert_ne!(new, leader);
        eprintln!("new leader {new} after {took:?}");

        let conn = lapin::Connection::connect(&c.url_of(&new).unwrap(), Default::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        assert_eq!(q.message_count(), 20, "every confirmed message is kept");
        let _ = conn.close(200, "done".into()).await;

        c.start_node(&leader).await.unwrap();
        assert_eq!(c.state(&leader), NodeState::Running);
        let follower = c.node_names().into_iter().find(|n| *n != new).unwrap();
        c.freeze(&follower).await.unwrap();
        assert_eq!(c.state(&follower), NodeState::Frozen);
        assert_eq!(c.leader(queue).await.unwrap(), new);
        c.thaw(&follower).await.unwrap();
        assert_eq!(c.state(&follower), NodeState::Running);
        let status = c.ctl("a", &["cluster_status"]).await.unwrap();
        assert!(status.contains(&follower), "{status}");
    }
}
