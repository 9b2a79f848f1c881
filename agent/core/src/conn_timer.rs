//! One timer for the route timeouts of an HTTP/1 client connection's requests.
//!
//! A route timeout is a deadline per request, but on an HTTP/1 connection one request is under way
//! at a time and its response future and body are polled by the connection's own task. So the
//! connection's task keeps one timer and the requests only write their deadline here: arming and
//! disarming a request's deadline is a few plain loads and stores, where a timer of its own costs
//! an allocation and two trips through the runtime's timer wheel (a lock each) per request.
//!
//! The connection's timer is set lazily: a deadline later than the one it is set to changes
//! nothing (when it fires early it finds the later deadline and is set again), so under steady
//! keep-alive traffic it is set once per timeout, not once per request. Only a deadline earlier
//! than the timer wakes the connection's task to set it earlier. When the timer finds the armed
//! deadline passed it marks it [expired](ConnTimer::expire) and polls the connection, which polls
//! the request: the same wake-up, at the same millisecond, that a timer of the request's own would
//! have caused.
//!
//! Only for a connection that polls its requests in its own task (hyper's HTTP/1 server does; its
//! HTTP/2 server runs each stream as a task of its own, whose timers must be their own).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;
use std::time::{Duration, Instant};

/// No deadline (nanoseconds after the connection's base instant otherwise).
const NONE: u64 = u64::MAX;

/// Shared by a connection's task (which owns the timer) and its request under way.
///
/// Every access is from the connection's task, one at a time, so plain loads and stores suffice;
/// they are atomics only so that the type can travel in a request's extensions.
#[derive(Debug)]
pub struct ConnTimer {
    base: Instant,
    /// The deadline of the request under way.
    armed: AtomicU64,
    /// What the connection's timer is set to.
    timer: AtomicU64,
    /// The last deadline the connection found passed.
    expired: AtomicU64,
    /// Wakes the connection's task to set its timer earlier.
    waker: Waker,
}

impl ConnTimer {
    /// For a connection whose task `waker` wakes (to look at its timer), made at `now` (on the
    /// clock the deadlines are on: tokio's, which tests may pause).
    pub fn new(waker: Waker, now: Instant) -> Self {
        Self {
            base: now,
            armed: AtomicU64::new(NONE),
            timer: AtomicU64::new(NONE),
            expired: AtomicU64::new(NONE),
            waker,
        }
    }

    fn ticks(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.base).as_nanos();
        u64::try_from(nanos).unwrap_or(NONE - 1).min(NONE - 1)
    }

    fn instant(&self, ticks: u64) -> Option<Instant> {
        (ticks != NONE).then(|| self.base + Duration::from_nanos(ticks))
    }

    /// Arms `deadline` for the request under way; it stays armed until the returned handle is
    /// dropped.
    pub fn arm(self: Arc<Self>, deadline: Instant) -> ArmedDeadline {
        let at = self.ticks(deadline);
        self.armed.store(at, Ordering::Relaxed);
        if self.timer.load(Ordering::Relaxed) > at {
            self.waker.wake_by_ref();
        }
        ArmedDeadline { timer: self, at }
    }

    /// For the connection's task: the deadline its timer must be set to, when the armed one is
    /// earlier than the timer (or the timer is not set). Records that the timer is set to it.
    pub fn reset_to(&self) -> Option<Instant> {
        let armed = self.armed.load(Ordering::Relaxed);
        let expired = self.expired.load(Ordering::Relaxed);
        if armed == NONE || armed == expired || armed >= self.timer.load(Ordering::Relaxed) {
            return None;
        }
        self.timer.store(armed, Ordering::Relaxed);
        self.instant(armed)
    }

    /// Whether the connection's timer is set (by [`reset_to`](Self::reset_to), until it fires).
    pub fn is_set(&self) -> bool {
        self.timer.load(Ordering::Relaxed) != NONE
    }

    /// For the connection's task, when its timer fired at `now`: marks the armed deadline expired
    /// if it has passed (true: the request must be polled), and leaves the timer unset, to be set
    /// again by [`reset_to`](Self::reset_to).
    pub fn fired(&self, now: Instant) -> bool {
        self.timer.store(NONE, Ordering::Relaxed);
        let armed = self.armed.load(Ordering::Relaxed);
        if armed == NONE || armed > self.ticks(now) {
            return false;
        }
        self.expired.store(armed, Ordering::Relaxed);
        true
    }
}

/// A request's armed deadline; dropping it disarms it.
#[derive(Debug)]
pub struct ArmedDeadline {
    timer: Arc<ConnTimer>,
    at: u64,
}

impl ArmedDeadline {
    /// The connection found this deadline passed.
    pub fn expired(&self) -> bool {
        self.timer.expired.load(Ordering::Relaxed) == self.at
    }
}

impl Drop for ArmedDeadline {
    fn drop(&mut self) {
        // A later request may have armed its own meanwhile: only this one's is taken back.
        if self.timer.armed.load(Ordering::Relaxed) == self.at {
            self.timer.armed.store(NONE, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
// Any instant serves as the tests' origin: this crate has no tokio clock to pause.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::test_wakes::Wakes;

    #[test]
    fn the_timer_is_set_only_when_a_deadline_comes_earlier() {
        let (wakes, waker) = Wakes::new();
        let t0 = Instant::now() - Duration::from_secs(1);
        let timer = Arc::new(ConnTimer::new(waker, t0));
        let s = Duration::from_secs(1);

        // The first deadline wakes the connection, which sets its timer to it.
        let first = timer.clone().arm(t0 + 10 * s);
        assert_eq!(wakes.count(), 1);
        assert_eq!(timer.reset_to(), Some(t0 + 10 * s));
        assert_eq!(timer.reset_to(), None, "set already");
        assert!(timer.is_set());
        drop(first);

        // Later deadlines (the next requests) neither wake nor set it.
        let second = timer.clone().arm(t0 + 11 * s);
        assert_eq!(wakes.count(), 1);
        assert_eq!(timer.reset_to(), None);

        // It fires early: nothing expires, and it is set to the deadline armed now.
        assert!(!timer.fired(t0 + 10 * s));
        assert!(!timer.is_set());
        assert!(!second.expired());
        assert_eq!(timer.reset_to(), Some(t0 + 11 * s));

        // A shorter deadline wakes the connection to set the timer earlier.
        drop(second);
        let third = timer.clone().arm(t0 + 5 * s);
        assert_eq!(wakes.count(), 2);
        assert_eq!(timer.reset_to(), Some(t0 + 5 * s));

        // It passes: the request's deadline is expired, and the timer is not set again for it.
        assert!(timer.fired(t0 + 5 * s));
        assert!(third.expired());
        assert_eq!(timer.reset_to(), None);
        drop(third);

        // The next request's deadline is not taken for expired, and disarming an old handle
        // after a newer one armed leaves the newer one armed.
        let fourth = timer.clone().arm(t0 + 15 * s);
        assert!(!fourth.expired());
        assert_eq!(timer.reset_to(), Some(t0 + 15 * s));
        let stale = ArmedDeadline {
            timer: timer.clone(),
            at: timer.ticks(t0 + 5 * s),
        };
        drop(stale);
        assert!(timer.fired(t0 + 16 * s));
        assert!(fourth.expired());
    }

    #[test]
    fn nothing_armed_nothing_expires() {
        let t0 = Instant::now() - Duration::from_secs(1);
        let timer = ConnTimer::new(Waker::noop().clone(), t0);
        assert_eq!(timer.reset_to(), None);
        assert!(!timer.fired(t0 + Duration::from_secs(3600)));
    }
}
