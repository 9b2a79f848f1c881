//! What the layers of one request learn about it, collected for the access log and metrics.
//! Shared through the request's extensions as `Arc<RequestInfo>`; each field is set by the one layer
//! that owns it, so the lock is never contended and never held across an await.

use crate::ResponseFlags;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

#[derive(Debug, Default)]
pub struct RequestInfo {
    flags: AtomicU16,
    attempts: AtomicU32,
    /// Endpoints of the attempts so far, in order; the last is the current one.
    upstreams: Mutex<Vec<SocketAddr>>,
    cluster: Mutex<Option<Arc<str>>>,
    /// Envoy's `%RESPONSE_CODE_DETAILS%` (or, for a connection, its termination details) when the
    /// proxy itself decided the outcome in a way flags do not say (`direct_response`).
    details: Mutex<Option<&'static str>>,
}

impl RequestInfo {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_flags(&self, flags: ResponseFlags) {
        self.flags.fetch_or(flags.bits(), Ordering::Relaxed);
    }

    pub fn flags(&self) -> ResponseFlags {
        ResponseFlags::from_bits(self.flags.load(Ordering::Relaxed))
    }

    /// Counts one more attempt (the first attempt included) and returns the count so far.
    pub fn add_attempt(&self) -> u32 {
        self.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Records the endpoint an attempt was sent to (called once per attempt by the balancer).
    pub fn push_upstream(&self, addr: SocketAddr) {
        self.upstreams.lock().push(addr);
    }

    /// The endpoint of the latest attempt.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.upstreams.lock().last().copied()
    }

    /// Whether an earlier attempt of this request already went to `addr` (for retry host selection).
    pub fn tried(&self, addr: &SocketAddr) -> bool {
        self.upstreams.lock().contains(addr)
    }

    /// Every endpoint tried so far, in order.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.lock().clone()
    }

    /// Records the Envoy-style cluster name (`outbound|80|v1|pricing.default.svc.cluster.local`).
    pub fn set_cluster(&self, name: Arc<str>) {
        *self.cluster.lock() = Some(name);
    }

    pub fn cluster(&self) -> Option<Arc<str>> {
        self.cluster.lock().clone()
    }

    /// Records why the proxy answered as it did (`direct_response`, `tcp_session_idle_timeout`).
    pub fn set_details(&self, details: &'static str) {
        *self.details.lock() = Some(details);
    }

    pub fn details(&self) -> Option<&'static str> {
        *self.details.lock()
    }
}

/// In a retried request's extensions when its route keeps Envoy's `previous_hosts` retry predicate
/// out (`retryIgnorePreviousHosts: false`): a retry may pick any host, tried ones included.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryAnyHost;
