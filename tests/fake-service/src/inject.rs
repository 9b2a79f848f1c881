//! Error injection, as the image's `errors.Injector` decides it.
//!
//! The image does not roll dice: it counts requests and fails every Nth one, with
//! `N = int(1 / ERROR_RATE)` (Go truncation), so 0.4 fails requests 2, 4, 6, ...,
//! 0.3 fails 3, 6, 9, ... and 0.9 fails all of them. [`ErrorMode::Random`] is an
//! extra for tests that want a seeded coin instead.

use std::sync::atomic::{AtomicU64, Ordering};

/// How requests are chosen to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorMode {
    /// The image's behaviour: every Nth request fails.
    Deterministic,
    /// Request `n` fails when a PRNG seeded with `seed` and `n` draws below the rate.
    Random { seed: u64 },
}

/// Decides, per request, whether to inject the configured error.
#[derive(Debug)]
pub struct Injector {
    rate: f64,
    mode: ErrorMode,
    every: Option<u64>,
    count: AtomicU64,
}

impl Injector {
    pub fn new(rate: f64, mode: ErrorMode) -> Self {
        Self {
            rate,
            mode,
            every: every_nth(rate),
            count: AtomicU64::new(0),
        }
    }

    /// Counts one request and says whether it must fail.
    pub fn next_fails(&self) -> bool {
        // Counted from 1, like the image (it increments before testing).
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        match self.mode {
            ErrorMode::Deterministic => self.every.is_some_and(|every| n.is_multiple_of(every)),
            ErrorMode::Random { seed } => {
                // A fresh generator per request index keeps the schedule reproducible
                // whatever order concurrent requests arrive in.
                let draw =
                    fastrand::Rng::with_seed(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15)).f64();
                draw < self.rate
            }
        }
    }

    /// Requests counted so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// `N` of "every Nth request fails", or `None` for never.
///
/// Go computes `requestCount % int(1/rate)`: a rate of 0 gives `int(+Inf)`, which on
/// amd64 is `math.MinInt64`, so nothing ever fails. A rate above 1 gives `int(0.x) == 0`
/// and the image panics with an integer divide by zero (the connection drops); we fail
/// every request instead. A negative rate behaves as its absolute value, as Go's `%` does.
pub fn every_nth(rate: f64) -> Option<u64> {
    if rate == 0.0 || !rate.is_finite() {
        return None;
    }
    let n = (1.0 / rate).trunc().abs();
    if n >= u64::MAX as f64 {
        return None;
    }
    Some((n as u64).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(inj: &Injector, n: usize) -> Vec<bool> {
        (0..n).map(|_| inj.next_fails()).collect()
    }

    #[test]
    fn every_nth_truncates_like_go() {
        assert_eq!(every_nth(0.4), Some(2));
        assert_eq!(every_nth(0.3), Some(3));
        assert_eq!(every_nth(0.9), Some(1));
        assert_eq!(every_nth(1.0), Some(1));
        assert_eq!(every_nth(0.1), Some(10));
        assert_eq!(every_nth(0.0), None);
        assert_eq!(every_nth(1.5), Some(1));
        assert_eq!(every_nth(-0.5), Some(2));
    }

    #[test]
    fn deterministic_schedule() {
        let inj = Injector::new(0.3, ErrorMode::Deterministic);
        assert_eq!(
            schedule(&inj, 7),
            [false, false, true, false, false, true, false]
        );
        assert_eq!(inj.count(), 7);
        let never = Injector::new(0.0, ErrorMode::Deterministic);
        assert!(schedule(&never, 100).iter().all(|f| !f));
    }

    #[test]
    fn random_mode_is_seeded_and_roughly_at_rate() {
        let a = schedule(&Injector::new(0.3, ErrorMode::Random { seed: 7 }), 2000);
        let b = schedule(&Injector::new(0.3, ErrorMode::Random { seed: 7 }), 2000);
        let c = schedule(&Injector::new(0.3, ErrorMode::Random { seed: 8 }), 2000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let failures = a.iter().filter(|f| **f).count();
        assert!((500..700).contains(&failures), "{failures} of 2000 failed");
    }
}
