//! The checked policy the proxy runs on. Plain data: built by `sluice-config` from Istio and Kubernetes
//! YAML (where every value is validated and defaulted as Istio does), read by the proxy, shown by the admin
//! API. Nothing here parses YAML or does I/O.
#![forbid(unsafe_code)]

mod cluster;
mod identity;
mod route;
mod serde_duration;
mod snapshot;

pub use self::cluster::{
    Cluster, ClusterKey, ConnectionPool, Endpoint, H2UpgradePolicy, LoadBalancer, OutlierDetection,
    RetryBudgetPolicy, TcpKeepalive, TrafficPolicy, Warmup,
};
pub use self::identity::{Identity, Owner, UNKNOWN, WORKLOAD_NAME_LABEL};
pub use self::route::{
    DirectResponse, Fault, FaultAbort, FaultDelay, HeaderMatch, HeaderOperations, IpNet, L4Match,
    QueryMatch, RequestMatch, RetryOn, RetryPolicy, Route, StringMatch, TcpRoute, VirtualHost,
    WeightedDestination, GRPC_STATUS_NAMES, INCOMING_PORT,
};
pub use self::snapshot::{
    split_at_only_colon, NamespaceView, Rejection, Service, ServiceExportTo, ServicePort, Snapshot,
    Workload,
};

/// The Kubernetes cluster domain when none is configured (`--cluster-domain`); the one in force is
/// [`Snapshot::cluster_domain`].
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";
