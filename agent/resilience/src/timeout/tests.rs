//! Route and per-try timeout tests on paused time.

use super::*;
use crate::test_util::{call, get, proxy_error, CloneService, Step};
use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use sluice_core::{ProxyError, ResponseFlags};
use std::sync::Arc;
use tokio::time::Instant;
use tower::ServiceExt;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_timeout_before_headers_is_request_timeout() {
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(secs(5.0), 200)]);
    let mut svc = TimeoutLayer::route(Some(secs(2.0))).layer(backend);
    let (req, info) = get();
    let start = Instant::now();
    let err = call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(2.0));
    assert!(matches!(proxy_error(&err), ProxyError::RequestTimeout(d) if d == secs(2.0)));
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn fast_response_passes_and_leaves_no_flag() {
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(secs(1.0), 200)]);
    let mut svc = TimeoutLayer::route(Some(secs(2.0))).layer(backend);
    let (req, info) = get();
    let rsp = call(&mut svc, req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert!(info.flags().is_empty());
}

/// A backend whose response body sends one chunk, then stalls for `stall`, then ends.
fn streaming(stall: Duration) -> impl CloneService {
    tower::service_fn(move |_req: Request<Body>| async move {
        let stream = futures_util::stream::unfold(0u8, move |n| async move {
            match n {
                0 => Some((Ok::<_, BoxError>(Frame::data(Bytes::from("a"))), 1)),
                1 => {
                    tokio::time::sleep(stall).await;
                    Some((Ok(Frame::data(Bytes::from("b"))), 2))
                }
                _ => None,
            }
        });
        Ok::<_, BoxError>(Response::new(StreamBody::new(stream).boxed_unsync()))
    })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_timeout_covers_the_response_body() {
    let mut svc = TimeoutLayer::route(Some(secs(2.0))).layer(streaming(secs(5.0)));
    let (req, info) = get();
    let start = Instant::now();
    let mut body = call(&mut svc, req).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "a");
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), secs(2.0));
    assert!(matches!(proxy_error(&err), ProxyError::RequestTimeout(_)));
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT));
    assert!(body.frame().await.is_none());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn per_try_timeout_does_not_cover_the_body() {
    let mut svc = TimeoutLayer::per_try(Some(secs(1.0))).layer(streaming(secs(5.0)));
    let (req, info) = get();
    let body = call(&mut svc, req).await.unwrap().into_body();
    let all = body.collect().await.unwrap().to_bytes();
    assert_eq!(all, "ab");
    assert!(info.flags().is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn per_try_timeout_is_its_own_error_without_flag() {
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(secs(5.0), 200)]);
    let mut svc = TimeoutLayer::per_try(Some(secs(0.5))).layer(backend);
    let (req, info) = get();
    let start = Instant::now();
    let err = call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(0.5));
    assert!(matches!(proxy_error(&err), ProxyError::PerTryTimeout(d) if d == secs(0.5)));
    // Whether this ends the request is the retry layer's call; the final error carries UT.
    assert!(info.flags().is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_header_overrides_and_is_consumed() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Slow(secs(5.0), 200)]);
    let mut svc = TimeoutLayer::route(Some(secs(10.0))).layer(backend);
    let (mut req, _) = get();
    req.headers_mut()
        .insert("x-envoy-upstream-rq-timeout-ms", "1500".parse().unwrap());
    let start = Instant::now();
    let err = call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(1.5));
    assert!(matches!(proxy_error(&err), ProxyError::RequestTimeout(_)));
    assert!(!calls
        .get(0)
        .headers
        .contains_key("x-envoy-upstream-rq-timeout-ms"));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn header_zero_disables_and_header_sets_one_where_none() {
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(secs(5.0), 200)]);
    let mut svc = TimeoutLayer::route(Some(secs(1.0))).layer(backend.clone());
    let (mut req, _) = get();
    req.headers_mut()
        .insert("x-envoy-upstream-rq-timeout-ms", "0".parse().unwrap());
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);

    let mut svc = TimeoutLayer::per_try(None).layer(backend.clone());
    let (mut req, _) = get();
    req.headers_mut().insert(
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "250".parse().unwrap(),
    );
    let err = call(&mut svc, req).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::PerTryTimeout(d) if d == secs(0.25)));

    // An unparsable header is consumed and the configured value stays.
    let mut svc = TimeoutLayer::route(Some(secs(1.0))).layer(backend);
    let (mut req, _) = get();
    req.headers_mut()
        .insert("x-envoy-upstream-rq-timeout-ms", "soon".parse().unwrap());
    let start = Instant::now();
    call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(1.0));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn none_is_a_plain_pass_through() {
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(secs(3600.0), 200)]);
    let mut svc = TimeoutLayer::route(None).layer(backend);
    let (req, info) = get();
    let fut = svc.ready().await.unwrap().call(req);
    // No timer was armed: the future holds no `Sleep`.
    assert!(fut.is_passthrough());
    assert_eq!(fut.await.unwrap().status(), 200);
    assert!(info.flags().is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_timeout_wins_a_tie_with_per_try() {
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(secs(5.0), 200)]);
    let per_try = TimeoutLayer::per_try(Some(secs(2.0))).layer(backend);
    let mut svc = TimeoutLayer::route(Some(secs(2.0))).layer(per_try);
    let (req, _) = get();
    let err = call(&mut svc, req).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::RequestTimeout(_)));
}

/// Each attempt's [`Expiry`], as the backend saw it.
type SeenExpiries = Arc<parking_lot::Mutex<Vec<Option<Expiry>>>>;

/// A backend that records each attempt's [`Expiry`] and never answers within the test.
fn expiry_recorder() -> (
    impl Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future: Send> + Clone,
    SeenExpiries,
) {
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let record = seen.clone();
    let svc = tower::service_fn(move |req: Request<Body>| {
        record
            .lock()
            .push(RequestCtx::of(req.extensions()).and_then(|c| c.expiry.clone()));
        async {
            tokio::time::sleep(secs(60.0)).await;
            Ok::<_, BoxError>(Response::new(sluice_core::empty()))
        }
    });
    (svc, seen)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_timer_marks_the_attempt_it_ends_and_a_caller_leaving_does_not() {
    use sluice_core::Deadline;
    let (backend, seen) = expiry_recorder();
    let svc = TimeoutLayer::route(Some(secs(2.0)))
        .layer(TimeoutLayer::per_try(Some(secs(1.0))).layer(backend.clone()));

    // The per-try timer ends the attempt.
    let err = svc.clone().oneshot(get().0).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::PerTryTimeout(_)));
    assert_eq!(
        seen.lock()[0].as_ref().unwrap().fired(),
        Some(Deadline::PerTry)
    );

    // The caller (the client) goes away before either timer: nothing is marked.
    let left = tokio::time::timeout(secs(0.5), svc.clone().oneshot(get().0)).await;
    assert!(left.is_err());
    assert_eq!(seen.lock()[1].as_ref().unwrap().fired(), None);

    // The route timer ends an attempt under a longer per-try timer.
    let svc = TimeoutLayer::route(Some(secs(2.0)))
        .layer(TimeoutLayer::per_try(Some(secs(5.0))).layer(backend));
    let err = svc.oneshot(get().0).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::RequestTimeout(_)));
    assert_eq!(
        seen.lock()[2].as_ref().unwrap().fired(),
        Some(Deadline::Route)
    );
}

/// The header the per-try layer writes for a retry `wait` seconds into the route clock.
async fn expected_header(route: Option<f64>, per_try: Option<f64>, wait: f64) -> Option<String> {
    expected_header_of_attempt(2, route, per_try, wait).await
}

/// [`expected_header`] for attempt `attempt` as the retry layer counts it in the request's info
/// (0 when no retry layer counted it).
async fn expected_header_of_attempt(
    attempt: u32,
    route: Option<f64>,
    per_try: Option<f64>,
    wait: f64,
) -> Option<String> {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = TimeoutLayer::per_try(per_try.map(secs)).layer(backend);
    let (mut req, info) = get();
    for _ in 0..attempt {
        info.add_attempt();
    }
    if let Some(route) = route {
        RequestCtx::of_mut(req.extensions_mut()).route_clock = Some(RouteClock {
            start: Instant::now().into_std(),
            timeout: secs(route),
        });
    }
    tokio::time::advance(secs(wait)).await;
    call(&mut svc, req).await.unwrap();
    calls
        .get(0)
        .headers
        .get(EXPECTED_RQ_TIMEOUT_MS)
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_attempts_own_count_does_not_hide_the_clients_timeout_headers() {
    // Below the retry layer: the attempt count is there whatever the client sent.
    let (backend, calls) =
        crate::test_util::backend(vec![Step::Slow(secs(5.0), 200), Step::Status(200)]);
    let mut svc = TimeoutLayer::per_try(None).layer(backend.clone());
    let (mut req, _) = get();
    let h = req.headers_mut();
    h.insert(crate::retry::ATTEMPT_COUNT, "1".parse().unwrap());
    h.insert(
        "x-envoy-upstream-rq-per-try-timeout-ms",
        "250".parse().unwrap(),
    );
    let err = call(&mut svc, req).await.unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::PerTryTimeout(d) if d == secs(0.25)));

    // No timeout anywhere: an expected timeout the client sent does not reach the upstream.
    let mut svc = TimeoutLayer::per_try(None).layer(backend);
    let (mut req, _) = get();
    let h = req.headers_mut();
    h.insert(crate::retry::ATTEMPT_COUNT, "1".parse().unwrap());
    h.insert(EXPECTED_RQ_TIMEOUT_MS, "999".parse().unwrap());
    call(&mut svc, req).await.unwrap();
    let sent = &calls.get(1).headers;
    assert!(!sent.contains_key(EXPECTED_RQ_TIMEOUT_MS), "{sent:?}");
    assert_eq!(sent[crate::retry::ATTEMPT_COUNT], "1");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn expected_timeout_header_is_envoys() {
    // No timeout: no header.
    assert_eq!(expected_header(None, None, 0.0).await, None);
    // The route timeout, less what has passed (here a retry 0.3 s later).
    assert_eq!(
        expected_header(Some(2.0), None, 0.0).await.as_deref(),
        Some("2000")
    );
    assert_eq!(
        expected_header(Some(2.0), None, 0.3).await.as_deref(),
        Some("1700")
    );
    // Used up: 1, not 0 (which would mean no timeout).
    assert_eq!(
        expected_header(Some(2.0), None, 2.5).await.as_deref(),
        Some("1")
    );
    // The per-try timeout when shorter; bounded by what is left of the route's.
    assert_eq!(
        expected_header(Some(2.0), Some(0.5), 0.0).await.as_deref(),
        Some("500")
    );
    assert_eq!(
        expected_header(Some(2.0), Some(0.5), 1.8).await.as_deref(),
        Some("200")
    );
    // A per-try timeout not shorter than the route's is ignored.
    assert_eq!(
        expected_header(Some(1.0), Some(3.0), 0.0).await.as_deref(),
        Some("1000")
    );
    // Only a per-try timeout.
    assert_eq!(
        expected_header(None, Some(0.25), 0.0).await.as_deref(),
        Some("250")
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_first_attempts_expected_timeout_counts_no_time_elapsed_as_envoys() {
    // Envoy writes the first attempt's header with nothing elapsed, a retry's with the time since
    // the route clock started.
    for (attempt, expected) in [(0, "2000"), (1, "2000"), (2, "1700")] {
        assert_eq!(
            expected_header_of_attempt(attempt, Some(2.0), None, 0.3)
                .await
                .as_deref(),
            Some(expected),
            "attempt {attempt}"
        );
    }
    assert_eq!(
        expected_header_of_attempt(1, Some(2.0), Some(0.5), 1.8)
            .await
            .as_deref(),
        Some("500")
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_layer_starts_the_clock_for_the_attempts() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc =
        TimeoutLayer::route(Some(secs(3.0))).layer(TimeoutLayer::per_try(None).layer(backend));
    let (req, _) = get();
    call(&mut svc, req).await.unwrap();
    assert_eq!(calls.get(0).headers[EXPECTED_RQ_TIMEOUT_MS], "3000");
}

/// A request body of two chunks, the second `after` later.
fn slow_upload(after: Duration) -> Body {
    let stream = futures_util::stream::unfold(0u8, move |n| async move {
        match n {
            0 => Some((Ok::<_, BoxError>(Frame::data(Bytes::from("a"))), 1)),
            1 => {
                tokio::time::sleep(after).await;
                Some((Ok(Frame::data(Bytes::from("b"))), 2))
            }
            _ => None,
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_timeout_starts_when_the_request_body_has_ended() {
    // A 1 s upload under a 0.5 s timeout, answered at once: no timeout.
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = TimeoutLayer::route(Some(secs(0.5))).layer(backend);
    let (req, info) = crate::test_util::with_body(slow_upload(secs(1.0)));
    let rsp = call(&mut svc, req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(calls.get(0).body, "ab");
    assert!(info.flags().is_empty());

    // The same upload answered 0.7 s after it ended: the timeout, 0.5 s after the body's end.
    let (backend, _) = crate::test_util::backend(vec![Step::Slow(secs(0.7), 200)]);
    let mut svc = TimeoutLayer::route(Some(secs(0.5))).layer(backend);
    let (req, info) = crate::test_util::with_body(slow_upload(secs(1.0)));
    let start = Instant::now();
    let err = call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(1.5));
    assert!(matches!(proxy_error(&err), ProxyError::RequestTimeout(_)));
    assert!(info
        .flags()
        .contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn route_timeout_never_starts_for_a_body_that_never_ends() {
    // The upstream answers before reading the body; the client never finishes it. Envoy's timer
    // waits for the request to complete, so the response body is not cut.
    let svc = tower::service_fn(|_req: Request<Body>| async move {
        let stream = futures_util::stream::unfold(0u8, |n| async move {
            match n {
                0 => Some((Ok::<_, BoxError>(Frame::data(Bytes::from("a"))), 1)),
                1 => {
                    tokio::time::sleep(secs(2.0)).await;
                    Some((Ok(Frame::data(Bytes::from("b"))), 2))
                }
                _ => None,
            }
        });
        Ok::<_, BoxError>(Response::new(StreamBody::new(stream).boxed_unsync()))
    });
    let mut svc = TimeoutLayer::route(Some(secs(0.5))).layer(svc);
    let (req, _) = crate::test_util::with_body(slow_upload(secs(10.0)));
    let rsp = call(&mut svc, req).await.unwrap();
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ab");
}

/// A cluster double: claims the attempt's connection signal, waits `queued` for a connection,
/// fires it, then answers after `serve`.
fn queued_backend(queued: Duration, serve: Duration) -> impl CloneService {
    tower::service_fn(move |req: Request<Body>| {
        let ready = RequestCtx::of(req.extensions()).and_then(|c| c.connection_ready.clone());
        async move {
            let ready = ready.expect("the per-try layer sends a connection signal");
            ready.claim();
            tokio::time::sleep(queued).await;
            ready.fire();
            tokio::time::sleep(serve).await;
            Ok::<_, BoxError>(crate::test_util::status(200))
        }
    })
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn per_try_timeout_starts_with_the_connection() {
    // 1 s queued for a connection, then 0.4 s: inside a 0.5 s per-try timeout.
    let mut svc =
        TimeoutLayer::per_try(Some(secs(0.5))).layer(queued_backend(secs(1.0), secs(0.4)));
    let (req, _) = get();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);

    // 1 s queued, then 0.6 s: the timeout, 0.5 s after the connection.
    let mut svc =
        TimeoutLayer::per_try(Some(secs(0.5))).layer(queued_backend(secs(1.0), secs(0.6)));
    let (req, _) = get();
    let start = Instant::now();
    let err = call(&mut svc, req).await.unwrap_err();
    assert_eq!(start.elapsed(), secs(1.5));
    assert!(matches!(proxy_error(&err), ProxyError::PerTryTimeout(_)));
}
