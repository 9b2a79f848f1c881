//! Envoy-exact resilience mechanisms for the L7 proxy, each a tower layer over
//! `Service<Request<Body>, Response = Response<Body>, Error = BoxError>`:
//!
//! - [`FaultLayer`]: Istio `fault` (delay, then abort), flags `DI` / `FI`.
//! - [`TimeoutLayer::route`]: the route `timeout`, covering every retry and the response body, flag `UT`.
//! - [`RetryLayer`]: Envoy's retry state machine (`retryOn`, `x-envoy-*` overrides, jittered back-off,
//!   the cluster's `maxRetries` budget, flag `URX`), replaying the request body with [`ReplayBody`].
//! - [`TimeoutLayer::per_try`]: `perTryTimeout`, which ends one attempt as a retriable failure.
//!
//! The order matches Envoy's filter chain (fault filter before the router; the router's global timer
//! outside its retries; the per-try timer around each upstream request). A route's stack, outermost
//! layer first:
//!
//! ```ignore
//! let svc = ServiceBuilder::new()
//!     .layer(FaultLayer::new(route.fault.clone().map(Arc::new))) // DI/FI; before any timer
//!     .layer(TimeoutLayer::route(route.timeout))                 // whole request incl. retries, UT
//!     .layer(RetryLayer::new(retry.clone(), budget.clone()))     // URX/UO, attempt count, back-off
//!     .layer(TimeoutLayer::per_try(retry.per_try_timeout))       // one attempt, PerTryTimeout
//!     .service(balancer);                                         // picks a host not in `tried`
//! ```
//!
//! Inside a spawned task (hyper's connection task), box the stack's future where it is created,
//! e.g. `let fut: BoxFuture<'static, _> = Box::pin(stack.oneshot(req));` or use
//! `BoxCloneService`: rustc cannot prove an un-boxed `Service<Request<Body>>::Future` `Send` for the
//! higher-ranked lifetimes it erases in `BoxError` ("implementation ... is not general enough"),
//! whatever the layers.
//!
//! Keep both timeout layers in the stack even when the route configures no timeout: they honour the
//! `x-envoy-upstream-rq-timeout-ms` / `x-envoy-upstream-rq-per-try-timeout-ms` request headers and
//! cost one header lookup (no timer) when neither is set.
//!
//! Where Sluice differs from Envoy:
//! - The per-try timer starts when the attempt has a connection; Envoy starts it when the attempt
//!   has a connection and the downstream request is complete. They agree for requests without a
//!   body, and for uploads that end before a connection is ready.
//! - The retry conditions `envoy-ratelimited`, `retriable-headers`, `reset-before-request` and
//!   `http3-post-connect-failure`, rate-limit reset headers and hedging are not implemented.
//! - A retry whose body is still held by the previous attempt (the upstream connection has not let
//!   go of it) waits for it to be released; linkerd2-proxy's `ReplayBody` panics there instead.
//! - A gRPC fault abort is always a trailers-only gRPC response, whatever the request's content type.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod fault;
pub mod replay;
pub mod retry;
pub mod timeout;

#[cfg(test)]
pub(crate) mod test_util;

pub use self::backoff::Backoff;
pub use self::fault::FaultLayer;
pub use self::replay::ReplayBody;
pub use self::retry::{classify, RetryBudget, RetryLayer};
pub use self::timeout::TimeoutLayer;

/// Whether `headers` hold an `x-envoy-` header other than `except`. Envoy's request control
/// headers all are: one pass over the names (no hashing) spares their lookups, each of which
/// hashes a 20-40 byte name, for the usual request that carries none.
pub(crate) fn has_envoy_headers(
    headers: &http::HeaderMap,
    except: Option<&http::HeaderName>,
) -> bool {
    headers
        .keys()
        .any(|k| k.as_str().starts_with("x-envoy-") && except != Some(k))
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    #[test]
    fn envoy_headers_are_found_by_prefix() {
        let mut h = HeaderMap::new();
        h.insert("x-envoy", HeaderValue::from_static("1"));
        h.insert("envoy-x-envoy-", HeaderValue::from_static("1"));
        assert!(!super::has_envoy_headers(&h, None));
        h.insert(crate::retry::ATTEMPT_COUNT, HeaderValue::from_static("1"));
        assert!(super::has_envoy_headers(&h, None));
        assert!(!super::has_envoy_headers(
            &h,
            Some(&crate::retry::ATTEMPT_COUNT)
        ));
        h.insert("X-Envoy-Max-Retries", HeaderValue::from_static("1"));
        assert!(super::has_envoy_headers(
            &h,
            Some(&crate::retry::ATTEMPT_COUNT)
        ));
    }
}
