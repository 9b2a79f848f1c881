//! Every answer of the agent's admin API as a serde type. The server (`sluice-proxy`'s admin
//! module) builds these, the `sluice` CLI decodes them and prints tables, and xtask and the tests
//! read them: nothing reads admin JSON by string keys. Plain data only (no HTTP, no runtime), so
//! any client can depend on it.
//!
//! Where the admin API shows the checked policy itself (`/config_dump`, the routes and traffic
//! policy of `/policy`), it is carried as a JSON document: that is `sluice-policy`'s own
//! serialisation, typed there.
#![forbid(unsafe_code)]

mod clusters;
mod status;
mod traffic;

pub use clusters::*;
pub use status::*;
pub use traffic::*;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where the admin API listens by default (Istio: 15000). It only ever listens on loopback.
pub const DEFAULT_ADDR: &str = "127.0.0.1:15000";
/// The admin API's Unix socket by default (mode 0600: root only on a node).
pub const DEFAULT_SOCKET: &str = "/var/run/sluice/admin.sock";

/// The admin API's paths.
pub mod paths {
    pub const STATUS: &str = "/status";
    pub const CONFIG_DUMP: &str = "/config_dump";
    pub const CLUSTERS: &str = "/clusters";
    /// `?service=NAME` selects one service's endpoints.
    pub const ENDPOINTS: &str = "/endpoints";
    pub const WORKLOADS: &str = "/workloads";
    pub const SERVICES: &str = "/services";
    pub const REDIRECTS: &str = "/redirects";
    /// `?service=NAME`.
    pub const POLICY: &str = "/policy";
    /// Recent requests, newest last (`?limit=N`).
    pub const REQUESTS: &str = "/requests";
    /// One recent request by its `x-request-id`: `/requests/ID`.
    pub const REQUEST: &str = "/requests/";
    /// Traffic per edge (source workload -> destination service) over the last `?window=SECONDS`
    /// (default 10) of the kept requests.
    pub const TOP: &str = "/top";
    /// Finished requests as they happen, one JSON [`crate::RequestSummary`] a line.
    pub const TAP: &str = "/tap";
    /// Open connections that carry HTTP, both sides of the proxy.
    pub const CONNECTIONS: &str = "/connections";
    pub const ACCESS_LOG: &str = "/access_log";
    /// A page of the node's live edges, endpoints and tap, served by the agent itself.
    pub const UI: &str = "/ui";
    /// `POST ?level=`.
    pub const LOGGING: &str = "/logging";
}

/// `/services`: a Service of the registry, with the cluster IPs its clients' DNS would give.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// `pricing.default.svc.cluster.local`.
    pub hostname: String,
    pub name: String,
    pub namespace: String,
    pub cluster_ips: Vec<String>,
    pub ports: Vec<u16>,
}

/// One problem with the configuration: a rejected object, or a warning.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// File path (standalone) or `Kind namespace/name` (Kubernetes).
    pub source: String,
    /// The rejected version of an API object (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// `Kind namespace/name` of the document, or its index in the file.
    pub object: String,
    /// Field path, e.g. `spec.http[0].retries.perTryTimeout`.
    pub field: String,
    pub reason: String,
}

/// `/policy?service=`: one service as the proxy routes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// The Service (`sluice-policy`'s serialisation).
    pub service: serde_json::Value,
    /// Its VirtualService routes, or Istio's implicit route.
    pub routes: serde_json::Value,
    pub clusters: Vec<PolicyCluster>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyCluster {
    /// Envoy's name: `outbound|PORT|SUBSET|HOST`.
    pub name: String,
    pub endpoints: Vec<PolicyEndpoint>,
    /// The DestinationRule's traffic policy as checked (`sluice-policy`'s serialisation).
    pub traffic_policy: serde_json::Value,
}

/// An endpoint as the configuration names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEndpoint {
    pub addr: String,
    pub pod: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pod's telemetry identity, when the pod is known.
    pub identity: Option<Identity>,
}

/// Istio's telemetry identity of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub workload: String,
    pub namespace: String,
    pub canonical_service: String,
    pub canonical_revision: String,
    pub app: String,
    pub version: String,
    pub principal: String,
}

#[cfg(test)]
mod tests;
