//! The outbound L7 proxy: the listener, route selection, the per-route resilience stack over the
//! live clusters, local replies with Envoy's flags, the access log, metrics and the admin endpoints.
//! Redirected connections (eBPF mode) are routed by their original destination; those that are not
//! HTTP are proxied at L4.
#![forbid(unsafe_code)]

pub mod admin;
mod cluster_stats;
mod conns;
pub mod detect;
mod direct;
mod downstream;
mod handler;
mod isolation;
mod limits;
mod metrics;
mod notes;
mod passthrough;
mod recorded;
mod relay;
pub mod route;
pub mod server;
mod stamp;
mod state;
mod tcp;

pub use self::handler::{ConnInfo, Handler, HandlerOptions, RedirectOptions};
pub use self::isolation::{cgroup_memory_limit, set_memory_release, Isolation, IsolationLimits};
pub use self::limits::{DownstreamLimits, InvalidLimit};
pub use self::passthrough::PASSTHROUGH_CLUSTER;
pub use self::relay::Refusal;
pub use sluice_telemetry::{AccessLog, Listener, LogFormat, Metrics};

/// Istio's name for traffic the proxy refuses (here: a redirected connection that would loop).
pub const BLACK_HOLE_CLUSTER: &str = "BlackHoleCluster";
pub use self::state::State;
