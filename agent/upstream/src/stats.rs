//! Cluster counters and gauges under Envoy's names (`upstream_rq_pending_overflow`, ...), kept in
//! atomics so the hot path never locks to count.

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};

/// The live counters of one cluster; gauges that live under a lock are filled in by the snapshot.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) rq_active: AtomicU64,
    pub(crate) rq_total: AtomicU64,
    pub(crate) rq_pending_total: AtomicU64,
    pub(crate) rq_pending_overflow: AtomicU64,
    pub(crate) rq_timeout: AtomicU64,
    pub(crate) rq_per_try_timeout: AtomicU64,
    pub(crate) rq_cancelled: AtomicU64,
    pub(crate) cx_total: AtomicU64,
    pub(crate) cx_connect_fail: AtomicU64,
    pub(crate) cx_connect_timeout: AtomicU64,
    pub(crate) cx_overflow: AtomicU64,
    pub(crate) ejections_enforced_total: AtomicU64,
    pub(crate) ejections_enforced_5xx: AtomicU64,
    pub(crate) ejections_enforced_gateway: AtomicU64,
    pub(crate) ejections_enforced_local: AtomicU64,
    pub(crate) ejections_overflow: AtomicU64,
}

pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// A snapshot of one cluster's stats, named as Envoy names them under `cluster.<name>.`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ClusterStats {
    pub upstream_rq_active: u64,
    pub upstream_rq_total: u64,
    pub upstream_rq_pending_active: u64,
    pub upstream_rq_pending_total: u64,
    /// Requests refused by `http1MaxPendingRequests` or `http2MaxRequests` (Envoy counts both here).
    pub upstream_rq_pending_overflow: u64,
    /// Attempts the route timeout ended while they waited for response headers; each is reported to
    /// the outlier detector as a local-origin timeout.
    pub upstream_rq_timeout: u64,
    /// Attempts their per-try timeout ended, reported the same way.
    pub upstream_rq_per_try_timeout: u64,
    /// Attempts abandoned because the client went away, waiting for a connection or for response
    /// headers (Envoy counts only the former here). Never reported to the outlier detector.
    pub upstream_rq_cancelled: u64,
    pub upstream_cx_active: u64,
    pub upstream_cx_total: u64,
    pub upstream_cx_connect_fail: u64,
    pub upstream_cx_connect_timeout: u64,
    /// Times `maxConnections` stopped a new connection.
    pub upstream_cx_overflow: u64,
    pub membership_total: u64,
    pub membership_healthy: u64,
    pub outlier_detection_ejections_active: u64,
    pub outlier_detection_ejections_enforced_total: u64,
    pub outlier_detection_ejections_enforced_consecutive_5xx: u64,
    pub outlier_detection_ejections_enforced_consecutive_gateway_failure: u64,
    pub outlier_detection_ejections_enforced_consecutive_local_origin_failure: u64,
    /// Ejections skipped because of `maxEjectionPercent`.
    pub outlier_detection_ejections_overflow: u64,
}

impl Stats {
    pub(crate) fn snapshot(&self) -> ClusterStats {
        ClusterStats {
            upstream_rq_active: get(&self.rq_active),
            upstream_rq_total: get(&self.rq_total),
            upstream_rq_pending_total: get(&self.rq_pending_total),
            upstream_rq_pending_overflow: get(&self.rq_pending_overflow),
            upstream_rq_timeout: get(&self.rq_timeout),
            upstream_rq_per_try_timeout: get(&self.rq_per_try_timeout),
            upstream_rq_cancelled: get(&self.rq_cancelled),
            upstream_cx_total: get(&self.cx_total),
            upstream_cx_connect_fail: get(&self.cx_connect_fail),
            upstream_cx_connect_timeout: get(&self.cx_connect_timeout),
            upstream_cx_overflow: get(&self.cx_overflow),
            outlier_detection_ejections_enforced_total: get(&self.ejections_enforced_total),
            outlier_detection_ejections_enforced_consecutive_5xx: get(&self.ejections_enforced_5xx),
            outlier_detection_ejections_enforced_consecutive_gateway_failure: get(
                &self.ejections_enforced_gateway
            ),
            outlier_detection_ejections_enforced_consecutive_local_origin_failure: get(
                &self.ejections_enforced_local
            ),
            outlier_detection_ejections_overflow: get(&self.ejections_overflow),
            ..ClusterStats::default()
        }
    }
}
