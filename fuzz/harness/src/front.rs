//! The HTTP front target: raw bytes from a client, as they arrive at the proxy's listeners, over
//! real loopback connections to the real server (`sluice_proxy::server::serve`) with a fixed
//! configuration (a Service with a VirtualService, a plain-TCP Service, a Service whose protocol
//! is detected, a client Pod). The first byte of an input picks the listener, that is the way the
//! client reached the proxy; the rest is sent, then the client half-closes and reads until the
//! proxy closes.
//!
//! | first byte % 7 | the client |
//! | --- | --- |
//! | 0 | explicit proxy: no original destination (`--redirect none`) |
//! | 1 | redirected to the cluster IP of `pricing`, port declared `http` |
//! | 2 | redirected to the cluster IP of `detected`, port with no declared protocol |
//! | 3 | redirected to the cluster IP of `raw`, port declared `tcp` (L4) |
//! | 4 | redirected to an address of no Service (Istio's `PassthroughCluster`) |
//! | 5 | redirected to the proxy's own listener (the loop guard) |
//! | 6 | redirected to `pricing`, from an address that is no enrolled pod (refused at accept) |
//!
//! Invariants (a panic when broken): nothing panics, on any task; the proxy closes every
//! connection within [`EXCHANGE_LIMIT`] of the client's last byte; every byte it sends belongs to
//! a valid HTTP/1.x response stream or HTTP/2 frame stream ([`crate::wire`]); `pricing`'s upstream
//! never receives a request its VirtualService refuses (`/blocked...`: a 100% fault abort),
//! however the request was framed; a client that is not an enrolled pod gets nothing back, and
//! the proxy's access log (where every request and L4 connection it serves is recorded with the
//! client's address) has no entry for it but its refusal.
//!
//! Determinism: one current-thread runtime runs the proxy, the upstreams and the client, only
//! while an input is being exchanged; the configuration has no weights or randomised policy.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_config::{BuildOptions, ConfigDir};
use sluice_proxy::server::OriginalDst;
use sluice_proxy::{AccessLog, Handler, HandlerOptions, LogFormat, Metrics, RedirectOptions};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{broadcast, watch};

/// How long the proxy may take to close a connection after the client's last byte. Nothing in
/// the configuration waits: the upstreams answer at once and the route timeout is 1 s.
pub const EXCHANGE_LIMIT: Duration = Duration::from_secs(5);

/// The path prefix `pricing`'s VirtualService aborts (fault abort, 100%, 403).
pub const REFUSED_PREFIX: &[u8] = b"/blocked";

const PRICING_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const DETECTED_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const RAW_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// Loopback, but no pod's address: a client the relay rule refuses.
const STRANGER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The proxy and its upstreams, made once per process.
pub struct Front {
    rt: Runtime,
    /// Listener per mode (see the module table).
    listeners: Vec<SocketAddr>,
    /// The access log (JSON: it names the client's address).
    log: parking_lot::Mutex<sluice_proxy::Listener<Arc<str>>>,
    _config: tempfile::TempDir,
    _shutdown: watch::Sender<bool>,
}

/// Says that every connection accepted on its listener was addressed to `.0` (stands in for the
/// eBPF map and `SO_ORIGINAL_DST`).
struct FixedDst(SocketAddr);

impl OriginalDst for FixedDst {
    fn original_dst(&self, _stream: &TcpStream) -> Option<SocketAddr> {
        Some(self.0)
    }
}

impl Front {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (tx, _) = watch::channel(false);
        let config = tempfile::tempdir().expect("a config directory");
        let (listeners, log) = rt.block_on(async {
            let pricing_ep = upstream(true).await;
            let open_ep = upstream(false).await;
            std::fs::write(
                config.path().join("mesh.yaml"),
                mesh_yaml(pricing_ep.port(), open_ep.port()),
            )
            .expect("write the configuration");
            let mut dir = ConfigDir::new(config.path().to_path_buf(), BuildOptions::default());
            let loaded = dir.reload();
            let errors: Vec<_> = loaded.problems.iter().filter(|p| p.is_error()).collect();
            assert!(
                errors.is_empty(),
                "the harness's configuration: {errors:#?}"
            );
            let handler = Arc::new(
                Handler::new(
                    HandlerOptions::default(),
                    AccessLog::with_format(false, LogFormat::Json),
                    Metrics::new(),
                )
                .with_redirect_options(RedirectOptions {
                    protocol_detection_timeout: Duration::from_secs(1),
                    ..RedirectOptions::default()
                }),
            );
            handler.apply(loaded.snapshot);
            let log = handler.access_log().subscribe();

            let mut listeners = Vec::new();
            for mode in 0..7u8 {
                let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
                let addr = listener.local_addr().expect("its address");
                let dst = match mode {
                    0 => None,
                    1 | 6 => Some(SocketAddr::from((PRICING_VIP, 80))),
                    2 => Some(SocketAddr::from((DETECTED_VIP, 8080))),
                    3 => Some(SocketAddr::from((RAW_VIP, 9000))),
                    4 => Some(open_ep),
                    _ => Some(addr),
                };
                let dst = dst.map(|d| Arc::new(FixedDst(d)) as Arc<dyn OriginalDst>);
                tokio::spawn(sluice_proxy::server::serve(
                    listener,
                    handler.clone(),
                    dst,
                    Default::default(),
                    tx.subscribe(),
                    Duration::from_secs(1),
                ));
                listeners.push(addr);
            }
            (listeners, log)
        });
        Self {
            rt,
            listeners,
            log: parking_lot::Mutex::new(log),
            _config: config,
            _shutdown: tx,
        }
    }

    /// Sends one input; panics when an invariant is broken.
    pub fn exchange(&self, data: &[u8]) {
        let Some((&mode, bytes)) = data.split_first() else {
            return;
        };
        let mode = usize::from(mode % 7);
        let to = self.listeners[mode];
        let from = (mode == 6).then_some(STRANGER);
        let received = self.rt.block_on(async {
            match tokio::time::timeout(EXCHANGE_LIMIT, send(to, from, bytes)).await {
                Ok(received) => received,
                Err(_) => panic!(
                    "mode {mode}: the proxy did not close the connection within {EXCHANGE_LIMIT:?} of the client's last byte"
                ),
            }
        });
        if let Err(e) = crate::wire::check(&received) {
            panic!(
                "mode {mode}: the proxy sent what no HTTP client can read: {e}\nall it sent: {:?}",
                String::from_utf8_lossy(&received)
            );
        }
        if mode == 6 {
            assert!(
                received.is_empty(),
                "a client that is no enrolled pod got an answer: {:?}",
                String::from_utf8_lossy(&received)
            );
        }
        self.check_log();
    }

    /// Every entry the access log has received so far: one with the stranger's address must be
    /// its refusal. (Entries are checked by address, not by input: a request is recorded when its
    /// response ends, which may be during a later input.)
    fn check_log(&self) {
        let mut log = self.log.lock();
        loop {
            let line = match log.try_recv() {
                Ok(line) => line,
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    panic!("{n} access-log entries went unread: the check would miss them")
                }
                Err(_) => return,
            };
            let entry: serde_json::Value =
                serde_json::from_str(&line).expect("a JSON access-log entry");
            let from_stranger = entry["downstream_remote_address"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{STRANGER}:")));
            if from_stranger {
                assert!(
                    entry["response_flags"] == "NR"
                        && entry["response_code_details"] == "client_not_enrolled",
                    "the proxy served a client that is no enrolled pod: {line}"
                );
            }
        }
    }
}

impl Default for Front {
    fn default() -> Self {
        Self::new()
    }
}

/// Connects (from `from` when given), writes `bytes` while reading, half-closes, and returns
/// everything read until the proxy closes (or resets) the connection.
async fn send(to: SocketAddr, from: Option<Ipv4Addr>, bytes: &[u8]) -> Vec<u8> {
    let socket = TcpSocket::new_v4().expect("a socket");
    if let Some(ip) = from {
        socket
            .bind(SocketAddr::from((ip, 0)))
            .expect("bind the client");
    }
    let stream = socket.connect(to).await.expect("connect to the proxy");
    let (mut rd, mut wr) = stream.into_split();
    let bytes = bytes.to_vec();
    // Written on its own task: a proxy that answers before reading everything must not block
    // the client's write while the client is not reading.
    let writer = tokio::spawn(async move {
        // A proxy that closed first makes these fail: its answer is what was read.
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
        wr
    });
    let mut received = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    drop(writer.await);
    received
}

/// An HTTP server on loopback that answers every request at once (HTTP/1.1 or h2c). When
/// `policed`, it is `pricing`'s endpoint and checks that no request arrives that the
/// VirtualService refuses. Returns its address.
async fn upstream(policed: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("its address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    if policed {
                        let path = req.uri().path_and_query().map_or("", |p| p.as_str());
                        assert!(
                                !path.as_bytes().starts_with(REFUSED_PREFIX),
                                "pricing's upstream received {} {path}, which its VirtualService aborts",
                                req.method()
                            );
                    }
                    let body = req.into_body().collect().await.map(|b| b.to_bytes());
                    let len = body.map_or(0, |b| b.len());
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("x-upstream-read", len)
                            .body(Full::new(Bytes::from_static(b"upstream")))
                            .expect("a response"),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The mesh the proxy serves: `pricing` (HTTP, with a VirtualService whose routes cover match
/// kinds, a fault abort, a direct response, retries, timeouts and header operations),
/// `detected` (no declared protocol), `raw` (TCP), and the client pod at 127.0.0.1, enrolled.
fn mesh_yaml(pricing_port: u16, open_port: u16) -> String {
    let service = |name: &str, ip: Ipv4Addr, port: u16, port_name: &str, ep: u16| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {ip}\n  ports:\n  - name: {port_name}\n    port: {port}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv4\nendpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\nports:\n- name: {port_name}\n  port: {ep}\n---\n"
        )
    };
    let prefix = std::str::from_utf8(REFUSED_PREFIX).expect("ASCII");
    let mut y = String::new();
    y += &service("pricing", PRICING_VIP, 80, "http", pricing_port);
    y += &service("detected", DETECTED_VIP, 8080, "web", open_port);
    y += &service("raw", RAW_VIP, 9000, "tcp", open_port);
    y += &format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: pricing
  namespace: default
spec:
  hosts: [pricing]
  http:
  - match:
    - uri: {{prefix: {prefix}}}
    fault:
      abort: {{httpStatus: 403, percentage: {{value: 100}}}}
    route:
    - destination: {{host: pricing}}
  - match:
    - uri: {{exact: /direct}}
    directResponse:
      status: 418
      body: {{string: "direct"}}
  - match:
    - headers:
        x-canary: {{exact: "yes"}}
      queryParams:
        v: {{regex: "^[0-9]+$"}}
    route:
    - destination: {{host: pricing}}
      headers:
        response:
          set: {{x-route: canary}}
    retries: {{attempts: 2, perTryTimeout: 500ms, retryOn: "5xx,reset,connect-failure"}}
  - match:
    - uri: {{regex: "^/re/[a-z]+$"}}
      method: {{exact: POST}}
    - authority: {{prefix: "pricing."}}
    route:
    - destination: {{host: pricing}}
    timeout: 1s
  - route:
    - destination: {{host: pricing}}
    timeout: 1s
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: default
  labels:
    istio.io/dataplane-mode: ambient
status:
  phase: Running
  podIP: 127.0.0.1
"#
    );
    y
}
