//! Runs Ember's scaling policy and a KEDA-like one on the same seeded traces and writes the
//! comparison (JSON, and a Markdown table on stdout).

use std::path::PathBuf;

use clap::Parser;
use ember_autoscaler::policy::Settings;
use ember_autoscaler::sim::{self, Policy, Scenario, World};

/// Compare scaling policies on simulated traces.
#[derive(Debug, Parser)]
struct Args {
    /// Where to write sim.json.
    #[arg(long, default_value = "docs/autoscaling")]
    out: PathBuf,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Simulated seconds per scenario.
    #[arg(long, default_value_t = 1800.0)]
    duration: f64,
    /// Nominal arrival rate, jobs/s.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Jobs/s one replica serves.
    #[arg(long, default_value_t = 10.0)]
    service_rate: f64,
    /// Seconds a new replica takes to load its model.
    #[arg(long, default_value_t = 5.0)]
    model_load: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let world = World {
        seed: args.seed,
        duration_s: args.duration,
        rate: args.rate,
        service_rate: args.service_rate,
        model_load_s: args.model_load,
        ..World::default()
    };
    let settings = Settings {
        max_replicas: world.max_replicas,
        initial_service_rate: args.service_rate,
        ..Settings::default()
    };
    let mut outcomes = Vec::new();
    println!(
        "| scenario | policy | jobs | wait p50 s | wait p95 s | wait p99 s | replica-s | scale events | flaps | interrupted |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for scenario in Scenario::ALL {
        for policy in [Policy::Ember, Policy::KedaLike] {
            let o = sim::run(&world, scenario, policy, &settings);
            println!(
                "| {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} | {} |",
                scenario.as_str(),
                match policy {
                    Policy::Ember => "ember",
                    Policy::KedaLike => "keda-like",
                },
                o.jobs,
                o.wait_p50_s,
                o.wait_p95_s,
                o.wait_p99_s,
                o.replica_seconds,
                o.scale_events,
                o.flaps,
                o.interrupted
            );
            outcomes.push(o);
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("sim.json");
    let doc = serde_json::json!({"world": world, "settings": format!("{settings:?}"), "outcomes": outcomes});
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
