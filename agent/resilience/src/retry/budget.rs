//! The cluster's `maxRetries` circuit breaker (Envoy's `max_retries` threshold): how many retries may
//! be outstanding across all requests to the cluster at once. With a DestinationRule `retryBudget`
//! (Envoy's `retry_budget`, which replaces `max_retries`), the limit moves with the load: `percent` %
//! of the cluster's active and pending requests, but at least `min_retry_concurrency`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// The cluster's active plus pending requests, read when a retry asks for a slot.
pub type LoadFn = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A `retryBudget`: the share of the load retries may take, and its floor.
struct Budget {
    percent: f64,
    min_retry_concurrency: u32,
    load: LoadFn,
}

/// Counts the retries in flight to one cluster. Share one per cluster (`Arc`) between routes.
pub struct RetryBudget {
    max: AtomicU32,
    active: AtomicU32,
    overflows: AtomicU64,
    budget: Option<Budget>,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("max", &self.max())
            .field("active", &self.active())
            .field(
                "budget",
                &self
                    .budget
                    .as_ref()
                    .map(|b| (b.percent, b.min_retry_concurrency)),
            )
            .finish()
    }
}

impl RetryBudget {
    /// A budget of `max_retries` concurrent retries (Istio's default is `u32::MAX`, i.e. unlimited).
    pub fn new(max_retries: u32) -> Self {
        Self {
            max: AtomicU32::new(max_retries),
            active: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
            budget: None,
        }
    }

    /// A `retryBudget`: at most `percent` % of `load()` retries in flight, but always
    /// `min_retry_concurrency` (Envoy's `RetryBudgetImpl::max`).
    pub fn with_budget(percent: f64, min_retry_concurrency: u32, load: LoadFn) -> Self {
        Self {
            budget: Some(Budget {
                percent,
                min_retry_concurrency,
                load,
            }),
            ..Self::new(min_retry_concurrency)
        }
    }

    /// Changes the limit on a config update; retries in flight keep their slots.
    pub fn set_max(&self, max_retries: u32) {
        self.max.store(max_retries, Ordering::Relaxed);
    }

    /// The limit now: `maxRetries`, or what the retry budget allows at the current load.
    pub fn max(&self) -> u32 {
        match &self.budget {
            None => self.max.load(Ordering::Relaxed),
            Some(b) => {
                // Truncated, as Envoy converts the product to an integer.
                let share = (b.percent / 100.0 * (b.load)() as f64) as u64;
                u32::try_from(share.max(u64::from(b.min_retry_concurrency))).unwrap_or(u32::MAX)
            }
        }
    }

    /// Retries in flight now (a gauge, like Envoy's `remaining_retries` read the other way).
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    /// Retries refused because the budget was full (Envoy's `upstream_rq_retry_overflow`).
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }

    /// Takes a slot for one retry, or counts an overflow when none is free.
    pub fn try_acquire(self: &Arc<Self>) -> Option<RetryPermit> {
        let max = self.max();
        let mut current = self.active.load(Ordering::Relaxed);
        loop {
            if current >= max {
                self.overflows.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.active.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(RetryPermit {
                        budget: self.clone(),
                    })
                }
                Err(now) => current = now,
            }
        }
    }
}

/// One retry's slot in a [`RetryBudget`]; released on drop. As in Envoy, a retry holds it from the
/// decision to retry, through the back-off, until that retry's outcome is known.
#[derive(Debug)]
pub struct RetryPermit {
    budget: Arc<RetryBudget>,
}

impl Drop for RetryPermit {
    fn drop(&mut self) {
        self.budget.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_in_flight_and_overflows() {
        let budget = Arc::new(RetryBudget::new(2));
        let a = budget.try_acquire().unwrap();
        let _b = budget.try_acquire().unwrap();
        assert_eq!(budget.active(), 2);
        assert!(budget.try_acquire().is_none());
        assert_eq!(budget.overflows(), 1);
        drop(a);
        assert_eq!(budget.active(), 1);
        assert!(budget.try_acquire().is_some());
        assert_eq!(budget.active(), 1);

        let none = Arc::new(RetryBudget::new(0));
        assert!(none.try_acquire().is_none());
        assert_eq!(none.overflows(), 1);
        none.set_max(1);
        assert!(none.try_acquire().is_some());
    }

    #[test]
    fn a_retry_budget_follows_the_load_above_its_floor() {
        let load = Arc::new(AtomicU64::new(0));
        let budget = Arc::new(RetryBudget::with_budget(25.0, 2, {
            let load = load.clone();
            Arc::new(move || load.load(Ordering::Relaxed))
        }));
        // Idle cluster: the floor.
        assert_eq!(budget.max(), 2);
        let held: Vec<_> = (0..2).map(|_| budget.try_acquire().unwrap()).collect();
        assert!(budget.try_acquire().is_none());
        // 20 requests active or pending: 25 % of them.
        load.store(20, Ordering::Relaxed);
        assert_eq!(budget.max(), 5);
        let more: Vec<_> = (0..3).map(|_| budget.try_acquire().unwrap()).collect();
        assert!(budget.try_acquire().is_none());
        assert_eq!(budget.overflows(), 2);
        // 0.2 % (istiod's default) of 100 requests truncates to 0: the floor again.
        let tiny = RetryBudget::with_budget(0.2, 3, Arc::new(|| 100));
        assert_eq!(tiny.max(), 3);
        drop((held, more));
    }
}
