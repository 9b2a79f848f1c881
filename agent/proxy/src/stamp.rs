//! An instant shared between a connection's tasks without a lock, and the wall-clock time of an
//! instant passed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// The wall-clock time of `at`, a moment passed (a record's start, made from the monotonic clock
/// its duration is measured on).
pub(crate) fn wall_time_of(at: Instant) -> SystemTime {
    let now = SystemTime::now();
    now.checked_sub(at.elapsed()).unwrap_or(now)
}

/// An instant kept as nanoseconds after a base instant its owner holds (the connection's start):
/// written with a plain store and read with a plain load, where a `Mutex<Instant>` took two atomic
/// read-modify-writes per write. Starts at the base.
#[derive(Debug, Default)]
pub(crate) struct Stamp(AtomicU64);

impl Stamp {
    pub(crate) fn set(&self, base: Instant, at: Instant) {
        let nanos = at.saturating_duration_since(base).as_nanos();
        self.0
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Release);
    }

    pub(crate) fn get(&self, base: Instant) -> Instant {
        base + Duration::from_nanos(self.0.load(Ordering::Acquire))
    }
}
