//! Retry layer tests: conditions, overrides, budget, timers and body replay on paused time.

use super::*;
use crate::test_util::{call, get, proxy_error, with_body, Step};
use crate::timeout::TimeoutLayer;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use sluice_core::{OverflowKind, ProxyError, ResponseFlags};
use sluice_policy::RetryOn;
use std::time::Duration;
use tokio::time::Instant;
use tower::ServiceBuilder;

/// A route policy retrying `n` times on the comma-separated `retry_on` names.
fn policy(retry_on: &str, n: u32) -> Arc<RetryPolicy> {
    let mut on = RetryOn::default();
    for name in retry_on.split(',').filter(|s| !s.is_empty()) {
        match name {
            "5xx" => on.five_xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "refused-stream" => on.refused_stream = true,
            "unavailable" => on.unavailable = true,
            "cancelled" => on.cancelled = true,
            code => on.retriable_status_codes.push(code.parse().unwrap()),
        }
    }
    Arc::new(RetryPolicy {
        num_retries: n,
        retry_on: on,
        ..RetryPolicy::istio_default()
    })
}

fn unlimited() -> Arc<RetryBudget> {
    Arc::new(RetryBudget::new(u32::MAX))
}

fn layer(retry_on: &str, n: u32) -> RetryLayer {
    RetryLayer::new(policy(retry_on, n), unlimited()).rng_seed(2024)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retries_503_under_5xx_until_exhausted() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("5xx", 2).layer(backend);
    let (req, info) = get();
    let rsp = call(&mut svc, req).await.unwrap();
    assert_eq!(rsp.status(), 503);
    assert_eq!(calls.len(), 3);
    assert_eq!(calls.attempt_counts(), ["1", "2", "3"]);
    assert_eq!(info.attempts(), 3);
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn success_after_a_retry_has_no_flag() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503), Step::Status(200)]);
    let budget = unlimited();
    let mut svc = RetryLayer::new(policy("5xx", 2), budget.clone()).layer(backend);
    let (req, info) = get();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 2);
    assert!(info.flags().is_empty());
    assert_eq!(info.attempts(), 2);
    // The retry's budget slot was released once its outcome was known.
    assert_eq!(budget.active(), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn backoff_between_attempts_is_envoys_jitter() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("5xx", 3).layer(backend);
    let start = Instant::now();
    call(&mut svc, get().0).await.unwrap();
    let at: Vec<_> = (0..4).map(|i| calls.get(i).at - start).collect();
    // Seed 2024 draws 6, 1, 57 ms below the 25, 50, 100 ms intervals (see backoff tests).
    assert_eq!(at, [ms(0), ms(6), ms(7), ms(64)]);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn gateway_error_does_not_retry_500() {
    let (backend, calls) = crate::test_util::backend(vec![
        Step::Status(500),
        Step::Status(502),
        Step::Status(200),
    ]);
    let mut svc = layer("gateway-error", 2).layer(backend.clone());
    let (req, info) = get();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 500);
    assert_eq!(calls.len(), 1);
    assert!(info.flags().is_empty());
    // The same backend now answers 502, then 200.
    assert_eq!(call(&mut svc, get().0).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 3);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn connect_failure_only_retries_connect_failures() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("connect-failure", 2).layer(backend);
    assert_eq!(call(&mut svc, get().0).await.unwrap().status(), 503);
    assert_eq!(calls.len(), 1);

    let (backend, calls) = crate::test_util::backend(vec![
        Step::Fail(crate::test_util::refused()),
        Step::Status(200),
    ]);
    let mut svc = layer("connect-failure", 2).layer(backend);
    assert_eq!(call(&mut svc, get().0).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 2);

    let (backend, calls) = crate::test_util::backend(vec![Step::Fail(crate::test_util::reset())]);
    let mut svc = layer("connect-failure", 2).layer(backend);
    let err = call(&mut svc, get().0).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::RemoteReset { .. }));
    assert_eq!(calls.len(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn overflow_is_never_retried() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Fail(ProxyError::Overflow(
        OverflowKind::Pending,
    ))]);
    let mut svc = layer("5xx,gateway-error,reset,connect-failure,refused-stream", 5).layer(backend);
    let (req, info) = get();
    let err = call(&mut svc, req).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::Overflow(_)));
    assert_eq!(calls.len(), 1);
    assert!(!info
        .flags()
        .contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn empty_budget_blocks_retries_and_counts_overflow() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let budget = Arc::new(RetryBudget::new(0));
    let mut svc = RetryLayer::new(policy("5xx", 2), budget.clone()).layer(backend);
    let (req, info) = get();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!(calls.len(), 1);
    assert_eq!(budget.overflows(), 1);
    // Envoy flags a retry refused by the circuit breaker as UO, not URX.
    assert!(info.flags().contains(ResponseFlags::UPSTREAM_OVERFLOW));
    assert!(!info
        .flags()
        .contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn budget_is_shared_by_concurrent_requests() {
    let (backend, calls) = crate::test_util::backend(vec![
        Step::Status(503),
        Step::Status(503),
        Step::Status(200),
    ]);
    let budget = Arc::new(RetryBudget::new(1));
    // Seeded so that the back-off is not 0 ms, which would finish A's retry before B is polled.
    let svc = RetryLayer::new(policy("5xx", 1), budget.clone())
        .rng_seed(2024)
        .layer(backend);
    let (mut a, mut b) = (svc.clone(), svc);
    let (ra, rb) = tokio::join!(call(&mut a, get().0), call(&mut b, get().0));
    // Both first attempts failed at once; only one retry fitted in the budget.
    let mut codes = [ra.unwrap().status(), rb.unwrap().status()];
    codes.sort();
    assert_eq!(codes, [200, 503]);
    assert_eq!(calls.len(), 3);
    assert_eq!(budget.overflows(), 1);
    assert_eq!(budget.active(), 0);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn per_try_timeout_is_retried_then_succeeds() {
    let (backend, calls) =
        crate::test_util::backend(vec![Step::Slow(ms(5000), 200), Step::Status(200)]);
    let mut svc = ServiceBuilder::new()
        .layer(layer("5xx", 2))
        .layer(TimeoutLayer::per_try(Some(ms(500))))
        .service(backend);
    let (req, info) = get();
    let start = Instant::now();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 2);
    assert_eq!(start.elapsed(), ms(506));
    assert!(info.flags().is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn per_try_timeout_is_not_retried_under_connect_failure_only() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Slow(ms(5000), 200)]);
    let mut svc = ServiceBuilder::new()
        .layer(layer(
            "connect-failure,refused-stream,unavailable,cancelled",
            2,
        ))
        .layer(TimeoutLayer::per_try(Some(ms(500))))
        .service(backend);
    let err = call(&mut svc, get().0).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::PerTryTimeout(_)));
    assert_eq!(calls.len(), 1);
}

/// timeout 2.5 s, perTryTimeout 0.5 s, a backend that never answers in time.
fn slow_stack(retries: u32) -> impl crate::test_util::CloneService {
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(ms(60_000), 200)]);
    ServiceBuilder::new()
        .layer(TimeoutLayer::route(Some(ms(2500))))
        .layer(layer("5xx", retries))
        .layer(TimeoutLayer::per_try(Some(ms(500))))
        .service(backend)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retries_run_out_before_the_route_timeout() {
    // attempts at 0, 0.506 and 1.007 s (back-offs 6 and 1 ms); the third per-try timeout ends it.
    let mut svc = slow_stack(2);
    let (req, info) = get();
    let start = Instant::now();
    let err = call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), ms(1507));
    assert!(matches!(proxy_error(&err), ProxyError::PerTryTimeout(_)));
    assert_eq!(info.attempts(), 3);
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_timeout_bounds_the_whole_retry_sequence() {
    // Attempts at 0, 0.506, 1.007, 1.564 and 2.156 s (back-offs 6, 1, 57, 92 ms); the route timer
    // ends the fifth at exactly 2.5 s.
    let mut svc = slow_stack(10);
    let (req, info) = get();
    let start = Instant::now();
    let err = call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), ms(2500));
    assert!(matches!(proxy_error(&err), ProxyError::RequestTimeout(_)));
    assert_eq!(info.attempts(), 5);
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT));
    assert!(!info
        .flags()
        .contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn max_retries_header_overrides_and_headers_are_consumed() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("5xx", 2).layer(backend);
    let (mut req, _) = get();
    req.headers_mut().insert(MAX_RETRIES, "1".parse().unwrap());
    req.headers_mut()
        .insert(RETRY_ON, "gateway-error".parse().unwrap());
    req.headers_mut()
        .insert(RETRY_GRPC_ON, "unavailable".parse().unwrap());
    req.headers_mut()
        .insert(RETRIABLE_STATUS_CODES, "418".parse().unwrap());
    req.headers_mut().insert(
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "100".parse().unwrap(),
    );
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.len(), 2);
    for i in 0..2 {
        let headers = calls.get(i).headers;
        for name in [
            "x-envoy-max-retries",
            "x-envoy-retry-on",
            "x-envoy-retry-grpc-on",
            "x-envoy-retriable-status-codes",
        ] {
            assert!(!headers.contains_key(name), "{name} went upstream");
        }
        // Left for the per-try timeout layer, which consumes it.
        assert!(headers.contains_key("x-envoy-upstream-rq-per-try-timeout-ms"));
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_retry_carries_the_first_attempt_s_headers() {
    // The first attempt goes out on the request's own map, each retry on a copy of it: the same
    // fields in the same order, repeated ones included, only the attempt count differing.
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503), Step::Status(200)]);
    let mut svc = layer("5xx", 1).layer(backend);
    let (mut req, _) = get();
    let h = req.headers_mut();
    h.append("x-b", "1".parse().unwrap());
    h.append("x-a", "2".parse().unwrap());
    h.append("x-b", "3".parse().unwrap());
    h.insert(MAX_RETRIES, "1".parse().unwrap());
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.len(), 2);
    let fields = |i: usize| {
        let headers = calls.get(i).headers;
        let count = headers[ATTEMPT_COUNT].to_str().unwrap().to_owned();
        let rest: Vec<(String, String)> = headers
            .iter()
            .filter(|(n, _)| *n != ATTEMPT_COUNT)
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        (count, rest)
    };
    let (first, retry) = (fields(0), fields(1));
    assert_eq!((first.0.as_str(), retry.0.as_str()), ("1", "2"));
    assert_eq!(first.1, retry.1);
    let b: Vec<&str> = first
        .1
        .iter()
        .filter(|(n, _)| n == "x-b")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(b, ["1", "3"]);
    assert!(!first.1.iter().any(|(n, _)| n == "x-envoy-max-retries"));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retry_on_header_adds_conditions() {
    // The route retries only connect failures; the header adds 5xx.
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(500), Step::Status(200)]);
    let mut svc = layer("connect-failure", 2).layer(backend);
    let (mut req, _) = get();
    req.headers_mut().insert(RETRY_ON, "5xx".parse().unwrap());
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 2);

    // Status codes from the header join the route's.
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(418), Step::Status(200)]);
    let mut svc = layer("503", 2).layer(backend);
    let (mut req, _) = get();
    req.headers_mut()
        .insert(RETRIABLE_STATUS_CODES, "418, 429".parse().unwrap());
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 2);

    // gRPC conditions come from their own header.
    let (backend, calls) = crate::test_util::backend(vec![
        Step::Headers(200, vec![("grpc-status", "14")]),
        Step::Status(200),
    ]);
    let mut svc = layer("5xx", 2).layer(backend);
    let (mut req, _) = get();
    req.headers_mut()
        .insert(RETRY_GRPC_ON, "unavailable".parse().unwrap());
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.len(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn headers_enable_retries_on_a_route_without_a_policy() {
    // attempts: 0 (no policy): one attempt, no URX, whatever the outcome.
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("5xx", 0).layer(backend.clone());
    let (req, info) = get();
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls.attempt_counts(), ["1"]);
    assert!(info.flags().is_empty());

    // x-envoy-retry-on alone gives Envoy's default of one retry.
    let (mut req, info) = get();
    req.headers_mut().insert(RETRY_ON, "5xx".parse().unwrap());
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.len(), 3);
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));

    // x-envoy-max-retries alone enables nothing.
    let (mut req, _) = get();
    req.headers_mut().insert(MAX_RETRIES, "5".parse().unwrap());
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.len(), 4);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn max_retries_zero_still_flags_urx() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("5xx", 3).layer(backend);
    let (mut req, info) = get();
    req.headers_mut().insert(MAX_RETRIES, "0".parse().unwrap());
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.len(), 1);
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn ratelimited_response_is_not_retried() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Headers(
        503,
        vec![("x-envoy-ratelimited", "true")],
    )]);
    let mut svc = layer("5xx", 2).layer(backend);
    let (req, info) = get();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!(calls.len(), 1);
    assert!(info.flags().is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn overloaded_upstream_response_is_retried() {
    let (backend, calls) = crate::test_util::backend(vec![
        Step::Headers(503, vec![("x-envoy-overloaded", "true")]),
        Step::Status(200),
    ]);
    let mut svc = layer("5xx", 2).layer(backend);
    let (req, _info) = get();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 2);
}

fn chunked(parts: &[&'static str]) -> Body {
    let mut t = http::HeaderMap::new();
    t.insert("x-checksum", "abc".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .chain([Ok(Frame::trailers(t))])
        .collect();
    StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn request_body_is_replayed_on_retry() {
    let (backend, calls) = crate::test_util::backend(vec![
        Step::Status(503),
        Step::Status(503),
        Step::Status(200),
    ]);
    let mut svc = layer("5xx", 2).layer(backend);
    let (req, _) = with_body(chunked(&["{\"sku\":", "42", "}"]));
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 3);
    for i in 0..3 {
        let seen = calls.get(i);
        assert_eq!(seen.body, "{\"sku\":42}");
        assert_eq!(seen.trailers.unwrap()["x-checksum"], "abc");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn body_over_the_replay_limit_is_not_retried() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("5xx", 2).max_replay_bytes(4).layer(backend);
    let (req, info) = with_body(chunked(&["12345", "678"]));
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 503);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls.get(0).body, "12345678");
    // Envoy drops its retry state when the body outgrows the buffer: no URX.
    assert!(info.flags().is_empty());
}

#[derive(Clone, Debug, PartialEq)]
struct Tag(&'static str);

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn every_attempt_gets_the_extensions_and_works_without_request_info() {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let record = seen.clone();
    let backend = tower::service_fn(move |req: Request<Body>| {
        record.lock().push((
            req.extensions().get::<Tag>().cloned(),
            RequestCtx::info(req.extensions()).cloned(),
        ));
        async { Ok::<_, BoxError>(crate::test_util::status(503)) }
    });
    let mut svc = layer("5xx", 1).layer(backend);
    let (mut req, info) = get();
    req.extensions_mut().insert(Tag("canary"));
    call(&mut svc, req).await.unwrap();
    let seen = std::mem::take(&mut *seen.lock());
    assert_eq!(seen.len(), 2);
    for (tag, ri) in seen {
        assert_eq!(tag, Some(Tag("canary")));
        assert!(Arc::ptr_eq(&ri.unwrap(), &info));
    }

    // With the context alone (the usual request: the loop keeps the context, not the map), and
    // what the first attempt's layers write into its context stays out of the retry's.
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let record = seen.clone();
    let backend = tower::service_fn(move |mut req: Request<Body>| {
        let ctx = RequestCtx::of_mut(req.extensions_mut());
        record
            .lock()
            .push((ctx.info.clone(), ctx.any_host, ctx.quota.is_some()));
        ctx.any_host = true;
        async { Ok::<_, BoxError>(crate::test_util::status(503)) }
    });
    let mut svc = layer("5xx", 1).layer(backend);
    let (req, info) = get();
    assert_eq!(req.extensions().len(), 1);
    call(&mut svc, req).await.unwrap();
    let seen = std::mem::take(&mut *seen.lock());
    assert_eq!(seen.len(), 2);
    for (ri, any_host, quota) in seen {
        assert!(Arc::ptr_eq(&ri.unwrap(), &info));
        assert!(!any_host && !quota);
    }

    // And without RequestInfo at all.
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(503)]);
    let mut svc = layer("5xx", 1).layer(backend);
    call(&mut svc, Request::new(sluice_core::empty()))
        .await
        .unwrap();
    assert_eq!(calls.len(), 2);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn retriable_response_body_is_dropped() {
    let body = Arc::new(());
    let watch = Arc::downgrade(&body);
    let backend = tower::service_fn(move |_req: Request<Body>| {
        let body = body.clone();
        async move {
            // A body that keeps `body` alive until dropped.
            let stream = futures_util::stream::once(async move {
                let _keep = body;
                Ok::<_, BoxError>(Frame::data(Bytes::from("busy")))
            });
            let mut rsp = Response::new(StreamBody::new(stream).boxed_unsync());
            *rsp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            Ok::<_, BoxError>(rsp)
        }
    });
    let mut svc = layer("5xx", 1).layer(backend);
    let rsp = call(&mut svc, get().0).await.unwrap();
    // Only the last response's body is alive.
    assert_eq!(watch.strong_count(), 2);
    drop(rsp);
    assert_eq!(watch.strong_count(), 1);
}

/// A concrete backend (no `impl Trait` bounds) answering 503 once, then 200.
#[derive(Clone)]
struct Flaky(Arc<std::sync::atomic::AtomicU32>);

impl Service<Request<Body>> for Flaky {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = std::future::Ready<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _req: Request<Body>) -> Self::Future {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::future::ready(Ok(crate::test_util::status(if n == 0 { 503 } else { 200 })))
    }
}

// The proxy runs the stack inside hyper's spawned connection task: its future must be `Send` for
// every lifetime the compiler erases in `BoxError`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn whole_stack_runs_on_a_spawned_task() {
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let backend = Flaky(calls.clone());
    let handle = tokio::spawn(async move {
        let stack = ServiceBuilder::new()
            .layer(crate::FaultLayer::new(None))
            .layer(TimeoutLayer::route(Some(ms(1000))))
            .layer(layer("5xx", 2))
            .layer(TimeoutLayer::per_try(Some(ms(100))))
            .service(backend);
        let (req, _) = get();
        // Boxing where the concrete types are known sidesteps rustc's higher-ranked `Send` check
        // of projections that mention `BoxError` (a known rustc limitation); without it even a bare
        // `oneshot` on any `Service<Request<Body>>` fails with "not general enough".
        let fut: BoxFuture<'static, Result<Response<Body>, BoxError>> =
            Box::pin(tower::ServiceExt::oneshot(stack, req));
        fut.await.map(|rsp| rsp.status())
    });
    assert_eq!(handle.await.unwrap().unwrap(), 200);
    assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 2);
}

// A client that leaves during the back-off or during the retry gives its budget slot back at once.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_client_leaving_mid_retry_gives_back_its_budget_slot() {
    let budget = Arc::new(RetryBudget::new(1));
    for (steps, leave_after) in [
        // Leaves during the back-off (at most 25 ms for the first retry; the 503 comes at once).
        (vec![Step::Status(503), Step::Status(200)], Duration::ZERO),
        // Leaves while the retry waits on a slow upstream.
        (vec![Step::Status(503), Step::Slow(ms(1000), 200)], ms(500)),
    ] {
        let (backend, calls) = crate::test_util::backend(steps);
        let mut svc = RetryLayer::new(policy("5xx", 1), budget.clone())
            .rng_seed(2024)
            .layer(backend);
        let mut fut = Box::pin(call(&mut svc, get().0));
        // Poll until the first attempt has failed and the retry holds its slot.
        let _ = futures_util::FutureExt::now_or_never(fut.as_mut());
        assert_eq!(budget.active(), 1);
        if !leave_after.is_zero() {
            let left = tokio::time::timeout(leave_after, fut.as_mut()).await;
            assert!(left.is_err());
            assert_eq!(calls.len(), 2, "the retry was under way");
        }
        drop(fut);
        assert_eq!(budget.active(), 0);
        assert_eq!(budget.overflows(), 0);
    }
}
