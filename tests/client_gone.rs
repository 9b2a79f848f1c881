//! What counts against an upstream host, with the proxy in-process in front of real loopback
//! upstreams: a client that goes away (its own timeout, a load generator stopping mid-request, an
//! upload cut short, during a retry) is not an upstream failure, so it never feeds the outlier
//! detector and gives back every circuit-breaker slot at once; the upstream's own failures (5xx, a
//! refused connect, a connection closed without an answer) and the proxy's timers (per-try and route
//! timeouts) still count, as in Envoy.

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use sluice_tests::yaml::{cluster_name, destination_rule, virtual_service};
use sluice_tests::{
    failing_env, join_all, refusing_port, slow_env, streaming_upstream, wait_until, Abandoning,
    LogLine, Mesh,
};
use sluice_upstream::ClusterHandle;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

const MAX_TIME: Duration = Duration::from_secs(5);
/// How long the tests wait for the proxy to see a client arrive or leave.
const SETTLE: Duration = Duration::from_secs(5);

/// One error ejects a host, for 30 s, whatever the other hosts do.
const EJECT_ON_FIRST_ERROR: &str = "    outlierDetection:\n      consecutive5xxErrors: 1\n      consecutiveGatewayErrors: 1\n      interval: 1s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n";

fn traffic_policy(parts: &[&str]) -> String {
    format!("  trafficPolicy:\n{}", parts.concat())
}

/// Waits until the proxy has `n` requests at the cluster's upstreams.
async fn wait_active(cluster: &ClusterHandle, n: u64) {
    wait_until(&format!("{n} requests are at the upstream"), SETTLE, || {
        cluster.stats().upstream_rq_active == n
    })
    .await;
}

/// Waits until every request has left the cluster: nothing active, nothing pending.
async fn wait_idle(cluster: &ClusterHandle) {
    wait_until("the cluster has no request left", SETTLE, || {
        let s = cluster.stats();
        s.upstream_rq_active == 0 && s.upstream_rq_pending_active == 0
    })
    .await;
}

/// Nothing was ejected and no host carries an error towards ejection.
fn assert_nothing_counted(cluster: &ClusterHandle) {
    assert_nothing_counted_against(cluster, |_| true);
}

/// Nothing was ejected and the hosts `which` selects carry no error towards ejection.
fn assert_nothing_counted_against(cluster: &ClusterHandle, which: impl Fn(u16) -> bool) {
    let stats = cluster.stats();
    assert_eq!(
        stats.outlier_detection_ejections_enforced_total, 0,
        "{stats:#?}"
    );
    assert_eq!(stats.outlier_detection_ejections_active, 0, "{stats:#?}");
    let hosts = cluster.hosts();
    assert!(
        hosts
            .iter()
            .filter(|h| which(h.addr.port()))
            .all(|h| !h.ejected
                && h.consecutive_5xx == 0
                && h.consecutive_gateway == 0
                && h.consecutive_local == 0),
        "{hosts:#?}"
    );
}

/// `n` access-log lines, each status 0 with `DC`: every abandoned request logged once.
fn assert_abandoned(lines: &[LogLine], n: usize) {
    assert_eq!(lines.len(), n, "{lines:#?}");
    assert!(
        lines.iter().all(|l| l.status == 0 && l.has_flag("DC")),
        "{lines:#?}"
    );
}

async fn assert_served(mesh: &Mesh, url: &str, n: usize) {
    for _ in 0..n {
        let o = mesh.get(url, MAX_TIME).await;
        assert_eq!(o.code(), 200, "{o:?}");
    }
}

// Clients that give up on a slow but healthy host (their own timeout, well under the host's 300 ms)
// leave it in service: Envoy tells outlier detection nothing when the downstream goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_time_out_do_not_eject_a_slow_host() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule("slow", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("slow"));
    let mut log = mesh.access_log();

    let clients = join_all((0..8).map(|_| Abandoning::get(mesh.proxy, "http://slow/"))).await;
    wait_active(&cluster, 8).await;
    // The clients' timeout fires: they close their connections with the requests unanswered.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(clients);
    wait_idle(&cluster).await;

    assert_abandoned(&log.drain().await, 8);
    assert_nothing_counted(&cluster);
    // Counted once each in the request metrics too, as Envoy does: code 0, flag DC.
    let m = mesh.metrics();
    // The client side and the endpoint's side each count them once: the endpoint saw its client
    // leave.
    for reporter in ["source", "destination"] {
        let want = [
            format!("reporter=\"{reporter}\""),
            "response_code=\"0\"".into(),
            "response_flags=\"DC\"".into(),
        ];
        assert!(
            m.lines().any(|l| l.starts_with("istio_requests_total{")
                && want.iter().all(|w| l.contains(w.as_str()))
                && l.ends_with("} 8")),
            "{want:?}\n{m}"
        );
    }
    assert_served(&mesh, "http://slow/", 3).await;
}

// A load generator that stops (wrk closing its 32 keep-alive connections with requests in flight)
// leaves the host in service and the pool empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_generator_stopping_mid_request_does_not_eject_the_host() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule("slow", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("slow"));
    let proxy = mesh.proxy;

    // 32 keep-alive connections, each with one request answered and the next one under way.
    let conns = join_all((0..32).map(|_| async move {
        let stream = TcpStream::connect(proxy).await.expect("connect");
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        let conn = tokio::spawn(conn);
        let get = || {
            Request::get("http://slow/")
                .body(Empty::<Bytes>::new())
                .unwrap()
        };
        let first = tx.send_request(get()).await.expect("first response");
        assert_eq!(first.status(), 200);
        http_body_util::BodyExt::collect(first.into_body())
            .await
            .expect("first body");
        tx.ready().await.expect("keep-alive");
        let second = tokio::spawn(tx.send_request(get()));
        (conn, second)
    }))
    .await;
    let mut log = mesh.access_log();
    wait_active(&cluster, 32).await;
    for (conn, second) in &conns {
        conn.abort();
        second.abort();
    }
    drop(conns);
    wait_idle(&cluster).await;

    assert_abandoned(&log.drain().await, 32);
    assert_nothing_counted(&cluster);
    assert_served(&mesh, "http://slow/", 3).await;
}

// An h2 client that resets its streams (RST_STREAM CANCEL) while keeping its connection: the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_resetting_its_streams_does_not_eject_the_host() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule("slow", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("slow"));
    let mut log = mesh.access_log();

    let stream = TcpStream::connect(mesh.proxy).await.expect("connect");
    let (tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let streams: Vec<_> = (0..8)
        .map(|_| {
            let mut tx = tx.clone();
            tokio::spawn(async move {
                let req = Request::get("http://slow/")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                tx.send_request(req).await
            })
        })
        .collect();
    wait_active(&cluster, 8).await;
    // Dropping the response futures resets the streams; the connection stays up.
    for s in &streams {
        s.abort();
    }
    wait_idle(&cluster).await;
    assert!(
        !conn.is_finished(),
        "the h2 connection should still be open"
    );

    assert_abandoned(&log.drain().await, 8);
    assert_nothing_counted(&cluster);
    assert_served(&mesh, "http://slow/", 3).await;
    conn.abort();
}

// A client that leaves during a retry: the first attempt got a retriable 500 from one host (500 is
// not a gateway error, so it ejects nothing here), the retry waits on the other, slow host when the
// client goes. Neither host is ejected and the retry budget is whole again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_during_a_retry_does_not_eject_the_host() {
    let mut mesh = Mesh::start().await;
    let broken = mesh.fake_service("web", &failing_env("500")).await;
    let slow = mesh.fake_service("web", &slow_env("300ms")).await;
    mesh.deploy("web", &[broken, slow]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "web",
            "  - route:\n    - destination:\n        host: web\n    timeout: 10s\n    retries:\n      attempts: 3\n      perTryTimeout: 2s\n      retryOn: 5xx\n",
        ),
    );
    mesh.write(
        "dr.yaml",
        &destination_rule(
            "web",
            "  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: 0\n      consecutiveGatewayErrors: 1\n      interval: 1s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n",
        ),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("web"));
    let budget = mesh
        .handler
        .state()
        .upstreams
        .values()
        .find(|u| *u.name == cluster_name("web"))
        .expect("cluster")
        .retry_budget
        .clone();
    let mut log = mesh.access_log();

    let clients = join_all((0..8).map(|_| Abandoning::get(mesh.proxy, "http://web/"))).await;
    // Every request ends up waiting on the slow host, some on their first attempt, the others on
    // the retry after the 500.
    let slow_active = || {
        cluster
            .hosts()
            .iter()
            .find(|h| h.addr.port() == slow)
            .map_or(0, |h| h.active_requests)
    };
    wait_until("8 requests wait on the slow host", SETTLE, || {
        slow_active() == 8
    })
    .await;
    drop(clients);
    wait_idle(&cluster).await;

    assert_abandoned(&log.drain().await, 8);
    // The 500s are the broken host's own: they count (towards nothing here), the abandoned
    // attempts on the slow host do not.
    assert_nothing_counted_against(&cluster, |port| port == slow);
    assert_eq!(budget.active(), 0, "retry slots still held");
    assert_eq!(budget.overflows(), 0);
    assert_served(&mesh, "http://web/", 3).await;
}

// A client that leaves while its request body is still being uploaded (a retry policy buffers it
// for replay): not the upstream's failure either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_upload_does_not_eject_the_host() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "slow",
            "  - route:\n    - destination:\n        host: slow\n    retries:\n      attempts: 2\n      retryOn: 5xx,reset\n",
        ),
    );
    mesh.write(
        "dr.yaml",
        &destination_rule("slow", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("slow"));
    let mut log = mesh.access_log();

    let head = "POST http://slow/upload HTTP/1.1\r\nhost: slow\r\ncontent-length: 100000\r\n\r\n";
    let chunk = vec![b'x'; 4096];
    let clients = join_all((0..6).map(|_| Abandoning::start(mesh.proxy, head, &chunk))).await;
    wait_active(&cluster, 6).await;
    drop(clients);
    wait_idle(&cluster).await;

    assert_abandoned(&log.drain().await, 6);
    assert_nothing_counted(&cluster);
    assert_served(&mesh, "http://slow/", 3).await;
}

// Circuit breakers: abandoned requests, on connections and waiting for one, give back their slots
// at once; the next burst within the limits neither overflows nor waits for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_requests_give_back_their_pool_slots() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[port]);
    // Requests opening a connection count as pending too (as in Envoy), so 8 may be pending at once.
    let pool = "    connectionPool:\n      tcp:\n        maxConnections: 4\n      http:\n        http1MaxPendingRequests: 8\n        http2MaxRequests: 8\n";
    mesh.write(
        "dr.yaml",
        &destination_rule("slow", &traffic_policy(&[pool, EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("slow"));
    let mut log = mesh.access_log();

    let clients = join_all((0..8).map(|_| Abandoning::get(mesh.proxy, "http://slow/"))).await;
    wait_until("4 requests on connections, 4 waiting", SETTLE, || {
        let s = cluster.stats();
        // As Envoy's pool: `upstream_rq_active` counts requests on a connection only.
        s.upstream_rq_active == 4 && s.upstream_rq_pending_active == 4
    })
    .await;
    drop(clients);
    wait_idle(&cluster).await;
    assert_abandoned(&log.drain().await, 8);

    let client = mesh.client();
    let burst = join_all((0..8).map(|_| client.get("http://slow/", MAX_TIME))).await;
    assert!(burst.iter().all(|o| o.code() == 200), "{burst:#?}");
    let stats = cluster.stats();
    assert_eq!(stats.upstream_rq_pending_overflow, 0, "{stats:#?}");
    assert_eq!(stats.upstream_rq_cancelled, 8, "{stats:#?}");
    assert_nothing_counted(&cluster);
    wait_idle(&cluster).await;
}

/// One request, and the host's state after it.
async fn eject_once(mesh: &Mesh, url: &str, cluster: &ClusterHandle) -> u16 {
    let o = mesh.get(url, MAX_TIME).await;
    let stats = cluster.stats();
    assert_eq!(
        stats.outlier_detection_ejections_enforced_total, 1,
        "{stats:#?}"
    );
    assert_eq!(stats.outlier_detection_ejections_active, 1, "{stats:#?}");
    let next = mesh.get(url, MAX_TIME).await;
    assert_eq!(next.code(), 503, "{next:?}");
    assert_eq!(next.headers.get("x-envoy-overloaded"), None);
    o.code()
}

// The proxy's own per-try timer is an upstream outcome (Envoy's local-origin timeout, a 504 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_still_ejects_the_host() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "slow",
            "  - route:\n    - destination:\n        host: slow\n    retries:\n      attempts: 1\n      perTryTimeout: 50ms\n",
        ),
    );
    mesh.write(
        "dr.yaml",
        &destination_rule("slow", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("slow"));
    assert_eq!(eject_once(&mesh, "http://slow/", &cluster).await, 504);
}

// So is the route timeout, when it ends an attempt still waiting for headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_still_ejects_the_host() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "slow",
            "  - route:\n    - destination:\n        host: slow\n    timeout: 50ms\n",
        ),
    );
    mesh.write(
        "dr.yaml",
        &destination_rule("slow", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("slow"));
    assert_eq!(eject_once(&mesh, "http://slow/", &cluster).await, 504);
}

// A 503 from the upstream ejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_503_still_ejects_the_host() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("web", &failing_env("503")).await;
    mesh.deploy("web", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "web",
            "  - route:\n    - destination:\n        host: web\n    retries:\n      attempts: 0\n",
        ),
    );
    mesh.write(
        "dr.yaml",
        &destination_rule("web", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("web"));
    assert_eq!(eject_once(&mesh, "http://web/", &cluster).await, 503);
}

// A refused connect ejects (a local-origin connect failure, a 503 when origins are not split).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_failure_still_ejects_the_host() {
    let mut mesh = Mesh::start().await;
    mesh.deploy("web", &[refusing_port()]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "web",
            "  - route:\n    - destination:\n        host: web\n    retries:\n      attempts: 0\n",
        ),
    );
    mesh.write(
        "dr.yaml",
        &destination_rule("web", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("web"));
    assert_eq!(eject_once(&mesh, "http://web/", &cluster).await, 503);
}

// An upstream that reads the request and closes the connection without answering ejects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_closes_without_answering_still_ejects_the_host() {
    let mut mesh = Mesh::start().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().unwrap().port();
    let closer = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        // Bounded: the test makes two requests and the second finds the host ejected.
        for _ in 0..4 {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
        }
    });
    mesh.deploy("web", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "web",
            "  - route:\n    - destination:\n        host: web\n    retries:\n      attempts: 0\n",
        ),
    );
    mesh.write(
        "dr.yaml",
        &destination_rule("web", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("web"));
    assert_eq!(eject_once(&mesh, "http://web/", &cluster).await, 503);
    closer.abort();
}

// A client that stops reading a long response and leaves: the status was the host's answer, the
// rest is the client's business.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_download_does_not_eject_the_host() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut mesh = Mesh::start().await;
    let (port, upstream) = streaming_upstream(&[b'x'; 1024], true).await;
    mesh.deploy("web", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule("web", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("web"));
    let mut log = mesh.access_log();

    for _ in 0..4 {
        let mut client = TcpStream::connect(mesh.proxy).await.expect("connect");
        client
            .write_all(b"GET http://web/ HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .expect("request");
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(MAX_TIME, client.read(&mut buf))
            .await
            .expect("response in time")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
        drop(client);
    }
    wait_idle(&cluster).await;
    upstream.abort();

    let lines = log.drain().await;
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert_nothing_counted(&cluster);
}

// An upstream that sends headers and cuts its body short has reset the exchange: Envoy reports it
// to outlier detection as it reports a reset before headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cutting_its_body_short_still_ejects_the_host() {
    let mut mesh = Mesh::start().await;
    let (port, upstream) = streaming_upstream(b"abc", false).await;
    mesh.deploy("web", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule("web", &traffic_policy(&[EJECT_ON_FIRST_ERROR])),
    );
    mesh.reload();
    let cluster = mesh.cluster(&cluster_name("web"));
    let o = mesh.get("http://web/", MAX_TIME).await;
    assert_eq!(o.code(), 0, "the body should have failed: {o:?}");
    let stats = cluster.stats();
    assert_eq!(
        stats.outlier_detection_ejections_enforced_total, 1,
        "{stats:#?}"
    );
    let next = mesh.get("http://web/", MAX_TIME).await;
    assert_eq!(next.code(), 503, "{next:?}");
    upstream.abort();
}
