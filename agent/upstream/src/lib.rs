//! Upstream clusters: the runtime behind one Istio `DestinationRule`-governed cluster. Each
//! [`ClusterHandle`] enforces the cluster's circuit breakers (`connectionPool`), balances across its
//! endpoints (`loadBalancer`), keeps per-host connection pools (HTTP/1.1 keep-alive or h2c) and runs
//! the outlier detector (`outlierDetection`), all with Envoy's semantics so Istio users see what they
//! would see behind Envoy.
#![forbid(unsafe_code)]

mod balance;
mod body;
mod cluster;
mod outlier;
mod pool;
mod stats;

#[cfg(test)]
mod tests;

pub use self::cluster::{Cluster, ClusterHandle, HostStatus, UpstreamProtocol};
pub use self::outlier::{EjectionType, OutlierEvent, OutlierEventKind};
pub use self::stats::ClusterStats;
