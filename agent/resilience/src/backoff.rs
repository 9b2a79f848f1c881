//! Envoy's fully jittered exponential back-off between retries
//! (`JitteredExponentialBackOffStrategy` in `source/common/common/backoff_strategy.cc`).
//!
//! The n-th delay is uniform in whole milliseconds over `[0, interval_n)`, where `interval_1 = base`
//! and each next interval doubles while it is below `max / 2`, then becomes `max`. With Istio's
//! 25 ms base and 250 ms cap the intervals are 25, 50, 100, 200, 250, 250, ... ms.
//!
//! (Envoy's router docs still quote the older `[0, (2^N - 1) * base)` formula; the code changed to the
//! doubling interval above, and that is what runs.)

use sluice_policy::RetryPolicy;
use std::time::Duration;

/// The back-off of one request's retries.
#[derive(Clone, Debug)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
    next_ms: u64,
}

impl Backoff {
    /// `base` below 1 ms is rounded up to 1 ms and `max` below `base` is raised to `base`, as Envoy's
    /// config validation does.
    pub fn new(base: Duration, max: Duration) -> Self {
        let base_ms = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(1);
        let max_ms = u64::try_from(max.as_millis())
            .unwrap_or(u64::MAX)
            .max(base_ms);
        Self {
            base_ms,
            max_ms,
            next_ms: base_ms,
        }
    }

    /// The back-off of `policy` (`backoff_base`, `backoff_max`).
    pub fn from_policy(policy: &RetryPolicy) -> Self {
        Self::new(policy.backoff_base, policy.backoff_max)
    }

    /// The exclusive upper bound of the next delay.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.next_ms)
    }

    /// The delay before the next retry, drawn from `rng`.
    pub fn next_delay(&mut self, rng: &mut fastrand::Rng) -> Duration {
        let interval = self.next_ms;
        // Compared with max / 2 rather than doubling first, so the interval never overflows.
        self.next_ms = if self.next_ms < self.max_ms / 2 {
            self.next_ms * 2
        } else {
            self.max_ms
        };
        Duration::from_millis(rng.u64(..interval))
    }

    /// Starts over from the base interval.
    pub fn reset(&mut self) {
        self.next_ms = self.base_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn intervals_double_from_base_then_cap() {
        let mut b = Backoff::new(ms(25), ms(250));
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = Vec::new();
        for _ in 0..7 {
            seen.push(b.interval().as_millis());
            b.next_delay(&mut rng);
        }
        assert_eq!(seen, [25, 50, 100, 200, 250, 250, 250]);

        // The cap applies as soon as doubling would pass max / 2, as in Envoy.
        let mut b = Backoff::new(ms(125), ms(251));
        b.next_delay(&mut rng);
        assert_eq!(b.interval(), ms(251));
    }

    #[test]
    fn delays_are_uniform_below_each_interval() {
        let mut rng = fastrand::Rng::with_seed(42);
        for retry in 0..5 {
            let mut max_seen = 0;
            let mut sum = 0;
            let bound = [25u64, 50, 100, 200, 250][retry];
            for _ in 0..4000 {
                let mut b = Backoff::new(ms(25), ms(250));
                for _ in 0..retry {
                    b.next_delay(&mut rng);
                }
                let d = b.next_delay(&mut rng).as_millis() as u64;
                assert!(d < bound, "retry {} delay {d} >= {bound}", retry + 1);
                max_seen = max_seen.max(d);
                sum += d;
            }
            assert_eq!(max_seen, bound - 1);
            let mean = sum as f64 / 4000.0;
            let expected = (bound - 1) as f64 / 2.0;
            assert!((mean - expected).abs() < expected * 0.1, "mean {mean}");
        }
    }

    #[test]
    fn seeded_sequence_is_pinned() {
        let mut rng = fastrand::Rng::with_seed(2024);
        let mut b = Backoff::new(ms(25), ms(250));
        let delays: Vec<u128> = (0..6).map(|_| b.next_delay(&mut rng).as_millis()).collect();
        let mut rng = fastrand::Rng::with_seed(2024);
        let mut again = Backoff::new(ms(25), ms(250));
        let replay: Vec<u128> = (0..6)
            .map(|_| again.next_delay(&mut rng).as_millis())
            .collect();
        assert_eq!(delays, replay);
        assert_eq!(delays, PINNED);
    }

    // fastrand 2.5.0 (Cargo.lock) with seed 2024.
    const PINNED: [u128; 6] = [6, 1, 57, 92, 68, 16];

    #[test]
    fn sub_millisecond_base_rounds_up() {
        let b = Backoff::new(Duration::from_micros(10), Duration::ZERO);
        assert_eq!(b.interval(), ms(1));
    }
}
