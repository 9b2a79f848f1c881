//! The ways a proxied request can fail inside the proxy, each with the status, response flag and body
//! text Envoy gives it, so clients and dashboards see what they would see behind Envoy.

use crate::{BoxError, ResponseFlags};
use http::StatusCode;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Which circuit breaker overflowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverflowKind {
    /// `http1MaxPendingRequests`: too many requests waiting for a connection.
    Pending,
    /// `http2MaxRequests`: too many requests in flight to the cluster.
    Requests,
    /// `maxConnections` reached and no request may wait.
    Connections,
    /// `maxRetries`: too many retries in flight to the cluster.
    Retries,
}

/// Why the proxy shed work: one client pod at one of its own limits, or the whole proxy short of
/// a resource. Each is answered `503` with Envoy's overload flag `OM` and these details.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Overload {
    /// The pod has as many connections open to the proxy as it may.
    PodConnections,
    /// The pod has as many requests in flight as it may.
    PodRequests,
    /// The pod holds as many upstream connections (HTTP/1 attempts, L4 connections) as it may.
    PodUpstreamConnections,
    /// The proxy is short of file descriptors (new work from the pods holding the most goes
    /// first; then all of it).
    FileDescriptors,
    /// The proxy is near its memory limit (as above).
    Memory,
}

impl Overload {
    pub const ALL: [Overload; 5] = [
        Self::PodConnections,
        Self::PodRequests,
        Self::PodUpstreamConnections,
        Self::FileDescriptors,
        Self::Memory,
    ];

    /// `%RESPONSE_CODE_DETAILS%` (Envoy's overload manager logs `overload`; these say which).
    pub fn details(self) -> &'static str {
        match self {
            Self::PodConnections => "overload_pod_connections",
            Self::PodRequests => "overload_pod_requests",
            Self::PodUpstreamConnections => "overload_pod_upstream_connections",
            Self::FileDescriptors => "overload_file_descriptors",
            Self::Memory => "overload_memory",
        }
    }

    /// The local reply's body.
    pub fn body(self) -> &'static str {
        match self {
            Self::PodConnections => {
                "overloaded: this pod has too many connections open to the node proxy"
            }
            Self::PodRequests => {
                "overloaded: this pod has too many requests in flight through the node proxy"
            }
            Self::PodUpstreamConnections => {
                "overloaded: this pod holds too many upstream connections through the node proxy"
            }
            Self::FileDescriptors => "overloaded: the node proxy is short of file descriptors",
            Self::Memory => "overloaded: the node proxy is near its memory limit",
        }
    }
}

/// A budget that units are taken from and given back to.
pub trait Quota: Send + Sync + 'static {
    /// Takes one unit, or says why not (nothing is held then).
    fn try_take(&self) -> Result<(), Overload>;
    /// Gives one unit back.
    fn release(&self);
}

/// A share of a budget that an attempt holds while it has an upstream connection to itself (an
/// HTTP/1 request, an L4 connection): given back when dropped.
pub struct QuotaUnit(Arc<dyn Quota>);

impl Drop for QuotaUnit {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// The client's budget of upstream connections, carried in a request's extensions: the cluster
/// takes a unit before an attempt takes a connection of its own. Cloning it clones an `Arc`.
#[derive(Clone)]
pub struct UpstreamQuota(pub Arc<dyn Quota>);

impl UpstreamQuota {
    pub fn take(&self) -> Result<QuotaUnit, Overload> {
        self.0.try_take()?;
        Ok(QuotaUnit(self.0.clone()))
    }
}

/// Where a failure came from. Only upstream failures may ever reach outlier detection; a downstream
/// failure (the client went away) never does, and a local one (the proxy's own limits and routing)
/// never reached an upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The upstream host or the network path to it, including the proxy's timers waiting on it.
    Upstream,
    /// The client of the proxy.
    Downstream,
    /// The proxy itself: circuit breakers, routing, no healthy host.
    Local,
}

/// The error behind another (an `io::Error`, a `hyper::Error` carrying an `h2::Error`, ...), shared
/// so that [`ProxyError`] stays `Clone`. Walking `source()` reaches the original error itself, so
/// callers can `downcast_ref` it.
#[derive(Clone, Debug)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    pub fn new(err: impl Into<BoxError>) -> Self {
        Self(Arc::from(err.into()))
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Why a connection to an upstream host could not be made.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("connect to {host}: {source}")]
    Io {
        host: SocketAddr,
        #[source]
        source: Cause,
    },
    /// `connectTimeout` passed first.
    #[error(
        "connect to {host} timed out after {after:?} (is the pod up, or is a NetworkPolicy \
         dropping packets?)"
    )]
    TimedOut { host: SocketAddr, after: Duration },
    /// The connection was made but the HTTP handshake failed.
    #[error("handshake with {host}: {source}")]
    Handshake {
        host: SocketAddr,
        #[source]
        source: Cause,
    },
}

impl ConnectError {
    pub fn io(host: SocketAddr, err: io::Error) -> Self {
        Self::Io {
            host,
            source: Cause::new(err),
        }
    }

    /// The host that could not be reached.
    pub fn host(&self) -> SocketAddr {
        match self {
            Self::Io { host, .. } | Self::TimedOut { host, .. } | Self::Handshake { host, .. } => {
                *host
            }
        }
    }
}

/// A request ended by the proxy rather than by the upstream's response.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProxyError {
    /// The route's `timeout` (or `x-envoy-upstream-rq-timeout-ms`) expired.
    #[error("upstream request timeout after {0:?}")]
    RequestTimeout(Duration),
    /// One attempt's `perTryTimeout` expired; retriable.
    #[error("upstream per-try timeout after {0:?}")]
    PerTryTimeout(Duration),
    /// A connection-pool limit was exceeded.
    #[error("upstream overflow ({0:?})")]
    Overflow(OverflowKind),
    /// Every endpoint is ejected or there are none.
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    /// The TCP connect or the HTTP handshake failed or timed out.
    #[error("upstream connect failure: {0}")]
    ConnectFailure(#[source] ConnectError),
    /// The upstream reset the stream (h2 RST_STREAM with `reason`, or a TCP RST) before a response.
    #[error("upstream reset before response: {source}")]
    RemoteReset {
        reason: Option<h2::Reason>,
        #[source]
        source: Cause,
    },
    /// The upstream refused the stream (h2 REFUSED_STREAM); always safe to retry.
    #[error("upstream refused stream")]
    RefusedStream,
    /// The upstream connection closed before a response.
    #[error("upstream connection terminated: {0}")]
    ConnectionTermination(#[source] Cause),
    /// The upstream's response was not valid HTTP (a bad status line or header, conflicting
    /// `content-length`s) or its body ended before its declared length: Envoy's codec calls this
    /// a protocol error and resets the stream (`UPE`, 502 before the response started).
    #[error("upstream protocol error: {0}")]
    ProtocolError(#[source] Cause),
    /// The client went away (its request body failed) before the response: nothing the upstream
    /// did, and no one is left to answer.
    #[error("downstream connection terminated: {0}")]
    DownstreamTermination(#[source] Cause),
    /// The proxy shed the request to protect the other clients or itself.
    #[error("overloaded: {}", .0.details())]
    Overload(Overload),
    /// No route matched the request.
    #[error("no route matched")]
    NoRoute,
    /// The request names no known service.
    #[error("no cluster for {0}")]
    NoCluster(String),
}

/// An upstream that closed every connection the pool tried before a request could be sent.
#[derive(Clone, Copy, Debug, thiserror::Error)]
#[error("{host} closed {connections} connections before a request could be sent")]
pub struct StaleConnections {
    pub host: SocketAddr,
    pub connections: u32,
}

impl ProxyError {
    /// Who caused it.
    pub fn origin(&self) -> Origin {
        match self {
            Self::RequestTimeout(_)
            | Self::PerTryTimeout(_)
            | Self::ConnectFailure(_)
            | Self::RemoteReset { .. }
            | Self::RefusedStream
            | Self::ConnectionTermination(_)
            | Self::ProtocolError(_) => Origin::Upstream,
            Self::DownstreamTermination(_) => Origin::Downstream,
            Self::Overflow(_)
            | Self::Overload(_)
            | Self::NoHealthyUpstream
            | Self::NoRoute
            | Self::NoCluster(_) => Origin::Local,
        }
    }

    /// The status Envoy answers with. For a downstream termination nobody reads it, and the access
    /// log records 0 (see [`Self::origin`]).
    pub fn status(&self) -> StatusCode {
        match self {
            Self::RequestTimeout(_) | Self::PerTryTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::DownstreamTermination(_) => StatusCode::BAD_REQUEST,
            Self::ProtocolError(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response flag Envoy logs.
    pub fn flag(&self) -> ResponseFlags {
        match self {
            Self::RequestTimeout(_) | Self::PerTryTimeout(_) => {
                ResponseFlags::UPSTREAM_REQUEST_TIMEOUT
            }
            Self::Overflow(_) => ResponseFlags::UPSTREAM_OVERFLOW,
            Self::Overload(_) => ResponseFlags::OVERLOAD_MANAGER,
            Self::NoHealthyUpstream => ResponseFlags::NO_HEALTHY_UPSTREAM,
            Self::ConnectFailure(_) => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            Self::RemoteReset { .. } | Self::RefusedStream => ResponseFlags::UPSTREAM_REMOTE_RESET,
            Self::ConnectionTermination(_) => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            Self::ProtocolError(_) => ResponseFlags::UPSTREAM_PROTOCOL_ERROR,
            Self::DownstreamTermination(_) => ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION,
            Self::NoRoute => ResponseFlags::NO_ROUTE_FOUND,
            Self::NoCluster(_) => ResponseFlags::NO_CLUSTER_FOUND,
        }
    }

    /// The stream reset reason Envoy names in its local reply (`resetReasonToString`), for the
    /// failures that reach the upstream connection pool or codec.
    pub fn reset_reason(&self) -> Option<&'static str> {
        Some(match self {
            Self::Overflow(_) => "overflow",
            Self::ConnectFailure(ConnectError::TimedOut { .. }) => "connection timeout",
            // A refused or failed connect is the peer's doing; Envoy keeps "local connection
            // failure" for sockets it could not even create.
            Self::ConnectFailure(_) => "remote connection failure",
            Self::RemoteReset { .. } | Self::RefusedStream => "remote reset",
            Self::ConnectionTermination(_) => "connection termination",
            Self::ProtocolError(_) => "protocol error",
            _ => return None,
        })
    }

    /// The body text Envoy sends (clients and the tutorial's scripts grep for `overflow`).
    /// `retried`: earlier attempts were made, so Envoy's text says the reason is the latest one
    /// ("retried and the latest reset reason: ...").
    pub fn body(&self, retried: bool) -> std::borrow::Cow<'static, str> {
        const PREFIX: &str = "upstream connect error or disconnect/reset before headers. ";
        if let Some(reason) = self.reset_reason() {
            let latest = if retried {
                "retried and the latest "
            } else {
                ""
            };
            return format!("{PREFIX}{latest}reset reason: {reason}").into();
        }
        match self {
            Self::RequestTimeout(_) | Self::PerTryTimeout(_) => "upstream request timeout".into(),
            Self::NoHealthyUpstream => "no healthy upstream".into(),
            Self::Overload(why) => why.body().into(),
            _ => "".into(),
        }
    }

    /// Envoy's `%RESPONSE_CODE_DETAILS%` for the failures whose details the access log shows
    /// (`started`: the response headers had already gone to the client).
    pub fn details(&self, started: bool) -> Option<&'static str> {
        match (self, started) {
            (Self::ProtocolError(_), false) => {
                Some("upstream_reset_before_response_started{protocol_error}")
            }
            (Self::ProtocolError(_), true) => {
                Some("upstream_reset_after_response_started{protocol_error}")
            }
            (Self::Overload(why), _) => Some(why.details()),
            _ => None,
        }
    }

    /// Finds a `ProxyError` in `err` or its chain of sources.
    pub fn find(err: &BoxError) -> Option<&ProxyError> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err.as_ref());
        while let Some(e) = cur {
            if let Some(pe) = e.downcast_ref::<ProxyError>() {
                return Some(pe);
            }
            cur = e.source();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapper(#[source] ProxyError);

    #[test]
    fn finds_cause_through_sources() {
        let err: BoxError = Box::new(Wrapper(ProxyError::Overflow(OverflowKind::Pending)));
        let found = ProxyError::find(&err).expect("cause");
        assert_eq!(found.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(found.flag().to_string(), "UO");
        assert_eq!(
            found.body(false),
            "upstream connect error or disconnect/reset before headers. reset reason: overflow"
        );
        assert_eq!(found.origin(), Origin::Local);
    }

    #[test]
    fn causes_stay_reachable_and_origins_are_typed() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        let host: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let err: BoxError = Box::new(ProxyError::ConnectFailure(ConnectError::io(host, refused)));
        let pe = ProxyError::find(&err).expect("proxy error");
        assert_eq!(pe.origin(), Origin::Upstream);
        let mut cause = std::error::Error::source(pe);
        let mut kind = None;
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                kind = Some(io.kind());
            }
            cause = e.source();
        }
        assert_eq!(kind, Some(io::ErrorKind::ConnectionRefused));
        // Envoy 1.40's text for a refused connect, alone and after retries.
        assert_eq!(
            pe.body(false),
            "upstream connect error or disconnect/reset before headers. reset reason: remote \
             connection failure"
        );
        assert_eq!(
            pe.body(true),
            "upstream connect error or disconnect/reset before headers. retried and the latest \
             reset reason: remote connection failure"
        );
        let timed_out = ProxyError::ConnectFailure(ConnectError::TimedOut {
            host,
            after: Duration::from_secs(1),
        });
        assert!(timed_out
            .body(false)
            .ends_with("reset reason: connection timeout"));

        // Envoy 1.40's reply to an upstream that answered `HTTP/1.1 abc`.
        let bad = ProxyError::ProtocolError(Cause::new(io::Error::other("invalid status")));
        assert_eq!(bad.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(bad.flag().to_string(), "UPE");
        assert_eq!(
            bad.body(false),
            "upstream connect error or disconnect/reset before headers. reset reason: protocol \
             error"
        );
        assert_eq!(
            bad.details(false),
            Some("upstream_reset_before_response_started{protocol_error}")
        );
        assert_eq!(bad.origin(), Origin::Upstream);

        let gone = ProxyError::DownstreamTermination(Cause::new(io::Error::from(
            io::ErrorKind::ConnectionReset,
        )));
        assert_eq!(gone.origin(), Origin::Downstream);
        assert_eq!(gone.flag().to_string(), "DC");
    }
}
