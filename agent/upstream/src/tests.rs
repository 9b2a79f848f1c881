//! Tests of the whole cluster runtime: real loopback TCP against small hyper servers started here,
//! and paused tokio time for the outlier detector.

use crate::outcome::Outcome;
use crate::outlier::{ejection_time, OutlierEventKind};
use crate::{Cluster, ClusterHandle, UpstreamProtocol};
use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_core::{
    Body, BoxError, Deadline, Expiry, OverflowKind, ProxyError, RequestCtx, RequestInfo,
};
use sluice_policy::{ClusterKey, Endpoint, LoadBalancer, OutlierDetection};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;

/// A hyper server on loopback that counts connections and requests.
struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
}

async fn serve<F, Fut>(h2: bool, handler: F) -> TestServer
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let hits = Arc::new(AtomicUsize::new(0));
    let (a, o, h) = (accepted.clone(), open.clone(), hits.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let (o, h, handler) = (o.clone(), h.clone(), handler.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    h.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(req).await) }
                });
                let io = TokioIo::new(stream);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    TestServer {
        addr,
        accepted,
        open,
        hits,
    }
}

async fn ok_server(h2: bool) -> TestServer {
    serve(h2, |_| async {
        Response::new(Full::new(Bytes::from_static(b"hello")))
    })
    .await
}

/// A server whose responses wait for a permit of `gate`.
async fn gated_server(gate: Arc<Semaphore>) -> TestServer {
    serve(false, move |_| {
        let gate = gate.clone();
        async move {
            gate.acquire().await.unwrap().forget();
            Response::new(Full::new(Bytes::from_static(b"late")))
        }
    })
    .await
}

fn spec(
    addrs: &[SocketAddr],
    edit: impl FnOnce(&mut sluice_policy::Cluster),
) -> Arc<sluice_policy::Cluster> {
    let mut cluster = sluice_policy::Cluster {
        key: ClusterKey {
            host: "pricing.default.svc.cluster.local".into(),
            port: 80,
            subset: None,
        },
        endpoints: addrs
            .iter()
            .map(|&addr| Endpoint {
                addr,
                pod: Some(format!("default/pod-{}", addr.port())),
                labels: Default::default(),
                identity: None,
            })
            .collect(),
        policy: Default::default(),
        destination_rule: None,
        subset_labels: Default::default(),
    };
    cluster.policy.load_balancer = LoadBalancer::RoundRobin;
    edit(&mut cluster);
    Arc::new(cluster)
}

fn request(info: &Arc<RequestInfo>) -> Request<Body> {
    let mut req = Request::builder()
        .uri("http://pricing/price?id=1")
        .header("host", "pricing")
        .body(sluice_core::empty())
        .unwrap();
    RequestCtx::of_mut(req.extensions_mut()).info = Some(info.clone());
    req
}

async fn call(cluster: &ClusterHandle) -> Result<Response<Body>, BoxError> {
    cluster
        .clone()
        .call(request(&Arc::new(RequestInfo::new())))
        .await
}

async fn call_ok(cluster: &ClusterHandle) -> Bytes {
    let rsp = call(cluster).await.expect("response");
    assert_eq!(rsp.status(), StatusCode::OK);
    rsp.into_body().collect().await.unwrap().to_bytes()
}

fn proxy_error(err: &BoxError) -> &ProxyError {
    ProxyError::find(err).unwrap_or_else(|| panic!("not a ProxyError: {err}"))
}

/// Waits (bounded, a few ms at a time) for `cond`.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A loopback address that refuses connections while the returned socket lives: bound, never
/// listening (so the kernel resets each connection), and so given to no other test's listener
/// meanwhile, as a released port could be.
fn refusing() -> (SocketAddr, socket2::Socket) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let bound = socket.local_addr().unwrap().as_socket().unwrap();
    (bound, socket)
}

fn addr(i: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 8000 + i))
}

// ---- connection pool ----

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let server = ok_server(false).await;
    let cluster = Cluster::new(spec(&[server.addr], |_| {}), UpstreamProtocol::Http1);
    for _ in 0..5 {
        assert_eq!(call_ok(&cluster).await, "hello");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    let stats = cluster.stats();
    assert_eq!(stats.upstream_cx_total, 1);
    assert_eq!(stats.upstream_rq_total, 5);
    assert_eq!(stats.upstream_rq_active, 0);
    let host = &cluster.hosts()[0];
    assert_eq!(
        (host.connections, host.idle_connections, host.total_requests),
        (1, 1, 5)
    );
}

#[tokio::test]
async fn max_requests_per_connection_one_opens_a_connection_each() {
    let server = ok_server(false).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            c.policy.connection_pool.max_requests_per_connection = 1
        }),
        UpstreamProtocol::Http1,
    );
    for _ in 0..4 {
        call_ok(&cluster).await;
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 4);
    eventually("connections to close", || {
        cluster.stats().upstream_cx_active == 0 && server.open.load(Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn dropped_body_discards_the_connection() {
    let server = ok_server(false).await;
    let cluster = Cluster::new(spec(&[server.addr], |_| {}), UpstreamProtocol::Http1);
    let rsp = call(&cluster).await.unwrap();
    // "hello" has a known length: hyper may already know the body is complete, which is reusable.
    drop(rsp);
    call_ok(&cluster).await;
    assert!(server.accepted.load(Ordering::SeqCst) <= 2);
    assert_eq!(cluster.stats().upstream_rq_active, 0);
}

#[tokio::test]
async fn circuit_breaker_one_in_flight_one_pending_rest_overflow() {
    let gate = Arc::new(Semaphore::new(0));
    let server = gated_server(gate.clone()).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            let cp = &mut c.policy.connection_pool;
            cp.max_connections = 1;
            cp.max_pending_requests = 1;
            cp.max_requests_per_connection = 1;
        }),
        UpstreamProtocol::Http1,
    );
    let first = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("first request at the server", || {
        server.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("second request pending", || {
        cluster.stats().upstream_rq_pending_active == 1
    })
    .await;

    for _ in 0..18 {
        let err = call(&cluster)
            .now_or_never()
            .expect("overflow answers at once")
            .expect_err("overflow");
        assert!(matches!(
            proxy_error(&err),
            ProxyError::Overflow(OverflowKind::Pending)
        ));
    }
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);
    assert_eq!(cluster.stats().upstream_cx_active, 1);

    gate.add_permits(2);
    assert_eq!(first.await.unwrap(), "late");
    assert_eq!(second.await.unwrap(), "late");
    let stats = cluster.stats();
    assert_eq!(stats.upstream_rq_pending_overflow, 18);
    assert_eq!(stats.upstream_rq_pending_active, 0);
    assert_eq!(stats.upstream_cx_total, 2);
    assert!(stats.upstream_cx_overflow >= 1);
    assert_eq!(server.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn cancelled_waiter_leaves_the_queue() {
    let gate = Arc::new(Semaphore::new(0));
    let server = gated_server(gate.clone()).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            let cp = &mut c.policy.connection_pool;
            cp.max_connections = 1;
            cp.max_pending_requests = 1;
        }),
        UpstreamProtocol::Http1,
    );
    let first = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("first request at the server", || {
        server.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    // A waiter abandoned by a timeout.
    let waited = tokio::time::timeout(Duration::from_millis(20), call(&cluster)).await;
    assert!(waited.is_err(), "should still be waiting");
    assert_eq!(cluster.stats().upstream_rq_pending_active, 0);
    // Its place is free again: the next request waits instead of overflowing, and gets the
    // connection the first one frees.
    let third = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("third request pending", || {
        cluster.stats().upstream_rq_pending_active == 1
    })
    .await;
    gate.add_permits(2);
    first.await.unwrap();
    third.await.unwrap();
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        1,
        "kept alive and reused"
    );
}

#[tokio::test]
async fn max_requests_overflows_at_once() {
    let gate = Arc::new(Semaphore::new(0));
    let server = gated_server(gate.clone()).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            c.policy.connection_pool.max_requests = 1
        }),
        UpstreamProtocol::Http1,
    );
    let first = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("first request at the server", || {
        server.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    // A second connection is made for it; on it, the request is one too many.
    let err = tokio::time::timeout(Duration::from_secs(5), call(&cluster))
        .await
        .expect("overflow answered")
        .unwrap_err();
    assert!(matches!(
        proxy_error(&err),
        ProxyError::Overflow(OverflowKind::Requests)
    ));
    assert_eq!(server.hits.load(Ordering::SeqCst), 1, "never sent");
    gate.add_permits(1);
    first.await.unwrap();
    // Admission is back once the first response ended.
    gate.add_permits(1);
    call_ok(&cluster).await;
}

#[tokio::test]
async fn requests_waiting_for_a_connection_do_not_count_against_max_requests() {
    // One connection, one request on it at a time: the second request waits in the pool
    // (`http1MaxPendingRequests`), not overflowing `http2MaxRequests` as Envoy's pool does not.
    let gate = Arc::new(Semaphore::new(0));
    let server = gated_server(gate.clone()).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            c.policy.connection_pool.max_connections = 1;
            c.policy.connection_pool.max_requests = 1;
        }),
        UpstreamProtocol::Http1,
    );
    let first = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("first request at the server", || {
        server.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    let second = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("second request pending", || {
        let stats = cluster.stats();
        stats.upstream_rq_pending_active == 1 && stats.upstream_rq_active == 1
    })
    .await;
    gate.add_permits(2);
    first.await.unwrap();
    second.await.unwrap();
    assert_eq!(cluster.stats().upstream_rq_pending_overflow, 0);
}

#[tokio::test]
async fn refused_connection_is_connect_failure() {
    let (addr, _refusing) = refusing();
    let cluster = Cluster::new(spec(&[addr], outlier(|_| {})), UpstreamProtocol::Http1);
    let err = tokio::time::timeout(Duration::from_secs(2), call(&cluster))
        .await
        .expect("fails fast")
        .unwrap_err();
    assert!(
        matches!(proxy_error(&err), ProxyError::ConnectFailure(_)),
        "{err}"
    );
    let stats = cluster.stats();
    assert_eq!(
        (stats.upstream_cx_connect_fail, stats.upstream_cx_active),
        (1, 0)
    );
    // Unsplit, a connect failure counts as a 503 for the outlier detector.
    assert_eq!(cluster.hosts()[0].consecutive_5xx, 1);
    assert_eq!(cluster.hosts()[0].consecutive_gateway, 1);
}

/// A loopback listener whose accept queue is full: further connects hang (Linux drops their
/// SYNs), so only a timeout ends them.
pub(crate) fn full_backlog_listener() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("inet");
    let fillers = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()
        })
        .collect();
    (socket, fillers, addr)
}

#[tokio::test(start_paused = true)]
async fn connect_timeout_is_connect_failure() {
    // Loopback only: an unroutable address may be answered by whatever the machine's network
    // intercepts it with.
    let (_listener, _fillers, addr) = full_backlog_listener();
    let cluster = Cluster::new(
        spec(&[addr], |c| {
            c.policy.connection_pool.connect_timeout = Duration::from_millis(200);
        }),
        UpstreamProtocol::Http1,
    );
    let started = tokio::time::Instant::now();
    let err = call(&cluster).await.unwrap_err();
    assert!(
        matches!(proxy_error(&err), ProxyError::ConnectFailure(_)),
        "{err}"
    );
    assert!(started.elapsed() <= Duration::from_millis(200));
    assert_eq!(cluster.stats().upstream_cx_active, 0);
}

#[tokio::test]
async fn idle_timeout_closes_connections() {
    let server = ok_server(false).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            c.policy.connection_pool.idle_timeout = Some(Duration::from_millis(30));
        }),
        UpstreamProtocol::Http1,
    );
    call_ok(&cluster).await;
    assert_eq!(cluster.stats().upstream_cx_active, 1);
    eventually("idle connection closed", || {
        cluster.stats().upstream_cx_active == 0 && server.open.load(Ordering::SeqCst) == 0
    })
    .await;
    call_ok(&cluster).await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn max_connection_duration_drains_busy_and_closes_idle_connections() {
    let gate = Arc::new(Semaphore::new(0));
    let server = gated_server(gate.clone()).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            c.policy.connection_pool.max_connection_duration = Some(Duration::from_millis(100));
        }),
        UpstreamProtocol::Http1,
    );
    // A request still under way when the connection reaches its age finishes on it...
    let first = tokio::spawn({
        let c = cluster.clone();
        async move { call_ok(&c).await }
    });
    eventually("first request at the server", || {
        server.hits.load(Ordering::SeqCst) == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    gate.add_permits(1);
    first.await.unwrap();
    // ...and the connection then closes rather than going back to idle.
    eventually("expired connection closed", || {
        cluster.stats().upstream_cx_active == 0 && server.open.load(Ordering::SeqCst) == 0
    })
    .await;
    // An idle connection closes at its age.
    gate.add_permits(1);
    call_ok(&cluster).await;
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    eventually("idle connection closed at its age", || {
        cluster.stats().upstream_cx_active == 0 && server.open.load(Ordering::SeqCst) == 0
    })
    .await;
}

#[tokio::test]
async fn a_retry_avoids_tried_hosts_unless_any_host_is_allowed() {
    let (a, b) = (ok_server(false).await, ok_server(false).await);
    // Round robin over two hosts: after a request to one, the other is next in line. A retry
    // whose earlier attempt went to that next host gets it only when any host is allowed.
    for any_host in [false, true] {
        let cluster = Cluster::new(spec(&[a.addr, b.addr], |_| {}), UpstreamProtocol::Http1);
        let info = Arc::new(RequestInfo::new());
        let rsp = cluster.clone().call(request(&info)).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let first = info.upstream().unwrap();
        let next = if first == a.addr { b.addr } else { a.addr };

        let info = Arc::new(RequestInfo::new());
        info.push_upstream(next);
        let mut req = request(&info);
        if any_host {
            RequestCtx::of_mut(req.extensions_mut()).any_host = true;
        }
        let rsp = cluster.clone().call(req).await.unwrap();
        assert_eq!(rsp.status(), StatusCode::OK);
        let expected = if any_host { next } else { first };
        assert_eq!(info.upstream(), Some(expected), "any host: {any_host}");
    }
}

#[tokio::test]
async fn h2c_end_to_end_multiplexes_one_connection() {
    let gate = Arc::new(Semaphore::new(0));
    let server = serve(true, {
        let gate = gate.clone();
        move |req: Request<Incoming>| {
            let gate = gate.clone();
            async move {
                assert_eq!(req.version(), http::Version::HTTP_2);
                assert_eq!(req.uri().authority().map(|a| a.as_str()), Some("pricing"));
                gate.acquire().await.unwrap().forget();
                Response::new(Full::new(Bytes::from(req.uri().path().to_owned())))
            }
        }
    })
    .await;
    let cluster = Cluster::new(spec(&[server.addr], |_| {}), UpstreamProtocol::H2c);
    let calls: Vec<_> = (0..10)
        .map(|_| {
            let c = cluster.clone();
            tokio::spawn(async move { call_ok(&c).await })
        })
        .collect();
    eventually("all streams at the server", || {
        server.hits.load(Ordering::SeqCst) == 10
    })
    .await;
    gate.add_permits(10);
    for c in calls {
        assert_eq!(c.await.unwrap(), "/price");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);
    let stats = cluster.stats();
    assert_eq!((stats.upstream_cx_total, stats.upstream_rq_total), (1, 10));
}

#[tokio::test]
async fn http1_request_is_origin_form_with_host() {
    let server = serve(false, |req: Request<Incoming>| async move {
        let host = req
            .headers()
            .get("host")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        Response::new(Full::new(Bytes::from(format!("{} {host}", req.uri()))))
    })
    .await;
    let cluster = Cluster::new(spec(&[server.addr], |_| {}), UpstreamProtocol::Http1);
    assert_eq!(call_ok(&cluster).await, "/price?id=1 pricing");
}

// ---- host selection through the cluster ----

#[tokio::test]
async fn retry_avoids_the_previously_tried_host() {
    let (a, b) = (ok_server(false).await, ok_server(false).await);
    let cluster = Cluster::new(spec(&[a.addr, b.addr], |_| {}), UpstreamProtocol::Http1);
    for _ in 0..4 {
        let info = Arc::new(RequestInfo::new());
        info.push_upstream(a.addr);
        let rsp = cluster.clone().call(request(&info)).await.unwrap();
        rsp.into_body().collect().await.unwrap();
        assert_eq!(info.upstream(), Some(b.addr));
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn round_robin_alternates_between_hosts() {
    let (a, b) = (ok_server(false).await, ok_server(false).await);
    let cluster = Cluster::new(spec(&[a.addr, b.addr], |_| {}), UpstreamProtocol::Http1);
    for _ in 0..6 {
        call_ok(&cluster).await;
    }
    assert_eq!(a.hits.load(Ordering::SeqCst), 3);
    assert_eq!(b.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn no_endpoints_is_no_healthy_upstream() {
    let cluster = Cluster::new(spec(&[], |_| {}), UpstreamProtocol::Http1);
    let err = call(&cluster).now_or_never().unwrap().unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::NoHealthyUpstream));
    assert_eq!(cluster.stats().upstream_rq_active, 0);
}

// ---- outlier detection ----

fn outlier(edit: impl FnOnce(&mut OutlierDetection)) -> impl FnOnce(&mut sluice_policy::Cluster) {
    move |c| {
        let mut od = OutlierDetection {
            max_ejection_percent: 100,
            ..OutlierDetection::default()
        };
        edit(&mut od);
        c.policy.outlier_detection = Some(od);
    }
}

fn fail(cluster: &ClusterHandle, host: SocketAddr, n: usize, status: u16) {
    for _ in 0..n {
        cluster.report_for_test(host, Outcome::Status(status));
    }
}

async fn sleep_secs(s: u64) {
    tokio::time::sleep(Duration::from_secs(s)).await;
}

#[tokio::test(start_paused = true)]
async fn five_consecutive_5xx_eject_and_ejection_time_doubles() {
    // interval 10 s, base 30 s; the ticker ticks at t = 10, 20, 30, ...
    let cluster = Cluster::new(
        spec(&[addr(0), addr(1)], outlier(|_| {})),
        UpstreamProtocol::Http1,
    );
    sleep_secs(1).await;

    fail(&cluster, addr(0), 4, 500);
    cluster.report_for_test(addr(0), Outcome::Status(200));
    fail(&cluster, addr(0), 4, 500);
    assert!(!cluster.hosts()[0].ejected, "a success resets the counter");
    fail(&cluster, addr(0), 1, 500);
    let h = &cluster.hosts()[0];
    assert!(h.ejected);
    assert_eq!((h.ejections, h.multiplier, h.consecutive_5xx), (1, 1, 0));
    assert_eq!(h.ejected_for, Some(Duration::from_secs(30)));
    let stats = cluster.stats();
    assert_eq!(stats.outlier_detection_ejections_active, 1);
    assert_eq!(
        stats.outlier_detection_ejections_enforced_consecutive_5xx,
        1
    );
    assert_eq!(stats.membership_healthy, 1);

    // Ejected at t=1 for 30 s: the tick at 30 is too early, at 40 it returns.
    sleep_secs(31).await; // t = 32
    assert!(cluster.hosts()[0].ejected, "un-ejection waits for a tick");
    assert_eq!(cluster.hosts()[0].ejected_for, Some(Duration::ZERO));
    sleep_secs(9).await; // t = 41
    assert!(!cluster.hosts()[0].ejected);
    assert_eq!(cluster.stats().outlier_detection_ejections_active, 0);

    // Ejected again before the multiplier decays: 60 s.
    fail(&cluster, addr(0), 5, 503);
    let h = &cluster.hosts()[0];
    assert_eq!((h.ejections, h.multiplier), (2, 2));
    assert_eq!(h.ejected_for, Some(Duration::from_secs(60)));
    sleep_secs(60).await; // t = 101: tick at 100 saw 59 s
    assert!(cluster.hosts()[0].ejected);
    sleep_secs(10).await; // t = 111
    assert!(!cluster.hosts()[0].ejected);
    assert_eq!(cluster.hosts()[0].multiplier, 2);

    // Healthy for an interval after un-ejection: the multiplier decays one step per tick.
    sleep_secs(10).await; // t = 121
    assert_eq!(cluster.hosts()[0].multiplier, 1);
    sleep_secs(10).await;
    assert_eq!(cluster.hosts()[0].multiplier, 0);
    sleep_secs(10).await;
    assert_eq!(cluster.hosts()[0].multiplier, 0);

    let kinds: Vec<_> = cluster
        .outlier_events()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds.len(), 4);
    assert!(matches!(
        kinds[0],
        OutlierEventKind::Ejected { ejections: 1, .. }
    ));
    assert_eq!(kinds[1], OutlierEventKind::Unejected);
}

#[test]
fn ejection_time_is_capped_and_multiplier_stops_growing() {
    let od = OutlierDetection::default(); // base 30 s, max 300 s
    assert_eq!(ejection_time(&od, 1), Duration::from_secs(30));
    assert_eq!(ejection_time(&od, 2), Duration::from_secs(60));
    assert_eq!(ejection_time(&od, 10), Duration::from_secs(300));
    assert_eq!(ejection_time(&od, 11), Duration::from_secs(300));
    // A max below base is raised to base, as Envoy's config requires.
    let od = OutlierDetection {
        base_ejection_time: Duration::from_secs(400),
        ..OutlierDetection::default()
    };
    assert_eq!(ejection_time(&od, 3), Duration::from_secs(400));
}

#[tokio::test(start_paused = true)]
async fn multiplier_stops_at_the_cap() {
    let cluster = Cluster::new(
        spec(
            &[addr(0), addr(1)],
            outlier(|od| {
                od.base_ejection_time = Duration::from_secs(1);
                od.max_ejection_time = Duration::from_secs(3);
                od.interval = Duration::from_secs(100);
            }),
        ),
        UpstreamProtocol::Http1,
    );
    sleep_secs(1).await;
    for round in 1..=6u32 {
        fail(&cluster, addr(0), 5, 500);
        let h = &cluster.hosts()[0];
        // Envoy grows the multiplier while base × multiplier < max + base: up to 4 here.
        assert_eq!(h.multiplier, round.min(4));
        assert_eq!(
            h.ejected_for,
            Some(Duration::from_secs(u64::from(round.min(3))))
        );
        sleep_secs(100).await; // one tick: un-ejected
        assert!(!cluster.hosts()[0].ejected);
    }
}

#[tokio::test(start_paused = true)]
async fn gateway_errors_and_local_origin_failures() {
    let cluster = Cluster::new(
        spec(
            &[addr(0), addr(1), addr(2)],
            outlier(|od| {
                od.consecutive_5xx = None;
                od.consecutive_gateway_errors = Some(3);
                od.consecutive_local_origin_failures = Some(2);
            }),
        ),
        UpstreamProtocol::Http1,
    );
    // 500 is not a gateway error and resets the gateway counter.
    fail(&cluster, addr(0), 2, 502);
    fail(&cluster, addr(0), 1, 500);
    fail(&cluster, addr(0), 2, 504);
    assert!(!cluster.hosts()[0].ejected);
    fail(&cluster, addr(0), 1, 503);
    assert!(cluster.hosts()[0].ejected);
    // Split: local-origin failures have their own counter and do not touch the 5xx ones; a
    // successful connect resets it.
    cluster.report_for_test(addr(1), Outcome::ConnectFailed);
    cluster.report_for_test(addr(1), Outcome::ConnectSuccess);
    cluster.report_for_test(addr(1), Outcome::Timeout(Deadline::PerTry));
    assert!(!cluster.hosts()[1].ejected);
    assert_eq!(cluster.hosts()[1].consecutive_gateway, 0);
    cluster.report_for_test(addr(1), Outcome::ConnectFailed);
    assert!(cluster.hosts()[1].ejected);
    let stats = cluster.stats();
    assert_eq!(
        stats.outlier_detection_ejections_enforced_consecutive_gateway_failure,
        1
    );
    assert_eq!(
        stats.outlier_detection_ejections_enforced_consecutive_local_origin_failure,
        1
    );
    assert_eq!(stats.outlier_detection_ejections_enforced_total, 2);
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_bounds_ejections() {
    // 50% of 4 hosts: two may be out.
    let cluster = Cluster::new(
        spec(
            &[addr(0), addr(1), addr(2), addr(3)],
            outlier(|od| od.max_ejection_percent = 50),
        ),
        UpstreamProtocol::Http1,
    );
    for i in 0..4 {
        fail(&cluster, addr(i), 5, 500);
    }
    let ejected: Vec<bool> = cluster.hosts().iter().map(|h| h.ejected).collect();
    assert_eq!(ejected, [true, true, false, false]);
    let stats = cluster.stats();
    assert_eq!(stats.outlier_detection_ejections_active, 2);
    assert_eq!(stats.outlier_detection_ejections_overflow, 2);
    // The refused host's counter was reset: it takes another full bout to try again.
    assert_eq!(cluster.hosts()[2].consecutive_5xx, 0);

    // 10% of 3 hosts (Istio's default percentage): one host would be 33%, over the limit, so
    // nothing is ejected, as in Envoy since 1.27 (`always_eject_one_host` is off; Istio never
    // sets it). Every overflow is counted.
    let cluster = Cluster::new(
        spec(
            &[addr(0), addr(1), addr(2)],
            outlier(|od| od.max_ejection_percent = 10),
        ),
        UpstreamProtocol::Http1,
    );
    fail(&cluster, addr(0), 5, 500);
    fail(&cluster, addr(1), 5, 500);
    let ejected: Vec<bool> = cluster.hosts().iter().map(|h| h.ejected).collect();
    assert_eq!(ejected, [false, false, false]);
    assert_eq!(cluster.stats().outlier_detection_ejections_overflow, 2);

    // With `always_eject_one_host` (an Envoy option Istio does not expose): the first one goes.
    let cluster = Cluster::new(
        spec(
            &[addr(0), addr(1), addr(2)],
            outlier(|od| od.max_ejection_percent = 10),
        ),
        UpstreamProtocol::Http1,
    );
    cluster.detector().set_always_eject_one(true);
    fail(&cluster, addr(0), 5, 500);
    fail(&cluster, addr(1), 5, 500);
    let ejected: Vec<bool> = cluster.hosts().iter().map(|h| h.ejected).collect();
    assert_eq!(ejected, [true, false, false]);
}

#[tokio::test(start_paused = true)]
async fn all_ejected_is_no_healthy_upstream_unless_in_panic() {
    let cluster = Cluster::new(
        spec(&[addr(0), addr(1)], outlier(|_| {})),
        UpstreamProtocol::Http1,
    );
    fail(&cluster, addr(0), 5, 500);
    fail(&cluster, addr(1), 5, 500);
    let err = call(&cluster).now_or_never().unwrap().unwrap_err();
    assert!(matches!(proxy_error(&err), ProxyError::NoHealthyUpstream));

    // Panic (healthy 0% < 50%): the ejected hosts take traffic again.
    let server = ok_server(false).await;
    let cluster = Cluster::new(
        spec(&[server.addr], outlier(|od| od.min_health_percent = 50)),
        UpstreamProtocol::Http1,
    );
    fail(&cluster, server.addr, 5, 500);
    assert!(cluster.hosts()[0].ejected);
    call_ok(&cluster).await;
}

/// A request carrying `expiry`, as the timeout layers above the cluster pass it.
fn request_with(expiry: &Expiry) -> Request<Body> {
    let mut req = request(&Arc::new(RequestInfo::new()));
    RequestCtx::of_mut(req.extensions_mut()).expiry = Some(expiry.clone());
    req
}

// An attempt a proxy timer ends while it waits for headers is a local-origin timeout.
#[tokio::test(start_paused = true)]
async fn an_attempt_ended_by_a_proxy_timer_counts_as_local_origin_timeout() {
    let gate = Arc::new(Semaphore::new(0));
    let server = gated_server(gate.clone()).await;
    let cluster = Cluster::new(
        spec(&[server.addr], outlier(|_| {})),
        UpstreamProtocol::Http1,
    );
    for deadline in [Deadline::PerTry, Deadline::Route] {
        let expiry = Expiry::new();
        let mut fut = Box::pin(cluster.clone().call(request_with(&expiry)));
        let waited = tokio::time::timeout(Duration::from_secs(1), fut.as_mut()).await;
        assert!(waited.is_err());
        // As the timeout layer does: raise the flag, then drop the attempt.
        expiry.fire(deadline);
        drop(fut);
    }
    let h = &cluster.hosts()[0];
    // Unsplit: a timeout is a 504, so both the 5xx and the gateway counters move.
    assert_eq!(
        (h.consecutive_5xx, h.consecutive_gateway, h.active_requests),
        (2, 2, 0)
    );
    let stats = cluster.stats();
    assert_eq!(
        (
            stats.upstream_rq_per_try_timeout,
            stats.upstream_rq_timeout,
            stats.upstream_rq_cancelled,
            stats.upstream_rq_active
        ),
        (1, 1, 0, 0)
    );
}

// An attempt dropped with no timer raised was abandoned by the client: nothing is reported, and
// everything it held is free at once.
#[tokio::test(start_paused = true)]
async fn an_attempt_the_client_abandons_reports_nothing() {
    let gate = Arc::new(Semaphore::new(0));
    let server = gated_server(gate.clone()).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            outlier(|od| od.consecutive_5xx = Some(1))(c);
            c.policy.connection_pool.max_connections = 1;
        }),
        UpstreamProtocol::Http1,
    );
    // One attempt on the only connection, one waiting for it; a route timer that has not fired.
    let route = Expiry::new();
    let on_conn = Box::pin(cluster.clone().call(request_with(&route)));
    let waiting = Box::pin(cluster.clone().call(request_with(&route.child())));
    let both = futures_util::future::select(on_conn, waiting);
    assert!(tokio::time::timeout(Duration::from_secs(1), both)
        .await
        .is_err());
    let h = &cluster.hosts()[0];
    assert_eq!(
        (h.consecutive_5xx, h.consecutive_gateway, h.ejected),
        (0, 0, false)
    );
    let stats = cluster.stats();
    assert_eq!(
        (
            stats.upstream_rq_cancelled,
            stats.upstream_rq_timeout,
            stats.upstream_rq_active,
            stats.upstream_rq_pending_active
        ),
        (2, 0, 0, 0)
    );
    assert_eq!(h.active_requests, 0);
    // The abandoned h1 connection was mid-message: it closes and frees its slot.
    eventually("the abandoned connection closes", || {
        cluster.stats().upstream_cx_active == 0
    })
    .await;
    gate.add_permits(1);
    call_ok(&cluster).await;
}

#[tokio::test(start_paused = true)]
async fn update_keeps_state_of_surviving_hosts() {
    let cluster = Cluster::new(
        spec(&[addr(0), addr(1), addr(2)], outlier(|_| {})),
        UpstreamProtocol::Http1,
    );
    fail(&cluster, addr(0), 5, 500);
    fail(&cluster, addr(1), 5, 500);
    fail(&cluster, addr(2), 3, 500);
    assert_eq!(cluster.stats().outlier_detection_ejections_active, 2);

    // addr(1) leaves, addr(3) joins; new limits.
    cluster.update(spec(&[addr(0), addr(2), addr(3)], |c| {
        outlier(|_| {})(c);
        c.policy.connection_pool.max_requests = 7;
    }));
    let hosts = cluster.hosts();
    assert_eq!(
        hosts.iter().map(|h| h.addr).collect::<Vec<_>>(),
        [addr(0), addr(2), addr(3)]
    );
    assert!(hosts[0].ejected);
    assert_eq!(hosts[0].ejections, 1);
    assert_eq!(hosts[1].consecutive_5xx, 3);
    assert!(!hosts[2].ejected);
    assert_eq!(cluster.stats().outlier_detection_ejections_active, 1);

    // Removing outlier detection returns every host.
    cluster.update(spec(&[addr(0), addr(2), addr(3)], |_| {}));
    assert!(cluster.hosts().iter().all(|h| !h.ejected));
    assert_eq!(cluster.stats().outlier_detection_ejections_active, 0);
}

#[tokio::test]
async fn update_drops_idle_connections_of_removed_hosts() {
    let (a, b) = (ok_server(false).await, ok_server(false).await);
    let cluster = Cluster::new(spec(&[a.addr, b.addr], |_| {}), UpstreamProtocol::Http1);
    call_ok(&cluster).await;
    call_ok(&cluster).await;
    assert_eq!(cluster.stats().upstream_cx_active, 2);
    cluster.update(spec(&[a.addr], |_| {}));
    eventually("removed host's idle connection closed", || {
        b.open.load(Ordering::SeqCst) == 0 && cluster.stats().upstream_cx_active == 1
    })
    .await;
    assert_eq!(a.open.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connect_failures_eject_through_the_data_path() {
    let (dead, _refusing) = refusing();
    let live = ok_server(false).await;
    let cluster = Cluster::new(
        spec(&[dead, live.addr], outlier(|_| {})),
        UpstreamProtocol::Http1,
    );
    for _ in 0..5 {
        let info = Arc::new(RequestInfo::new());
        info.push_upstream(live.addr); // steer to the dead host
        let _ = cluster.clone().call(request(&info)).await;
    }
    assert!(cluster.hosts()[0].ejected);
    for _ in 0..4 {
        call_ok(&cluster).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_queues_and_serves_everyone() {
    let server = ok_server(false).await;
    let cluster = Cluster::new(
        spec(&[server.addr], |c| {
            c.policy.connection_pool.max_connections = 4;
            c.policy.connection_pool.tcp_keepalive = Some(sluice_policy::TcpKeepalive {
                probes: Some(3),
                time: Some(Duration::from_secs(60)),
                interval: Some(Duration::from_secs(10)),
            });
        }),
        UpstreamProtocol::Http1,
    );
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let c = cluster.clone();
            tokio::spawn(async move { call_ok(&c).await })
        })
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), "hello");
    }
    assert!(server.accepted.load(Ordering::SeqCst) <= 4);
    let stats = cluster.stats();
    assert_eq!(
        (stats.upstream_rq_active, stats.upstream_rq_pending_active),
        (0, 0)
    );
    assert_eq!(stats.upstream_rq_total, 200);
}

#[tokio::test]
async fn server_closing_connections_is_not_an_error() {
    let server = serve(false, |_| async {
        Response::builder()
            .header("connection", "close")
            .body(Full::new(Bytes::from_static(b"bye")))
            .unwrap()
    })
    .await;
    let cluster = Cluster::new(spec(&[server.addr], |_| {}), UpstreamProtocol::Http1);
    for _ in 0..3 {
        assert_eq!(call_ok(&cluster).await, "bye");
    }
    assert_eq!(server.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn h2_refused_stream_maps_to_refused_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut conn = h2::server::handshake(stream).await.unwrap();
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    });
    let cluster = Cluster::new(spec(&[addr], |_| {}), UpstreamProtocol::H2c);
    let err = call(&cluster).await.unwrap_err();
    assert!(
        matches!(proxy_error(&err), ProxyError::RefusedStream),
        "{err}"
    );
    assert_eq!(cluster.stats().upstream_rq_active, 0);
}

// Plain TCP connections (the L4 proxy).

#[tokio::test]
async fn tcp_connections_share_max_connections_and_overflow_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cluster = Cluster::new(
        spec(&[addr], |c| c.policy.connection_pool.max_connections = 1),
        UpstreamProtocol::Http1,
    );
    let info = RequestInfo::new();
    let first = cluster.connect_tcp(&info).await.expect("first connects");
    assert_eq!(first.host, addr);
    assert_eq!(info.upstream(), Some(addr));
    assert_eq!(cluster.stats().upstream_cx_active, 1);
    assert_eq!(cluster.hosts()[0].active_requests, 1);

    // At the limit: no waiting, no escape hatch for a host that already has a connection.
    let err = cluster
        .connect_tcp(&RequestInfo::new())
        .await
        .err()
        .expect("overflows");
    assert!(
        matches!(err, ProxyError::Overflow(OverflowKind::Connections)),
        "{err}"
    );
    assert_eq!(err.flag().to_string(), "UO");
    // An HTTP request waits for the slot rather than overflowing (http1MaxPendingRequests is
    // unlimited), and gets it when the TCP connection closes.
    let http = tokio::spawn({
        let cluster = cluster.clone();
        async move { call(&cluster).await.map(|r| r.status()) }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!http.is_finished(), "HTTP must wait for the TCP slot");
    drop(first);
    // The listener never answers HTTP; enough that the request got its connection.
    eventually("the HTTP request to connect", || {
        cluster.stats().upstream_cx_total == 2
    })
    .await;
    let stats = cluster.stats();
    assert_eq!(stats.upstream_cx_overflow, 2, "{stats:?}");
    assert_eq!(cluster.hosts()[0].active_requests, 1);
    http.abort();
    drop(listener);
}

#[tokio::test]
async fn tcp_connect_failure_feeds_outlier_detection_and_avoids_the_tried_host() {
    let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let live_addr = live.local_addr().unwrap();
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let cluster = Cluster::new(
        spec(
            &[dead, live_addr],
            outlier(|od| od.consecutive_5xx = Some(2)),
        ),
        UpstreamProtocol::Http1,
    );
    // Round robin from a random start: connect until the dead host has been tried once.
    let info = RequestInfo::new();
    let mut failed = 0;
    for _ in 0..2 {
        match cluster.connect_tcp(&info).await {
            Ok(conn) => assert_eq!(conn.host, live_addr),
            Err(err) => {
                assert!(matches!(err, ProxyError::ConnectFailure(_)), "{err}");
                assert_eq!(err.flag().to_string(), "UF");
                failed += 1;
            }
        }
    }
    // The second attempt of one connection avoids the host the first tried.
    assert_eq!(failed, 1);
    assert_eq!(info.upstreams().len(), 2);
    let dead_state = cluster
        .hosts()
        .into_iter()
        .find(|h| h.addr == dead)
        .unwrap();
    assert_eq!(
        dead_state.consecutive_5xx, 1,
        "unsplit: a connect failure is a 503"
    );
    assert_eq!(dead_state.connections, 0);
    let stats = cluster.stats();
    assert_eq!(stats.upstream_cx_connect_fail, 1);
    assert_eq!(stats.upstream_cx_active, 0, "both connections were dropped");

    // A second failure ejects the dead host; from then on every connection goes to the live one.
    let mut fresh = 0;
    while cluster.stats().upstream_cx_connect_fail < 2 {
        let _ = cluster.connect_tcp(&RequestInfo::new()).await;
        fresh += 1;
        assert!(fresh < 10, "round robin never returned to the dead host");
    }
    assert!(cluster.hosts().iter().any(|h| h.addr == dead && h.ejected));
    for _ in 0..4 {
        let conn = cluster.connect_tcp(&RequestInfo::new()).await.unwrap();
        assert_eq!(conn.host, live_addr);
    }
    drop(live);
}

// ---- attempt records (the destination side of each attempt, for telemetry) ----

#[tokio::test]
async fn each_attempt_is_recorded_with_what_its_endpoint_saw() {
    let server = ok_server(false).await;
    let cluster = Cluster::new(spec(&[server.addr], |_| {}), UpstreamProtocol::Http1);
    let info = Arc::new(RequestInfo::new());
    let rsp = cluster
        .clone()
        .call(request(&info))
        .await
        .expect("response");
    // Not written until the body has been read: the attempt lasts until then.
    assert!(info.attempt_records().is_empty());
    let body = rsp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    let records = info.attempt_records();
    assert_eq!(records.len(), 1, "{records:?}");
    let r = &records[0];
    assert_eq!((r.endpoint, r.reached, r.status), (server.addr, true, 200));
    assert_eq!((r.response_bytes, r.flags.to_string().as_str()), (5, "-"));
    assert_eq!(r.timeout, None);

    // A refused connect: the endpoint saw nothing.
    let (gone, _refusing) = refusing();
    let cluster = Cluster::new(spec(&[gone], |_| {}), UpstreamProtocol::Http1);
    let info = Arc::new(RequestInfo::new());
    cluster.clone().call(request(&info)).await.unwrap_err();
    let records = info.attempt_records();
    assert_eq!(records.len(), 1);
    assert!(!records[0].reached);
    assert_eq!(
        (records[0].status, records[0].flags.to_string().as_str()),
        (0, "UF")
    );

    // An attempt abandoned while waiting for headers: a client gone (`DC`), or the proxy's timer.
    let gate = Arc::new(Semaphore::new(0));
    let slow = gated_server(gate.clone()).await;
    let cluster = Cluster::new(spec(&[slow.addr], |_| {}), UpstreamProtocol::Http1);
    for (expired, flag) in [(None, "DC"), (Some(Deadline::PerTry), "UT")] {
        let info = Arc::new(RequestInfo::new());
        let mut req = request(&info);
        let expiry = Expiry::new();
        RequestCtx::of_mut(req.extensions_mut()).expiry = Some(expiry.clone());
        let mut attempt = Box::pin(cluster.clone().call(req));
        let waited = tokio::time::timeout(Duration::from_millis(100), &mut attempt).await;
        assert!(waited.is_err(), "the gated server holds its response");
        if let Some(deadline) = expired {
            expiry.fire(deadline);
        }
        drop(attempt);
        let records = info.attempt_records();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert!(r.reached);
        assert_eq!((r.status, r.flags.to_string().as_str()), (0, flag));
        assert_eq!(r.timeout, expired);
    }
    gate.add_permits(8);

    // A response dropped after its headers (a retry discarding it): the status the endpoint
    // answered, no `DC`.
    let cluster = Cluster::new(spec(&[server.addr], |_| {}), UpstreamProtocol::Http1);
    let info = Arc::new(RequestInfo::new());
    let rsp = cluster
        .clone()
        .call(request(&info))
        .await
        .expect("response");
    drop(rsp);
    let records = info.attempt_records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (records[0].status, records[0].flags.to_string().as_str()),
        (200, "-")
    );
}
