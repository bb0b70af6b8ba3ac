//! `ember-bench chaos`: the fleet (autoscaler local backend + workers + dispatcher, on a private
//! RabbitMQ node) under a steady load from real clients — HTTP jobs with callbacks to a receiver
//! run here, synchronous HTTP jobs, AMQP RPC jobs with a durable reply queue — while one fault at
//! a time is injected. Every submitted job is then checked: answered once (a visible result and a
//! callback, or a reply), or rejected up front with an error; never lost, never answered twice.
//! docs/chaos.md explains the faults and the columns.
//!
//! # Layout
//!
//! - this file: the flags, the fleet's settings, the run from start to files;
//! - [`clients`]: the callback receiver, the AMQP and HTTP clients, the ledger of every job;
//! - [`faults`]: one phase per fault: the load, the injection, the wait for the answers;
//! - [`report`]: the accounting of each phase and the run's `chaos.json` / `chaos.md`;
//! - the processes themselves: [`crate::fleet`] ([`IsolatedFleet`]).

mod clients;
mod faults;
mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use ember_core::topology::{self, QueueSettings};
use lapin::options::QueueDeleteOptions;

use self::clients::{AmqpClient, CallbackReceiver, HttpClient, Ledger, lock};
use self::faults::InFlight;
use crate::cluster::{BrokerCluster, ClusterOptions};
use crate::fleet::{self, Autoscaler, Broker, BrokerNode, IsolatedFleet, RestartableDispatcher};

/// Every fault, in the order they run.
pub const FAULTS: &[&str] = &[
    "worker-sigkill",
    "worker-sigterm",
    "scale-in",
    "dispatcher-restart",
    "dispatcher-sigkill",
    "broker-stop-app",
    "broker-restart",
    "receiver-down",
    "receiver-slow",
    "poison",
    "overload",
];

/// The faults against a three-node broker cluster (`--cluster`), in the order they run.
pub const CLUSTER_FAULTS: &[&str] = &[
    "cluster-kill-leader",
    "cluster-stop-follower",
    "cluster-kill-rejoin",
    "cluster-freeze-leader",
];

/// The marker that makes a worker abort (EMBER_WORKER_CHAOS_CRASH_ON), appended to a PNG.
const POISON_MARKER: &str = "EMBER-CHAOS-POISON-7f3a";

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosArgs {
    /// Faults to run, comma-separated, in this order (default: all).
    #[arg(long, value_delimiter = ',')]
    pub faults: Vec<String>,
    /// Jobs per fault (the overload phase sends for --overload instead).
    #[arg(long, default_value_t = 300)]
    pub jobs: usize,
    /// Steady offered load, jobs/s.
    #[arg(long, default_value_t = 20.0)]
    pub rate: f64,
    /// How long the overload (10x the measured capacity) lasts.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub overload: Duration,
    /// Longest wait for the answers after a fault's load.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// AMQP port of the private RabbitMQ node (`scripts/rabbitmq-node start chaos PORT`); with
    /// --cluster, the first of the three nodes' ports.
    #[arg(long, default_value_t = 5682)]
    pub amqp_port: u16,
    /// Run on a three-node RabbitMQ cluster (`scripts/rabbitmq-cluster`), every part given all
    /// three nodes; the default faults are then the cluster's (CLUSTER_FAULTS).
    #[arg(long)]
    pub cluster: bool,
    /// The dispatcher's Redis, with a database index of its own.
    #[arg(long, default_value = "redis://127.0.0.1:6379/7")]
    pub redis_url: String,
    /// The model served (ssdlite-person: the real one).
    #[arg(long, default_value = "models/ssdlite-person")]
    pub model_dir: PathBuf,
    /// `x-max-length` of the model's queue (the overload bound).
    #[arg(long, default_value_t = 300)]
    pub queue_max_length: u32,
    /// Most worker replicas (the autoscaler keeps at least 2).
    #[arg(long, default_value_t = 3)]
    pub max_replicas: u32,
}

/// Everything a phase works with: the fleet, the clients, the ledger, the payloads.
struct Harness {
    fleet: Arc<IsolatedFleet>,
    ledger: Ledger,
    http: Arc<HttpClient>,
    amqp: Arc<AmqpClient>,
    receiver: Arc<CallbackReceiver>,
    heartbeats: InFlight,
    /// An ordinary job's body (an 8x8 PNG), and a poison job's (the same with the marker).
    image: Vec<u8>,
    poison: Vec<u8>,
    args: ChaosArgs,
    /// Scale-ins logged before the scale-in phase began.
    scale_in_baseline: AtomicUsize,
}

pub async fn run(out: &Path, args: &ChaosArgs) -> anyhow::Result<()> {
    let faults = selected_faults(args)?;
    for bin in ["ember-worker", "ember-dispatcher", "ember-autoscaler"] {
        anyhow::ensure!(
            fleet::binary(bin).is_file(),
            "{} is missing: build the workspace's binaries first (cargo build --workspace)",
            fleet::binary(bin).display()
        );
    }
    let run_started = Instant::now();
    let fleet = Arc::new(start_fleet(args)?);
    fleet.autoscaler.wait_ready().await?;
    fleet.dispatcher.wait_ready().await?;
    let harness = Arc::new(connect_clients(fleet.clone(), args).await?);
    wait_for_workers(&harness).await?;
    let mut rows = Vec::new();
    for (phase, fault) in faults.iter().enumerate() {
        rows.push(faults::run_phase(&harness, fault, phase).await?);
        // A quiet moment between faults: the pool back to its floor.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    report::write(out, args, rows, run_started)?;
    // Clean up this run's queues (the broker is stopped anyway).
    if let Ok(c) = fleet::connect_any(&fleet.broker.urls()).await
        && let Ok(ch) = c.create_channel().await
    {
        for q in topology::model_queues(&fleet.model) {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    Ok(())
}

/// `--faults`, checked, or every fault.
fn selected_faults(args: &ChaosArgs) -> anyhow::Result<Vec<String>> {
    let known = if args.cluster { CLUSTER_FAULTS } else { FAULTS };
    let faults: Vec<String> = if args.faults.is_empty() {
        known.iter().map(|s| s.to_string()).collect()
    } else {
        args.faults.clone()
    };
    for f in &faults {
        anyhow::ensure!(
            known.contains(&f.as_str()),
            "unknown fault `{f}`{}; the faults: {}",
            if args.cluster { " with --cluster" } else { "" },
            known.join(", ")
        );
    }
    Ok(faults)
}

/// The private node, the autoscaler (which starts the workers) and the dispatcher, for a model
/// of this run's own.
fn start_fleet(args: &ChaosArgs) -> anyhow::Result<IsolatedFleet> {
    let broker = if args.cluster {
        eprintln!(
            "chaos: starting a three-node RabbitMQ cluster on 127.0.0.1:{}-{}",
            args.amqp_port,
            args.amqp_port + 2
        );
        // A frozen node is counted down after 10 s (not 60), and comes back through autoheal.
        let options = ClusterOptions {
            net_ticktime: Some(10),
            partition_handling: Some("autoheal".into()),
        };
        Broker::Cluster(BrokerCluster::start_with(
            &format!("chaos{}", args.amqp_port),
            args.amqp_port,
            &options,
        )?)
    } else {
        eprintln!(
            "chaos: starting the private RabbitMQ node on 127.0.0.1:{}",
            args.amqp_port
        );
        Broker::Node(BrokerNode::start(args.amqp_port)?)
    };
    let model = format!("chaos-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let env = environment(args, &broker.url());
    let autoscaler_admin = fleet::free_port();
    let autoscaler = Autoscaler::start(
        &autoscaler_args(args, &model, autoscaler_admin),
        autoscaler_admin,
        &env,
    )?;
    let (api, dispatcher_admin) = (fleet::free_port(), fleet::free_port());
    let dispatcher = RestartableDispatcher::new(
        dispatcher_args(args, &model, api, dispatcher_admin, &broker.url()),
        env,
        api,
        dispatcher_admin,
    );
    let fleet = IsolatedFleet {
        model,
        dispatcher,
        autoscaler,
        broker,
    };
    fleet.dispatcher.start()?;
    Ok(fleet)
}

/// Every part's environment: the private node, quick reconnects, the queue bound, the poison.
fn environment(args: &ChaosArgs, amqp_url: &str) -> Vec<(String, String)> {
    vec![
        ("EMBER_AMQP_URL".into(), amqp_url.into()),
        ("EMBER_AMQP_MAX_BACKOFF".into(), "1s".into()),
        // A frozen cluster node accepts TCP and then says nothing: give up on it soon.
        ("EMBER_AMQP_CONNECT_TIMEOUT".into(), "5s".into()),
        (
            "EMBER_WORKER_QUEUE_MAX_LENGTH".into(),
            args.queue_max_length.to_string(),
        ),
        ("EMBER_WORKER_CHAOS_CRASH_ON".into(), POISON_MARKER.into()),
        ("EMBER_LOG".into(), "info,ort=warn".into()),
    ]
}

fn autoscaler_args(args: &ChaosArgs, model: &str, admin: u16) -> Vec<String> {
    [
        "--model-dir",
        &args.model_dir.display().to_string(),
        "--model-name",
        model,
        "--admin-addr",
        &format!("127.0.0.1:{admin}"),
        "--min-replicas",
        "2",
        "--max-replicas",
        &args.max_replicas.max(2).to_string(),
        "--tick",
        "200ms",
        "--heartbeat-timeout",
        "3s",
        "--target-drain-time",
        "2s",
        "--scale-down-window",
        "2s",
        "--scale-down-step",
        "2",
        "--queue-max-length",
        &args.queue_max_length.to_string(),
        "--worker-arg",
        "--intra-threads 1 --max-batch 4 --heartbeat-interval 100ms --drain-timeout 10s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn dispatcher_args(args: &ChaosArgs, model: &str, api: u16, admin: u16, url: &str) -> Vec<String> {
    [
        "--model-dir",
        &args.model_dir.display().to_string(),
        "--model-name",
        model,
        "--listen",
        &format!("127.0.0.1:{api}"),
        "--admin-addr",
        &format!("127.0.0.1:{admin}"),
        "--amqp-url",
        url,
        "--redis-url",
        &args.redis_url,
        "--insecure-no-auth",
        "--callback-allow-net",
        "127.0.0.1/32",
        "--callback-timeout",
        "1s",
        "--callback-initial-backoff",
        "200ms",
        "--callback-max-backoff",
        "2s",
        "--callback-max-attempts",
        "1000",
        "--queue-max-length",
        &args.queue_max_length.to_string(),
        "--drain-timeout",
        "10s",
        "--max-wait",
        "30s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The callback receiver, the AMQP and HTTP clients and the heartbeat watch, with an empty ledger.
async fn connect_clients(fleet: Arc<IsolatedFleet>, args: &ChaosArgs) -> anyhow::Result<Harness> {
    let ledger: Ledger = Arc::default();
    let settings = QueueSettings {
        delivery_limit: 5,
        max_length: args.queue_max_length,
    };
    let receiver = CallbackReceiver::new(ledger.clone(), Duration::from_secs(2));
    receiver.up().await?;
    let amqp = AmqpClient::start(fleet.broker.urls(), &fleet.model, settings, ledger.clone());
    let http = Arc::new(HttpClient::new(
        format!("http://127.0.0.1:{}", fleet.dispatcher.api),
        &fleet.model,
        ledger.clone(),
        receiver.clone(),
    )?);
    let heartbeats = faults::watch_heartbeats(fleet.broker.urls(), fleet.model.clone());
    let image = include_bytes!("tiny.png").to_vec();
    let mut poison = image.clone();
    poison.extend_from_slice(POISON_MARKER.as_bytes());
    Ok(Harness {
        fleet,
        ledger,
        http,
        amqp,
        receiver,
        heartbeats,
        image,
        poison,
        args: args.clone(),
        scale_in_baseline: AtomicUsize::new(0),
    })
}

/// Two ready workers (by their heartbeats) before the first fault.
async fn wait_for_workers(harness: &Harness) -> anyhow::Result<()> {
    let started = Instant::now();
    while lock(&harness.heartbeats).len() < 2 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(90),
            "the workers never came up: {}",
            harness.fleet.autoscaler.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}
