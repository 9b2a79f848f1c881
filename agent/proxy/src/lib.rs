//! The outbound L7 proxy: the listener, route selection, the per-route resilience stack over the
//! live clusters, local replies with Envoy's flags, the access log, metrics and the admin endpoints.
//! Redirected connections (eBPF mode) are routed by their original destination; those that are not
//! HTTP are proxied at L4.
#![forbid(unsafe_code)]

mod access_log;
pub mod admin;
mod cluster_stats;
pub mod detect;
mod direct;
mod handler;
mod metrics;
mod passthrough;
pub mod route;
pub mod server;
mod state;
mod tcp;

pub use self::access_log::AccessLog;
pub use self::handler::{ConnInfo, Handler, HandlerOptions, RedirectOptions};
pub use self::passthrough::PASSTHROUGH_CLUSTER;

/// Istio's name for traffic the proxy refuses (here: a redirected connection that would loop).
pub const BLACK_HOLE_CLUSTER: &str = "BlackHoleCluster";
pub use self::metrics::Metrics;
pub use self::state::State;
