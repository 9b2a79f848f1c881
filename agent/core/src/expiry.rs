//! Which of the proxy's own timers ended an upstream attempt. A timeout layer raises its
//! [`Expiry`] when its timer fires, before it drops the attempt below it; the cluster reads it when
//! an attempt ends without response headers. A timer is an upstream outcome (Envoy's local-origin
//! timeout, which outlier detection counts); no timer means the attempt was abandoned from above
//! because the client went away, which Envoy never reports to outlier detection.
//!
//! The signal travels in the request's extensions. The route layer's is cloned into every attempt
//! by the retry layer; the per-try layer makes a child of it per attempt, so an attempt sees both.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// One of the proxy's timers that bound an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// `perTryTimeout`: this attempt only.
    PerTry,
    /// The route `timeout`: every attempt of the request.
    Route,
}

const NONE: u8 = 0;
const PER_TRY: u8 = 1;
const ROUTE: u8 = 2;

#[derive(Debug, Default)]
struct State {
    fired: AtomicU8,
    parent: Option<Expiry>,
}

/// A timer's "I fired" flag, shared between the layer that owns the timer and the attempts below.
#[derive(Clone, Debug, Default)]
pub struct Expiry(Arc<State>);

impl Expiry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A flag for a narrower timer that also reports this one's firing.
    pub fn child(&self) -> Self {
        Self(Arc::new(State {
            fired: AtomicU8::new(NONE),
            parent: Some(self.clone()),
        }))
    }

    /// For the layer whose timer fired: called before it drops the attempts below it.
    pub fn fire(&self, deadline: Deadline) {
        let v = match deadline {
            Deadline::PerTry => PER_TRY,
            Deadline::Route => ROUTE,
        };
        let _ = self
            .0
            .fired
            .compare_exchange(NONE, v, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The timer that fired first, this one's or an enclosing one's; `None` if none did.
    pub fn fired(&self) -> Option<Deadline> {
        match self.0.fired.load(Ordering::Acquire) {
            PER_TRY => Some(Deadline::PerTry),
            ROUTE => Some(Deadline::Route),
            _ => self.0.parent.as_ref().and_then(Expiry::fired),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_sees_its_own_timer_and_its_parents() {
        let route = Expiry::new();
        let first = route.child();
        let second = route.child();
        assert_eq!(first.fired(), None);
        first.fire(Deadline::PerTry);
        assert_eq!(first.fired(), Some(Deadline::PerTry));
        assert_eq!((route.fired(), second.fired()), (None, None));
        route.fire(Deadline::Route);
        assert_eq!(second.fired(), Some(Deadline::Route));
        // The first timer to fire is the one that ended the attempt.
        assert_eq!(first.fired(), Some(Deadline::PerTry));
    }
}
