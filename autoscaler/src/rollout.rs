//! A rollout of a new model version over a pool of workers, as a pure step function: given
//! how many workers of each generation are live and ready, how long the rollout has run and
//! how many new workers died, what to start, what to stop, and whether it is over. The local
//! backend carries it out with processes (the kubernetes backend leaves the same surge-then-
//! retire order to the Deployment's RollingUpdate with `maxUnavailable: 0`).
//!
//! The order is Kubernetes' `maxUnavailable: 0` rolling update: new workers start first; an
//! old worker is stopped (it drains on SIGTERM, finishing what it holds) only once a new one
//! reports ready, so the pool never has fewer ready workers than it is meant to. A new
//! generation that does not become ready in time, or whose workers keep dying while loading,
//! is rolled back: its workers are stopped and the old version goes on serving.

use std::time::Duration;

/// New workers that may exit before the rollout is called failed.
pub const MAX_FAILURES: u32 = 2;

/// What a rollout step sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Workers the pool should have (the policy's decision; at least one during a rollout, so
    /// that a new version proves it loads before it is called done).
    pub want: u32,
    /// New-version workers alive and not draining, and how many of them report ready.
    pub new_live: u32,
    pub new_ready: u32,
    /// Old-version workers alive and not draining.
    pub old_live: u32,
    /// New-version workers that exited without being asked to since the rollout began.
    pub failures: u32,
    /// Since the rollout began or a new worker last became ready (progress).
    pub elapsed: Duration,
    pub deadline: Duration,
}

/// Where a rollout stands after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Progressing,
    /// Every old worker is gone and enough new ones are ready: the new version is the pool's.
    Complete,
    /// Give up: stop the new workers, keep the old version; the reason says why.
    RollBack(String),
}

/// What to do this step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// New-version workers to start.
    pub start: u32,
    /// Old-version workers to stop (they drain).
    pub retire: u32,
    pub phase: Phase,
}

/// One step of a rollout.
pub fn step(p: Progress) -> Step {
    let want = p.want.max(1);
    let hold = |phase| Step {
        start: 0,
        retire: 0,
        phase,
    };
    if p.failures >= MAX_FAILURES {
        return hold(Phase::RollBack(format!(
            "{} new workers exited before becoming ready",
            p.failures
        )));
    }
    if p.elapsed >= p.deadline && p.new_ready < want {
        return hold(Phase::RollBack(format!(
            "{}/{want} new workers ready, none more for {:.0} s (the deadline)",
            p.new_ready,
            p.deadline.as_secs_f64()
        )));
    }
    // No old worker left and the new version has proven it loads: what is still missing is
    // ordinary scale-out, not the rollout's (a rollout that waited for a grown target could be
    // rolled back with every worker of the pool new).
    if p.old_live == 0 && p.new_ready >= 1 {
        return hold(Phase::Complete);
    }
    // Old workers stay while new ones are not ready: old + new ready >= want at all times.
    let keep_old = want.saturating_sub(p.new_ready);
    Step {
        start: want.saturating_sub(p.new_live),
        retire: p.old_live.saturating_sub(keep_old),
        phase: Phase::Progressing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(want: u32, new_live: u32, new_ready: u32, old_live: u32) -> Progress {
        Progress {
            want,
            new_live,
            new_ready,
            old_live,
            failures: 0,
            elapsed: Duration::from_secs(5),
            deadline: Duration::from_secs(120),
        }
    }

    #[test]
    fn new_workers_start_first_and_old_ones_go_only_as_new_ones_are_ready() {
        // (want, new live, new ready, old live) -> (start, retire, phase)
        let table = [
            ((2, 0, 0, 2), (2, 0, Phase::Progressing)),
            ((2, 2, 0, 2), (0, 0, Phase::Progressing)),
            ((2, 2, 1, 2), (0, 1, Phase::Progressing)),
            ((2, 2, 2, 1), (0, 1, Phase::Progressing)),
            ((2, 2, 2, 0), (0, 0, Phase::Complete)),
            // The policy wants a third while no old one is left: scaling's business now.
            ((3, 2, 2, 0), (0, 0, Phase::Complete)),
            // Scaled to zero: one new worker still has to prove the version loads.
            ((0, 0, 0, 0), (1, 0, Phase::Progressing)),
            ((0, 1, 1, 0), (0, 0, Phase::Complete)),
            // The policy wants more during the rollout: new ones are started, old ones kept.
            ((3, 2, 1, 2), (1, 0, Phase::Progressing)),
            // ... or fewer: surplus old ones go at once.
            ((1, 1, 0, 3), (0, 2, Phase::Progressing)),
        ];
        for ((want, new_live, new_ready, old_live), (start, retire, phase)) in table {
            let got = step(progress(want, new_live, new_ready, old_live));
            assert_eq!(
                got,
                Step {
                    start,
                    retire,
                    phase
                },
                "want {want}, new {new_live} live {new_ready} ready, old {old_live}"
            );
        }
    }

    #[test]
    fn a_version_that_does_not_become_ready_in_time_or_keeps_dying_is_rolled_back() {
        let late = Progress {
            elapsed: Duration::from_secs(120),
            ..progress(2, 2, 1, 1)
        };
        let Phase::RollBack(why) = step(late).phase else {
            panic!("not rolled back")
        };
        assert_eq!(
            why,
            "1/2 new workers ready, none more for 120 s (the deadline)"
        );
        let dying = Progress {
            failures: MAX_FAILURES,
            ..progress(2, 0, 0, 2)
        };
        assert_eq!(
            step(dying),
            Step {
                start: 0,
                retire: 0,
                phase: Phase::RollBack("2 new workers exited before becoming ready".into())
            }
        );
        // Ready in time: the deadline does not matter once it is complete.
        let done = Progress {
            elapsed: Duration::from_secs(500),
            ..progress(2, 2, 2, 0)
        };
        assert_eq!(step(done).phase, Phase::Complete);
        // One death is tolerated (a worker may be killed by something else).
        let once = Progress {
            failures: 1,
            ..progress(2, 1, 0, 2)
        };
        assert_eq!(step(once).phase, Phase::Progressing);
    }
}
