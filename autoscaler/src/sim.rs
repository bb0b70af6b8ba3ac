//! A deterministic (seeded) simulator of one model's queue and replicas, running Ember's policy
//! and KEDA's RabbitMQ scaler (with the HPA it drives) on the same arrival traces.
//!
//! The world: jobs arrive (Poisson around a rate that follows the scenario), wait in a FIFO
//! queue, and are served one at a time by ready replicas (exponential service times); a new
//! replica serves only after a model-load delay. Every scaler's scale-in drains: a replica told
//! to stop takes no new job and finishes the one in hand (an Ember worker's SIGTERM drain); only
//! a job still running when the drain limit passes (`--drain-timeout`, under the pod's
//! `terminationGracePeriodSeconds`) is interrupted and goes back to the head of the queue.
//! Draining replicas cost replica-seconds but are no longer counted as replicas (a terminating
//! pod is not in a Deployment's `status.replicas`).
//!
//! The scalers:
//!
//! - **Ember**: [`crate::policy::decide`] every second on ready + in-flight jobs, the arrival rate
//!   and the measured service rate. Scale-in picks victims as the Kubernetes backend's
//!   `pod-deletion-cost` makes the ReplicaSet do: still-loading replicas, then idle ones, then
//!   busy ones (which drain), youngest first within each.
//! - **KEDA, `QueueLength` over HTTP**: metric = ready + unacked messages; **KEDA, `MessageRate`**:
//!   metric = the queue's publish rate (as the management API reports it, over a sample
//!   interval). Both: KEDA's operator polls every `pollingInterval` and alone moves 0 -> 1 (any
//!   activity) and N -> 0 (no activity for `cooldownPeriod`); between 1 and N the HPA syncs every
//!   15 s on the external metric with an `AverageValue` target: `ceil(metric / value)` unless
//!   within the 10% tolerance, then HPA's default behaviour (scale-up: no stabilisation, at most
//!   max(+100%, +4 pods) per 15 s; scale-down: the highest recommendation of the last 300 s, at
//!   most -100% per 15 s; never under 1). Scale-in victims are chosen as a ReplicaSet does
//!   without deletion costs: not-ready first, then youngest, busy or not.
//!
//! Every controller ticks at half its period past the period's start (Ember at 0.5 s + k s, KEDA
//! at 15 s + 30k s, the HPA at 7.5 s + 15k s): the expected phase of a randomly timed event.

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

/// Which scaler drives the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    Ember,
    /// KEDA's RabbitMQ scaler, `mode: QueueLength`, `protocol: http` (ready + unacked).
    KedaQueueLength,
    /// KEDA's RabbitMQ scaler, `mode: MessageRate` (publish rate; needs `protocol: http`).
    KedaMessageRate,
}

impl Policy {
    pub const ALL: [Policy; 3] = [
        Policy::Ember,
        Policy::KedaQueueLength,
        Policy::KedaMessageRate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Ember => "ember",
            Policy::KedaQueueLength => "keda_queue_length",
            Policy::KedaMessageRate => "keda_message_rate",
        }
    }
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
    pub max_replicas: u32,
    /// How long a replica told to stop may take to finish the job in hand: the worker's
    /// `--drain-timeout` (25 s in manifests/base/worker.yaml, under its
    /// `terminationGracePeriodSeconds: 35`). A job still running then is interrupted.
    pub drain_limit_s: f64,
    /// Whether Ember measures the service rate (completed jobs / their inference seconds each
    /// tick, as from heartbeats) or is given `Settings::initial_service_rate` throughout.
    pub ember_measures_service_rate: bool,
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
            max_replicas: 10,
            drain_limit_s: 25.0,
            ember_measures_service_rate: true,
        }
    }
}

/// KEDA's and the HPA's settings; [`Default`] is what a user gets without setting them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Keda {
    /// `pollingInterval`: how often KEDA's operator checks activity (0 <-> 1).
    pub polling_interval_s: f64,
    /// `cooldownPeriod`: no activity for this long -> 0 replicas.
    pub cooldown_period_s: f64,
    /// `activationValue`: the metric must exceed this to count as activity.
    pub activation_value: f64,
    /// `value` for `mode: QueueLength`: ready + unacked messages per replica.
    pub queue_length_value: f64,
    /// `value` for `mode: MessageRate`: published messages/s per replica.
    pub message_rate_value: f64,
    /// The management API's publish rate is over the last sample of this length
    /// (`collect_statistics_interval`, 5 s by default).
    pub rate_sample_s: f64,
    /// kube-controller-manager `--horizontal-pod-autoscaler-sync-period`.
    pub hpa_sync_period_s: f64,
    /// HPA's tolerance on the usage ratio.
    pub hpa_tolerance: f64,
    pub scale_up_stabilization_s: f64,
    /// Scale-up policies (selectPolicy Max): +`scale_up_percent`% or +`scale_up_pods` per period.
    pub scale_up_percent: f64,
    pub scale_up_pods: u32,
    pub scale_up_period_s: f64,
    pub scale_down_stabilization_s: f64,
    /// Scale-down policy: -`scale_down_percent`% per period.
    pub scale_down_percent: f64,
    pub scale_down_period_s: f64,
}

impl Default for Keda {
    fn default() -> Self {
        Self {
            polling_interval_s: 30.0,
            cooldown_period_s: 300.0,
            activation_value: 0.0,
            queue_length_value: 20.0,
            message_rate_value: 8.0,
            rate_sample_s: 5.0,
            hpa_sync_period_s: 15.0,
            hpa_tolerance: 0.1,
            scale_up_stabilization_s: 0.0,
            scale_up_percent: 100.0,
            scale_up_pods: 4,
            scale_up_period_s: 15.0,
            scale_down_stabilization_s: 300.0,
            scale_down_percent: 100.0,
            scale_down_period_s: 15.0,
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
    /// Waits (arrival -> the start of the service that completed it) of every job; a job not
    /// started by the end counts with its wait so far.
    pub wait_p50_s: f64,
    pub wait_p95_s: f64,
    pub wait_p99_s: f64,
    pub wait_max_s: f64,
    pub replica_seconds: f64,
    pub scale_events: u32,
    /// Direction reversals (up then down, or down then up) within 120 s.
    pub flaps: u32,
    /// Replicas told to stop while busy that finished the job in hand within the drain limit.
    pub drained: u64,
    /// Jobs whose replica's drain limit passed before they finished (back to the queue).
    pub interrupted: u64,
    /// Times a job arrived with no replica up or starting (0 -> 1 activations needed).
    pub cold_starts: u32,
    /// For each cold start, the first job's wait; the mean and the largest.
    pub cold_start_wait_mean_s: f64,
    pub cold_start_wait_max_s: f64,
    /// One sample a second: replicas alive (starting, ready or draining) and ready messages.
    pub replicas: Vec<u32>,
    pub queue: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Job {
    arrived: f64,
    /// Start of the current (or completing) service.
    started: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
struct Replica {
    created: f64,
    ready_at: f64,
    /// Set when told to stop: the drain deadline.
    draining_until: Option<f64>,
    /// The job in hand and when it finishes.
    busy: Option<(usize, f64)>,
}

/// How scale-in picks its victims among the replicas not already draining.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VictimOrder {
    /// A ReplicaSet with Ember's `pod-deletion-cost` annotations: loading, idle, then busy;
    /// youngest first within each.
    DeletionCost,
    /// A ReplicaSet without deletion costs: not-ready first, then youngest, busy or not.
    ReplicaSet,
}

/// The queue and the replicas, stepped in time; no policy in it.
#[derive(Debug, Clone, Default)]
struct Fleet {
    jobs: Vec<Job>,
    queue: VecDeque<usize>,
    replicas: Vec<Replica>,
    completed: u64,
    drained: u64,
    interrupted: u64,
    replica_seconds: f64,
    /// Completions and their service seconds since the last read (Ember's service-rate
    /// measurement, from heartbeats: completed jobs / inference seconds).
    done_since: u64,
    busy_time_since: f64,
    cold_starts: u32,
    cold_start_job: Option<usize>,
    cold_start_waits: Vec<f64>,
}

impl Fleet {
    fn arrive(&mut self, t: f64) {
        let id = self.jobs.len();
        self.jobs.push(Job {
            arrived: t,
            started: None,
        });
        self.queue.push_back(id);
        if self.cold_start_job.is_none() && self.replicas.iter().all(|r| r.draining_until.is_some())
        {
            self.cold_starts += 1;
            self.cold_start_job = Some(id);
        }
    }

    /// Replicas asked for (starting or ready), not draining.
    fn replicas(&self) -> u32 {
        self.replicas
            .iter()
            .filter(|r| r.draining_until.is_none())
            .count() as u32
    }

    fn ready(&self, t: f64) -> u32 {
        self.replicas
            .iter()
            .filter(|r| r.draining_until.is_none() && r.ready_at <= t)
            .count() as u32
    }

    /// Jobs in service (unacked), draining replicas included.
    fn in_flight(&self) -> u64 {
        self.replicas.iter().filter(|r| r.busy.is_some()).count() as u64
    }

    /// Advances `[t, t + dt)`: completions, drains ending (or running out), starts.
    fn step(&mut self, t: f64, dt: f64, service: &mut dyn FnMut() -> f64) {
        let mut index = 0;
        while index < self.replicas.len() {
            let replica = &mut self.replicas[index];
            if let Some((job, finish)) = replica.busy
                && finish <= t
            {
                replica.busy = None;
                self.completed += 1;
                // As a worker counts it: the job's inference time, added when it completes.
                self.done_since += 1;
                self.busy_time_since += finish - self.jobs[job].started.unwrap_or(finish);
                if replica.draining_until.is_some() {
                    self.drained += 1;
                }
            }
            if let Some(deadline) = replica.draining_until {
                if let Some((job, _)) = replica.busy {
                    if t < deadline {
                        index += 1;
                        continue;
                    }
                    // The drain ran out: SIGKILL; the unacked job goes back to the queue's head.
                    self.interrupted += 1;
                    self.jobs[job].started = None;
                    self.queue.push_front(job);
                }
                self.replicas.swap_remove(index);
                continue;
            }
            if replica.busy.is_none()
                && replica.ready_at <= t
                && let Some(job) = self.queue.pop_front()
            {
                self.jobs[job].started = Some(t);
                replica.busy = Some((job, t + service()));
                if self.cold_start_job == Some(job) {
                    self.cold_start_waits.push(t - self.jobs[job].arrived);
                    self.cold_start_job = None;
                }
            }
            index += 1;
        }
        self.replica_seconds += self.replicas.len() as f64 * dt;
    }

    /// Sets the replica count: new replicas load the model; removed ones drain.
    fn scale_to(&mut self, t: f64, desired: u32, order: VictimOrder, load_s: f64, drain_s: f64) {
        let mut current = self.replicas();
        while current < desired {
            self.replicas.push(Replica {
                created: t,
                ready_at: t + load_s,
                draining_until: None,
                busy: None,
            });
            current += 1;
        }
        while current > desired {
            let rank = |r: &Replica| -> u8 {
                match (r.ready_at <= t, r.busy.is_some(), order) {
                    (false, _, _) => 0,
                    (true, false, VictimOrder::DeletionCost) => 1,
                    (true, true, VictimOrder::DeletionCost) => 2,
                    (true, _, VictimOrder::ReplicaSet) => 1,
                }
            };
            let victim = self
                .replicas
                .iter()
                .enumerate()
                .filter(|(_, r)| r.draining_until.is_none())
                // Lowest rank, then youngest; the later index wins a tie.
                .min_by(|(ia, a), (ib, b)| {
                    rank(a)
                        .cmp(&rank(b))
                        .then(b.created.total_cmp(&a.created))
                        .then(ib.cmp(ia))
                })
                .map(|(index, _)| index);
            let Some(index) = victim else { break };
            if self.replicas[index].busy.is_some() {
                self.replicas[index].draining_until = Some(t + drain_s);
            } else {
                self.replicas.swap_remove(index);
            }
            current -= 1;
        }
    }

    /// Every job's wait: to the start of its last service, or until `end` if never started.
    fn waits(&self, end: f64) -> Vec<f64> {
        self.jobs
            .iter()
            .map(|job| job.started.unwrap_or(end) - job.arrived)
            .collect()
    }
}

/// The HPA controller's state for one HorizontalPodAutoscaler (external metric, `AverageValue`
/// target), following kube-controller-manager's replica calculator and
/// `normalizeDesiredReplicasWithBehaviors`.
#[derive(Debug, Clone, Default)]
pub struct Hpa {
    /// (time, recommendation before stabilisation).
    recommendations: Vec<(f64, u32)>,
    /// (time, replicas added (+) or removed (-)).
    events: Vec<(f64, i64)>,
}

impl Hpa {
    /// One sync: the replica count the HPA sets, given the current count (> 0), the metric and
    /// its per-replica target.
    pub fn sync(
        &mut self,
        keda: &Keda,
        max: u32,
        t: f64,
        current: u32,
        metric: f64,
        target: f64,
    ) -> u32 {
        let target = target.max(1e-9);
        let ratio = metric / (target * f64::from(current));
        let proposal = if (1.0 - ratio).abs() > keda.hpa_tolerance {
            (metric / target).ceil().min(f64::from(u32::MAX)) as u32
        } else {
            current
        };
        // maybeInitScaleDownStabilizationWindow: the first sync remembers the current count.
        if self.recommendations.is_empty() && keda.scale_down_stabilization_s > 0.0 {
            self.recommendations.push((t, current));
        }
        let (mut up, mut down) = (proposal, proposal);
        for &(at, rec) in &self.recommendations {
            if at > t - keda.scale_up_stabilization_s {
                up = up.min(rec);
            }
            if at > t - keda.scale_down_stabilization_s {
                down = down.max(rec);
            }
        }
        let stabilised = current.max(up).min(down);
        let keep = keda
            .scale_up_stabilization_s
            .max(keda.scale_down_stabilization_s);
        self.recommendations.retain(|(at, _)| *at > t - keep);
        self.recommendations.push((t, proposal));

        let change_within = |period: f64, up: bool| -> i64 {
            self.events
                .iter()
                .filter(|(at, change)| *at > t - period && (*change > 0) == up)
                .map(|(_, change)| change.abs())
                .sum()
        };
        let current_i = i64::from(current);
        let desired = if stabilised > current {
            let period = keda.scale_up_period_s;
            let start = current_i - change_within(period, true) + change_within(period, false);
            let by_pods = start + i64::from(keda.scale_up_pods);
            let by_percent = (start as f64 * (1.0 + keda.scale_up_percent / 100.0)).ceil() as i64;
            let limit = by_pods.max(by_percent).max(current_i);
            i64::from(stabilised).min(limit).min(i64::from(max))
        } else if stabilised < current {
            let period = keda.scale_down_period_s;
            let start = current_i + change_within(period, false) - change_within(period, true);
            let limit = (start as f64 * (1.0 - keda.scale_down_percent / 100.0)) as i64;
            // KEDA gives its HPA minReplicas = 1; 0 is KEDA's own move.
            i64::from(stabilised).max(limit).max(1)
        } else {
            current_i
        };
        let desired = desired.clamp(1, i64::from(max.max(1))) as u32;
        if desired != current {
            self.events.push((t, i64::from(desired) - current_i));
        }
        let keep = keda.scale_up_period_s.max(keda.scale_down_period_s);
        self.events.retain(|(at, _)| *at > t - keep);
        desired
    }
}

/// KEDA's operator loop for one ScaledObject (`minReplicaCount: 0`): activation and cooldown.
#[derive(Debug, Clone, Default)]
pub struct KedaOperator {
    last_active: Option<f64>,
}

impl KedaOperator {
    /// One poll: `Some(replicas)` when KEDA itself scales (0 -> 1 or N -> 0).
    pub fn poll(&mut self, keda: &Keda, t: f64, replicas: u32, active: bool) -> Option<u32> {
        if active {
            self.last_active = Some(t);
            (replicas == 0).then_some(1)
        } else if replicas > 0
            && self
                .last_active
                .is_none_or(|at| at + keda.cooldown_period_s < t)
        {
            Some(0)
        } else {
            None
        }
    }
}

/// Whether a controller with this period and phase ticks in `[t, t + dt)`.
fn ticks(t: f64, dt: f64, period: f64, phase: f64) -> bool {
    let since = t - phase;
    if since < -dt / 2.0 {
        return false;
    }
    let k = (since / period).round();
    (since - k * period).abs() < dt / 2.0
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Runs one scenario under one scaler.
pub fn run(
    world: &World,
    scenario: Scenario,
    policy_kind: Policy,
    settings: &Settings,
    keda: &Keda,
) -> Outcome {
    let mut arrivals_rng = StdRng::seed_from_u64(world.seed);
    let mut service_rng = StdRng::seed_from_u64(world.seed ^ 0x5eed);
    let service_rate = world.service_rate;
    let mut service = move || -(1.0 - service_rng.random::<f64>()).ln() / service_rate;
    let mut fleet = Fleet::default();
    let mut state = PolicyState::default();
    let mut hpa = Hpa::default();
    let mut operator = KedaOperator::default();
    let mut scale_events = 0;
    let mut flaps = 0;
    let mut last_change: Option<(f64, i8)> = None;
    let (mut replicas_series, mut queue_series) = (Vec::new(), Vec::new());
    let mut arrived_since_tick = 0u64;
    let mut measured_rate: Option<f64> = None;
    let mut arrival_rate = 0.0;
    let (mut rate_bucket, mut publish_rate) = (0u64, 0.0);
    let steps = (world.duration_s / world.dt_s).round() as u64;
    let per_second = (1.0 / world.dt_s).round() as u64;
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
            fleet.arrive(t);
        }
        arrived_since_tick += new;
        rate_bucket += new;
        fleet.step(t, world.dt_s, &mut service);
        if step % per_second == 0 {
            replicas_series.push(fleet.replicas.len() as u32);
            queue_series.push(fleet.queue.len() as u64);
        }
        if ticks(t, world.dt_s, keda.rate_sample_s, 0.0) && step > 0 {
            publish_rate = rate_bucket as f64 / keda.rate_sample_s;
            rate_bucket = 0;
        }
        // Decide.
        let current = fleet.replicas();
        let mut desired = None;
        match policy_kind {
            Policy::Ember if ticks(t, world.dt_s, 1.0, 0.5) => {
                arrival_rate = 0.5 * arrival_rate + 0.5 * arrived_since_tick as f64;
                if world.ember_measures_service_rate
                    && fleet.busy_time_since > 0.0
                    && fleet.done_since > 0
                {
                    let rate = fleet.done_since as f64 / fleet.busy_time_since;
                    measured_rate = Some(measured_rate.map_or(rate, |m| 0.8 * m + 0.2 * rate));
                }
                arrived_since_tick = 0;
                fleet.done_since = 0;
                fleet.busy_time_since = 0.0;
                let ready = fleet.ready(t);
                let signals = Signals {
                    ready: fleet.queue.len() as u64,
                    in_flight: fleet.in_flight(),
                    arrival_rate,
                    service_rate_per_replica: measured_rate,
                    replicas_ready: ready,
                    replicas_starting: current - ready,
                    gpu_utilisation: None,
                    backlog_growing: false,
                };
                let decision =
                    policy::decide(settings, &mut state, &signals, Duration::from_secs_f64(t));
                desired = Some(decision.replicas);
            }
            Policy::KedaQueueLength | Policy::KedaMessageRate => {
                let messages = (fleet.queue.len() as u64 + fleet.in_flight()) as f64;
                let (metric, target, active) = if policy_kind == Policy::KedaQueueLength {
                    (
                        messages,
                        keda.queue_length_value,
                        messages > keda.activation_value,
                    )
                } else {
                    (
                        publish_rate,
                        keda.message_rate_value,
                        publish_rate > keda.activation_value || messages > keda.activation_value,
                    )
                };
                let period = keda.polling_interval_s;
                if ticks(t, world.dt_s, period, period / 2.0) {
                    desired = operator.poll(keda, t, current, active);
                }
                let period = keda.hpa_sync_period_s;
                if desired.is_none() && current > 0 && ticks(t, world.dt_s, period, period / 2.0) {
                    let max = world.max_replicas;
                    desired = Some(hpa.sync(keda, max, t, current, metric, target));
                }
            }
            _ => {}
        }
        if let Some(desired) = desired {
            let desired = desired.min(world.max_replicas);
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
                let order = if policy_kind == Policy::Ember {
                    VictimOrder::DeletionCost
                } else {
                    VictimOrder::ReplicaSet
                };
                fleet.scale_to(t, desired, order, world.model_load_s, world.drain_limit_s);
            }
        }
    }
    let mut waits = fleet.waits(world.duration_s);
    waits.sort_by(f64::total_cmp);
    let cold = &fleet.cold_start_waits;
    Outcome {
        scenario,
        policy: policy_kind,
        jobs: fleet.jobs.len() as u64,
        completed: fleet.completed,
        wait_p50_s: percentile(&waits, 0.50),
        wait_p95_s: percentile(&waits, 0.95),
        wait_p99_s: percentile(&waits, 0.99),
        wait_max_s: waits.last().copied().unwrap_or(0.0),
        replica_seconds: fleet.replica_seconds,
        scale_events,
        flaps,
        drained: fleet.drained,
        interrupted: fleet.interrupted,
        cold_starts: fleet.cold_starts,
        cold_start_wait_mean_s: if cold.is_empty() {
            0.0
        } else {
            cold.iter().sum::<f64>() / cold.len() as f64
        },
        cold_start_wait_max_s: cold.iter().copied().fold(0.0, f64::max),
        replicas: replicas_series,
        queue: queue_series,
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
        let keda = Keda::default();
        for policy in Policy::ALL {
            let a = run(&short(), Scenario::Bursts, policy, &settings(), &keda);
            let b = run(&short(), Scenario::Bursts, policy, &settings(), &keda);
            assert_eq!(a.jobs, b.jobs);
            assert_eq!(a.wait_p99_s, b.wait_p99_s);
            assert_eq!(a.replica_seconds, b.replica_seconds);
            assert_eq!(a.replicas, b.replicas);
        }
        let a = run(
            &short(),
            Scenario::Bursts,
            Policy::Ember,
            &settings(),
            &keda,
        );
        let other = World { seed: 8, ..short() };
        let b = run(&other, Scenario::Bursts, Policy::Ember, &settings(), &keda);
        assert_ne!(b.jobs, a.jobs);
    }

    /// A fleet driven by hand: jobs at given times, given service times, scale commands.
    struct Script {
        arrivals: &'static [f64],
        service_s: &'static [f64],
        /// (time, replicas)
        scale: &'static [(f64, u32)],
        drain_s: f64,
        order: VictimOrder,
    }

    fn play(script: &Script, until: f64) -> Fleet {
        let dt = 0.01;
        let mut fleet = Fleet::default();
        let mut services = script.service_s.iter().copied();
        let mut service = move || services.next().expect("a service time per start");
        let steps = (until / dt).round() as u64;
        for step in 0..steps {
            let t = step as f64 * dt;
            for at in script.arrivals {
                if (at - t).abs() < dt / 2.0 {
                    fleet.arrive(t);
                }
            }
            fleet.step(t, dt, &mut service);
            for &(at, replicas) in script.scale {
                if (at - t).abs() < dt / 2.0 {
                    fleet.scale_to(t, replicas, script.order, 0.0, script.drain_s);
                }
            }
        }
        fleet
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 0.015)
    }

    struct Case {
        what: &'static str,
        script: Script,
        until: f64,
        /// Per job, in arrival order.
        waits: [f64; 3],
        interrupted: u64,
        drained: u64,
    }

    /// Replica A (created at 0) serves job 0 (3 s); replica B (created at 0.5) serves job 1
    /// (10 s); job 2 waits for A (1.2 -> 3.01). At 4 s the scaler goes to 1 replica.
    const ARRIVALS: &[f64] = &[0.0, 1.0, 1.2];
    const SCALE: &[(f64, u32)] = &[(0.0, 1), (0.5, 2), (4.0, 1)];
    const SERVICE: &[f64] = &[3.0, 10.0, 0.5, 0.5];

    #[test]
    fn every_job_keeps_its_own_wait_through_drains_and_interruptions() {
        // The old bookkeeping recorded a wait at each start and, on an interruption, popped the
        // *last recorded* wait: in the first case that is job 2's 1.81 s, not job 1's, and the
        // multiset of waits came out {0.01, 0, 4.01} instead of {0.01, 4.01, 1.81}.
        let cases = [
            Case {
                what: "a ReplicaSet takes the youngest replica (B, busy); its drain limit (1 s) \
                       passes; job 1 goes back to the queue's head and A serves it at 5.01",
                script: Script {
                    arrivals: ARRIVALS,
                    service_s: SERVICE,
                    scale: SCALE,
                    drain_s: 1.0,
                    order: VictimOrder::ReplicaSet,
                },
                until: 6.0,
                waits: [0.01, 4.01, 1.81],
                interrupted: 1,
                drained: 0,
            },
            Case {
                what: "the same with the manifests' 25 s drain: B finishes job 1 while draining",
                script: Script {
                    arrivals: ARRIVALS,
                    service_s: SERVICE,
                    scale: SCALE,
                    drain_s: 25.0,
                    order: VictimOrder::ReplicaSet,
                },
                until: 12.0,
                waits: [0.01, 0.0, 1.81],
                interrupted: 0,
                drained: 1,
            },
            Case {
                what: "Ember's deletion costs: the idle replica (A) goes, B keeps serving",
                script: Script {
                    arrivals: ARRIVALS,
                    service_s: SERVICE,
                    scale: SCALE,
                    drain_s: 1.0,
                    order: VictimOrder::DeletionCost,
                },
                until: 12.0,
                waits: [0.01, 0.0, 1.81],
                interrupted: 0,
                drained: 0,
            },
            Case {
                what: "scale to 0 under a 5 s job with two queued: the cut-off job keeps its \
                       place ahead of them, and a new replica at 2 s serves all three in order",
                script: Script {
                    arrivals: &[0.0, 0.1, 0.2],
                    service_s: &[5.0, 1.0, 1.0, 1.0],
                    scale: &[(0.0, 1), (1.0, 0), (2.0, 1)],
                    drain_s: 0.5,
                    order: VictimOrder::DeletionCost,
                },
                until: 6.0,
                waits: [2.01, 2.91, 3.81],
                interrupted: 1,
                drained: 0,
            },
        ];
        for case in cases {
            let fleet = play(&case.script, case.until);
            let waits = fleet.waits(case.until);
            assert!(
                close(&waits, &case.waits),
                "{}: waits {waits:?}, expected {:?}",
                case.what,
                case.waits
            );
            let (mut sorted, mut expected) = (waits.clone(), case.waits.to_vec());
            sorted.sort_by(f64::total_cmp);
            expected.sort_by(f64::total_cmp);
            assert!(
                close(&sorted, &expected),
                "{}: as a distribution",
                case.what
            );
            assert_eq!(fleet.interrupted, case.interrupted, "{}", case.what);
            assert_eq!(fleet.drained, case.drained, "{}", case.what);
            assert_eq!(fleet.completed, 3, "{}", case.what);
        }
    }

    #[test]
    fn hpa_follows_its_default_behaviour() {
        let keda = Keda::default();
        // Tolerance: 21 messages for 1 replica at target 20 is within 10%: hold.
        let mut hpa = Hpa::default();
        assert_eq!(hpa.sync(&keda, 10, 0.0, 1, 21.0, 20.0), 1);
        // Scale-up: at most max(+100%, +4) per 15 s: 1 -> 5, then 5 -> 10 (max).
        let mut hpa = Hpa::default();
        assert_eq!(hpa.sync(&keda, 100, 0.0, 1, 1000.0, 20.0), 5);
        assert_eq!(hpa.sync(&keda, 100, 15.0, 5, 1000.0, 20.0), 10);
        assert_eq!(hpa.sync(&keda, 100, 30.0, 10, 1000.0, 20.0), 20);
        assert_eq!(hpa.sync(&keda, 12, 45.0, 20, 1000.0, 20.0), 12);
        // Scale-down: the highest recommendation of the last 300 s.
        let mut hpa = Hpa::default();
        assert_eq!(hpa.sync(&keda, 10, 0.0, 4, 80.0, 20.0), 4);
        for k in 1..20 {
            let t = 15.0 * f64::from(k);
            assert_eq!(hpa.sync(&keda, 10, t, 4, 10.0, 20.0), 4, "t={t}");
        }
        // 300 s after the last recommendation of 4: down to the proposal, never under 1.
        assert_eq!(hpa.sync(&keda, 10, 315.0, 4, 0.0, 20.0), 1);
        // With Ember's 30 s window instead.
        let short = Keda {
            scale_down_stabilization_s: 30.0,
            ..keda
        };
        let mut hpa = Hpa::default();
        assert_eq!(hpa.sync(&short, 10, 0.0, 4, 80.0, 20.0), 4);
        assert_eq!(hpa.sync(&short, 10, 15.0, 4, 10.0, 20.0), 4);
        // At 30 s the recommendation of 0 s is no longer inside the window.
        assert_eq!(hpa.sync(&short, 10, 30.0, 4, 10.0, 20.0), 1);
    }

    #[test]
    fn keda_activates_at_a_poll_and_goes_to_zero_after_the_cooldown() {
        let keda = Keda::default();
        let mut op = KedaOperator::default();
        assert_eq!(op.poll(&keda, 15.0, 0, false), None);
        assert_eq!(op.poll(&keda, 45.0, 0, true), Some(1));
        assert_eq!(op.poll(&keda, 75.0, 3, true), None, "1 <-> N is the HPA's");
        for k in 0..10 {
            let t = 105.0 + 30.0 * f64::from(k);
            assert_eq!(op.poll(&keda, t, 3, false), None, "t={t}");
        }
        // Last active at 75: 75 + 300 < 405.
        assert_eq!(op.poll(&keda, 405.0, 3, false), Some(0));
    }

    #[test]
    fn where_the_scalers_differ_on_a_step_of_short_jobs() {
        let world = short();
        let keda = Keda::default();
        let [ember, queue_length, message_rate] =
            Policy::ALL.map(|policy| run(&world, Scenario::Step, policy, &settings(), &keda));
        for o in [&ember, &queue_length, &message_rate] {
            // 100 ms jobs always finish within the 25 s drain: no scaler interrupts one.
            assert_eq!(o.interrupted, 0, "{:?}", o.policy);
        }
        // Activation: Ember's first job waits for a 1 s tick and a model load; KEDA's for a
        // poll (15 s at the mid-interval phase) and a model load.
        assert!(
            ember.cold_start_wait_max_s < world.model_load_s + 1.5,
            "{}",
            ember.cold_start_wait_max_s
        );
        for o in [&queue_length, &message_rate] {
            assert!(
                o.cold_start_wait_max_s >= world.model_load_s + 14.0,
                "{:?}: {}",
                o.policy,
                o.cold_start_wait_max_s
            );
        }
        // Ember reaches the step's capacity at once; the HPA in 15 s syncs, and QueueLength
        // only holds replicas while a backlog stands.
        for o in [&queue_length, &message_rate] {
            assert!(
                ember.wait_p95_s < o.wait_p95_s,
                "ember p95 {} vs {:?} {}",
                ember.wait_p95_s,
                o.policy,
                o.wait_p95_s
            );
        }
    }

    #[test]
    fn every_arrival_is_counted_and_waits_cover_every_job() {
        let keda = Keda::default();
        for policy in Policy::ALL {
            let o = run(&short(), Scenario::Step, policy, &settings(), &keda);
            assert!(o.jobs > 8_000, "{policy:?}: {}", o.jobs);
            assert!(
                o.completed + 200 >= o.jobs,
                "{policy:?}: {} of {}",
                o.completed,
                o.jobs
            );
            assert_eq!(o.cold_starts, 1, "{policy:?}: one activation at the step");
        }
    }
}
