//! Requests through the node: the ring of recent requests (`/requests`, `/requests/ID`), the live
//! stream (`/tap`) and the per-edge table (`/top`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One finished request (or L4 connection) as the agent recorded it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// `x-request-id` as sent upstream; `None` for an L4 connection.
    pub request_id: Option<String>,
    pub start_unix_ms: u64,
    pub duration_ms: f64,
    /// `HTTP/1.1`, `HTTP/2`, or `TCP`.
    pub protocol: String,
    pub method: Option<String>,
    pub authority: Option<String>,
    pub path: Option<String>,
    /// The client's address.
    pub peer: Option<String>,
    /// The client pod (`namespace/name`), `unknown` when it is not a known pod.
    pub source: String,
    /// Its workload (Istio's `source_workload`).
    pub source_workload: String,
    /// The Service addressed (FQDN), `unknown` before one was chosen.
    pub service: String,
    /// The cluster the route chose.
    pub cluster: Option<String>,
    /// The route that took the request and its policy, as the configuration in force when it
    /// was routed had them (a later reload changes nothing here); Istio's `allow_any` route for
    /// the passthrough; `None` for what was refused before routing.
    #[serde(default)]
    pub route: Option<RoutePolicy>,
    /// The cluster's policy then: the DestinationRule that shaped it and its limits.
    #[serde(default)]
    pub destination: Option<DestinationPolicy>,
    /// The final status; 0 when none was sent.
    pub status: u16,
    /// Envoy's response flags (`URX,UF`), `-` when none.
    pub flags: String,
    /// Envoy's response code details, when the proxy decided the outcome.
    pub details: Option<String>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// Attempts made, as the access log's `attempts=` counts them (one that never got an
    /// endpoint included).
    #[serde(default)]
    pub attempt_count: u32,
    /// The last endpoint tried, as the access log's upstream host.
    #[serde(default)]
    pub upstream: Option<String>,
    /// Each attempt that picked an endpoint, in order.
    pub attempts: Vec<Attempt>,
}

/// One attempt of a request at one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1 for the first (as `x-envoy-attempt-count` says).
    pub attempt: u32,
    pub endpoint: String,
    /// The pod behind the endpoint, when known.
    pub pod: Option<String>,
    /// From the request's start to this attempt's choice of endpoint.
    pub start_offset_ms: f64,
    pub duration_ms: f64,
    /// The request reached the endpoint (went out on a connection).
    pub reached: bool,
    /// 0 when no response headers came.
    pub status: u16,
    /// What ended it short of a complete response (`UF`, `UC`, `UT`, `DC`), `-` when none.
    pub flags: String,
    /// The proxy's timer that ended it (`per_try`, `route`), if one did.
    pub timeout: Option<String>,
}

/// `/top`: traffic per edge over a recent window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Top {
    /// The span the rates are over, in seconds: the window asked for (at most 60), of which
    /// the current second counts as far as it has gone.
    pub window_s: f64,
    /// Requests that finished in the window.
    pub requests: u64,
    pub edges: Vec<Edge>,
}

/// Source workload -> destination service.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Edge {
    /// `namespace/workload`, `unknown` for clients that are no known pod.
    pub source: String,
    pub service: String,
    pub requests: u64,
    pub requests_per_s: f64,
    /// Responses below 500 (and not 0) over all, in percent.
    pub success_pct: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Attempts beyond the first.
    pub retries: u64,
    pub retries_per_s: f64,
    /// Requests per response flag (`UO`, `URX`, `UT`, `UF`, `UH`, `DC`, `FI`, `DI`, ...).
    pub flags: BTreeMap<String, u64>,
}

/// The route a request took and the policy it ran under.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutePolicy {
    /// `namespace/name` of the VirtualService, or `default` for Istio's implicit route.
    pub virtual_service: String,
    /// The route (`http[].name`, or `VSNAME.INDEX`; `default` for the implicit route).
    pub route: String,
    /// The route's `match` entry the request fitted: its index in `match` and its conditions
    /// (as `/policy` spells them); `None` when the route has no `match` (it takes everything).
    pub matched: Option<Match>,
    /// `timeout`, whole request.
    pub timeout_ms: Option<u64>,
    /// Retries allowed after the first attempt.
    pub retries: u32,
    /// `retryOn` conditions in force.
    pub retry_on: Vec<String>,
    pub per_try_timeout_ms: Option<u64>,
    /// The route's `fault` (as `/policy` spells it), when it has one.
    pub fault: Option<serde_json::Value>,
}

/// One `match` entry of a route.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Match {
    pub index: usize,
    pub conditions: serde_json::Value,
}

/// A cluster's policy: which DestinationRule shaped it, and what the request ran under.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationPolicy {
    /// `namespace/name` of the DestinationRule (the first, when Istio merged several); `None`:
    /// no rule applies and Envoy's defaults do.
    pub destination_rule: Option<String>,
    /// `connectionPool`: `maxConnections`, `http1MaxPendingRequests`, `http2MaxRequests`,
    /// `maxRetries`.
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
    /// `outlierDetection` in force (as `/policy` spells it); `None`: nothing is ejected.
    pub outlier_detection: Option<serde_json::Value>,
    /// `loadBalancer` (as `/policy` spells it).
    pub load_balancer: serde_json::Value,
}

/// `/connections`: one open connection that carries HTTP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connection {
    /// `downstream` (a client's, to the proxy) or `upstream` (the proxy's, to an endpoint).
    pub side: String,
    /// The client's or the endpoint's address.
    pub peer: Option<String>,
    /// The pod at the other end (`namespace/name`), when known.
    pub pod: Option<String>,
    /// Its workload (`namespace/workload`), `unknown/unknown` when it is no known pod.
    pub workload: String,
    /// The Service it is for; `unknown` for a client's connection to the explicit proxy, which
    /// may carry requests to any.
    pub service: String,
    pub protocol: String,
    pub age_ms: u64,
    /// Bytes read from the peer, and written to it.
    pub bytes_received: u64,
    pub bytes_sent: u64,
}
