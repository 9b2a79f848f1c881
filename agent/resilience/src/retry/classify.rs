//! Which outcomes of an attempt may be retried, as Envoy's `RetryStateImpl::wouldRetryFromHeaders`
//! and `wouldRetryFromReset` decide them (source/common/router/retry_state_impl.cc).
//!
//! Responses: `5xx` any 5xx; `gateway-error` 502/503/504; `retriable-4xx` 409;
//! `retriable-status-codes` the listed codes; the gRPC conditions by the `grpc-status` of the response
//! headers (a trailers-only response; statuses in trailers are never retried). A response carrying
//! `x-envoy-ratelimited` (an upstream Envoy's rate limit) is never retried; one carrying
//! `x-envoy-overloaded` is judged like any other (Envoy stopped special-casing it in 1.15: an
//! upstream's overload is exactly what a retry to another host is for).
//!
//! Errors (Envoy's stream reset reasons): overflow is never retried; a connect failure under
//! `connect-failure`; a refused stream under `refused-stream`; and any reset (connect failure, refused
//! stream, remote reset, connection termination, and the local reset of a per-try timeout) under
//! `reset`, `5xx` or `gateway-error`. Errors that never reached an upstream (no healthy host, no route,
//! the route timeout) are not attempts and are never retried; neither is an error that is not a
//! [`ProxyError`], such as a failed request body.

use http::{header::HeaderName, HeaderMap, Response, StatusCode};
use sluice_core::{BoxError, ProxyError};
use sluice_policy::RetryOn;

const RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// A compiled set of `retryOn` conditions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct On(u16);

impl On {
    pub const NONE: Self = Self(0);
    pub const FIVE_XX: Self = Self(1 << 0);
    pub const GATEWAY_ERROR: Self = Self(1 << 1);
    pub const RESET: Self = Self(1 << 2);
    pub const CONNECT_FAILURE: Self = Self(1 << 3);
    pub const RETRIABLE_4XX: Self = Self(1 << 4);
    pub const REFUSED_STREAM: Self = Self(1 << 5);
    pub const STATUS_CODES: Self = Self(1 << 6);
    pub const GRPC_CANCELLED: Self = Self(1 << 7);
    pub const GRPC_DEADLINE_EXCEEDED: Self = Self(1 << 8);
    pub const GRPC_RESOURCE_EXHAUSTED: Self = Self(1 << 9);
    pub const GRPC_INTERNAL: Self = Self(1 << 10);
    pub const GRPC_UNAVAILABLE: Self = Self(1 << 11);

    const ANY_RESET: Self = Self(Self::RESET.0 | Self::FIVE_XX.0 | Self::GATEWAY_ERROR.0);
    const ANY_GRPC: Self = Self(
        Self::GRPC_CANCELLED.0
            | Self::GRPC_DEADLINE_EXCEEDED.0
            | Self::GRPC_RESOURCE_EXHAUSTED.0
            | Self::GRPC_INTERNAL.0
            | Self::GRPC_UNAVAILABLE.0,
    );

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn any(self, other: Self) -> bool {
        self.0 & other.0 != 0
    }

    pub fn from_policy(on: &RetryOn) -> Self {
        let pairs = [
            (on.five_xx, Self::FIVE_XX),
            (on.gateway_error, Self::GATEWAY_ERROR),
            (on.reset, Self::RESET),
            (on.connect_failure, Self::CONNECT_FAILURE),
            (on.retriable_4xx, Self::RETRIABLE_4XX),
            (on.refused_stream, Self::REFUSED_STREAM),
            (!on.retriable_status_codes.is_empty(), Self::STATUS_CODES),
            (on.cancelled, Self::GRPC_CANCELLED),
            (on.deadline_exceeded, Self::GRPC_DEADLINE_EXCEEDED),
            (on.resource_exhausted, Self::GRPC_RESOURCE_EXHAUSTED),
            (on.internal, Self::GRPC_INTERNAL),
            (on.unavailable, Self::GRPC_UNAVAILABLE),
        ];
        pairs
            .into_iter()
            .filter(|(set, _)| *set)
            .fold(Self::NONE, |acc, (_, bit)| acc | bit)
    }

    /// `x-envoy-retry-on`; unknown names (and ones Sluice does not implement, such as
    /// `envoy-ratelimited` or `reset-before-request`) are ignored, as Envoy ignores unknown names.
    pub fn parse_http(value: &str) -> Self {
        Self::parse(value, |name| match name {
            "5xx" => Self::FIVE_XX,
            "gateway-error" => Self::GATEWAY_ERROR,
            "reset" => Self::RESET,
            "connect-failure" => Self::CONNECT_FAILURE,
            "retriable-4xx" => Self::RETRIABLE_4XX,
            "refused-stream" => Self::REFUSED_STREAM,
            "retriable-status-codes" => Self::STATUS_CODES,
            _ => Self::NONE,
        })
    }

    /// `x-envoy-retry-grpc-on`.
    pub fn parse_grpc(value: &str) -> Self {
        Self::parse(value, |name| match name {
            "cancelled" => Self::GRPC_CANCELLED,
            "deadline-exceeded" => Self::GRPC_DEADLINE_EXCEEDED,
            "resource-exhausted" => Self::GRPC_RESOURCE_EXHAUSTED,
            "internal" => Self::GRPC_INTERNAL,
            "unavailable" => Self::GRPC_UNAVAILABLE,
            _ => Self::NONE,
        })
    }

    fn parse(value: &str, name: impl Fn(&str) -> Self) -> Self {
        value
            .split(',')
            .map(|n| name(n.trim()))
            .fold(Self::NONE, |acc, bit| acc | bit)
    }

    /// Whether a response with these `status` and `headers` is retriable; `codes` are the
    /// `retriable-status-codes`.
    pub fn response(self, status: StatusCode, headers: &HeaderMap, codes: &[&[u16]]) -> bool {
        if self.is_empty() || headers.contains_key(RATELIMITED) {
            return false;
        }
        let code = status.as_u16();
        if self.any(Self::FIVE_XX) && status.is_server_error() {
            return true;
        }
        if self.any(Self::GATEWAY_ERROR) && matches!(code, 502..=504) {
            return true;
        }
        if self.any(Self::RETRIABLE_4XX) && code == 409 {
            return true;
        }
        if self.any(Self::STATUS_CODES) && codes.iter().any(|list| list.contains(&code)) {
            return true;
        }
        if self.any(Self::ANY_GRPC) {
            let grpc = headers
                .get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u32>().ok());
            let bit = match grpc {
                Some(1) => Self::GRPC_CANCELLED,
                Some(4) => Self::GRPC_DEADLINE_EXCEEDED,
                Some(8) => Self::GRPC_RESOURCE_EXHAUSTED,
                Some(13) => Self::GRPC_INTERNAL,
                Some(14) => Self::GRPC_UNAVAILABLE,
                _ => Self::NONE,
            };
            return self.any(bit);
        }
        false
    }

    /// Whether an attempt that failed with `err` is retriable.
    pub fn error(self, err: &BoxError) -> bool {
        let Some(err) = ProxyError::find(err) else {
            return false;
        };
        match err {
            ProxyError::ConnectFailure(_) => self.any(Self::CONNECT_FAILURE | Self::ANY_RESET),
            ProxyError::RefusedStream => self.any(Self::REFUSED_STREAM | Self::ANY_RESET),
            ProxyError::RemoteReset { .. }
            | ProxyError::ConnectionTermination(_)
            | ProxyError::ProtocolError(_)
            | ProxyError::PerTryTimeout(_) => self.any(Self::ANY_RESET),
            ProxyError::Overflow(_)
            | ProxyError::Overload(_)
            | ProxyError::NoHealthyUpstream
            | ProxyError::RequestTimeout(_)
            // The client is gone: nobody is waiting for a retry.
            | ProxyError::DownstreamTermination(_)
            | ProxyError::NoRoute
            | ProxyError::NoCluster(_) => false,
        }
    }
}

impl std::ops::BitOr for On {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// Whether Envoy would retry `outcome` under `retry_on`, before counting retries left or the
/// cluster's retry budget. For callers that need the verdict without the retry layer (metrics,
/// outlier detection of retriable failures).
pub fn classify<B>(retry_on: &RetryOn, outcome: Result<&Response<B>, &BoxError>) -> bool {
    let on = On::from_policy(retry_on);
    match outcome {
        Ok(rsp) => on.response(
            rsp.status(),
            rsp.headers(),
            &[&retry_on.retriable_status_codes],
        ),
        Err(err) => on.error(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::status;
    use sluice_core::OverflowKind;

    fn on(names: &str) -> On {
        On::parse_http(names)
    }

    fn rsp(code: u16) -> (StatusCode, HeaderMap) {
        (StatusCode::from_u16(code).unwrap(), HeaderMap::new())
    }

    fn retries(on: On, code: u16) -> bool {
        let (s, h) = rsp(code);
        on.response(s, &h, &[&[]])
    }

    #[test]
    fn response_conditions() {
        assert!(retries(on("5xx"), 500));
        assert!(retries(on("5xx"), 503));
        assert!(!retries(on("5xx"), 409));
        assert!(!retries(on("gateway-error"), 500));
        assert!(retries(on("gateway-error"), 502));
        assert!(retries(on("gateway-error"), 503));
        assert!(retries(on("gateway-error"), 504));
        assert!(retries(on("retriable-4xx"), 409));
        assert!(!retries(on("retriable-4xx"), 429));
        assert!(!retries(on("connect-failure,reset,refused-stream"), 503));
        let (s, h) = rsp(429);
        assert!(on("retriable-status-codes").response(s, &h, &[&[429]]));
        assert!(!on("retriable-status-codes").response(s, &h, &[&[503]]));
        // The codes alone do nothing without the condition.
        assert!(!on("5xx").response(s, &h, &[&[429]]));
    }

    #[test]
    fn ratelimited_is_never_retried_overloaded_is() {
        let (s, mut h) = rsp(503);
        h.insert("x-envoy-ratelimited", "true".parse().unwrap());
        assert!(!on("5xx,gateway-error").response(s, &h, &[&[503]]));
        let (s, mut h) = rsp(503);
        h.insert("x-envoy-overloaded", "true".parse().unwrap());
        assert!(on("5xx").response(s, &h, &[]));
        assert!(on("gateway-error").response(s, &h, &[]));
        assert!(on("retriable-status-codes").response(s, &h, &[&[503]]));
    }

    #[test]
    fn grpc_status_in_headers() {
        let grpc = |code: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", code.parse().unwrap());
            (StatusCode::OK, h)
        };
        let all =
            On::parse_grpc("cancelled,deadline-exceeded,internal,resource-exhausted,unavailable");
        for code in ["1", "4", "8", "13", "14"] {
            let (s, h) = grpc(code);
            assert!(all.response(s, &h, &[]), "grpc-status {code}");
        }
        for code in ["0", "2", "5", "x"] {
            let (s, h) = grpc(code);
            assert!(!all.response(s, &h, &[]), "grpc-status {code}");
        }
        let (s, h) = grpc("14");
        assert!(!On::parse_grpc("cancelled").response(s, &h, &[]));
        assert!(!on("5xx").response(s, &h, &[]));
    }

    #[test]
    fn error_conditions() {
        let e = |err: ProxyError| -> BoxError { err.into() };
        let connect = e(crate::test_util::refused());
        let refused = e(ProxyError::RefusedStream);
        let reset = e(crate::test_util::reset());
        let term = e(crate::test_util::terminated());
        let per_try = e(ProxyError::PerTryTimeout(std::time::Duration::from_secs(1)));

        for name in ["5xx", "gateway-error", "reset"] {
            for err in [&connect, &refused, &reset, &term, &per_try] {
                assert!(on(name).error(err), "{name} retries {err}");
            }
        }
        assert!(on("connect-failure").error(&connect));
        assert!(!on("connect-failure").error(&refused));
        assert!(!on("connect-failure").error(&reset));
        assert!(!on("connect-failure").error(&per_try));
        assert!(on("refused-stream").error(&refused));
        assert!(!on("refused-stream").error(&connect));
        assert!(!on("retriable-4xx,retriable-status-codes").error(&reset));

        let all = on("5xx,gateway-error,reset,connect-failure,refused-stream");
        for never in [
            ProxyError::Overflow(OverflowKind::Pending),
            ProxyError::NoHealthyUpstream,
            ProxyError::RequestTimeout(std::time::Duration::from_secs(1)),
            ProxyError::NoRoute,
            ProxyError::NoCluster("x".into()),
            ProxyError::DownstreamTermination(sluice_core::Cause::new("client gone")),
        ] {
            assert!(!all.error(&e(never.clone())), "{never}");
        }
        let other: BoxError = "body stream failed".into();
        assert!(!all.error(&other));
    }

    #[test]
    fn istio_default_policy() {
        let policy = sluice_policy::RetryPolicy::istio_default();
        let unavailable = {
            let mut r = status(200);
            r.headers_mut().insert("grpc-status", "14".parse().unwrap());
            r
        };
        assert!(classify(&policy.retry_on, Ok(&unavailable)));
        assert!(!classify(&policy.retry_on, Ok(&status(503))));
        let connect: BoxError = crate::test_util::refused().into();
        assert!(classify::<sluice_core::Body>(
            &policy.retry_on,
            Err(&connect)
        ));
        let reset: BoxError = crate::test_util::reset().into();
        assert!(!classify::<sluice_core::Body>(
            &policy.retry_on,
            Err(&reset)
        ));
    }
}
