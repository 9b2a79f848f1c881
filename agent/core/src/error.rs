//! The ways a proxied request can fail inside the proxy, each with the status, response flag and body
//! text Envoy gives it, so clients and dashboards see what they would see behind Envoy.

use crate::{BoxError, ResponseFlags};
use http::StatusCode;
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
    /// The TCP connect failed or timed out.
    #[error("upstream connect failure: {0}")]
    ConnectFailure(String),
    /// The upstream reset the stream (h2 RST_STREAM or TCP RST) before a response.
    #[error("upstream reset before response: {0}")]
    RemoteReset(String),
    /// The upstream refused the stream (h2 REFUSED_STREAM); always safe to retry.
    #[error("upstream refused stream")]
    RefusedStream,
    /// The upstream connection closed before a response.
    #[error("upstream connection terminated: {0}")]
    ConnectionTermination(String),
    /// No route matched the request.
    #[error("no route matched")]
    NoRoute,
    /// The request names no known service.
    #[error("no cluster for {0}")]
    NoCluster(String),
}

impl ProxyError {
    /// The status Envoy answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::RequestTimeout(_) | Self::PerTryTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::NoRoute => StatusCode::NOT_FOUND,
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
            Self::NoHealthyUpstream => ResponseFlags::NO_HEALTHY_UPSTREAM,
            Self::ConnectFailure(_) => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
            Self::RemoteReset(_) | Self::RefusedStream => ResponseFlags::UPSTREAM_REMOTE_RESET,
            Self::ConnectionTermination(_) => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
            Self::NoRoute => ResponseFlags::NO_ROUTE_FOUND,
            Self::NoCluster(_) => ResponseFlags::NO_CLUSTER_FOUND,
        }
    }

    /// The body text Envoy sends (clients and the tutorial's scripts grep for `overflow`).
    pub fn body(&self) -> &'static str {
        match self {
            Self::RequestTimeout(_) | Self::PerTryTimeout(_) => "upstream request timeout",
            Self::Overflow(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: overflow"
            }
            Self::NoHealthyUpstream => "no healthy upstream",
            Self::ConnectFailure(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            }
            Self::RemoteReset(_) | Self::RefusedStream => {
                "upstream connect error or disconnect/reset before headers. reset reason: remote reset"
            }
            Self::ConnectionTermination(_) => {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            }
            Self::NoRoute => "",
            Self::NoCluster(_) => "",
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
        assert!(found.body().contains("overflow"));
    }
}
