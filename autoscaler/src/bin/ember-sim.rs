//! Runs Ember's scaling policy and KEDA's RabbitMQ scaler (QueueLength over HTTP, and
//! MessageRate) with the HPA it drives, on the same seeded traces, at each system's default
//! windows and at equal windows; writes the comparison (JSON, and Markdown tables on stdout).

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ember_autoscaler::policy::Settings;
use ember_autoscaler::sim::{self, Keda, Outcome, Policy, Scenario, World};
use serde::Serialize;

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
    /// Seconds a replica told to stop may take to finish its job (the worker's --drain-timeout).
    #[arg(long, default_value_t = 25.0)]
    drain_limit: f64,
    /// KEDA QueueLength `value` (ready + unacked messages per replica).
    #[arg(long, default_value_t = 20.0)]
    keda_queue_length: f64,
    /// KEDA MessageRate `value` (published messages/s per replica).
    #[arg(long, default_value_t = 8.0)]
    keda_message_rate: f64,
    /// Long-jobs world: jobs/s one replica serves (20 s jobs on average).
    #[arg(long, default_value_t = 0.05)]
    long_service_rate: f64,
    /// Long-jobs world: nominal arrival rate, jobs/s.
    #[arg(long, default_value_t = 0.3)]
    long_rate: f64,
    /// Long-jobs world: simulated seconds per scenario.
    #[arg(long, default_value_t = 7200.0)]
    long_duration: f64,
    /// Long-jobs world: KEDA QueueLength `value` (one message per replica).
    #[arg(long, default_value_t = 1.0)]
    long_keda_queue_length: f64,
    /// Long-jobs world: KEDA MessageRate `value` (80% of a replica's 0.05 jobs/s).
    #[arg(long, default_value_t = 0.04)]
    long_keda_message_rate: f64,
}

/// Other KEDA `value`s tried at the defaults (besides `--keda-queue-length` and
/// `--keda-message-rate`).
const QUEUE_LENGTH_VALUES: [f64; 3] = [5.0, 10.0, 40.0];
const MESSAGE_RATE_VALUES: [f64; 2] = [6.0, 10.0];

/// One set of windows applied to every scaler.
#[derive(Debug, Clone, Copy, Serialize)]
struct Windows {
    name: &'static str,
    what: &'static str,
    /// Ember `--scale-down-window` / `--idle-to-zero`, or `None` for Ember's defaults.
    ember: Option<(f64, f64)>,
    /// HPA scale-down `stabilizationWindowSeconds` / KEDA `cooldownPeriod`, or `None` for theirs.
    keda: Option<(f64, f64)>,
}

const WINDOWS: [Windows; 3] = [
    Windows {
        name: "defaults",
        what: "each system's defaults: Ember 30 s scale-down window / 60 s idle to zero; HPA 300 s scale-down stabilisation / KEDA 300 s cooldown",
        ember: None,
        keda: None,
    },
    Windows {
        name: "ember_windows",
        what: "everyone at Ember's windows: 30 s scale-down / 60 s to zero",
        ember: None,
        keda: Some((30.0, 60.0)),
    },
    Windows {
        name: "hpa_windows",
        what: "everyone at HPA/KEDA's windows: 300 s scale-down / 300 s to zero",
        ember: Some((300.0, 300.0)),
        keda: None,
    },
];

#[derive(Debug, Serialize)]
struct Run {
    /// `windows`: the three window sets; `keda_value`: other KEDA `value`s at the defaults;
    /// `long_jobs`: jobs longer than the drain limit.
    section: &'static str,
    windows: &'static str,
    keda_queue_length: f64,
    keda_message_rate: f64,
    /// Ember measured the service rate (false: it was given the true one).
    ember_measures_service_rate: bool,
    #[serde(flatten)]
    outcome: Outcome,
}

fn windowed(windows: &Windows, settings: Settings, keda: Keda) -> (Settings, Keda) {
    let settings = match windows.ember {
        Some((down, zero)) => Settings {
            scale_down_window: Duration::from_secs_f64(down),
            idle_to_zero: Duration::from_secs_f64(zero),
            ..settings
        },
        None => settings,
    };
    let keda = match windows.keda {
        Some((down, zero)) => Keda {
            scale_down_stabilization_s: down,
            cooldown_period_s: zero,
            ..keda
        },
        None => keda,
    };
    (settings, keda)
}

fn header(title: &str) {
    println!("\n### {title}\n");
    println!(
        "| scenario | scaler | value | jobs | wait p50 s | wait p95 s | wait p99 s | wait max s | replica-s | scale events | flaps | drained | interrupted | cold starts | cold-start wait max s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
}

fn row(run: &Run) {
    let o = &run.outcome;
    let value = match o.policy {
        Policy::Ember if !run.ember_measures_service_rate => "rate given".to_string(),
        Policy::Ember => "-".to_string(),
        Policy::KedaQueueLength => format!("{}", run.keda_queue_length),
        Policy::KedaMessageRate => format!("{}", run.keda_message_rate),
    };
    println!(
        "| {} | {} | {value} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {:.2} |",
        o.scenario.as_str(),
        o.policy.as_str(),
        o.jobs,
        o.wait_p50_s,
        o.wait_p95_s,
        o.wait_p99_s,
        o.wait_max_s,
        o.replica_seconds,
        o.scale_events,
        o.flaps,
        o.drained,
        o.interrupted,
        o.cold_starts,
        o.cold_start_wait_max_s,
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let world = World {
        seed: args.seed,
        duration_s: args.duration,
        rate: args.rate,
        service_rate: args.service_rate,
        model_load_s: args.model_load,
        drain_limit_s: args.drain_limit,
        ..World::default()
    };
    let base_settings = Settings {
        max_replicas: world.max_replicas,
        initial_service_rate: args.service_rate,
        ..Settings::default()
    };
    let base_keda = Keda {
        queue_length_value: args.keda_queue_length,
        message_rate_value: args.keda_message_rate,
        ..Keda::default()
    };
    let mut runs = Vec::new();
    let mut push = |section, windows: &Windows, world: &World, keda: &Keda, outcome| {
        let run = Run {
            section,
            windows: windows.name,
            keda_queue_length: keda.queue_length_value,
            keda_message_rate: keda.message_rate_value,
            ember_measures_service_rate: world.ember_measures_service_rate,
            outcome,
        };
        row(&run);
        runs.push(run);
    };

    // Every scaler at each system's defaults, then at equal windows.
    for windows in &WINDOWS {
        let (settings, keda) = windowed(windows, base_settings, base_keda);
        header(&format!("{} ({})", windows.name, windows.what));
        for scenario in Scenario::ALL {
            for policy in Policy::ALL {
                let outcome = sim::run(&world, scenario, policy, &settings, &keda);
                push("windows", windows, &world, &keda, outcome);
            }
        }
    }

    // KEDA's `value` is the user's choice: other values, at the defaults.
    let defaults = &WINDOWS[0];
    header("keda_value (KEDA at its default windows, other `value`s)");
    for scenario in Scenario::ALL {
        for (policy, values) in [
            (Policy::KedaQueueLength, &QUEUE_LENGTH_VALUES[..]),
            (Policy::KedaMessageRate, &MESSAGE_RATE_VALUES[..]),
        ] {
            for &value in values {
                let keda = Keda {
                    queue_length_value: value,
                    message_rate_value: value,
                    ..base_keda
                };
                let outcome = sim::run(&world, scenario, policy, &base_settings, &keda);
                push("keda_value", defaults, &world, &keda, outcome);
            }
        }
    }

    // Jobs longer than the drain limit: where scale-in's choice of victim matters.
    let long = World {
        duration_s: args.long_duration,
        rate: args.long_rate,
        service_rate: args.long_service_rate,
        ..world
    };
    let long_settings = Settings {
        initial_service_rate: args.long_service_rate,
        ..base_settings
    };
    let long_keda = Keda {
        queue_length_value: args.long_keda_queue_length,
        message_rate_value: args.long_keda_message_rate,
        ..base_keda
    };
    for windows in &WINDOWS[..2] {
        let (settings, keda) = windowed(windows, long_settings, long_keda);
        header(&format!("long_jobs, {} ({})", windows.name, windows.what));
        let given = World {
            ember_measures_service_rate: false,
            ..long
        };
        for scenario in Scenario::ALL {
            let outcome = sim::run(&given, scenario, Policy::Ember, &settings, &keda);
            push("long_jobs", windows, &given, &keda, outcome);
            for policy in Policy::ALL {
                let outcome = sim::run(&long, scenario, policy, &settings, &keda);
                push("long_jobs", windows, &long, &keda, outcome);
            }
        }
    }

    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join("sim.json");
    // Pretty JSON, but each per-second series on one line (compact), so the file stays
    // readable and small: series are swapped for placeholders, then put back. Only the
    // `windows` section (the one plotted) keeps its series.
    let mut series = Vec::new();
    let mut values = Vec::new();
    for run in &runs {
        let mut value = serde_json::to_value(run)?;
        for key in ["replicas", "queue"] {
            if run.section != "windows"
                && let Some(map) = value.as_object_mut()
            {
                map.remove(key);
            } else if let Some(slot) = value.get_mut(key) {
                let placeholder = format!("@@series{}@@", series.len());
                series.push(serde_json::to_string(slot)?);
                *slot = serde_json::Value::String(placeholder);
            }
        }
        values.push(value);
    }
    let doc = serde_json::json!({
        "world": world,
        "long_jobs_world": long,
        "ember_settings": format!("{base_settings:?}"),
        "ember_settings_long_jobs": format!("{long_settings:?}"),
        "keda": base_keda,
        "keda_long_jobs": long_keda,
        "windows": WINDOWS,
        "series": "replicas (alive: starting, ready or draining) and ready messages, one sample per simulated second (section windows only)",
        "runs": values,
    });
    let mut text = serde_json::to_string_pretty(&doc)?;
    for (index, compact) in series.iter().enumerate() {
        text = text.replacen(&format!("\"@@series{index}@@\""), compact, 1);
    }
    text.push('\n');
    std::fs::write(&path, text)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
