//! Backoff between tries of something that may fail for a while (a callback receiver, a model
//! store): exponential, capped, jittered so that many clients do not retry in step.

use std::time::Duration;

/// The wait after failed try `attempt` (1-based): `initial * 2^(attempt-1)`, capped at `max`,
/// then jittered into its upper half (`jitter` in 0..=1: half of it at 0, all of it at 1).
pub fn jittered_backoff(initial: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exponent).min(max);
    base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_first_is_capped_and_jittered_into_the_upper_half() {
        let (first, max) = (Duration::from_millis(250), Duration::from_secs(4));
        let table = [
            (1, 1.0, 250),
            (1, 0.0, 125),
            (2, 1.0, 500),
            (3, 1.0, 1000),
            (10, 1.0, 4000),
            (u32::MAX, 1.0, 4000),
            (2, 7.0, 500),
        ];
        for (attempt, jitter, ms) in table {
            assert_eq!(
                jittered_backoff(first, max, attempt, jitter),
                Duration::from_millis(ms),
                "attempt {attempt}, jitter {jitter}"
            );
        }
    }
}
