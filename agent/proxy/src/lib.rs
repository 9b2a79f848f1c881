//! The outbound L7 proxy: the listener, route selection, the per-route resilience stack over the
//! live clusters, local replies with Envoy's flags, the access log, metrics and the admin endpoints.
#![forbid(unsafe_code)]

mod access_log;
pub mod admin;
mod cluster_stats;
mod handler;
mod metrics;
pub mod route;
pub mod server;
mod state;

pub use self::access_log::AccessLog;
pub use self::handler::{ConnInfo, Handler, HandlerOptions};
pub use self::metrics::Metrics;
pub use self::state::State;
