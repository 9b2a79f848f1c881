//! Upstream clusters: the runtime behind one Istio `DestinationRule`-governed cluster. Each
//! [`ClusterHandle`] enforces the cluster's circuit breakers (`connectionPool`), balances across its
//! endpoints (`loadBalancer`), keeps per-host connection pools (HTTP/1.1 keep-alive or h2c) and runs
//! the outlier detector (`outlierDetection`), all with Envoy's semantics so Istio users see what they
//! would see behind Envoy.
//!
//! As in Envoy's connection pool, `http2MaxRequests` counts requests that are on a connection
//! (checked when an attempt gets one, an overflow then being `UO`); requests waiting for a
//! connection count against `http1MaxPendingRequests` only.
//!
//! Where this crate decides something Envoy leaves to its surroundings, or differs on purpose:
//! - What an attempt tells the outlier detector is decided in one place (`outcome`). An attempt
//!   that a per-try or route timeout ends while it waits for response headers is a local-origin
//!   timeout (a 504 when origins are not split, as Envoy's router reports its timeouts); the timeout
//!   layers say so through the attempt's `sluice_core::Expiry`. An attempt dropped with no timer
//!   raised was abandoned by the client and reports nothing, as in Envoy; nor does one dropped
//!   while still waiting for a connection (Envoy has no host for it yet).
//! - Retries avoid previously tried hosts by filtering the candidates rather than re-drawing.
//! - h2c opens another connection to a host past 100 concurrent streams on one.
//! - Plain TCP connections ([`ClusterHandle::connect_tcp`]) overflow at `maxConnections` at once
//!   rather than queueing, as Envoy's TCP proxy documents.
#![forbid(unsafe_code)]

mod balance;
mod body;
mod cluster;
mod observe;
mod outcome;
mod outlier;
mod pool;
mod stats;
mod tcp;

#[cfg(test)]
mod tests;

pub use self::cluster::{Cluster, ClusterHandle, HostStatus, UpstreamProtocol};
pub use self::observe::{ConnectionMeter, ConnectionObserver};
pub use self::outlier::{EjectionType, OutlierEvent, OutlierEventKind};
pub use self::stats::ClusterStats;
pub use self::tcp::TcpConnection;
