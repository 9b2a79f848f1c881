//! The cluster's `maxRetries` circuit breaker (Envoy's `max_retries` threshold): how many retries may
//! be outstanding across all requests to the cluster at once.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Counts the retries in flight to one cluster. Share one per cluster (`Arc`) between routes.
#[derive(Debug)]
pub struct RetryBudget {
    max: AtomicU32,
    active: AtomicU32,
    overflows: AtomicU64,
}

impl RetryBudget {
    /// A budget of `max_retries` concurrent retries (Istio's default is `u32::MAX`, i.e. unlimited).
    pub fn new(max_retries: u32) -> Self {
        Self {
            max: AtomicU32::new(max_retries),
            active: AtomicU32::new(0),
            overflows: AtomicU64::new(0),
        }
    }

    /// Changes the limit on a config update; retries in flight keep their slots.
    pub fn set_max(&self, max_retries: u32) {
        self.max.store(max_retries, Ordering::Relaxed);
    }

    pub fn max(&self) -> u32 {
        self.max.load(Ordering::Relaxed)
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
        let max = self.max.load(Ordering::Relaxed);
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
}
