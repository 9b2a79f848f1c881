//! The proxy in-process, one behaviour at a time, against real loopback upstreams: Istio's defaults,
//! the blog's experiments, circuit breakers, outlier detection, load balancing, subsets, matches,
//! connection reuse, h2c, reloads, faults and the retry budget. Each test deploys its own Services and
//! EndpointSlices (and Pods, for subsets) inline, and asserts what Envoy under Istio would do.

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use sluice_tests::{endpoint_slice, join_all, refusing_port, LogLine, Mesh, Outcome};
use std::ops::Range;
use std::time::Duration;

const MAX_TIME: Duration = Duration::from_secs(5);

/// Every call waits `delay`, then answers 200 (fake-service's `delay` answers `ERROR_CODE`).
fn slow(delay: &'static str) -> [(&'static str, &'static str); 4] {
    [
        ("ERROR_RATE", "1"),
        ("ERROR_TYPE", "delay"),
        ("ERROR_DELAY", delay),
        ("ERROR_CODE", "200"),
    ]
}

/// Every call answers `code` at once.
fn failing(code: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("ERROR_RATE", "1"),
        ("ERROR_TYPE", "http_error"),
        ("ERROR_CODE", code),
    ]
}

/// A Service `name` (namespace default) with port 80 named `port_name`.
fn service(name: &str, port_name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n  - name: {port_name}\n    port: 80\n    targetPort: 9090\n"
    )
}

/// A Service with port `http` and one endpoint per loopback port.
fn deploy(mesh: &Mesh, name: &str, ports: &[u16]) {
    mesh.write(&format!("{name}.yaml"), &service(name, "http"));
    if !ports.is_empty() {
        mesh.write(
            &format!("{name}-endpoints.yaml"),
            &endpoint_slice(name, ports),
        );
    }
}

fn virtual_service(host: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  hosts:\n  - {host}\n  http:\n{http}"
    )
}

fn destination_rule(host: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  host: {host}\n{spec}"
    )
}

fn cluster_name(host: &str) -> String {
    format!("outbound|80||{host}.default.svc.cluster.local")
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

async fn sequential(mesh: &Mesh, url: &str, n: usize) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(mesh.get(url, MAX_TIME).await);
    }
    out
}

fn with_header(url: &str, name: &str, value: &str) -> Request<Empty<Bytes>> {
    Request::get(url)
        .header(name, value)
        .body(Empty::new())
        .unwrap()
}

fn ms(range: Range<u64>) -> Range<Duration> {
    Duration::from_millis(range.start)..Duration::from_millis(range.end)
}

fn only(lines: &[LogLine]) -> &LogLine {
    assert_eq!(lines.len(), 1, "{lines:#?}");
    &lines[0]
}

// 1. Istio's default retry policy applies with no VirtualService at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_retries_move_a_refused_connection_to_the_other_host() {
    let mut mesh = Mesh::start().await;
    let live = mesh.fake_service("web", &[]).await;
    let dead = refusing_port();
    deploy(&mesh, "web", &[live, dead]);
    mesh.reload();
    let mut log = mesh.access_log();
    let outcomes = sequential(&mesh, "http://web/", 20).await;
    let lines = log.drain().await;

    assert!(outcomes.iter().all(|o| o.code() == 200), "{outcomes:#?}");
    assert_eq!(lines.len(), 20);
    // connect-failure is a default condition; the retry avoids the host already tried.
    assert!(
        lines
            .iter()
            .all(|l| l.upstream == addr(live) && l.flags == "-" && (1..=2).contains(&l.attempts)),
        "{lines:#?}"
    );
    let retried = lines.iter().filter(|l| l.attempts == 2).count();
    assert!(retried > 0, "no request hit the refusing host: {lines:#?}");
    let stats = mesh.cluster(&cluster_name("web")).stats();
    assert_eq!(stats.upstream_cx_connect_fail, retried as u64, "{stats:?}");
}

// 2a. `x-envoy-upstream-rq-timeout-ms` sets a deadline the route does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_header_bounds_a_route_without_timeout() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("2s")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.reload();
    let mut log = mesh.access_log();
    let o = mesh
        .send(
            with_header("http://slow/", "x-envoy-upstream-rq-timeout-ms", "300"),
            MAX_TIME,
        )
        .await;
    let lines = log.drain().await;

    assert_eq!(o.code(), 504, "{o:?}");
    assert_eq!(o.body.as_ref(), b"upstream request timeout");
    assert!(ms(280..800).contains(&o.elapsed), "{:?}", o.elapsed);
    let l = only(&lines);
    assert!(l.has_flag("UT") && l.attempts == 1, "{l:?}");
}

// 2b. `x-envoy-retry-on: 5xx` plus `x-envoy-max-retries` retry what the route would not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_headers_retry_a_503_the_route_does_not() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("flaky", &failing("503")).await;
    deploy(&mesh, "flaky", &[port]);
    mesh.reload();
    let mut log = mesh.access_log();

    // Istio's default conditions do not include 5xx: one attempt.
    let plain = mesh.get("http://flaky/", MAX_TIME).await;
    let req = Request::get("http://flaky/")
        .header("x-envoy-retry-on", "5xx")
        .header("x-envoy-max-retries", "3")
        .body(Empty::new())
        .unwrap();
    let retried = mesh.send(req, MAX_TIME).await;
    let lines = log.drain().await;

    assert_eq!((plain.code(), retried.code()), (503, 503));
    assert_eq!(lines.len(), 2, "{lines:#?}");
    assert_eq!((lines[0].attempts, lines[0].flags.as_str()), (1, "-"));
    // 3 retries, not the default 2: the header's count replaces the route's.
    assert_eq!(lines[1].attempts, 4, "{:?}", lines[1]);
    assert!(lines[1].has_flag("URX"), "{:?}", lines[1]);
}

// 3. The blog's experiment 1: `timeout: 0.5s` in front of a 2 s service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeout_ends_a_slow_call_with_504_ut() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("2s")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "slow",
            "  - route:\n    - destination:\n        host: slow\n    timeout: 0.5s\n",
        ),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    let o = mesh.get("http://slow/", MAX_TIME).await;
    let lines = log.drain().await;

    assert_eq!(o.code(), 504, "{o:?}");
    assert!(ms(480..900).contains(&o.elapsed), "{:?}", o.elapsed);
    let l = only(&lines);
    assert!(l.has_flag("UT") && l.attempts == 1, "{l:?}");
    assert!((490..800).contains(&l.duration_ms), "{l:?}");
}

/// An upstream on loopback whose answer depends on the path: `/fast` at once, `/slow` after 2 s,
/// `/stall` its headers at once and its body after 2 s. Ends with the returned task.
async fn paced_upstream() -> (u16, tokio::task::JoinHandle<()>) {
    use hyper::body::{Body, Frame};
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// A body whose one chunk comes after its timer.
    struct Late(Pin<Box<tokio::time::Sleep>>, bool);

    impl Body for Late {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            if self.1 {
                return Poll::Ready(None);
            }
            std::task::ready!(self.0.as_mut().poll(cx));
            self.1 = true;
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"late\n")))))
        }
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let task = tokio::spawn(async move {
        // Bounded: a handful of connections per test.
        for _ in 0..32 {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let later = || Box::pin(tokio::time::sleep(Duration::from_secs(2)));
                        let body = match req.uri().path() {
                            "/slow" => {
                                later().await;
                                Late(later(), true)
                            }
                            "/stall" => Late(later(), false),
                            _ => Late(later(), true),
                        };
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, task)
}

// Route timeouts of the requests of one keep-alive HTTP/1 connection, which share the
// connection's timer: requests that finish in time, a timer that fires early with nothing or a
// later deadline armed, a deadline shorter than the one the timer is set to (it must be set
// earlier, not wait for the longer one), and a deadline that passes in the response body (the
// client's connection is reset after the headers, as Envoy does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_timeouts_on_one_keep_alive_connection() {
    use hyper_util::rt::TokioIo;
    use tokio::time::Instant;

    let mut mesh = Mesh::start().await;
    let (port, upstream) = paced_upstream().await;
    deploy(&mesh, "paced", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "paced",
            "  - route:\n    - destination:\n        host: paced\n    timeout: 0.5s\n",
        ),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    let stream = tokio::net::TcpStream::connect(mesh.proxy)
        .await
        .expect("connect");
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    let conn = tokio::spawn(conn);
    // One request on the connection: its status, and when its body ended or failed.
    let mut send = async |path: &str, timeout_ms: Option<u64>| {
        let mut req = Request::get(format!("http://paced{path}"));
        if let Some(ms) = timeout_ms {
            req = req.header("x-envoy-upstream-rq-timeout-ms", ms.to_string());
        }
        let started = Instant::now();
        let exchange = async {
            tx.ready()
                .await
                .expect("connection ready for the next request");
            let rsp = tx
                .send_request(req.body(Empty::<Bytes>::new()).unwrap())
                .await
                .expect("response head");
            let status = rsp.status().as_u16();
            let body = http_body_util::BodyExt::collect(rsp.into_body()).await;
            (status, body.is_ok())
        };
        let (status, body_ok) = tokio::time::timeout(MAX_TIME, exchange)
            .await
            .expect("an answer in time");
        (status, body_ok, started.elapsed())
    };

    for _ in 0..3 {
        assert_eq!(send("/fast", None).await.0, 200);
    }
    // The first request's deadline passes with nothing armed; then one passes with the next
    // request's later deadline armed.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(send("/fast", None).await.0, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body_ok, took) = send("/fast", Some(400)).await;
    assert_eq!((status, body_ok), (200, true));
    assert!(took < Duration::from_millis(300), "{took:?}");

    let (status, _, took) = send("/slow", None).await;
    assert_eq!(status, 504);
    assert!(ms(480..1000).contains(&took), "{took:?}");

    // The timer is set to this request's 5 s deadline; the next request's 200 ms one is earlier.
    assert_eq!(send("/fast", Some(5000)).await.0, 200);
    let (status, _, took) = send("/slow", Some(200)).await;
    assert_eq!(status, 504);
    assert!(ms(180..700).contains(&took), "{took:?}");

    // Headers in time, the body not: the body fails at the deadline and the connection closes.
    let (status, body_ok, took) = send("/stall", None).await;
    assert_eq!((status, body_ok), (200, false));
    assert!(ms(480..1000).contains(&took), "{took:?}");
    let closed = tokio::time::timeout(MAX_TIME, conn).await;
    assert!(
        closed.is_ok(),
        "the client connection should have been closed"
    );

    let lines = log.drain().await;
    let flags: Vec<(u16, &str)> = lines.iter().map(|l| (l.status, l.flags.as_str())).collect();
    // The last as Envoy logs it: `UT` alone (its router resets the upstream stream itself).
    assert_eq!(
        flags,
        [
            (200, "-"),
            (200, "-"),
            (200, "-"),
            (200, "-"),
            (200, "-"),
            (504, "UT"),
            (200, "-"),
            (504, "UT"),
            (200, "UT"),
        ],
        "{lines:#?}"
    );
    upstream.abort();
}

// A client that gives up while the proxy waits on the upstream: one access-log line with status 0
// and `DC` (Envoy's downstream connection termination), written when the client went away, not
// when the upstream would have answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_is_logged_with_status_0_dc() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("2s")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.reload();
    let mut log = mesh.access_log();
    let o = mesh.get("http://slow/", Duration::from_millis(300)).await;
    assert_eq!(o.code(), 0, "the client should have given up: {o:?}");
    let lines = log.drain().await;
    let l = only(&lines);
    assert_eq!(l.status, 0, "{l:?}");
    assert!(l.has_flag("DC"), "{l:?}");
    assert!((250..1500).contains(&l.duration_ms), "{l:?}");
}

const BLOG_RETRIES: &str = "  - route:\n    - destination:\n        host: slow\n    timeout: 2s\n    retries:\n      attempts: 3\n      perTryTimeout: 0.5s\n";

// 4a. The blog's experiment 2 as current Istio runs it: without `retryOn` the default conditions
// (connect-failure,refused-stream,unavailable,cancelled) do not cover a per-try timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeout_is_not_retried_without_retry_on() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("2s")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.write("vs.yaml", &virtual_service("slow", BLOG_RETRIES));
    mesh.reload();
    let mut log = mesh.access_log();
    let o = mesh.get("http://slow/", MAX_TIME).await;
    let lines = log.drain().await;

    assert_eq!(o.code(), 504, "{o:?}");
    assert!(ms(480..900).contains(&o.elapsed), "{:?}", o.elapsed);
    let l = only(&lines);
    assert!(l.has_flag("UT") && l.attempts == 1, "{l:?}");
}

// 4b. The same with `retryOn: 5xx` (which covers per-try timeouts): 4 attempts, cut by the 2 s
// route timeout during the 4th.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_try_timeouts_are_retried_under_5xx_until_the_route_timeout() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("2s")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service("slow", &format!("{BLOG_RETRIES}      retryOn: 5xx\n")),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    let o = mesh.get("http://slow/", MAX_TIME).await;
    let lines = log.drain().await;

    assert_eq!(o.code(), 504, "{o:?}");
    assert!(ms(1950..2600).contains(&o.elapsed), "{:?}", o.elapsed);
    let l = only(&lines);
    assert!(l.has_flag("UT") && l.attempts == 4, "{l:?}");
    assert!((1990..2400).contains(&l.duration_ms), "{l:?}");
}

/// `clients` concurrent clients, each sending `n` requests one after the other.
async fn clients(mesh: &Mesh, url: &str, clients: usize, n: usize) -> Vec<Outcome> {
    join_all((0..clients).map(|_| sequential(mesh, url, n)))
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn share_503(outcomes: &[Outcome]) -> f64 {
    outcomes.iter().filter(|o| o.code() == 503).count() as f64 / outcomes.len() as f64
}

// 5. The blog's experiment 3: `http1MaxPendingRequests: 1`, `maxRequestsPerConnection: 1` and no
// `maxConnections`. As in Envoy, a request that finds no free connection is pending while its new
// connection is set up; every request needs a new connection here, so concurrent arrivals collide
// in that window and overflow (503 UO, `x-envoy-overloaded: true`); one client alone never does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_limit_overflows_concurrent_new_connections() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("100ms")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule(
            "slow",
            "  trafficPolicy:\n    connectionPool:\n      http:\n        http1MaxPendingRequests: 1\n        maxRequestsPerConnection: 1\n",
        ),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    // One client never has two requests at once: nothing can overflow.
    let one = clients(&mesh, "http://slow/", 1, 20).await;
    assert!(one.iter().all(|o| o.code() == 200), "{one:#?}");
    let stats = mesh.cluster(&cluster_name("slow")).stats();
    assert_eq!(
        (stats.upstream_rq_pending_overflow, stats.upstream_cx_total),
        (0, 20),
        "{stats:?}"
    );
    log.drain().await;
    let two = clients(&mesh, "http://slow/", 2, 20).await;
    let two_lines = log.drain().await;
    let three = clients(&mesh, "http://slow/", 3, 20).await;
    let three_lines = log.drain().await;
    eprintln!(
        "503 share: 2 clients {} 3 clients {}",
        share_503(&two),
        share_503(&three)
    );

    for (outcomes, lines) in [(&two, &two_lines), (&three, &three_lines)] {
        assert!(
            outcomes.iter().all(|o| matches!(o.code(), 200 | 503)),
            "{outcomes:#?}"
        );
        assert!(
            outcomes.iter().filter(|o| o.code() == 503).all(|o| o
                .headers
                .get("x-envoy-overloaded")
                .is_some_and(|v| v == "true")),
            "{outcomes:#?}"
        );
        assert!(
            lines
                .iter()
                .all(|l| (l.status == 200)
                    != (l.has_flag("UO") && l.status == 503 && l.attempts == 1)),
            "{lines:#?}"
        );
    }
    assert!(share_503(&two) < 0.3, "2 clients: {}", share_503(&two));
    assert!(share_503(&three) > 0.0, "no overflow with 3 clients");
    let overflowed = two.iter().chain(&three).filter(|o| o.code() == 503).count();
    let stats = mesh.cluster(&cluster_name("slow")).stats();
    assert_eq!(
        stats.upstream_rq_pending_overflow, overflowed as u64,
        "{stats:?}"
    );
    // 3 clients collide about twice as often as 2 (pairs of clients: 3 vs 1), but a 20-round sample
    // does not order them reliably (0.175 at 2 vs 0.083 at 3 happened under load), so the
    // deterministic contrast is the one with a single client above.
}

const EJECT_ON_2_GATEWAY_ERRORS: &str = "  trafficPolicy:\n    outlierDetection:\n      consecutiveGatewayErrors: 2\n      consecutive5xxErrors: 0\n      interval: 10s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n";

// 6a. `consecutiveGatewayErrors` counts 502/503/504 only (the 5xx detector is off here: Istio leaves
// Envoy's default of 5 on unless `consecutive5xxErrors: 0`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_eject_a_503_host_but_not_a_500_host() {
    let mut mesh = Mesh::start().await;
    let unavailable = mesh.fake_service("web", &failing("503")).await;
    let broken = mesh.fake_service("web", &failing("500")).await;
    deploy(&mesh, "web", &[unavailable, broken]);
    mesh.write(
        "dr.yaml",
        &destination_rule("web", EJECT_ON_2_GATEWAY_ERRORS),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    sequential(&mesh, "http://web/", 30).await;
    let lines = log.drain().await;

    let to = |port| lines.iter().filter(|l| l.upstream == addr(port)).count();
    assert_eq!(to(unavailable), 2, "{lines:#?}");
    assert_eq!(to(broken), 28, "{lines:#?}");
    let cluster = mesh.cluster(&cluster_name("web"));
    let hosts = cluster.hosts();
    let host = |port| {
        hosts
            .iter()
            .find(|h| h.addr.to_string() == addr(port))
            .unwrap()
    };
    assert!(
        host(unavailable).ejected && host(unavailable).ejections == 1,
        "{hosts:#?}"
    );
    assert!(
        !host(broken).ejected && host(broken).ejections == 0,
        "{hosts:#?}"
    );
    let stats = cluster.stats();
    assert_eq!(
        stats.outlier_detection_ejections_enforced_consecutive_gateway_failure,
        1
    );
}

// 6b. Every host ejected (maxEjectionPercent 100) and no panic threshold: 503 UH.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_hosts_ejected_is_no_healthy_upstream() {
    let mut mesh = Mesh::start().await;
    let a = mesh.fake_service("web", &failing("503")).await;
    let b = mesh.fake_service("web", &failing("503")).await;
    deploy(&mesh, "web", &[a, b]);
    mesh.write(
        "dr.yaml",
        &destination_rule("web", EJECT_ON_2_GATEWAY_ERRORS),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    let outcomes = sequential(&mesh, "http://web/", 6).await;
    let lines = log.drain().await;

    // Each host takes exactly two 503s before it is ejected.
    assert!(
        lines[..4]
            .iter()
            .all(|l| l.status == 503 && l.flags == "-" && l.upstream != "-"),
        "{lines:#?}"
    );
    assert!(
        lines[4..]
            .iter()
            .all(|l| l.status == 503 && l.has_flag("UH") && l.upstream == "-"),
        "{lines:#?}"
    );
    assert!(outcomes[4..]
        .iter()
        .all(|o| o.body.as_ref() == b"no healthy upstream"));
    let hosts = mesh.cluster(&cluster_name("web")).hosts();
    assert!(hosts.iter().all(|h| h.ejected), "{hosts:#?}");
}

// 6c. `minHealthPercent: 50`: with 0 of 2 healthy the cluster is in panic and ignores ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_threshold_keeps_traffic_flowing_to_ejected_hosts() {
    let mut mesh = Mesh::start().await;
    let a = mesh.fake_service("web", &failing("503")).await;
    let b = mesh.fake_service("web", &failing("503")).await;
    deploy(&mesh, "web", &[a, b]);
    mesh.write(
        "dr.yaml",
        &destination_rule(
            "web",
            &format!("{EJECT_ON_2_GATEWAY_ERRORS}      minHealthPercent: 50\n"),
        ),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    sequential(&mesh, "http://web/", 20).await;
    let lines = log.drain().await;

    let hosts = mesh.cluster(&cluster_name("web")).hosts();
    assert!(hosts.iter().all(|h| h.ejected), "{hosts:#?}");
    assert!(
        lines
            .iter()
            .all(|l| l.status == 503 && !l.has_flag("UH") && l.upstream != "-"),
        "{lines:#?}"
    );
    // Each host is ejected after its 2nd 503; 16 panic-mode picks missing one host: p = 2^-15.
    assert!(
        [a, b]
            .iter()
            .all(|p| lines.iter().filter(|l| l.upstream == addr(*p)).count() > 2),
        "both hosts take traffic after ejection: {lines:#?}"
    );
}

fn with_lb(policy: &str) -> String {
    format!("  trafficPolicy:\n    loadBalancer:\n      simple: {policy}\n")
}

/// Requests per upstream port, in `ports` order.
fn split(lines: &[LogLine], ports: &[u16]) -> Vec<usize> {
    ports
        .iter()
        .map(|p| lines.iter().filter(|l| l.upstream == addr(*p)).count())
        .collect()
}

// 7a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_sequential_requests_exactly() {
    let mut mesh = Mesh::start().await;
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push(mesh.fake_service("web", &[]).await);
    }
    deploy(&mesh, "web", &ports);
    mesh.write("dr.yaml", &destination_rule("web", &with_lb("ROUND_ROBIN")));
    mesh.reload();
    let mut log = mesh.access_log();
    let outcomes = sequential(&mesh, "http://web/", 30).await;
    let lines = log.drain().await;

    assert!(outcomes.iter().all(|o| o.code() == 200));
    assert_eq!(split(&lines, &ports), [10, 10, 10], "{lines:#?}");
    // In turn: the same host every third request.
    assert!(lines
        .windows(4)
        .all(|w| w[0].upstream == w[3].upstream && w[0].upstream != w[1].upstream));
}

// 7b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reaches_every_host() {
    let mut mesh = Mesh::start().await;
    let mut ports = Vec::new();
    for _ in 0..3 {
        ports.push(mesh.fake_service("web", &[]).await);
    }
    deploy(&mesh, "web", &ports);
    mesh.write("dr.yaml", &destination_rule("web", &with_lb("RANDOM")));
    mesh.reload();
    let mut log = mesh.access_log();
    let outcomes = sequential(&mesh, "http://web/", 60).await;
    let lines = log.drain().await;

    assert!(outcomes.iter().all(|o| o.code() == 200));
    let counts = split(&lines, &ports);
    // Missing a host has probability 3 * (2/3)^60, about 1e-10. Round robin would take the hosts
    // in turn; random does that over 60 requests with probability (1/3)^57. (Exactly 20 each is
    // no sign of round robin: random lands there 1.4% of the time.)
    let in_turn = lines
        .windows(4)
        .all(|w| w[0].upstream == w[3].upstream && w[0].upstream != w[1].upstream);
    assert!(counts.iter().all(|c| *c > 0) && !in_turn, "{counts:?}");
}

// 7c. Power of two choices: a host busy with 3 s requests loses every draw against an idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_request_prefers_the_idle_hosts() {
    let mut mesh = Mesh::start().await;
    let fast_a = mesh.fake_service("web", &[]).await;
    let fast_b = mesh.fake_service("web", &[]).await;
    let busy = mesh.fake_service("web", &slow("3s")).await;
    let ports = [fast_a, fast_b, busy];
    deploy(&mesh, "web", &ports);
    mesh.write(
        "dr.yaml",
        &destination_rule("web", &with_lb("LEAST_REQUEST")),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    // 10 concurrent clients, 10 requests each, 30 ms apart: the fast hosts are mostly idle between
    // requests, the slow one holds every request it gets for 3 s, so its active count only grows
    // while the test runs. (With 1 s and 60 requests the whole run was the start-up transient, and
    // on a loaded CI machine, where the fast hosts are slow too, the slow host got 16 of 60.)
    let mesh = &mesh;
    let paced = |c: u64| async move {
        tokio::time::sleep(Duration::from_millis(3 * c)).await;
        let mut out = Vec::new();
        for _ in 0..10 {
            out.push(mesh.get("http://web/", MAX_TIME).await);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        out
    };
    let outcomes: Vec<_> = join_all((0..10).map(paced))
        .await
        .into_iter()
        .flatten()
        .collect();
    let lines = log.drain().await;

    assert!(outcomes.iter().all(|o| o.code() == 200));
    let counts = split(&lines, &ports);
    // Round robin or random would send about 33 of 100 to the slow host (random: under 23 with
    // probability ~1%); P2C sends it a request while it is busy only when both draws pick it
    // (1/9, Envoy draws with replacement) or a fast host is as busy.
    eprintln!(
        "least request: fast {} and {}, slow {}",
        counts[0], counts[1], counts[2]
    );
    assert!(counts[2] <= 22, "{counts:?}");
    // Between the two fast hosts the split is wide: whichever is momentarily busier loses draws,
    // so small differences in their latency compound (12 local runs: 34/56 to 45/45; a loaded CI
    // machine: 61/29). Both must still be used.
    assert!(counts[0] >= 15 && counts[1] >= 15, "{counts:?}");
}

/// `reviews` with two pods labelled version v1 and v2 (EndpointSlice targetRef -> Pod), a
/// DestinationRule with subsets v1 and v2, and the VirtualService's `http` routes. Returns the ports
/// of v1 and v2.
async fn reviews(mesh: &mut Mesh, http: &str) -> (u16, u16) {
    let v1 = mesh.fake_service("reviews-v1", &[]).await;
    let v2 = mesh.fake_service("reviews-v2", &[]).await;
    mesh.write("reviews.yaml", &service("reviews", "http"));
    for (version, port) in [("v1", v1), ("v2", v2)] {
        mesh.write(
            &format!("reviews-{version}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: reviews-{version}\n  namespace: default\n  labels:\n    app: reviews\n    version: {version}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: reviews-{version}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: reviews\naddressType: IPv4\nendpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: reviews-{version}, namespace: default}}\nports:\n- name: http\n  port: {port}\n"
            ),
        );
    }
    mesh.write(
        "dr.yaml",
        &destination_rule(
            "reviews",
            "  subsets:\n  - name: v1\n    labels:\n      version: v1\n  - name: v2\n    labels:\n      version: v2\n",
        ),
    );
    mesh.write("vs.yaml", &virtual_service("reviews", http));
    (v1, v2)
}

const REVIEWS_ROUTES: &str = "  - match:\n    - headers:\n        end-user:\n          exact: jason\n    route:\n    - destination:\n        host: reviews\n        subset: v2\n  - route:\n    - destination:\n        host: reviews\n        subset: v1\n      weight: 80\n    - destination:\n        host: reviews\n        subset: v2\n      weight: 20\n";

// 8a.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_subsets_split_traffic_80_20() {
    let mut mesh = Mesh::start().await;
    let (v1, v2) = reviews(&mut mesh, REVIEWS_ROUTES).await;
    mesh.reload();
    let mut log = mesh.access_log();
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        outcomes.extend(join_all((0..20).map(|_| mesh.get("http://reviews/", MAX_TIME))).await);
    }
    let lines = log.drain().await;

    assert!(outcomes.iter().all(|o| o.code() == 200));
    let counts = split(&lines, &[v1, v2]);
    assert_eq!(counts[0] + counts[1], 200, "{counts:?}");
    // Binomial(200, 0.8): mean 160, sd 5.7.
    assert!((130..=190).contains(&counts[0]), "{counts:?}");
    let body_v1 = outcomes
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.body).contains("\"name\": \"reviews-v1\""))
        .count();
    assert_eq!(body_v1, counts[0]);
}

// 8b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_match_sends_jason_to_v2_always() {
    let mut mesh = Mesh::start().await;
    let (_, v2) = reviews(&mut mesh, REVIEWS_ROUTES).await;
    mesh.reload();
    let mut log = mesh.access_log();
    let outcomes = join_all((0..30).map(|_| {
        mesh.send(
            with_header("http://reviews/", "end-user", "jason"),
            MAX_TIME,
        )
    }))
    .await;
    let lines = log.drain().await;

    assert!(outcomes.iter().all(|o| o.code() == 200));
    assert_eq!(lines.len(), 30);
    assert!(lines.iter().all(|l| l.upstream == addr(v2)), "{lines:#?}");
}

// 8c. A route to a subset no DestinationRule defines: accepted with a warning (Istio validates
// routes without cross-checking subsets); Envoy finds no such cluster and answers 503 NC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_subset_is_503_nc_with_a_warning() {
    let mut mesh = Mesh::start().await;
    reviews(
        &mut mesh,
        "  - route:\n    - destination:\n        host: reviews\n        subset: v3\n",
    )
    .await;
    let problems = mesh.reload_checked(false);
    let mut log = mesh.access_log();
    let o = mesh.get("http://reviews/", MAX_TIME).await;
    let lines = log.drain().await;

    let warning = problems
        .iter()
        .find(|p| p.file == "vs.yaml" && p.field.starts_with("spec.http[0].route[0].destination"))
        .unwrap_or_else(|| panic!("{problems:#?}"));
    assert!(
        !warning.is_error() && warning.reason.contains("v3") && warning.reason.contains("NC"),
        "{warning:?}"
    );
    assert_eq!(o.code(), 503, "{o:?}");
    assert!(o.body.is_empty(), "{o:?}");
    let l = only(&lines);
    assert!(l.has_flag("NC") && l.upstream == "-", "{l:?}");
}

// 9. Match kinds, first matching route wins; nothing matches -> 404 NR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_kinds_select_destinations() {
    let mut mesh = Mesh::start().await;
    let alpha = mesh.fake_service("alpha", &[]).await;
    let beta = mesh.fake_service("beta", &[]).await;
    deploy(&mesh, "alpha", &[alpha]);
    deploy(&mesh, "beta", &[beta]);
    deploy(&mesh, "shop", &[]);
    let to = |host: &str| format!("    route:\n    - destination:\n        host: {host}\n");
    let routes = [
        ("  - match:\n    - uri:\n        exact: /exact\n", "alpha"),
        ("  - match:\n    - uri:\n        regex: /items/[0-9]+\n", "alpha"),
        ("  - match:\n    - uri:\n        prefix: /api\n      method:\n        exact: POST\n", "beta"),
        ("  - match:\n    - uri:\n        prefix: /api\n      queryParams:\n        v:\n          exact: \"2\"\n", "beta"),
        ("  - match:\n    - uri:\n        prefix: /api\n      withoutHeaders:\n        x-debug:\n          exact: \"1\"\n", "alpha"),
        ("  - match:\n    - uri:\n        prefix: /api\n", "beta"),
    ];
    let http: String = routes
        .iter()
        .map(|(m, host)| format!("{m}{}", to(host)))
        .collect();
    mesh.write("vs.yaml", &virtual_service("shop", &http));
    mesh.reload();

    let get = |path: &str| {
        Request::get(format!("http://shop{path}"))
            .body(Empty::new())
            .unwrap()
    };
    let cases: Vec<(Request<Empty<Bytes>>, Option<&str>)> = vec![
        (get("/exact"), Some("alpha")),
        (get("/exact/more"), None),
        (get("/items/42"), Some("alpha")),
        (get("/items/42x"), None),
        (
            Request::post("http://shop/api/x")
                .body(Empty::new())
                .unwrap(),
            Some("beta"),
        ),
        (get("/api/x?v=2"), Some("beta")),
        (get("/api/x?v=3"), Some("alpha")),
        (
            with_header("http://shop/api/x", "x-debug", "1"),
            Some("beta"),
        ),
        (
            with_header("http://shop/api/x", "x-debug", "0"),
            Some("alpha"),
        ),
        (get("/other"), None),
    ];
    let mut log = mesh.access_log();
    for (req, want) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let o = mesh.send(req, MAX_TIME).await;
        let l = only(&log.drain().await).clone();
        match want {
            Some(name) => {
                assert_eq!(o.code(), 200, "{what}: {o:?}");
                let body = String::from_utf8_lossy(&o.body);
                assert!(
                    body.contains(&format!("\"name\": \"{name}\"")),
                    "{what}: {body}"
                );
                let port = if name == "alpha" { alpha } else { beta };
                assert_eq!(l.upstream, addr(port), "{what}");
            }
            None => {
                assert_eq!(o.code(), 404, "{what}: {o:?}");
                assert!(l.has_flag("NR") && l.upstream == "-", "{what}: {l:?}");
            }
        }
    }
}

// 10a. HTTP/1.1 keep-alive: sequential requests share one upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("web", &[]).await;
    deploy(&mesh, "web", &[port]);
    mesh.reload();
    let outcomes = sequential(&mesh, "http://web/", 20).await;

    assert!(outcomes.iter().all(|o| o.code() == 200));
    let stats = mesh.cluster(&cluster_name("web")).stats();
    assert_eq!(
        (stats.upstream_cx_total, stats.upstream_rq_total),
        (1, 20),
        "{stats:?}"
    );
}

// 10b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_connection_one_opens_a_connection_per_request() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("web", &[]).await;
    deploy(&mesh, "web", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule(
            "web",
            "  trafficPolicy:\n    connectionPool:\n      http:\n        maxRequestsPerConnection: 1\n",
        ),
    );
    mesh.reload();
    let outcomes = sequential(&mesh, "http://web/", 20).await;

    assert!(outcomes.iter().all(|o| o.code() == 200));
    let stats = mesh.cluster(&cluster_name("web")).stats();
    assert_eq!(
        (stats.upstream_cx_total, stats.upstream_rq_total),
        (20, 20),
        "{stats:?}"
    );
}

// 11a. A prior-knowledge HTTP/2 client is served; the upstream still gets HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_reaches_an_http1_upstream() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("web", &[]).await;
    deploy(&mesh, "web", &[port]);
    mesh.reload();
    let mut log = mesh.access_log();
    let o = mesh
        .send_h2(
            Request::get("http://web/").body(Empty::new()).unwrap(),
            MAX_TIME,
        )
        .await;
    let lines = log.drain().await;

    assert_eq!(o.code(), 200, "{o:?}");
    assert!(String::from_utf8_lossy(&o.body).contains("\"name\": \"web\""));
    assert_eq!(only(&lines).upstream, addr(port));
    let cluster = mesh.cluster(&cluster_name("web"));
    assert_eq!(cluster.protocol(), sluice_upstream::UpstreamProtocol::Http1);
}

// 11b. A Service port named `http2` is reached over h2c: concurrent requests share one connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_service_port_is_reached_over_h2c() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("grpcish", &slow("100ms")).await;
    mesh.write("svc.yaml", &service("grpcish", "http2"));
    mesh.write(
        "eps.yaml",
        &endpoint_slice("grpcish", &[port]).replace("name: http\n", "name: http2\n"),
    );
    mesh.reload();
    let outcomes = join_all((0..10).map(|_| mesh.get("http://grpcish/", MAX_TIME))).await;

    assert!(outcomes.iter().all(|o| o.code() == 200), "{outcomes:#?}");
    let cluster = mesh.cluster(&cluster_name("grpcish"));
    assert_eq!(cluster.protocol(), sluice_upstream::UpstreamProtocol::H2c);
    // HTTP/1.1 would need 10 connections for 10 concurrent requests.
    let stats = cluster.stats();
    assert_eq!(
        (stats.upstream_cx_total, stats.upstream_rq_total),
        (1, 10),
        "{stats:?}"
    );
}

fn with_timeout(host: &str, timeout: &str) -> String {
    virtual_service(
        host,
        &format!("  - route:\n    - destination:\n        host: {host}\n    timeout: {timeout}\n"),
    )
}

// 12a. A bad edit is rejected with file, field and reason; the last good VirtualService stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_edit_keeps_the_last_good_policy() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("1s")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.write("vs.yaml", &with_timeout("slow", "0.3s"));
    mesh.reload();

    mesh.write("vs.yaml", &with_timeout("slow", "3 s"));
    let problems = mesh.reload_checked(true);
    let error = problems
        .iter()
        .find(|p| p.is_error())
        .unwrap_or_else(|| panic!("{problems:#?}"));
    assert_eq!(
        (error.file.as_str(), error.field.as_str()),
        ("vs.yaml", "spec.http[0].timeout"),
        "{error:?}"
    );
    assert!(
        error.reason.contains("invalid duration \"3 s\""),
        "{error:?}"
    );
    let old = mesh.get("http://slow/", MAX_TIME).await;
    assert_eq!(old.code(), 504, "the 0.3 s timeout still applies: {old:?}");
    assert!(ms(280..700).contains(&old.elapsed), "{:?}", old.elapsed);

    mesh.write("vs.yaml", &with_timeout("slow", "3s"));
    let problems = mesh.reload_checked(false);
    assert!(problems.is_empty(), "{problems:#?}");
    let new = mesh.get("http://slow/", MAX_TIME).await;
    assert_eq!(new.code(), 200, "{new:?}");
    assert!(ms(950..1500).contains(&new.elapsed), "{:?}", new.elapsed);
}

// 12b. A request finishes under the policy it started with; the next one gets the new policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_keep_their_policy_across_a_reload() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", &slow("1s")).await;
    deploy(&mesh, "slow", &[port]);
    mesh.write("vs.yaml", &with_timeout("slow", "3s"));
    mesh.reload();

    let client = mesh.client();
    let in_flight = tokio::spawn(async move { client.get("http://slow/", MAX_TIME).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    mesh.write("vs.yaml", &with_timeout("slow", "0.2s"));
    mesh.reload();
    let new = mesh.get("http://slow/", MAX_TIME).await;
    let old = in_flight.await.unwrap();

    assert_eq!(new.code(), 504, "{new:?}");
    assert!(ms(180..600).contains(&new.elapsed), "{:?}", new.elapsed);
    assert_eq!(old.code(), 200, "{old:?}");
    assert!(ms(950..1500).contains(&old.elapsed), "{:?}", old.elapsed);
}

// 13. A fault on a header-matched route only; the legacy integer `percent` of a delay still counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_matched_fault_aborts_only_matching_requests() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("web", &[]).await;
    deploy(&mesh, "web", &[port]);
    let route = "    route:\n    - destination:\n        host: web\n";
    let http = format!(
        "  - match:\n    - headers:\n        x-chaos:\n          exact: \"on\"\n    fault:\n      abort:\n        httpStatus: 503\n        percentage:\n          value: 100\n{route}  - match:\n    - headers:\n        x-chaos:\n          exact: slow\n    fault:\n      delay:\n        fixedDelay: 300ms\n        percent: 100\n{route}  - route:\n    - destination:\n        host: web\n"
    );
    mesh.write("vs.yaml", &virtual_service("web", &http));
    mesh.reload();
    let mut log = mesh.access_log();
    let chaos =
        join_all((0..10).map(|_| mesh.send(with_header("http://web/", "x-chaos", "on"), MAX_TIME)))
            .await;
    let chaos_lines = log.drain().await;
    let plain = sequential(&mesh, "http://web/", 10).await;
    let plain_lines = log.drain().await;
    let delayed = mesh
        .send(with_header("http://web/", "x-chaos", "slow"), MAX_TIME)
        .await;
    let delayed_lines = log.drain().await;

    assert!(
        chaos
            .iter()
            .all(|o| o.code() == 503 && o.body.as_ref() == b"fault filter abort"),
        "{chaos:#?}"
    );
    assert!(
        chaos_lines.len() == 10
            && chaos_lines
                .iter()
                .all(|l| l.has_flag("FI") && l.upstream == "-"),
        "{chaos_lines:#?}"
    );
    assert!(plain.iter().all(|o| o.code() == 200));
    assert!(
        plain_lines
            .iter()
            .all(|l| l.flags == "-" && l.upstream == addr(port)),
        "{plain_lines:#?}"
    );
    assert_eq!(delayed.code(), 200, "{delayed:?}");
    assert!(
        ms(290..800).contains(&delayed.elapsed),
        "{:?}",
        delayed.elapsed
    );
    let l = only(&delayed_lines);
    assert!(l.has_flag("DI") && l.upstream == addr(port), "{l:?}");
    // The upstream's time leaves the 300 ms delay out: Envoy's router gets the request after it.
    let service_ms: u64 = delayed.headers["x-envoy-upstream-service-time"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        service_ms < 250,
        "x-envoy-upstream-service-time {service_ms}"
    );
}

// 14. `maxRetries: 1`: at most one retry in flight cluster-wide; the others are not retried
// (Envoy's upstream_rq_retry_overflow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_retries_budget_overflows_under_concurrent_retries() {
    let mut mesh = Mesh::start().await;
    let port = mesh
        .fake_service(
            "web",
            &[
                ("ERROR_RATE", "1"),
                ("ERROR_TYPE", "delay"),
                ("ERROR_DELAY", "50ms"),
                ("ERROR_CODE", "503"),
            ],
        )
        .await;
    deploy(&mesh, "web", &[port]);
    mesh.write(
        "dr.yaml",
        &destination_rule(
            "web",
            "  trafficPolicy:\n    connectionPool:\n      http:\n        maxRetries: 1\n",
        ),
    );
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "web",
            "  - route:\n    - destination:\n        host: web\n    retries:\n      attempts: 3\n      retryOn: 5xx\n",
        ),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    let outcomes = join_all((0..5).map(|_| mesh.get("http://web/", MAX_TIME))).await;
    let lines = log.drain().await;

    assert!(outcomes.iter().all(|o| o.code() == 503), "{outcomes:#?}");
    let state = mesh.handler.state();
    let (_, upstream) = state
        .upstreams
        .iter()
        .find(|(k, _)| k.to_string() == cluster_name("web"))
        .unwrap();
    assert_eq!(upstream.retry_budget.max(), 1);
    // A retry refused by the budget ends the request with the upstream's 503 and flag UO (as
    // Envoy's router does on RetryStatus::NoOverflow); the others exhaust their retries (URX).
    let overflowed = lines.iter().filter(|l| l.has_flag("UO")).count();
    assert!(overflowed > 0, "{lines:#?}");
    assert_eq!(upstream.retry_budget.overflows(), overflowed as u64);
    assert!(
        lines.iter().all(|l| l.status == 503
            && ((l.has_flag("UO") && l.attempts < 4) || (l.has_flag("URX") && l.attempts == 4))),
        "{lines:#?}"
    );
}

// 2c. `attempts: 0` removes the route's retry policy (Istio sets none); Envoy still honours the
// retry headers, which bring their own conditions and count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_headers_retry_on_a_route_with_retries_disabled() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("flaky", &failing("503")).await;
    deploy(&mesh, "flaky", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "flaky",
            "  - route:\n    - destination:\n        host: flaky\n    retries:\n      attempts: 0\n",
        ),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    let req = Request::get("http://flaky/")
        .header("x-envoy-retry-on", "5xx")
        .header("x-envoy-max-retries", "2")
        .body(Empty::new())
        .unwrap();
    let o = mesh.send(req, MAX_TIME).await;
    let lines = log.drain().await;

    assert_eq!(o.code(), 503, "{o:?}");
    let l = only(&lines);
    assert!(l.attempts == 3 && l.has_flag("URX"), "{l:?}");
}

// 15. `directResponse`: the proxy answers by itself (the service has no endpoint at all), with the
// route's response headers (Istio refuses a fault on such a route: see the config tests). Logged
// with no upstream or cluster and `details=direct_response`, counted under the service the request
// was routed to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_response_is_answered_by_the_proxy() {
    let mut mesh = Mesh::start().await;
    deploy(&mesh, "web", &[]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "web",
            "  - match:\n    - uri:\n        exact: /health\n    directResponse:\n      status: 200\n      body:\n        string: ok\n    headers:\n      response:\n        set:\n          x-served-by: sluice\n        add:\n          cache-control: no-store\n  - match:\n    - uri:\n        prefix: /teapot\n    directResponse:\n      status: 418\n      body:\n        bytes: dGVhcG90\n  - route:\n    - destination:\n        host: web\n",
        ),
    );
    mesh.reload();
    let mut log = mesh.access_log();
    let ok = mesh.get("http://web/health", MAX_TIME).await;
    let teapot = mesh.get("http://web/teapot/x", MAX_TIME).await;
    // The last route has no direct response: no endpoint, Envoy's 503 UH.
    let proxied = mesh.get("http://web/other", MAX_TIME).await;
    let lines = log.drain().await;

    assert_eq!(ok.code(), 200, "{ok:?}");
    assert_eq!(ok.body.as_ref(), b"ok");
    assert_eq!(ok.headers["content-type"], "text/plain");
    assert_eq!(ok.headers["content-length"], "2");
    assert_eq!(ok.headers["x-served-by"], "sluice");
    assert_eq!(ok.headers["cache-control"], "no-store");
    assert!(ok.elapsed < Duration::from_millis(300), "{:?}", ok.elapsed);
    assert_eq!(teapot.code(), 418, "{teapot:?}");
    assert_eq!(teapot.body.as_ref(), b"teapot");
    assert_eq!(proxied.code(), 503, "{proxied:?}");

    assert_eq!(lines.len(), 3, "{lines:#?}");
    let svc = "web.default.svc.cluster.local";
    let (l0, l1) = (&lines[0], &lines[1]);
    assert_eq!(
        (
            l0.status,
            l0.flags.as_str(),
            l0.attempts,
            l0.upstream.as_str()
        ),
        (200, "-", 0, "-"),
        "{l0:?}"
    );
    assert_eq!(
        (l0.details.as_deref(), l0.service.as_str()),
        (Some("direct_response"), svc)
    );
    assert_eq!(
        (l1.status, l1.flags.as_str(), l1.attempts),
        (418, "-", 0),
        "{l1:?}"
    );
    assert_eq!(l1.details.as_deref(), Some("direct_response"));
    assert!(
        lines[2].has_flag("UH") && lines[2].details.is_none(),
        "{lines:#?}"
    );

    let m = mesh.metrics();
    for (code, flags) in [("200", "-"), ("418", "-")] {
        let want = [
            "reporter=\"source\"".to_string(),
            format!("destination_service=\"{svc}\",destination_service_name=\"web\",destination_service_namespace=\"default\",request_protocol=\"http\",response_code=\"{code}\""),
            format!("response_flags=\"{flags}\""),
        ];
        assert!(
            m.lines().any(|l| l.starts_with("istio_requests_total{")
                && want.iter().all(|w| l.contains(w.as_str()))
                && l.ends_with("} 1")),
            "{want:?}\n{m}"
        );
    }
}

// 16. `headers.response` on a proxied route: removals, then `set`, then `add`, on the upstream's
// response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_apply_to_upstream_responses() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("web", &[]).await;
    deploy(&mesh, "web", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "web",
            "  - route:\n    - destination:\n        host: web\n    headers:\n      response:\n        set:\n          content-type: text/x-sluice\n        add:\n          x-route: web\n        remove:\n        - content-length\n",
        ),
    );
    mesh.reload();
    let o = mesh.get("http://web/", MAX_TIME).await;
    assert_eq!(o.code(), 200, "{o:?}");
    assert_eq!(o.headers["content-type"], "text/x-sluice");
    assert_eq!(o.headers["x-route"], "web");
    assert!(
        String::from_utf8_lossy(&o.body).contains("\"web\""),
        "{o:?}"
    );
}

// A `match` with `sourceLabels`/`sourceNamespace` applies only to clients it fits: the client is
// known by its Pod (here the Pod whose IP the test's connections come from).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_label_matches_apply_to_the_pods_they_fit() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("pricing", &[]).await;
    deploy(&mesh, "pricing", &[port]);
    mesh.write(
        "vs.yaml",
        &virtual_service(
            "pricing",
            "  - match: [{sourceLabels: {app: batch}}]\n    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: pricing}}]\n  - route: [{destination: {host: pricing}}]\n",
        ),
    );
    let client = |app: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: default\n  labels: {{app: {app}}}\nstatus:\n  podIP: 127.0.0.1\n")
    };
    mesh.write("client.yaml", &client("batch"));
    mesh.reload();
    assert_eq!(mesh.get("http://pricing/", MAX_TIME).await.code(), 418);

    // Relabelled: the first route's only match no longer fits, so the route is skipped.
    mesh.write("client.yaml", &client("web"));
    mesh.reload();
    assert_eq!(mesh.get("http://pricing/", MAX_TIME).await.code(), 200);

    // An unknown client fits no source condition either.
    mesh.remove("client.yaml");
    mesh.reload();
    assert_eq!(mesh.get("http://pricing/", MAX_TIME).await.code(), 200);
}
