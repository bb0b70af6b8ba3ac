//! The scaling policy: pure, deterministic, table-tested. Signals in, a replica count and its
//! reasons out. No I/O and no clock: the caller passes `now`.
//!
//! `desired = ceil((arrival_rate + backlog / target_drain_time) / (service_rate_per_replica * target_utilisation))`
//! clamped to `[min, max]`, where backlog counts ready **and in-flight** jobs (KEDA's AMQP
//! scaler sees only ready ones and scales busy workers away). Up at once; down only when every
//! recommendation in the stabilisation window agrees, and by a bounded step. Replicas still
//! starting count as capacity on the way. Zero only after an idle period; any job wakes the
//! model at the next tick.

use std::time::Duration;

/// Per-model settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Settings {
    pub min_replicas: u32,
    pub max_replicas: u32,
    /// Time in which the backlog should be worked off, on top of new arrivals.
    pub target_drain_time: Duration,
    /// Fraction of each replica's service rate to plan for (headroom).
    pub target_utilisation: f64,
    /// Jobs/s per replica assumed until one is measured.
    pub initial_service_rate: f64,
    /// Scale down only if every recommendation in this window allows it.
    pub scale_down_window: Duration,
    /// At most this many replicas removed per decision.
    pub scale_down_step: u32,
    /// With `min_replicas == 0`: no work for this long -> zero replicas.
    pub idle_to_zero: Duration,
    /// GPU utilisation above which a growing backlog forces a step up.
    pub gpu_high: f64,
    /// GPU utilisation under which scale-down is allowed (when GPU readings exist).
    pub gpu_low: f64,
    /// Demand within this fraction above the current capacity does not scale up (HPA's
    /// tolerance): Poisson noise around a steady rate must not flap.
    pub tolerance: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            min_replicas: 0,
            max_replicas: 8,
            target_drain_time: Duration::from_secs(10),
            target_utilisation: 0.8,
            initial_service_rate: 10.0,
            scale_down_window: Duration::from_secs(30),
            scale_down_step: 1,
            idle_to_zero: Duration::from_secs(60),
            gpu_high: 0.9,
            gpu_low: 0.5,
            tolerance: 0.1,
        }
    }
}

/// What the autoscaler saw this tick.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    /// Ready messages in the queue (passive declare).
    pub ready: u64,
    /// Jobs held by workers, unacked (heartbeats).
    pub in_flight: u64,
    /// Jobs/s arriving.
    pub arrival_rate: f64,
    /// Measured jobs/s per busy-saturated replica, if any was measured.
    pub service_rate_per_replica: Option<f64>,
    /// Replicas serving (ready heartbeats).
    pub replicas_ready: u32,
    /// Replicas asked for and not ready yet (loading the model).
    pub replicas_starting: u32,
    /// Mean GPU utilisation of the model's replicas, 0..1, where NVML reports it.
    pub gpu_utilisation: Option<f64>,
    /// Whether the backlog grew since the last tick.
    pub backlog_growing: bool,
}

impl Signals {
    pub fn backlog(&self) -> u64 {
        self.ready + self.in_flight
    }
    fn capacity(&self) -> u32 {
        self.replicas_ready + self.replicas_starting
    }
}

/// Why a decision came out as it did; bounded, so usable as a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The formula asked for more than the capacity on the way.
    Demand,
    /// GPU hot and backlog growing: one more replica.
    GpuHot,
    /// Work waiting and no replica: wake up.
    Wake,
    /// Lower demand held for the whole stabilisation window.
    ScaleDown,
    /// Lower demand, but not for the whole window yet.
    Stabilising,
    /// GPU still busy: no scale-down.
    GpuBusy,
    /// No work for the idle period: zero replicas.
    IdleToZero,
    /// The result was clamped to `max_replicas`.
    AtMax,
    /// The result was clamped to `min_replicas`.
    AtMin,
    /// Nothing to change.
    Steady,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Demand => "demand",
            Reason::GpuHot => "gpu_hot",
            Reason::Wake => "wake",
            Reason::ScaleDown => "scale_down",
            Reason::Stabilising => "stabilising",
            Reason::GpuBusy => "gpu_busy",
            Reason::IdleToZero => "idle_to_zero",
            Reason::AtMax => "at_max",
            Reason::AtMin => "at_min",
            Reason::Steady => "steady",
        }
    }
}

/// A decision: the replica count to have, what the formula said, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub replicas: u32,
    /// The formula's raw recommendation (before stabilisation and bounds).
    pub recommended: u32,
    pub reasons: Vec<Reason>,
}

/// Memory the policy keeps between ticks (per model).
#[derive(Debug, Clone, Default)]
pub struct PolicyState {
    /// (time, recommendation) within the stabilisation window.
    recent: Vec<(Duration, u32)>,
    /// Last time there was any work.
    last_busy: Option<Duration>,
    /// First decision: no scale-down until a whole window has been seen (e.g. after a restart
    /// of the autoscaler).
    started: Option<Duration>,
}

/// The formula alone.
pub fn recommend(settings: &Settings, signals: &Signals) -> u32 {
    let raw = demand(settings, signals).ceil();
    if raw >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        raw as u32
    }
}

/// The formula before rounding: replicas' worth of demand.
fn demand(settings: &Settings, signals: &Signals) -> f64 {
    let rate = signals
        .service_rate_per_replica
        .filter(|r| *r > 0.0)
        .unwrap_or(settings.initial_service_rate)
        .max(1e-6);
    let demand = signals.arrival_rate.max(0.0)
        + signals.backlog() as f64 / settings.target_drain_time.as_secs_f64().max(1e-3);
    let per_replica = rate * settings.target_utilisation.clamp(0.01, 1.0);
    demand / per_replica
}

/// One tick of the policy. `now` is any monotonic time (e.g. since start).
pub fn decide(
    settings: &Settings,
    state: &mut PolicyState,
    signals: &Signals,
    now: Duration,
) -> Decision {
    let mut reasons = Vec::new();
    let current = signals.capacity();
    let started = *state.started.get_or_insert(now);
    let window_seen = now.saturating_sub(started) >= settings.scale_down_window;
    // Arrivals below one job per 100 s are the tail of a smoothed rate, not work.
    let busy = signals.backlog() > 0 || signals.arrival_rate >= 0.01;
    if busy || state.last_busy.is_none() {
        state.last_busy = Some(now);
    }
    let mut recommended = recommend(settings, signals);
    if busy {
        recommended = recommended.max(1);
    }
    if let Some(gpu) = signals.gpu_utilisation
        && gpu > settings.gpu_high
        && signals.backlog_growing
        && current > 0
    {
        recommended = recommended.max(current.saturating_add(1));
        reasons.push(Reason::GpuHot);
    }
    state
        .recent
        .retain(|(at, _)| now.saturating_sub(*at) < settings.scale_down_window);
    state.recent.push((now, recommended));

    let within_tolerance = current > 0
        && !reasons.contains(&Reason::GpuHot)
        && demand(settings, signals) <= f64::from(current) * (1.0 + settings.tolerance);
    let mut target = if recommended > current && within_tolerance {
        reasons.push(Reason::Steady);
        current
    } else if recommended > current {
        if current == 0 {
            reasons.push(Reason::Wake);
        } else if !reasons.contains(&Reason::GpuHot) {
            reasons.push(Reason::Demand);
        }
        recommended
    } else if recommended < current {
        // The highest recommendation in the window bounds how far down we may go.
        let window_max = state
            .recent
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(recommended);
        let gpu_busy = signals
            .gpu_utilisation
            .is_some_and(|gpu| gpu >= settings.gpu_low);
        let idle_long = !busy
            && state
                .last_busy
                .is_some_and(|at| now.saturating_sub(at) >= settings.idle_to_zero);
        if gpu_busy && busy {
            reasons.push(Reason::GpuBusy);
            current
        } else if !window_seen {
            reasons.push(Reason::Stabilising);
            current
        } else if recommended == 0 && settings.min_replicas == 0 && !idle_long {
            // Idle, but not for long enough to go to zero: keep one warm.
            reasons.push(Reason::Stabilising);
            current.min(window_max.max(1))
        } else if window_max >= current {
            reasons.push(Reason::Stabilising);
            current
        } else {
            let floor = current.saturating_sub(settings.scale_down_step.max(1));
            if recommended == 0 && idle_long {
                reasons.push(Reason::IdleToZero);
            } else {
                reasons.push(Reason::ScaleDown);
            }
            window_max.max(floor)
        }
    } else {
        reasons.push(Reason::Steady);
        current
    };
    if target > settings.max_replicas {
        target = settings.max_replicas;
        reasons.push(Reason::AtMax);
    }
    if target < settings.min_replicas {
        target = settings.min_replicas;
        reasons.push(Reason::AtMin);
    }
    Decision {
        replicas: target,
        recommended,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn settings() -> Settings {
        Settings {
            min_replicas: 0,
            max_replicas: 10,
            target_drain_time: secs(10),
            target_utilisation: 1.0,
            initial_service_rate: 10.0,
            scale_down_window: secs(30),
            scale_down_step: 2,
            idle_to_zero: secs(60),
            gpu_high: 0.9,
            gpu_low: 0.5,
            tolerance: 0.1,
        }
    }

    fn signals(ready: u64, in_flight: u64, arrival: f64, ready_replicas: u32) -> Signals {
        Signals {
            ready,
            in_flight,
            arrival_rate: arrival,
            service_rate_per_replica: Some(10.0),
            replicas_ready: ready_replicas,
            ..Signals::default()
        }
    }

    #[test]
    fn the_formula_in_a_table() {
        let s = settings();
        let table = [
            // (ready, in_flight, arrival, measured rate, expected)
            (0, 0, 0.0, Some(10.0), 0),
            (0, 0, 10.0, Some(10.0), 1),
            (0, 0, 25.0, Some(10.0), 3),
            (100, 0, 0.0, Some(10.0), 1), // 100 / 10 s = 10 jobs/s = one replica
            (100, 0, 10.0, Some(10.0), 2), // plus arrivals
            (0, 16, 0.0, Some(10.0), 1),  // busy workers, empty queue: still one
            (1000, 0, 0.0, Some(10.0), 10),
            (100, 0, 0.0, None, 1), // before any measurement: the guess (10/s)
            (100, 0, 0.0, Some(2.0), 5),
        ];
        for (ready, in_flight, arrival, rate, expected) in table {
            let sig = Signals {
                ready,
                in_flight,
                arrival_rate: arrival,
                service_rate_per_replica: rate,
                ..Signals::default()
            };
            assert_eq!(recommend(&s, &sig), expected, "{sig:?}");
        }
        let headroom = Settings {
            target_utilisation: 0.5,
            ..s
        };
        assert_eq!(recommend(&headroom, &signals(0, 0, 10.0, 1)), 2);
    }

    #[test]
    fn decisions_in_a_table_of_situations() {
        struct Case {
            what: &'static str,
            signals: Signals,
            expected: u32,
            reason: Reason,
        }
        let cases = [
            Case {
                what: "zero -> one on the first message",
                signals: signals(1, 0, 0.0, 0),
                expected: 1,
                reason: Reason::Wake,
            },
            Case {
                what: "busy workers with an empty ready count are not scaled away",
                signals: signals(0, 8, 0.0, 2),
                expected: 2,
                reason: Reason::Stabilising,
            },
            Case {
                // (20 + 508 / 10) / 10 = 7.08
                what: "a burst scales up at once",
                signals: signals(500, 8, 20.0, 2),
                expected: 8,
                reason: Reason::Demand,
            },
            Case {
                what: "replicas still starting count: no pile-up while a model loads",
                signals: Signals {
                    replicas_starting: 6,
                    ..signals(500, 8, 20.0, 2)
                },
                expected: 8,
                reason: Reason::Steady,
            },
            Case {
                what: "demand just over capacity (within the tolerance) holds",
                signals: signals(0, 2, 20.5, 2),
                expected: 2,
                reason: Reason::Steady,
            },
            Case {
                what: "max bounds the result",
                signals: signals(100_000, 0, 0.0, 2),
                expected: 10,
                reason: Reason::AtMax,
            },
            Case {
                what: "a hot GPU with a growing backlog forces a step up",
                signals: Signals {
                    gpu_utilisation: Some(0.97),
                    backlog_growing: true,
                    ..signals(10, 8, 5.0, 3)
                },
                expected: 4,
                reason: Reason::GpuHot,
            },
            Case {
                what: "a busy GPU holds scale-down",
                signals: Signals {
                    gpu_utilisation: Some(0.7),
                    ..signals(0, 2, 1.0, 4)
                },
                expected: 4,
                reason: Reason::GpuBusy,
            },
        ];
        for case in cases {
            let mut state = PolicyState::default();
            let decision = decide(&settings(), &mut state, &case.signals, secs(100));
            assert_eq!(
                decision.replicas, case.expected,
                "{}: {decision:?}",
                case.what
            );
            assert!(
                decision.reasons.contains(&case.reason),
                "{}: {decision:?}",
                case.what
            );
        }
    }

    #[test]
    fn scale_down_waits_for_the_window_then_steps_down_by_a_bounded_amount() {
        let s = settings();
        let mut state = PolicyState::default();
        // A busy minute at 8 replicas.
        let busy = signals(700, 8, 0.0, 8);
        assert_eq!(decide(&s, &mut state, &busy, secs(0)).replicas, 8);
        // Demand falls to one replica's worth.
        let light = signals(0, 1, 5.0, 8);
        for t in 1..30 {
            let d = decide(&s, &mut state, &light, secs(t));
            assert_eq!(d.replicas, 8, "t={t}: stabilising");
            assert!(d.reasons.contains(&Reason::Stabilising));
        }
        let d = decide(&s, &mut state, &light, secs(30));
        assert_eq!(d.replicas, 6, "the window passed: down by the step (2)");
        assert!(d.reasons.contains(&Reason::ScaleDown));
        let d = decide(&s, &mut state, &signals(0, 1, 5.0, 6), secs(31));
        assert_eq!(d.replicas, 4);
    }

    #[test]
    fn zero_only_after_the_idle_period_and_never_below_min() {
        let s = settings();
        let mut state = PolicyState::default();
        let idle = signals(0, 0, 0.0, 1);
        assert_eq!(
            decide(&s, &mut state, &signals(0, 1, 1.0, 1), secs(0)).replicas,
            1
        );
        for t in 1..60 {
            assert_eq!(decide(&s, &mut state, &idle, secs(t)).replicas, 1, "t={t}");
        }
        let d = decide(&s, &mut state, &idle, secs(61));
        assert_eq!(d.replicas, 0);
        assert!(d.reasons.contains(&Reason::IdleToZero));
        // And back at the first message.
        let d = decide(&s, &mut state, &signals(1, 0, 0.0, 0), secs(62));
        assert_eq!(d.replicas, 1);

        let floor = Settings {
            min_replicas: 2,
            ..s
        };
        let mut state = PolicyState::default();
        let d = decide(&floor, &mut state, &signals(0, 0, 0.0, 0), secs(0));
        assert_eq!(d.replicas, 2);
        assert!(d.reasons.contains(&Reason::AtMin));
    }
}
