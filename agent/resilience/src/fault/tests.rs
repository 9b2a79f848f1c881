//! Fault injection tests: flags, abort responses, and seeded percentage statistics.

use super::*;
use crate::test_util::{call, get, Step};
use http_body::Body as _;
use http_body_util::BodyExt;
use sluice_policy::FaultDelay;
use std::time::Duration;
use tokio::time::Instant;

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn delay(d: Duration, percentage: f64) -> Option<FaultDelay> {
    Some(FaultDelay {
        fixed_delay: d,
        percentage,
    })
}

fn http_abort(status: u16, percentage: f64) -> Option<FaultAbort> {
    Some(FaultAbort::Http { status, percentage })
}

fn layer(delay: Option<FaultDelay>, abort: Option<FaultAbort>) -> FaultLayer {
    FaultLayer::new(Some(Arc::new(Fault { delay, abort }))).with_rng(fastrand::Rng::with_seed(11))
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn no_fault_is_a_pass_through() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = FaultLayer::new(None).layer(backend);
    let (req, info) = get();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(calls.len(), 1);
    assert!(info.flags().is_empty());
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn delay_then_upstream_with_di() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = layer(delay(secs(5), 100.0), None).layer(backend);
    let (req, info) = get();
    let start = Instant::now();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 200);
    assert_eq!(start.elapsed(), secs(5));
    assert_eq!(calls.len(), 1);
    assert_eq!(calls.get(0).at - start, secs(5));
    assert_eq!(info.flags(), ResponseFlags::DELAY_INJECTED);
    // The router's time starts where the delay ended.
    assert_eq!(info.completed(), Some((start + secs(5)).into_std()));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn http_abort_never_calls_upstream() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = layer(None, http_abort(503, 100.0)).layer(backend);
    let (req, info) = get();
    let rsp = call(&mut svc, req).await.unwrap();
    assert_eq!(rsp.status(), 503);
    assert_eq!(rsp.headers()["content-type"], "text/plain");
    assert_eq!(
        rsp.into_body().collect().await.unwrap().to_bytes(),
        ABORT_BODY
    );
    assert_eq!(calls.len(), 0);
    assert_eq!(info.flags(), ResponseFlags::FAULT_INJECTED);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn grpc_abort_is_trailers_only() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let abort = Some(FaultAbort::Grpc {
        status: "UNAVAILABLE".into(),
        percentage: 100.0,
    });
    let mut svc = layer(None, abort).layer(backend);
    let (req, info) = get();
    let rsp = call(&mut svc, req).await.unwrap();
    assert_eq!(rsp.status(), 200);
    assert_eq!(rsp.headers()["content-type"], "application/grpc");
    assert_eq!(rsp.headers()["grpc-status"], "14");
    assert_eq!(rsp.headers()["grpc-message"], ABORT_BODY);
    assert!(rsp.body().is_end_stream());
    assert_eq!(calls.len(), 0);
    assert_eq!(info.flags(), ResponseFlags::FAULT_INJECTED);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn delay_comes_before_abort() {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = layer(delay(secs(2), 100.0), http_abort(500, 100.0)).layer(backend);
    let (req, info) = get();
    let start = Instant::now();
    assert_eq!(call(&mut svc, req).await.unwrap().status(), 500);
    assert_eq!(start.elapsed(), secs(2));
    assert_eq!(calls.len(), 0);
    assert_eq!(
        info.flags(),
        ResponseFlags::DELAY_INJECTED | ResponseFlags::FAULT_INJECTED
    );
}

/// How many of `n` requests are aborted with `percentage`.
async fn aborted(percentage: f64, n: usize) -> usize {
    let (backend, calls) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = layer(None, http_abort(503, percentage)).layer(backend);
    let mut hits = 0;
    for _ in 0..n {
        let (req, info) = get();
        let rsp = call(&mut svc, req).await.unwrap();
        if rsp.status() == 503 {
            assert!(info.flags().contains(ResponseFlags::FAULT_INJECTED));
            hits += 1;
        } else {
            assert!(info.flags().is_empty());
        }
    }
    assert_eq!(calls.len(), n - hits);
    hits
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn abort_percentage_is_respected() {
    // 10 % of 10 000 within +-1 % of all requests.
    let hits = aborted(10.0, 10_000).await;
    assert!((900..=1100).contains(&hits), "{hits}");
    // Fractions of a percent work: 0.1 % of 100 000 is about 100.
    let hits = aborted(0.1, 100_000).await;
    assert!((70..=130).contains(&hits), "{hits}");
    assert_eq!(aborted(0.0, 1000).await, 0);
    assert_eq!(aborted(100.0, 1000).await, 1000);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn delay_percentage_is_respected() {
    let (backend, _) = crate::test_util::backend(vec![Step::Status(200)]);
    let mut svc = layer(delay(secs(1), 25.0), None).layer(backend);
    let mut delayed = 0;
    for _ in 0..4000 {
        let (req, info) = get();
        call(&mut svc, req).await.unwrap();
        if info.flags().contains(ResponseFlags::DELAY_INJECTED) {
            delayed += 1;
        }
    }
    assert!((920..=1080).contains(&delayed), "{delayed}");
}

#[test]
fn grpc_names_map_to_codes() {
    assert_eq!(grpc_code("OK"), 0);
    assert_eq!(grpc_code("CANCELLED"), 1);
    assert_eq!(grpc_code("DEADLINE_EXCEEDED"), 4);
    assert_eq!(grpc_code("RESOURCE_EXHAUSTED"), 8);
    assert_eq!(grpc_code("INTERNAL"), 13);
    assert_eq!(grpc_code("UNAVAILABLE"), 14);
    assert_eq!(grpc_code("UNAUTHENTICATED"), 16);
    assert_eq!(grpc_code("14"), 14);
    assert_eq!(grpc_code("NOT_A_CODE"), 2);
}
