//! Clusters: the endpoints of one service port (optionally one subset of it) and the `trafficPolicy`
//! that governs connections to them, after Istio's port-level and subset-level overrides are applied.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Names a cluster as Envoy does: `outbound|PORT|SUBSET|HOST`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ClusterKey {
    /// The service's fully qualified host name (`pricing.default.svc.cluster.local`).
    pub host: String,
    /// The service port.
    pub port: u16,
    /// The DestinationRule subset, if any.
    pub subset: Option<String>,
}

impl fmt::Display for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "outbound|{}|{}|{}",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            self.host
        )
    }
}

/// One upstream endpoint (a ready pod address behind the service port).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// `namespace/name` of the pod behind the endpoint, when known.
    pub pod: Option<String>,
    /// The pod's labels (subsets select on these).
    pub labels: BTreeMap<String, String>,
    /// The pod's telemetry identity (`destination_workload`, ...), when the pod is known.
    pub identity: Option<std::sync::Arc<crate::Identity>>,
}

/// A cluster: endpoints plus the traffic policy for them.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cluster {
    pub key: ClusterKey,
    pub endpoints: Vec<Endpoint>,
    pub policy: TrafficPolicy,
    /// `namespace/name` of the DestinationRule that shaped `policy` (the first one, when Istio
    /// merged several); `None`: no rule applies, Envoy's defaults do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination_rule: Option<String>,
    /// A subset's cluster: the labels its endpoints carry (the subset's selector, kept so that
    /// an endpoint change can refilter the subset without its DestinationRule). Empty otherwise.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subset_labels: BTreeMap<String, String>,
}

pub use self::traffic::TrafficPolicy;

mod traffic {
    use super::*;

    /// The effective `trafficPolicy` of a cluster.
    #[derive(Clone, Debug, Default, PartialEq, Serialize)]
    pub struct TrafficPolicy {
        pub connection_pool: ConnectionPool,
        /// `None` when no `outlierDetection` is configured (Envoy then ejects nothing).
        pub outlier_detection: Option<OutlierDetection>,
        pub load_balancer: LoadBalancer,
        /// `retryBudget`: when set, it bounds retries in flight instead of `maxRetries`.
        pub retry_budget: Option<RetryBudgetPolicy>,
        /// `loadBalancer.warmup` (or `warmupDurationSecs`), for ROUND_ROBIN and LEAST_REQUEST.
        pub warmup: Option<Warmup>,
    }
}

/// `trafficPolicy.retryBudget`, as istiod writes it into Envoy's `retry_budget` circuit breaker:
/// retries in flight to the cluster may be `percent` % of its active and pending requests, but
/// never fewer than `min_retry_concurrency`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct RetryBudgetPolicy {
    /// Envoy's `budget_percent` (0-100). istiod writes 0.2 when `percent` is unset.
    pub percent: f64,
    /// Envoy's `min_retry_concurrency`; istiod writes 3 when it is unset or 0.
    pub min_retry_concurrency: u32,
}

/// `connectionPool.tcp` and `connectionPool.http`, with Istio's defaults.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: connections to all endpoints of the cluster.
    pub max_connections: u32,
    /// `tcp.connectTimeout` (Istio default 10 s).
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub connect_timeout: Duration,
    /// `tcp.tcpKeepalive`.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `tcp.idleTimeout`: an L4 connection with no bytes either way that long is closed (Envoy's
    /// TCP proxy `idle_timeout`; Istio's default 1 h; `None` after `0s`). Also the HTTP
    /// `idle_timeout` below when `http.idleTimeout` is unset.
    #[serde(serialize_with = "crate::serde_duration::opt")]
    pub tcp_idle_timeout: Option<Duration>,
    /// `tcp.maxConnectionDuration`: an L4 connection is closed this long after it was accepted
    /// (Envoy's `max_downstream_connection_duration`, flag `DT`); an upstream HTTP connection
    /// drains this long after it was made (the cluster's `max_connection_duration`).
    #[serde(serialize_with = "crate::serde_duration::opt")]
    pub max_connection_duration: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests that may wait for a connection.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: requests on a connection to the cluster (waiting ones are pending).
    pub max_requests: u32,
    /// `http.maxRequestsPerConnection`; 0 means unlimited.
    pub max_requests_per_connection: u32,
    /// `http.maxRetries`: retries in flight to the cluster.
    pub max_retries: u32,
    /// `http.idleTimeout` of upstream connections, else `tcp.idleTimeout` (Istio default 1 h).
    #[serde(serialize_with = "crate::serde_duration::opt")]
    pub idle_timeout: Option<Duration>,
    /// `http.h2UpgradePolicy`.
    pub h2_upgrade: H2UpgradePolicy,
    /// `http.useClientProtocol`: speak to the upstream in the protocol the client used.
    pub use_client_protocol: bool,
}

/// Istio's circuit-breaker default: effectively unlimited.
pub const UNLIMITED: u32 = u32::MAX;

impl Default for ConnectionPool {
    fn default() -> Self {
        Self {
            max_connections: UNLIMITED,
            connect_timeout: Duration::from_secs(10),
            tcp_keepalive: None,
            tcp_idle_timeout: Some(Duration::from_secs(3600)),
            max_connection_duration: None,
            max_pending_requests: UNLIMITED,
            max_requests: UNLIMITED,
            max_requests_per_connection: 0,
            max_retries: UNLIMITED,
            idle_timeout: Some(Duration::from_secs(3600)),
            h2_upgrade: H2UpgradePolicy::Default,
            use_client_protocol: false,
        }
    }
}

/// `connectionPool.tcp.tcpKeepalive`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcpKeepalive {
    pub probes: Option<u32>,
    #[serde(serialize_with = "crate::serde_duration::opt")]
    pub time: Option<Duration>,
    #[serde(serialize_with = "crate::serde_duration::opt")]
    pub interval: Option<Duration>,
}

/// `connectionPool.http.h2UpgradePolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum H2UpgradePolicy {
    #[default]
    Default,
    DoNotUpgrade,
    Upgrade,
}

/// `outlierDetection`, translated as Istio translates it to Envoy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx (including locally generated 503s when origins are not split) that eject;
    /// `None` disables this detector.
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502/503/504 that eject.
    pub consecutive_gateway_errors: Option<u32>,
    /// Consecutive local-origin failures (connect failure, timeout, reset) that eject; `Some` also
    /// splits local-origin from external errors, as `split_external_local_origin_errors` does.
    pub consecutive_local_origin_failures: Option<u32>,
    /// Time between ejection sweeps (un-ejection happens only at these ticks).
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub interval: Duration,
    /// Base ejection time, multiplied by the host's ejection count.
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub base_ejection_time: Duration,
    /// Cap on one ejection (Envoy's `max_ejection_time`, 300 s).
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub max_ejection_time: Duration,
    /// At most this percent of hosts ejected at once (at least one host may always be ejected).
    pub max_ejection_percent: u32,
    /// Below this percent of healthy hosts, ejection is ignored (panic mode); 0 disables.
    pub min_health_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: Some(5),
            consecutive_gateway_errors: None,
            consecutive_local_origin_failures: None,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// `loadBalancer.warmup`: Envoy's `slow_start_config`. A host younger than `window` takes a share
/// of the traffic that grows with its age.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Warmup {
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub window: Duration,
    /// `minimumPercent` (default 10): the least share a warming host gets, in percent.
    pub minimum_percent: f64,
    /// `aggression` (default 1): how fast the share grows; Envoy treats 0 as 1.
    pub aggression: f64,
}

impl Warmup {
    /// The factor Envoy's `applySlowStartFactor` multiplies a host's weight by at `age`:
    /// `max(minimumPercent / 100, (max(age, 1 ms) / window) ^ (1 / aggression))` inside the
    /// window, 1 after it.
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window {
            return 1.0;
        }
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let t = ms(age).floor().max(1.0) / ms(self.window);
        let aggression = if self.aggression > 0.0 {
            self.aggression
        } else {
            1.0
        };
        let scaled = if aggression == 1.0 || t == 1.0 {
            t
        } else {
            t.powf(1.0 / aggression)
        };
        scaled.max(self.minimum_percent / 100.0)
    }
}

/// `loadBalancer.simple`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    /// Istio's default is LEAST_REQUEST.
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
    /// Forward to the original destination address, no load balancing.
    Passthrough,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_factor_is_envoys_slow_start() {
        let w = |minimum_percent, aggression| Warmup {
            window: Duration::from_secs(10),
            minimum_percent,
            aggression,
        };
        let at = |s: f64| Duration::from_secs_f64(s);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(w(10.0, 1.0).factor(at(0.0)), 0.1));
        assert!(close(w(10.0, 1.0).factor(at(5.0)), 0.5));
        assert!(close(w(10.0, 1.0).factor(at(10.0)), 1.0));
        // Aggression 2: the square root of the time share.
        assert!(close(w(10.0, 2.0).factor(at(2.5)), 0.5));
        // No floor: at least 1 ms of age counts.
        assert!(close(w(0.0, 1.0).factor(at(0.0)), 0.0001));
        // Aggression 0 is taken as 1, as Envoy does.
        assert!(close(w(0.0, 0.0).factor(at(5.0)), 0.5));
    }
}
