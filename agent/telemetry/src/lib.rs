//! Telemetry: one record per request (and per connection proxied at L4), and everything made from
//! it: Istio's metric samples under both reporters, the access-log entry, the trace spans.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod edges;
mod labels;
mod live;
mod metrics;
pub mod recent;
mod record;
pub mod trace;

pub use self::access_log::{AccessLog, LogFormat};
pub use self::edges::{EdgeTotals, Edges};
pub use self::labels::{
    unknown_identity, Interned, Peer, Peers, Protocol, Reporter, RequestLabels, ServiceName,
    TcpLabels,
};
pub use self::live::{Listener, Live};
pub use self::metrics::{protocol_of, Metrics, TcpCounters};
pub use self::recent::{Kept, Recent};
pub use self::record::{
    header_bytes, Endpoints, Exchange, HttpRequest, Record, Telemetry, DEFAULT_CLUSTER_ID,
};
