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
