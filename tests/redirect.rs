//! Redirected connections, in-process: routing by original destination, protocol detection and the
//! L4 proxy. Each proxy listener here is given a [`FixedDst`], a test `OriginalDst` that says every
//! connection it accepts was originally addressed to one chosen destination. It stands in only for
//! the kernel's lookup (eBPF map / `SO_ORIGINAL_DST`); the real redirect is tested end to end in
//! network namespaces, as root, by `agent/redirect/tests` and `tests/e2e.rs`.
//!
//! Cluster IPs (10.96.0.0/16) are never connected to: the proxy maps them to their endpoints, which
//! are loopback servers started here.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sluice_config::{BuildOptions, ConfigDir, Severity};
use sluice_proxy::server::OriginalDst;
use sluice_proxy::{AccessLog, Handler, HandlerOptions, Metrics, RedirectOptions};
use sluice_tests::refusing_port;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const MAX_TIME: Duration = Duration::from_secs(5);

/// Every connection accepted on the listener it serves was originally addressed to `.0`.
struct FixedDst(SocketAddr);

impl OriginalDst for FixedDst {
    fn original_dst(&self, _stream: &TcpStream) -> Option<SocketAddr> {
        Some(self.0)
    }
}

/// One node's proxy over a config directory, with as many redirecting listeners as a test wants.
struct Node {
    dir: tempfile::TempDir,
    config: ConfigDir,
    handler: Arc<Handler>,
    log: sluice_telemetry::Listener<Arc<str>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// A direct connection: the kernel knows no original destination for it.
struct NoDst;

impl OriginalDst for NoDst {
    fn original_dst(&self, _stream: &TcpStream) -> Option<SocketAddr> {
        None
    }
}

impl Node {
    /// A node whose redirecting listeners serve any client: the clients here are loopback
    /// sockets standing in for pods, with a Pod object only where a test wants one. The rule that
    /// a redirecting listener serves only enrolled pods is shown by the `*_no_open_relay*` tests
    /// (with [`Node::enforcing`]).
    fn start(redirect: RedirectOptions) -> Self {
        Self::enforcing(RedirectOptions {
            enrolled_clients_only: false,
            ..redirect
        })
    }

    /// A node with the redirect options as given (the relay rule on unless they turn it off).
    fn enforcing(redirect: RedirectOptions) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ConfigDir::new(dir.path().to_path_buf(), BuildOptions::default());
        let handler = Arc::new(
            Handler::new(
                HandlerOptions::default(),
                AccessLog::new(false),
                Metrics::new(),
            )
            .with_redirect_options(redirect),
        );
        let log = handler.access_log().subscribe();
        let (shutdown, _) = watch::channel(false);
        Self {
            dir,
            config,
            handler,
            log,
            shutdown,
            tasks: Vec::new(),
        }
    }

    fn write(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.path().join(file), yaml).expect("write config");
    }

    fn reload(&mut self) {
        let outcome = self.config.reload();
        let errors: Vec<_> = outcome
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .collect();
        assert!(errors.is_empty(), "config errors: {errors:#?}");
        self.handler.apply(outcome.snapshot);
    }

    /// A proxy listener whose connections were all originally addressed to `dst` (`None`: to the
    /// listener itself).
    async fn redirecting_to(&mut self, dst: Option<SocketAddr>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        self.serving(listener, Arc::new(FixedDst(dst.unwrap_or(addr))))
    }

    /// Serves `listener` as a redirecting listener whose original destinations `dst` finds.
    fn serving(&mut self, listener: TcpListener, dst: Arc<dyn OriginalDst>) -> SocketAddr {
        let addr = listener.local_addr().unwrap();
        self.tasks.push(tokio::spawn(sluice_proxy::server::serve(
            listener,
            self.handler.clone(),
            Some(dst),
            Default::default(),
            self.shutdown.subscribe(),
            Duration::from_secs(1),
        )));
        addr
    }

    /// The next `n` access-log lines (waits up to [`MAX_TIME`] for them).
    async fn lines(&mut self, n: usize) -> Vec<String> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            match tokio::time::timeout(MAX_TIME, self.log.recv()).await {
                Ok(Ok(line)) => out.push(line.to_string()),
                other => panic!("waiting for {n} log lines, got {out:#?} then {other:?}"),
            }
        }
        out
    }

    fn cluster(&self, name: &str) -> sluice_upstream::ClusterHandle {
        sluice_tests::cluster_of(&self.handler, name)
    }

    fn metrics(&self) -> String {
        self.handler.prometheus_text()
    }

    /// A fake-service instance named `name` on loopback.
    fn fake_service(&mut self, name: &str) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind service");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let name = name.to_owned();
        let cfg = fake_service::Config::from_lookup(|k| (k == "NAME").then(|| name.clone()))
            .expect("fake-service config");
        self.tasks.push(tokio::spawn(async move {
            let _ = fake_service::serve(cfg, listener).await;
        }));
        addr
    }

    /// A TCP server that echoes what it reads; with `greeting`, it speaks first (SMTP-like).
    fn echo(&mut self, greeting: Option<&'static [u8]>) -> SocketAddr {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind echo");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        self.tasks.push(tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Some(greeting) = greeting {
                        if stream.write_all(greeting).await.is_err() {
                            return;
                        }
                    }
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        }));
        addr
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A Service with a cluster IP and one port.
fn service(name: &str, cluster_ip: &str, port: u16, port_name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {cluster_ip}\n  ports:\n  - name: {port_name}\n    port: {port}\n    targetPort: 9000\n"
    )
}

/// An EndpointSlice for `service`'s port `port_name`, one endpoint per loopback address.
fn endpoints(service: &str, port_name: &str, addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{i}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n- addresses: [\"{}\"]\n  conditions: {{ready: true}}\nports:\n- name: {port_name}\n  port: {}\n",
                a.ip(),
                a.port()
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

fn deploy(node: &Node, name: &str, ip: &str, port: u16, port_name: &str, eps: &[SocketAddr]) {
    node.write(
        &format!("{name}.yaml"),
        &format!(
            "{}---\n{}",
            service(name, ip, port, port_name),
            endpoints(name, port_name, eps)
        ),
    );
}

fn destination_rule(host: &str, traffic_policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  host: {host}\n  trafficPolicy:\n{traffic_policy}"
    )
}

fn dst(s: &str) -> Option<SocketAddr> {
    Some(s.parse().unwrap())
}

/// An HTTP/1.1 request as a redirected client sends it: origin form, its own `Host`.
async fn get(proxy: SocketAddr, host: &str) -> (StatusCode, Bytes) {
    tokio::time::timeout(MAX_TIME, async move {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/")
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let rsp = tx.send_request(req).await.unwrap();
        let status = rsp.status();
        (status, rsp.into_body().collect().await.unwrap().to_bytes())
    })
    .await
    .expect("response in time")
}

/// Sends `msg`, half-closes, and reads until the proxy closes: what came back.
async fn tcp_exchange(proxy: SocketAddr, msg: &[u8]) -> Vec<u8> {
    tokio::time::timeout(MAX_TIME, async move {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        // The proxy may already have closed a refused connection: errors here are its answer.
        let _ = stream.write_all(msg).await;
        let _ = stream.shutdown().await;
        let mut back = Vec::new();
        let _ = stream.read_to_end(&mut back).await;
        back
    })
    .await
    .expect("connection ends in time")
}

/// `received=N sent=M` of a TCP access-log line.
fn bytes_of(line: &str) -> (u64, u64) {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|t| t.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("received="), field("sent="))
}

fn metric(metrics: &str, name: &str, labels: &[&str]) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ip_selects_the_service_whatever_the_host_header() {
    let mut node = Node::start(RedirectOptions::default());
    let web = node.fake_service("web");
    let other = node.fake_service("other");
    deploy(&node, "web", "10.96.0.10", 80, "http", &[web]);
    deploy(&node, "other", "10.96.0.20", 80, "http", &[other]);
    // The authority still matters to the routes of the service the destination chose.
    node.write(
        "web-vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: default\nspec:\n  hosts:\n  - web\n  http:\n  - match:\n    - authority:\n        exact: shop.example\n    route:\n    - destination:\n        host: web\n  - fault:\n      abort:\n        httpStatus: 418\n        percentage:\n          value: 100\n    route:\n    - destination:\n        host: web\n",
    );
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.10:80")).await;

    let (status, _) = get(proxy, "unrelated.example").await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    // Even a Host naming another service does not move the request off the destination's routes.
    let (status, _) = get(proxy, "other").await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    let (status, body) = get(proxy, "shop.example").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&body).contains("\"web\""),
        "{body:?}"
    );

    let lines = node.lines(3).await;
    assert!(lines[0].contains(" 418 FI "), "{lines:#?}");
    assert!(lines[1].contains(" 418 FI ") && lines[1].contains("\"other\""));
    assert!(lines[2].contains(" 200 - ") && lines[2].contains(&format!("\"{web}\"")));
    assert!(lines
        .iter()
        .all(|l| l.ends_with(" web.default.svc.cluster.local")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_destinations_pass_through_unchanged() {
    let mut node = Node::start(RedirectOptions::default());
    let web = node.fake_service("web");
    deploy(&node, "web", "10.96.0.10", 80, "http", &[web]);
    // A fault on the service: a request addressed to its pod directly does not get it.
    node.write(
        "web-vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: default\nspec:\n  hosts:\n  - web\n  http:\n  - fault:\n      abort:\n        httpStatus: 418\n        percentage:\n          value: 100\n    route:\n    - destination:\n        host: web\n",
    );
    node.reload();
    let to_pod = node.redirecting_to(Some(web)).await;
    let dead = SocketAddr::from(([127, 0, 0, 1], refusing_port()));
    let to_nothing = node.redirecting_to(Some(dead)).await;

    let (status, body) = get(to_pod, "web").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    // No policy: no retries, the connect failure is the answer.
    let (status, _) = get(to_nothing, "web").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    let lines = node.lines(2).await;
    assert!(
        lines[0].contains(" 200 - attempts=1 ")
            && lines[0].contains(&format!("\"{web}\" PassthroughCluster "))
            && lines[0].ends_with(" -"),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains(" 503 UF attempts=1 ")
            && lines[1].contains(&format!("\"{dead}\" PassthroughCluster ")),
        "{lines:#?}"
    );
    let m = node.metrics();
    assert_eq!(
        metric(
            &m,
            "istio_requests_total",
            &[
                "reporter=\"source\"",
                "destination_service=\"PassthroughCluster\"",
                "response_code=\"200\""
            ]
        ),
        Some(1),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_bytes_to_a_cluster_ip_are_proxied_at_l4() {
    let mut node = Node::start(RedirectOptions::default());
    let echo = node.echo(None);
    // The port name declares no protocol: the first bytes decide.
    deploy(&node, "echo", "10.96.0.11", 7000, "echo", &[echo]);
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.11:7000")).await;

    let msg = b"hello sluice\n";
    let back = tcp_exchange(proxy, msg).await;
    assert_eq!(back, msg);

    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains("\"- - -\" 0 - attempts=1 ")
            && line.contains(&format!(
                "\"{echo}\" outbound|7000||echo.default.svc.cluster.local \"-\" echo.default.svc.cluster.local"
            )),
        "{line}"
    );
    assert_eq!(bytes_of(&line), (13, 13), "{line}");
    let m = node.metrics();
    let svc = "destination_service=\"echo.default.svc.cluster.local\"";
    let tcp = "request_protocol=\"tcp\"";
    for (name, want) in [
        ("istio_tcp_connections_opened_total", 1),
        ("istio_tcp_connections_closed_total", 1),
        ("istio_tcp_received_bytes_total", 13),
        ("istio_tcp_sent_bytes_total", 13),
    ] {
        // Under both reporters: the client's side and the endpoint's.
        for reporter in ["reporter=\"source\"", "reporter=\"destination\""] {
            let got = metric(&m, name, &[reporter, svc, tcp]);
            assert_eq!(got, Some(want), "{name} {reporter}: {m}");
        }
    }
    let stats = node
        .cluster("outbound|7000||echo.default.svc.cluster.local")
        .stats();
    assert_eq!((stats.upstream_cx_total, stats.upstream_cx_active), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_first_protocols_go_l4_after_the_detection_timeout() {
    let timeout = Duration::from_millis(300);
    let mut node = Node::start(RedirectOptions {
        protocol_detection_timeout: timeout,
        ..RedirectOptions::default()
    });
    let mail = node.echo(Some(b"220 ready\r\n"));
    deploy(&node, "mail", "10.96.0.12", 25, "mail", &[mail]);
    // The same server behind a port that declares `tcp`: no detection, no wait.
    deploy(&node, "mail-tcp", "10.96.0.13", 25, "tcp-mail", &[mail]);
    node.reload();
    let undeclared = node.redirecting_to(dst("10.96.0.12:25")).await;
    let declared = node.redirecting_to(dst("10.96.0.13:25")).await;

    let greeting = |proxy: SocketAddr| async move {
        let start = Instant::now();
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        let mut buf = [0u8; 11];
        tokio::time::timeout(MAX_TIME, stream.read_exact(&mut buf))
            .await
            .expect("greeting in time")
            .unwrap();
        assert_eq!(&buf, b"220 ready\r\n");
        (start.elapsed(), stream)
    };
    let (waited, stream) = greeting(undeclared).await;
    assert!(waited >= timeout, "greeting after {waited:?}");
    drop(stream);
    let (waited, stream) = greeting(declared).await;
    assert!(waited < timeout, "declared tcp waited {waited:?}");
    drop(stream);

    // Lines come as connections end; the duration counts from accept, detection included.
    let mut lines = node.lines(2).await;
    lines.sort_by_key(|l| l.ends_with(" mail-tcp.default.svc.cluster.local"));
    assert!(
        lines[0].ends_with(" mail.default.svc.cluster.local"),
        "{lines:#?}"
    );
    assert!(lines[1].ends_with(" mail-tcp.default.svc.cluster.local"));
    let duration = |l: &str| -> u64 {
        l.split_whitespace()
            .find_map(|t| {
                t.strip_prefix("duration=")?
                    .strip_suffix("ms")?
                    .parse()
                    .ok()
            })
            .unwrap()
    };
    assert!(duration(&lines[0]) >= 300, "{lines:#?}");
    for l in &lines {
        assert_eq!(bytes_of(l), (0, 11), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_failure_is_uf_and_ejects_the_host() {
    let mut node = Node::start(RedirectOptions::default());
    let live = node.echo(None);
    let dead = SocketAddr::from(([127, 0, 0, 1], refusing_port()));
    deploy(&node, "echo", "10.96.0.11", 7000, "echo", &[live, dead]);
    node.write(
        "echo-dr.yaml",
        &destination_rule(
            "echo",
            "    loadBalancer:\n      simple: ROUND_ROBIN\n    outlierDetection:\n      consecutive5xxErrors: 1\n      interval: 10s\n      baseEjectionTime: 30s\n      maxEjectionPercent: 100\n",
        ),
    );
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.11:7000")).await;

    // Envoy's TCP proxy makes one connect attempt by default: a connection that draws the dead
    // host fails (round robin draws it within two), and that failure ejects it.
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        outcomes.push(tcp_exchange(proxy, b"ping").await);
    }
    let lines = node.lines(6).await;
    let failed: Vec<_> = lines.iter().filter(|l| l.contains(" UF ")).collect();
    assert_eq!(failed.len(), 1, "{lines:#?}");
    assert!(failed[0].contains(&format!("\"{dead}\"")) && failed[0].contains(" 0 UF attempts=1 "));
    let empty = outcomes.iter().filter(|o| o.is_empty()).count();
    assert_eq!(empty, 1, "the failed connection is closed: {outcomes:?}");
    assert!(outcomes
        .iter()
        .filter(|o| !o.is_empty())
        .all(|o| o == b"ping"));
    assert!(lines
        .iter()
        .filter(|l| !l.contains(" UF "))
        .all(|l| l.contains(&format!("\"{live}\""))));

    let cluster = node.cluster("outbound|7000||echo.default.svc.cluster.local");
    assert_eq!(cluster.stats().upstream_cx_connect_fail, 1);
    let dead_host = cluster
        .hosts()
        .into_iter()
        .find(|h| h.addr == dead)
        .unwrap();
    assert!(dead_host.ejected, "{dead_host:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connect_failure_moves_to_another_host_with_more_attempts() {
    let mut node = Node::start(RedirectOptions {
        tcp_max_connect_attempts: 2,
        ..RedirectOptions::default()
    });
    let live = node.echo(None);
    let dead = SocketAddr::from(([127, 0, 0, 1], refusing_port()));
    deploy(&node, "echo", "10.96.0.11", 7000, "echo", &[dead, live]);
    node.write(
        "echo-dr.yaml",
        &destination_rule("echo", "    loadBalancer:\n      simple: ROUND_ROBIN\n"),
    );
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.11:7000")).await;

    for _ in 0..6 {
        assert_eq!(tcp_exchange(proxy, b"ping").await, b"ping");
    }
    let lines = node.lines(6).await;
    assert!(
        lines
            .iter()
            .all(|l| l.contains(&format!("\"{live}\"")) && l.contains("\"- - -\" 0 - ")),
        "{lines:#?}"
    );
    let retried = lines.iter().filter(|l| l.contains(" attempts=2 ")).count();
    assert!(
        retried > 0,
        "round robin never drew the dead host: {lines:#?}"
    );
    let stats = node
        .cluster("outbound|7000||echo.default.svc.cluster.local")
        .stats();
    assert_eq!(stats.upstream_cx_connect_fail, retried as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_overflow_closes_with_uo() {
    let mut node = Node::start(RedirectOptions::default());
    let echo = node.echo(None);
    deploy(&node, "echo", "10.96.0.11", 7000, "echo", &[echo]);
    node.write(
        "echo-dr.yaml",
        &destination_rule(
            "echo",
            "    connectionPool:\n      tcp:\n        maxConnections: 1\n",
        ),
    );
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.11:7000")).await;

    // The first connection holds the only slot.
    let mut first = TcpStream::connect(proxy).await.unwrap();
    first.write_all(b"one").await.unwrap();
    let mut buf = [0u8; 3];
    tokio::time::timeout(MAX_TIME, first.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    // The second is closed at once.
    assert_eq!(tcp_exchange(proxy, b"two").await, b"");
    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains("\"- - -\" 0 UO attempts=1 ") && line.contains("\"-\" outbound|7000||echo"),
        "{line}"
    );
    let cluster = node.cluster("outbound|7000||echo.default.svc.cluster.local");
    assert_eq!(cluster.stats().upstream_cx_overflow, 1);

    // Once the first ends, the slot is free again.
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    first.read_to_end(&mut rest).await.unwrap();
    drop(first);
    let line = node.lines(1).await.remove(0);
    assert_eq!(bytes_of(&line), (3, 3), "{line}");
    assert_eq!(tcp_exchange(proxy, b"three").await, b"three");
    assert_eq!(cluster.stats().upstream_cx_overflow, 1);
}

/// A pod's L4 connections take from its budget of upstream connections: past it, a connection is
/// closed with `OM` (`overload_pod_upstream_connections`) and never reaches the destination,
/// while another pod's connection goes through; a slot frees when a connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_l4_connections_past_its_upstream_budget_close_with_om() {
    let mut node = Node::start(RedirectOptions::default());
    node.handler = Arc::new(
        Handler::new(
            HandlerOptions::default(),
            AccessLog::new(false),
            Metrics::new(),
        )
        .with_redirect_options(RedirectOptions {
            enrolled_clients_only: false,
            ..RedirectOptions::default()
        })
        .with_isolation(sluice_proxy::IsolationLimits {
            max_upstream_connections_per_pod: 2,
            ..Default::default()
        }),
    );
    node.log = node.handler.access_log().subscribe();
    let echo = node.echo(None);
    deploy(&node, "echo", "10.96.0.11", 7000, "echo", &[echo]);
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.11:7000")).await;

    let mut held = Vec::new();
    for msg in [b"one", b"two"] {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(msg).await.unwrap();
        let mut buf = [0u8; 3];
        tokio::time::timeout(MAX_TIME, s.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        held.push(s);
    }
    // Both are listed with their two ends, at L4, with the bytes each way (a count may land a
    // moment after the client has the bytes: the proxy counts once its write returns).
    let handler = node.handler.clone();
    let tcp = move || {
        handler
            .open_connections()
            .into_iter()
            .filter(|c| c.protocol == sluice_telemetry::Protocol::Tcp)
            .collect::<Vec<_>>()
    };
    let bytes = |c: &sluice_telemetry::recent::OpenConnection| {
        (
            c.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
            c.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    sluice_tests::wait_until("both ends counted", MAX_TIME, || {
        let open = tcp();
        open.len() == 4 && open.iter().all(|c| bytes(c) == (3, 3))
    })
    .await;
    let upstream_ends = tcp()
        .into_iter()
        .filter(|c| c.side == sluice_telemetry::recent::Side::Upstream)
        .filter(|c| c.peer == Some(echo))
        .count();
    assert_eq!(upstream_ends, 2);
    // The third from the same pod (127.0.0.1) is closed at once.
    assert_eq!(tcp_exchange(proxy, b"three").await, b"");
    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains(" 0 OM attempts=0 ")
            && line.contains("details=overload_pod_upstream_connections"),
        "{line}"
    );
    // Another pod is not held to this one's budget.
    assert_eq!(exchange_from("127.0.0.5", proxy, b"other").await, b"other");
    let _ = node.lines(1).await;
    // One ends: the pod has a slot again.
    drop(held.pop());
    let _ = node.lines(1).await;
    assert_eq!(tcp_exchange(proxy, b"four").await, b"four");
    assert_eq!(
        node.handler
            .isolation()
            .shed_count(sluice_core::Overload::PodUpstreamConnections),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_guard_refuses_the_proxys_own_listener() {
    let mut node = Node::start(RedirectOptions::default());
    node.reload();
    let proxy = node.redirecting_to(None).await;

    let (status, body) = get(proxy, "anything").await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("loop"), "{body:?}");
    assert_eq!(tcp_exchange(proxy, b"not http\n").await, b"");

    let lines = node.lines(2).await;
    assert!(
        lines[0].contains(" 502 - ") && lines[0].contains(" BlackHoleCluster "),
        "{lines:#?}"
    );
    assert!(
        lines[1].contains("\"- - -\" 0 ") && lines[1].contains(" BlackHoleCluster "),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_on_an_undeclared_port_is_detected_and_gets_the_routes() {
    let mut node = Node::start(RedirectOptions::default());
    let web = node.fake_service("web");
    // Port name `web` declares nothing: the request line is what makes this HTTP.
    deploy(&node, "web", "10.96.0.10", 8080, "web", &[web]);
    node.write(
        "web-vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\n  namespace: default\nspec:\n  hosts:\n  - web\n  http:\n  - fault:\n      abort:\n        httpStatus: 418\n        percentage:\n          value: 100\n    route:\n    - destination:\n        host: web\n",
    );
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.10:8080")).await;

    let (status, _) = get(proxy, "10.96.0.10:8080").await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains("\"GET / HTTP/1.1\" 418 FI ")
            && line.ends_with(" web.default.svc.cluster.local"),
        "{line}"
    );
}

/// A Pod at 127.0.0.1 (every test client's address) with `labels`, in namespace default.
fn client_pod(labels: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: default\n  labels: {labels}\nstatus:\n  podIP: 127.0.0.1\n")
}

/// Connects through `proxy` and reads the one-byte greeting that names the backend.
async fn greeted_by(proxy: SocketAddr) -> u8 {
    tokio::time::timeout(MAX_TIME, async move {
        let mut stream = TcpStream::connect(proxy).await.unwrap();
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).await.unwrap();
        b[0]
    })
    .await
    .expect("greeting in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_choose_the_cluster_by_source_and_port() {
    let mut node = Node::start(RedirectOptions::default());
    let stable = node.echo(Some(b"S"));
    let canary = node.echo(Some(b"C"));
    deploy(&node, "db", "10.96.0.30", 5432, "tcp-db", &[stable]);
    deploy(&node, "db-canary", "10.96.0.31", 5432, "tcp-db", &[canary]);
    node.write(
        "db-vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: db\n  namespace: default\nspec:\n  hosts:\n  - db\n  tcp:\n  - match:\n    - port: 9999\n    route:\n    - destination:\n        host: db-canary\n  - match:\n    - sourceLabels:\n        app: batch\n      port: 5432\n    route:\n    - destination:\n        host: db-canary\n        port:\n          number: 5432\n",
    );
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.30:5432")).await;

    // The client is no known pod: no source rule matches, the service's own endpoints answer.
    assert_eq!(greeted_by(proxy).await, b'S');
    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains(" outbound|5432||db.default.svc.cluster.local "),
        "{line}"
    );

    // Now it is a pod labelled app=batch: the second rule sends it to the canary service.
    node.write("client.yaml", &client_pod("{app: batch}"));
    node.reload();
    assert_eq!(greeted_by(proxy).await, b'C');
    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains(&format!(
            "\"{canary}\" outbound|5432||db-canary.default.svc.cluster.local "
        )) && line.ends_with(" db.default.svc.cluster.local"),
        "{line}"
    );

    // Other labels: no rule, the default cluster again.
    node.write("client.yaml", &client_pod("{app: web}"));
    node.reload();
    assert_eq!(greeted_by(proxy).await, b'S');
}

/// An echo Service at 10.96.0.11:7000 (declared `tcp`) whose DestinationRule sets
/// `connectionPool.tcp` to `tcp`, and a listener whose connections were addressed to it.
async fn echo_with_tcp_pool(tcp: &str) -> (Node, SocketAddr) {
    let mut node = Node::start(RedirectOptions::default());
    let echo = node.echo(None);
    deploy(&node, "echo", "10.96.0.11", 7000, "tcp-echo", &[echo]);
    node.write(
        "echo-dr.yaml",
        &destination_rule("echo", &format!("    connectionPool:\n      tcp: {tcp}\n")),
    );
    node.reload();
    let proxy = node.redirecting_to(dst("10.96.0.11:7000")).await;
    (node, proxy)
}

/// `envoy_tcp_<name>` of the echo service's cluster.
fn echo_tcp_stat(node: &Node, name: &str) -> Option<u64> {
    let series = format!(
        "envoy_tcp_{name}{{envoy_tcp_prefix=\"outbound|7000||echo.default.svc.cluster.local\"}}"
    );
    metric(&node.metrics(), &series, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_idle_timeout_closes_a_silent_connection() {
    let (mut node, proxy) = echo_with_tcp_pool("{idleTimeout: 300ms}").await;

    let start = Instant::now();
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut back = Vec::new();
    // The echo answers, then nothing moves: the proxy closes both sides at the idle timeout.
    tokio::time::timeout(MAX_TIME, stream.read_to_end(&mut back))
        .await
        .expect("closed by the proxy")
        .unwrap();
    let waited = start.elapsed();
    assert_eq!(back, b"ping");
    assert!(
        (Duration::from_millis(300)..Duration::from_millis(2000)).contains(&waited),
        "{waited:?}"
    );
    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains("\"- - -\" 0 - attempts=1 ")
            && line.contains(" details=tcp_session_idle_timeout "),
        "{line}"
    );
    assert_eq!(bytes_of(&line), (4, 4), "{line}");
    assert_eq!(echo_tcp_stat(&node, "idle_timeout"), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_max_connection_duration_closes_a_busy_connection_with_dt() {
    let (mut node, proxy) =
        echo_with_tcp_pool("{idleTimeout: 200ms, maxConnectionDuration: 600ms}").await;

    let start = Instant::now();
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    // A byte every 50 ms keeps it from idling; the duration limit still ends it.
    let mut echoed = 0;
    let closed_at = loop {
        if start.elapsed() > MAX_TIME {
            panic!("not closed within {MAX_TIME:?}");
        }
        if stream.write_all(b"x").await.is_err() {
            break start.elapsed();
        }
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break start.elapsed(),
            Ok(Ok(_)) => {
                echoed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(_) => {}
        }
    };
    assert!(
        (Duration::from_millis(600)..Duration::from_millis(2000)).contains(&closed_at),
        "{closed_at:?}"
    );
    assert!(echoed >= 4, "{echoed}");
    let line = node.lines(1).await.remove(0);
    assert!(line.contains("\"- - -\" 0 DT attempts=1 "), "{line}");
    assert_eq!(
        echo_tcp_stat(&node, "max_downstream_connection_duration"),
        Some(1)
    );
}

/// A Pod `name` at `ip` in namespace default: enrolled (`istio.io/dataplane-mode: ambient`) or
/// not, sharing the node's network namespace or not.
fn pod_at(name: &str, ip: &str, enrolled: bool, host_network: bool) -> String {
    let mode = if enrolled { "ambient" } else { "none" };
    format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    istio.io/dataplane-mode: {mode}\nspec:\n  hostNetwork: {host_network}\nstatus:\n  phase: Running\n  podIP: {ip}\n")
}

/// Connects to `proxy` from the loopback address `from`, sends `msg`, half-closes, and reads
/// until the proxy closes: what came back (nothing when it refused the connection).
async fn exchange_from(from: &str, proxy: SocketAddr, msg: &[u8]) -> Vec<u8> {
    tokio::time::timeout(MAX_TIME, async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        let mut stream = socket.connect(proxy).await.unwrap();
        // A refused connection may already be closed: errors are the proxy's answer.
        let _ = stream.write_all(msg).await;
        let _ = stream.shutdown().await;
        let mut back = Vec::new();
        let _ = stream.read_to_end(&mut back).await;
        back
    })
    .await
    .expect("connection ends in time")
}

/// `sluice_outbound_refused_connections_total{reason="<reason>"}`.
fn refused(node: &Node, reason: &str) -> Option<u64> {
    metric(
        &node.metrics(),
        "sluice_outbound_refused_connections_total",
        &[&format!("reason=\"{reason}\"")],
    )
}

/// The relay rule of a redirecting listener (eBPF mode): a connection is served only when its
/// original destination is known and its client is an enrolled pod of this node. Anyone else
/// (an address no pod has, an unenrolled pod, a hostNetwork pod that shares the node's
/// address, and anyone connecting straight to the listener) cannot use the proxy to reach an
/// arbitrary destination: the connection is closed unanswered, counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_open_relay_only_enrolled_pods_redirected_connections_are_served() {
    let mut node = Node::enforcing(RedirectOptions::default());
    // An arbitrary destination (no Service: the passthrough cluster), counting its connections.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    target.set_nonblocking(true).unwrap();
    let target_addr = target.local_addr().unwrap();
    let target = TcpListener::from_std(target).unwrap();
    let reached = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = reached.clone();
    node.tasks.push(tokio::spawn(async move {
        while let Ok((mut stream, _)) = target.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    }));
    let reached = move || reached.load(std::sync::atomic::Ordering::SeqCst);
    node.write(
        "pods.yaml",
        &[
            pod_at("client", "127.0.0.1", true, false),
            pod_at("plain", "127.0.0.3", false, false),
            pod_at("host-agent", "127.0.0.4", true, true),
        ]
        .join("---\n"),
    );
    node.reload();
    let redirected = node.redirecting_to(Some(target_addr)).await;
    let direct = node.serving(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Arc::new(NoDst),
    );

    // The enrolled pod's redirected connection reaches the destination.
    assert_eq!(
        exchange_from("127.0.0.1", redirected, b"ping").await,
        b"ping"
    );
    assert_eq!(reached(), 1);
    let line = node.lines(1).await.remove(0);
    assert!(line.contains("\"- - -\" 0 - attempts=1 "), "{line}");

    // Nobody else's does: no pod, an unenrolled pod, a hostNetwork pod (the node's address).
    for from in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        assert_eq!(
            exchange_from(from, redirected, b"ping").await,
            b"",
            "from {from}"
        );
        let line = node.lines(1).await.remove(0);
        assert!(
            line.contains("\"- - -\" 0 NR attempts=0 ")
                && line.contains(" details=client_not_enrolled "),
            "{line}"
        );
    }
    // A connection straight to the listener has no original destination: refused even from the
    // enrolled pod, even asking as an explicit proxy client would.
    let explicit = format!("GET http://{target_addr}/ HTTP/1.1\r\nHost: {target_addr}\r\n\r\n");
    assert_eq!(
        exchange_from("127.0.0.1", direct, explicit.as_bytes()).await,
        b""
    );
    let line = node.lines(1).await.remove(0);
    assert!(
        line.contains(" NR ") && line.contains(" details=no_original_destination "),
        "{line}"
    );
    assert_eq!(reached(), 1, "a refused client reached the destination");
    assert_eq!(refused(&node, "client_not_enrolled"), Some(3));
    assert_eq!(refused(&node, "no_original_destination"), Some(1));
    assert_eq!(
        node.handler
            .refused_connections(sluice_proxy::Refusal::ClientNotEnrolled),
        3
    );

    // The rule follows the configuration: once the plain pod is enrolled, it is served.
    node.write(
        "pods.yaml",
        &[
            pod_at("client", "127.0.0.1", true, false),
            pod_at("plain", "127.0.0.3", true, false),
        ]
        .join("---\n"),
    );
    node.reload();
    assert_eq!(
        exchange_from("127.0.0.3", redirected, b"pong").await,
        b"pong"
    );
    assert_eq!(reached(), 2);
    assert_eq!(refused(&node, "client_not_enrolled"), Some(3));

    // A pod that leaves: a connection it made while still redirected, accepted just after the
    // snapshot without it was applied, is served, also after a second change within that
    // second (each departure keeps its own grace); a second later, its address no longer passes.
    node.write("pods.yaml", &pod_at("plain", "127.0.0.3", true, false));
    node.reload();
    assert_eq!(
        exchange_from("127.0.0.1", redirected, b"late").await,
        b"late"
    );
    let two = [
        pod_at("plain", "127.0.0.3", true, false),
        pod_at("other", "127.0.0.5", true, false),
    ];
    node.write("pods.yaml", &two.join("---\n"));
    node.reload();
    assert_eq!(
        exchange_from("127.0.0.1", redirected, b"later").await,
        b"later"
    );
    assert_eq!(reached(), 4);
    assert_eq!(refused(&node, "client_not_enrolled"), Some(3));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(exchange_from("127.0.0.1", redirected, b"gone").await, b"");
    assert_eq!(reached(), 4);
    assert_eq!(refused(&node, "client_not_enrolled"), Some(4));
    // Once its grace is over, the changes after it do not let it back.
    node.write(
        "pods.yaml",
        &[two[1].clone(), pod_at("third", "127.0.0.6", true, false)].join("---\n"),
    );
    node.reload();
    assert_eq!(exchange_from("127.0.0.1", redirected, b"gone").await, b"");
    assert_eq!(refused(&node, "client_not_enrolled"), Some(5));
}
