//! When an attempt has a connection. Envoy's per-try timer starts when the connection pool hands
//! the attempt a connection (`UpstreamRequest::onPoolReady`): time spent queued for a connection
//! or connecting is bounded by the route timeout and `connectTimeout`, not by `perTryTimeout`.
//!
//! The per-try layer puts a [`ConnectionReady`] in the attempt's extensions and starts its timer
//! when it is fired. A service below that knows about connections [claims](ConnectionReady::claim)
//! it first; one that never claims it (a test double, a direct response) leaves the timer to start
//! at once, so the timer can never be left waiting for a signal nobody will send.

use parking_lot::Mutex;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

#[derive(Debug, Default)]
struct State {
    claimed: bool,
    fired: bool,
    waker: Option<Waker>,
}

/// Shared between the per-try layer (waiting) and the cluster (claiming, then firing).
#[derive(Clone, Debug, Default)]
pub struct ConnectionReady(Arc<Mutex<State>>);

impl ConnectionReady {
    pub fn new() -> Self {
        Self::default()
    }

    /// For the service that will [`fire`](Self::fire) it once the attempt has a connection.
    pub fn claim(&self) {
        self.0.lock().claimed = true;
    }

    /// The attempt has a connection.
    pub fn fire(&self) {
        let waker = {
            let mut state = self.0.lock();
            state.fired = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Ready once fired, or at once when nobody claimed it (the service below does not report
    /// connections). Call after polling the service's future, which is where it claims.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.0.lock();
        if state.fired || !state.claimed {
            return Poll::Ready(());
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn unclaimed_is_ready_claimed_waits_for_fire() {
        let mut cx = Context::from_waker(Waker::noop());
        let ready = ConnectionReady::new();
        assert!(ready.poll_ready(&mut cx).is_ready());
        let ready = ConnectionReady::new();
        ready.claim();
        assert!(ready.poll_ready(&mut cx).is_pending());
        ready.clone().fire();
        assert!(ready.poll_ready(&mut cx).is_ready());
    }
}
