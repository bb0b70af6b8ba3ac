//! A deterministic (seeded) simulator of one model's queue and replicas, running Ember's policy
//! and a KEDA-like one on the same arrival traces.
//!
//! The world: jobs arrive (Poisson around a rate that follows the scenario), wait in a FIFO
//! queue, and are served one at a time by ready replicas (exponential service times); a new
//! replica serves only after a model-load delay. Ember's policy runs every second on ready +
//! in-flight jobs with measured rates and only stops idle replicas. The KEDA-like policy polls
//! every 30 s, sees ready messages only (`desired = ceil(ready / target)`), and HPA's 300 s
//! scale-down stabilisation; its scale-in stops replicas at random, busy or not (the job in hand
//! goes back to the queue, as a requeue would).

use std::collections::VecDeque;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::policy::{self, PolicyState, Settings, Signals};

/// Arrival shapes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// A constant rate.
    Steady,
    /// Nothing, then the rate from 60 s on.
    Step,
    /// A background of 10% of the rate plus a burst of `rate * 10` jobs every 300 s.
    Bursts,
    /// A day compressed into the run: rate * (0.55 - 0.45 cos(2 pi t / duration)).
    Diurnal,
}

impl Scenario {
    pub const ALL: [Scenario; 4] = [
        Scenario::Steady,
        Scenario::Step,
        Scenario::Bursts,
        Scenario::Diurnal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Step => "step",
            Scenario::Bursts => "bursts",
            Scenario::Diurnal => "diurnal",
        }
    }

    /// Jobs arriving in `[t, t + dt)`: Poisson around the scenario's rate, plus bursts.
    fn arrivals(self, t: f64, dt: f64, rate: f64, duration: f64, rng: &mut StdRng) -> u64 {
        let (lambda, burst) = match self {
            Scenario::Steady => (rate, 0),
            Scenario::Step => (if t >= 60.0 { rate } else { 0.0 }, 0),
            Scenario::Bursts => {
                let at_burst = (t % 300.0) < dt && t >= 30.0;
                (rate * 0.1, if at_burst { (rate * 10.0) as u64 } else { 0 })
            }
            Scenario::Diurnal => {
                let phase = 2.0 * std::f64::consts::PI * t / duration;
                (rate * (0.55 - 0.45 * phase.cos()), 0)
            }
        };
        poisson(lambda * dt, rng) + burst
    }
}

fn poisson(mean: f64, rng: &mut StdRng) -> u64 {
    // Knuth: fine for the small means of one time step.
    let limit = (-mean).exp();
    let mut k = 0;
    let mut p = 1.0;
    loop {
        p *= rng.random::<f64>();
        if p <= limit {
            return k;
        }
        k += 1;
    }
}

/// Which policy drives the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Ember,
    KedaLike,
}

/// The world's parameters.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct World {
    pub seed: u64,
    pub duration_s: f64,
    pub dt_s: f64,
    /// The scenario's nominal arrival rate, jobs/s.
    pub rate: f64,
    /// Jobs/s one replica serves.
    pub service_rate: f64,
    pub model_load_s: f64,
    /// KEDA's `queueLength` target (messages per replica).
    pub keda_target: f64,
    pub keda_poll_s: f64,
    pub hpa_stabilisation_s: f64,
    pub max_replicas: u32,
}

impl Default for World {
    fn default() -> Self {
        Self {
            seed: 7,
            duration_s: 1800.0,
            dt_s: 0.01,
            rate: 20.0,
            service_rate: 10.0,
            model_load_s: 5.0,
            keda_target: 20.0,
            keda_poll_s: 30.0,
            hpa_stabilisation_s: 300.0,
            max_replicas: 10,
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub scenario: Scenario,
    pub policy: Policy,
    pub jobs: u64,
    pub completed: u64,
    pub wait_p50_s: f64,
    pub wait_p95_s: f64,
    pub wait_p99_s: f64,
    pub replica_seconds: f64,
    pub scale_events: u32,
    /// Direction reversals (up then down, or down then up) within 120 s.
    pub flaps: u32,
    /// Jobs whose replica was stopped under them (returned to the queue).
    pub interrupted: u64,
    /// (t, replicas incl. starting, queue length), one sample a second.
    pub series: Vec<(f64, u32, u64)>,
}

struct Replica {
    ready_at: f64,
    /// Arrival time of the job in hand and when it finishes.
    busy: Option<(f64, f64)>,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Runs one scenario under one policy.
pub fn run(world: &World, scenario: Scenario, policy_kind: Policy, settings: &Settings) -> Outcome {
    let mut arrivals_rng = StdRng::seed_from_u64(world.seed);
    let mut service_rng = StdRng::seed_from_u64(world.seed ^ 0x5eed);
    let mut chaos_rng = StdRng::seed_from_u64(world.seed ^ 0xc4a0);
    let mut queue: VecDeque<f64> = VecDeque::new();
    let mut replicas: Vec<Replica> = Vec::new();
    let mut waits = Vec::new();
    let mut state = PolicyState::default();
    let mut keda_history: VecDeque<(f64, u32)> = VecDeque::new();
    let (mut jobs, mut completed, mut interrupted) = (0u64, 0u64, 0u64);
    let mut replica_seconds = 0.0;
    let mut scale_events = 0;
    let mut flaps = 0;
    let mut last_change: Option<(f64, i8)> = None;
    let mut series = Vec::new();
    let (mut arrived_since_tick, mut done_since_tick) = (0u64, 0u64);
    let mut measured_rate: Option<f64> = None;
    let mut arrival_rate = 0.0;
    let mut busy_time_since_tick = 0.0;
    let steps = (world.duration_s / world.dt_s).round() as u64;
    for step in 0..steps {
        let t = step as f64 * world.dt_s;
        let new = scenario.arrivals(
            t,
            world.dt_s,
            world.rate,
            world.duration_s,
            &mut arrivals_rng,
        );
        for _ in 0..new {
            queue.push_back(t);
        }
        jobs += new;
        arrived_since_tick += new;
        // Serve.
        for replica in replicas.iter_mut() {
            if let Some((_, finish)) = replica.busy
                && finish <= t
            {
                replica.busy = None;
                completed += 1;
                done_since_tick += 1;
            }
            if replica.busy.is_none()
                && replica.ready_at <= t
                && let Some(arrived) = queue.pop_front()
            {
                waits.push(t - arrived);
                let service = -(1.0 - service_rng.random::<f64>()).ln() / world.service_rate;
                replica.busy = Some((arrived, t + service));
            }
            if replica.busy.is_some() {
                busy_time_since_tick += world.dt_s;
            }
        }
        replica_seconds += replicas.len() as f64 * world.dt_s;
        let on_second = step % ((1.0 / world.dt_s).round() as u64) == 0;
        if on_second {
            series.push((t, replicas.len() as u32, queue.len() as u64));
        }
        // Decide.
        let desired = match policy_kind {
            Policy::Ember if on_second => {
                arrival_rate = 0.5 * arrival_rate + 0.5 * arrived_since_tick as f64;
                if busy_time_since_tick > 0.0 && done_since_tick > 0 {
                    let rate = done_since_tick as f64 / busy_time_since_tick;
                    measured_rate = Some(measured_rate.map_or(rate, |m| 0.8 * m + 0.2 * rate));
                }
                arrived_since_tick = 0;
                done_since_tick = 0;
                busy_time_since_tick = 0.0;
                let ready = replicas.iter().filter(|r| r.ready_at <= t).count() as u32;
                let in_flight = replicas.iter().filter(|r| r.busy.is_some()).count() as u64;
                let signals = Signals {
                    ready: queue.len() as u64,
                    in_flight,
                    arrival_rate,
                    service_rate_per_replica: measured_rate,
                    replicas_ready: ready,
                    replicas_starting: replicas.len() as u32 - ready,
                    gpu_utilisation: None,
                    backlog_growing: false,
                };
                Some(
                    policy::decide(settings, &mut state, &signals, Duration::from_secs_f64(t))
                        .replicas,
                )
            }
            Policy::KedaLike if step % ((world.keda_poll_s / world.dt_s).round() as u64) == 0 => {
                let raw = (queue.len() as f64 / world.keda_target).ceil() as u32;
                // KEDA activation: any message wakes 0 -> 1; HPA keeps the highest
                // recommendation of the stabilisation window when scaling down.
                let raw = if queue.is_empty() { raw } else { raw.max(1) };
                keda_history.push_back((t, raw));
                while keda_history
                    .front()
                    .is_some_and(|(at, _)| t - at > world.hpa_stabilisation_s)
                {
                    keda_history.pop_front();
                }
                let window_max = keda_history.iter().map(|(_, r)| *r).max().unwrap_or(raw);
                let current = replicas.len() as u32;
                let target = if raw >= current {
                    raw
                } else {
                    window_max.min(current)
                };
                Some(target.min(world.max_replicas))
            }
            _ => None,
        };
        if let Some(desired) = desired {
            let current = replicas.len() as u32;
            if desired != current {
                let direction = if desired > current { 1 } else { -1 };
                if let Some((at, last)) = last_change
                    && last != direction
                    && t - at <= 120.0
                {
                    flaps += 1;
                }
                last_change = Some((t, direction));
                scale_events += 1;
            }
            while (replicas.len() as u32) < desired {
                replicas.push(Replica {
                    ready_at: t + world.model_load_s,
                    busy: None,
                });
            }
            while (replicas.len() as u32) > desired {
                let victim = match policy_kind {
                    // Idle (or still loading) replicas only; busy ones wait for the next tick.
                    Policy::Ember => replicas.iter().rposition(|r| r.busy.is_none()),
                    // A random pod, as HPA does.
                    Policy::KedaLike => Some(chaos_rng.random_range(0..replicas.len())),
                };
                let Some(index) = victim else { break };
                let removed = replicas.swap_remove(index);
                if let Some((arrived, _)) = removed.busy {
                    interrupted += 1;
                    queue.push_front(arrived);
                    waits.pop();
                }
            }
        }
    }
    waits.sort_by(f64::total_cmp);
    Outcome {
        scenario,
        policy: policy_kind,
        jobs,
        completed,
        wait_p50_s: percentile(&waits, 0.50),
        wait_p95_s: percentile(&waits, 0.95),
        wait_p99_s: percentile(&waits, 0.99),
        replica_seconds,
        scale_events,
        flaps,
        interrupted,
        series,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn short() -> World {
        World {
            duration_s: 600.0,
            ..World::default()
        }
    }

    fn settings() -> Settings {
        Settings {
            max_replicas: 10,
            initial_service_rate: 10.0,
            ..Settings::default()
        }
    }

    #[test]
    fn the_simulator_is_deterministic_for_a_seed() {
        let a = run(&short(), Scenario::Bursts, Policy::Ember, &settings());
        let b = run(&short(), Scenario::Bursts, Policy::Ember, &settings());
        assert_eq!(a.jobs, b.jobs);
        assert_eq!(a.wait_p99_s, b.wait_p99_s);
        assert_eq!(a.replica_seconds, b.replica_seconds);
        let other = World { seed: 8, ..short() };
        assert_ne!(
            run(&other, Scenario::Bursts, Policy::Ember, &settings()).jobs,
            a.jobs
        );
    }

    #[test]
    fn ember_never_interrupts_a_job_and_keeps_up_with_a_step() {
        let outcome = run(&short(), Scenario::Step, Policy::Ember, &settings());
        assert_eq!(outcome.interrupted, 0);
        assert!(outcome.jobs > 8_000, "{}", outcome.jobs);
        assert!(
            outcome.completed + 100 >= outcome.jobs,
            "{} of {}",
            outcome.completed,
            outcome.jobs
        );
        let keda = run(&short(), Scenario::Step, Policy::KedaLike, &settings());
        assert!(
            outcome.wait_p95_s < keda.wait_p95_s,
            "ember p95 {} vs keda-like {}",
            outcome.wait_p95_s,
            keda.wait_p95_s
        );
    }
}
