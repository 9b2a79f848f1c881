//! `/clusters` and `/endpoints`: live clusters, their endpoints and outlier detection.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One live cluster (`/clusters` is a list of these, by name).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    /// Envoy's name: `outbound|PORT|SUBSET|HOST`.
    pub name: String,
    /// `Http1` or `H2c` upstream.
    pub protocol: String,
    /// Envoy's `cluster.<name>.*` stats by name (`upstream_rq_pending_overflow`, ...).
    pub stats: BTreeMap<String, u64>,
    pub retry_budget: RetryBudget,
    pub hosts: Vec<Host>,
    /// The last ejections and un-ejections, oldest first.
    pub outlier_events: Vec<OutlierEvent>,
}

impl Cluster {
    /// A stat by Envoy's name; 0 when absent.
    pub fn stat(&self, name: &str) -> u64 {
        self.stats.get(name).copied().unwrap_or(0)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryBudget {
    /// Retries allowed at once now.
    pub max: u32,
    pub active: u32,
    pub upstream_rq_retry_overflow: u64,
}

/// One endpoint of a cluster, with its outlier-detection state and load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub addr: String,
    /// `namespace/name` of the pod behind it, when known.
    pub pod: Option<String>,
    pub ejected: bool,
    /// Time left of the current ejection.
    pub ejected_for_ms: Option<u64>,
    /// Times ejected so far.
    pub ejection_count: u32,
    /// The ejection-time multiplier (`ejectTimeBackoff`).
    pub multiplier: u32,
    /// The current run of consecutive 5xx (and gateway, and local-origin) failures.
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local: u32,
    pub active_requests: u32,
    pub connections: u32,
    pub idle_connections: u32,
    pub total_requests: u64,
}

/// An ejection or an un-ejection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlierEvent {
    pub host: String,
    /// How long before the answer it happened.
    pub ago_ms: u64,
    #[serde(flatten)]
    pub kind: OutlierEventKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum OutlierEventKind {
    Ejected {
        /// `Consecutive5xx`, `ConsecutiveGatewayFailure` or `ConsecutiveLocalOriginFailure`.
        reason: String,
        /// This host's ejections so far, this one included.
        ejections: u32,
        duration_ms: u64,
    },
    Unejected,
}

/// `/endpoints[?service=]`: one row per endpoint of every cluster (Istio's `proxy-config
/// endpoint`), with the outlier check's verdict.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The service's host name (FQDN).
    pub service: String,
    pub cluster: String,
    #[serde(flatten)]
    pub host: Host,
    /// `HEALTHY`, or `UNHEALTHY` while ejected (Envoy's health flags).
    pub status: String,
    /// `OK`, or `FAILED` while outlier detection has it ejected (Istio's OUTLIER CHECK).
    pub outlier_check: String,
    /// When its current ejection ended or ends, as milliseconds since the Unix epoch.
    pub ejected_until_unix_ms: Option<u64>,
}
