//! What the autoscaler knows about each model: workers from their heartbeats (state, in-flight,
//! completed, busy time, GPU), and rates derived from consecutive readings.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ember_core::protocol::{Heartbeat, WorkerState};

/// One worker as its heartbeats describe it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub beat: Heartbeat,
    pub seen: Instant,
    /// Jobs per second of inference time, smoothed: what a saturated replica can do.
    pub service_rate: Option<f64>,
    /// Fraction of wall time spent in inference, smoothed.
    pub busy_ratio: Option<f64>,
}

/// Heartbeats of every worker, per model.
#[derive(Debug, Default)]
pub struct Heartbeats {
    models: HashMap<String, HashMap<String, WorkerView>>,
}

fn smooth(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(old) => 0.5 * old + 0.5 * new,
        None => new,
    }
}

impl Heartbeats {
    /// Takes a heartbeat, deriving rates from the worker's previous one.
    pub fn record(&mut self, beat: Heartbeat, now: Instant) {
        let workers = self.models.entry(beat.model.clone()).or_default();
        let previous = workers.remove(&beat.worker);
        let (service_rate, busy_ratio) = match &previous {
            Some(prev) => {
                let wall = now.duration_since(prev.seen).as_secs_f64();
                let busy = beat.busy_seconds - prev.beat.busy_seconds;
                let done = beat.completed.saturating_sub(prev.beat.completed) as f64;
                let rate = (busy > 1e-3 && done > 0.0).then(|| done / busy);
                let ratio = (wall > 1e-3).then(|| (busy / wall).clamp(0.0, 1.0));
                (
                    rate.map(|r| smooth(prev.service_rate, r))
                        .or(prev.service_rate),
                    ratio
                        .map(|r| smooth(prev.busy_ratio, r))
                        .or(prev.busy_ratio),
                )
            }
            None => (None, None),
        };
        workers.insert(
            beat.worker.clone(),
            WorkerView {
                beat,
                seen: now,
                service_rate,
                busy_ratio,
            },
        );
    }

    /// Workers of `model` heard from within `timeout` (older ones are aged out).
    pub fn workers(&mut self, model: &str, now: Instant, timeout: Duration) -> Vec<WorkerView> {
        let Some(workers) = self.models.get_mut(model) else {
            return Vec::new();
        };
        workers.retain(|_, w| now.duration_since(w.seen) <= timeout);
        workers.values().cloned().collect()
    }
}

/// A model's workers summed up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelView {
    pub ready: u32,
    pub draining: u32,
    /// Workers that reported `starting` (loading or reconnecting).
    pub starting: u32,
    pub in_flight: u64,
    pub completed: u64,
    pub service_rate: Option<f64>,
    pub busy_ratio: Option<f64>,
    pub gpu_utilisation: Option<f64>,
    pub model_load_seconds: Option<f64>,
    /// Ids of ready workers with nothing in flight: the ones to stop first.
    pub idle_workers: Vec<String>,
    /// Ids of every worker heard from, with its in-flight count.
    pub workers: Vec<(String, u64)>,
    /// Ids of the workers reporting ready.
    pub ready_ids: Vec<String>,
    /// Ready workers per model version they report (`model_info.version`; workers older than
    /// it are not counted).
    pub ready_by_version: std::collections::BTreeMap<String, u32>,
}

impl ModelView {
    pub fn from_workers(workers: &[WorkerView]) -> Self {
        let mut view = Self::default();
        let mut rates = Vec::new();
        let mut ratios = Vec::new();
        let mut gpus = Vec::new();
        let mut loads = Vec::new();
        for w in workers {
            match w.beat.state {
                WorkerState::Ready => {
                    view.ready += 1;
                    view.ready_ids.push(w.beat.worker.clone());
                    if let Some(info) = &w.beat.model_info {
                        *view
                            .ready_by_version
                            .entry(info.version.clone())
                            .or_default() += 1;
                    }
                }
                WorkerState::Draining => view.draining += 1,
                WorkerState::Starting => view.starting += 1,
            }
            view.in_flight += w.beat.in_flight;
            view.completed += w.beat.completed;
            rates.extend(w.service_rate);
            ratios.extend(w.busy_ratio);
            gpus.extend(w.beat.gpu.as_ref().map(|g| g.utilization));
            loads.push(w.beat.model_load_seconds);
            if w.beat.state == WorkerState::Ready && w.beat.in_flight == 0 {
                view.idle_workers.push(w.beat.worker.clone());
            }
            view.workers.push((w.beat.worker.clone(), w.beat.in_flight));
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        view.service_rate = mean(&rates);
        view.busy_ratio = mean(&ratios);
        view.gpu_utilisation = mean(&gpus);
        view.model_load_seconds = mean(&loads);
        view.idle_workers.sort();
        view
    }
}

/// Arrival rate from consecutive observations: what entered = the change in ready + in flight,
/// plus what was completed meanwhile.
#[derive(Debug, Default, Clone)]
pub struct ArrivalMeter {
    last: Option<(Instant, u64, u64, u64)>,
    rate: Option<f64>,
    last_backlog: Option<u64>,
}

impl ArrivalMeter {
    /// Returns (arrival rate, whether the backlog grew since the last observation).
    pub fn observe(
        &mut self,
        now: Instant,
        ready: u64,
        in_flight: u64,
        completed: u64,
    ) -> (f64, bool) {
        let backlog = ready + in_flight;
        let growing = self.last_backlog.is_some_and(|b| backlog > b);
        self.last_backlog = Some(backlog);
        if let Some((at, r, f, c)) = self.last {
            let dt = now.duration_since(at).as_secs_f64();
            if dt > 1e-3 {
                let entered = (ready + in_flight) as f64 - (r + f) as f64
                    + completed.saturating_sub(c) as f64;
                let rate = (entered / dt).max(0.0);
                let smoothed = smooth(self.rate, rate);
                // Let a decaying average reach zero.
                self.rate = Some(if smoothed < 1e-3 { 0.0 } else { smoothed });
            }
        }
        self.last = Some((now, ready, in_flight, completed));
        (self.rate.unwrap_or(0.0), growing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(
        worker: &str,
        state: WorkerState,
        in_flight: u64,
        completed: u64,
        busy: f64,
    ) -> Heartbeat {
        Heartbeat {
            worker: worker.into(),
            model: "m".into(),
            state,
            in_flight,
            completed,
            busy_seconds: busy,
            model_load_seconds: 0.2,
            at_ms: 0,
            device: Some("cpu".into()),
            device_fallback: false,
            gpu: None,
            model_info: None,
        }
    }

    #[test]
    fn service_rate_and_busy_ratio_come_from_consecutive_heartbeats() {
        let mut heartbeats = Heartbeats::default();
        let t0 = Instant::now();
        heartbeats.record(beat("a", WorkerState::Ready, 4, 100, 10.0), t0);
        // One second later: 20 more jobs in 0.5 s of inference.
        heartbeats.record(
            beat("a", WorkerState::Ready, 4, 120, 10.5),
            t0 + Duration::from_secs(1),
        );
        heartbeats.record(
            beat("b", WorkerState::Ready, 0, 0, 0.0),
            t0 + Duration::from_secs(1),
        );
        heartbeats.record(
            beat("c", WorkerState::Starting, 0, 0, 0.0),
            t0 + Duration::from_secs(1),
        );
        let workers = heartbeats.workers("m", t0 + Duration::from_secs(1), Duration::from_secs(5));
        let view = ModelView::from_workers(&workers);
        assert_eq!((view.ready, view.starting, view.in_flight), (2, 1, 4));
        assert_eq!(view.service_rate, Some(40.0));
        assert_eq!(view.busy_ratio, Some(0.5));
        assert_eq!(view.idle_workers, vec!["b".to_string()]);
        assert!(
            view.ready_by_version.is_empty(),
            "no model_info, no version"
        );
        // Ready workers are counted by the version they report (a rollout's two).
        let mut versioned = beat("d", WorkerState::Ready, 0, 0, 0.0);
        versioned.model_info = Some(ember_core::protocol::ModelInfo {
            version: "2".into(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            max_batch: 1,
            input: "tensor".into(),
            decoder: "tensor".into(),
        });
        let mut starting = versioned.clone();
        starting.worker = "e".into();
        starting.state = WorkerState::Starting;
        heartbeats.record(versioned, t0 + Duration::from_secs(1));
        heartbeats.record(starting, t0 + Duration::from_secs(1));
        let workers = heartbeats.workers("m", t0 + Duration::from_secs(1), Duration::from_secs(5));
        let view = ModelView::from_workers(&workers);
        assert_eq!(
            view.ready_by_version,
            std::collections::BTreeMap::from([("2".to_string(), 1)])
        );
        // Silence ages a worker out.
        let later = heartbeats.workers("m", t0 + Duration::from_secs(10), Duration::from_secs(5));
        assert!(later.is_empty());
    }

    #[test]
    fn arrivals_count_what_entered_the_queue_and_what_was_done_meanwhile() {
        let mut meter = ArrivalMeter::default();
        let t0 = Instant::now();
        assert_eq!(meter.observe(t0, 0, 0, 0), (0.0, false));
        // 10 jobs came: 6 waiting, 2 in hand, 2 done.
        let (rate, growing) = meter.observe(t0 + Duration::from_secs(1), 6, 2, 2);
        assert_eq!(rate, 10.0);
        assert!(growing);
        // Nothing new: backlog worked off.
        let (rate, growing) = meter.observe(t0 + Duration::from_secs(2), 0, 0, 10);
        assert_eq!(rate, 5.0, "smoothed: (10 + 0) / 2");
        assert!(!growing);
    }
}
