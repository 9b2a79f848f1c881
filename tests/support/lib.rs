//! Shared harness for the in-process tests: a config directory, the proxy serving on a loopback port,
//! fake services started in-process, a curl-like client, and readers for what the proxy saw (access-log
//! lines and cluster state). Everything binds 127.0.0.1:0 and ends when the harness is dropped.
#![forbid(unsafe_code)]

pub mod bins;
pub mod envoy;
pub mod listen;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sluice_config::{BuildOptions, ConfigDir, Severity};
use sluice_proxy::{AccessLog, Handler, HandlerOptions, Metrics, RedirectOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The tutorial's YAML, shipped verbatim in `examples/tutorial/`.
pub fn tutorial_yaml(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/tutorial")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An EndpointSlice for `service` (namespace default) with one endpoint per loopback port.
pub fn endpoint_slice(service: &str, ports: &[u16]) -> String {
    // Kubernetes gives each endpoint one port per slice, so one slice per port.
    ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{i}\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n- addresses: [\"127.0.0.1\"]\n  conditions: {{ready: true}}\nports:\n- name: http\n  port: {port}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The real listener in-process on a loopback port in front of `handler`, configured once with
/// `web`: a Service `web` whose one endpoint is `127.0.0.1:upstream` (for tests of one proxy's
/// own behaviour: its limits, its budgets). Served until dropped.
pub struct Served {
    pub handler: Arc<Handler>,
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Served {
    pub async fn web(handler: Handler, upstream: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("web.yaml"),
            format!(
                "{}---\n{}",
                yaml::service("web"),
                endpoint_slice("web", &[upstream])
            ),
        )
        .expect("write config");
        let mut config = ConfigDir::new(dir.path().to_path_buf(), BuildOptions::default());
        let outcome = config.reload();
        assert!(
            !outcome
                .problems
                .iter()
                .any(|p| p.severity == Severity::Error),
            "{:#?}",
            outcome.problems
        );
        let handler = Arc::new(handler);
        handler.apply(outcome.snapshot);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (shutdown, rx) = watch::channel(false);
        let task = tokio::spawn(sluice_proxy::server::serve(
            listener,
            handler.clone(),
            None,
            Default::default(),
            rx,
            Duration::from_secs(1),
        ));
        Self {
            handler,
            addr,
            shutdown,
            task,
            _dir: dir,
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

/// The proxy in-process over a config directory, reloaded on demand (deterministic, no polling).
pub struct Mesh {
    pub dir: tempfile::TempDir,
    config: ConfigDir,
    pub handler: Arc<Handler>,
    pub proxy: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Mesh {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ConfigDir::new(dir.path().to_path_buf(), BuildOptions::default());
        // Tests that put redirecting listeners in front of this handler stand in for the kernel
        // with loopback clients that are no enrolled pod: the relay rule (tested on its own in
        // `tests/redirect.rs`) would refuse them.
        let handler = Arc::new(
            Handler::new(
                HandlerOptions::default(),
                AccessLog::new(false),
                Metrics::new(),
            )
            .with_redirect_options(RedirectOptions {
                enrolled_clients_only: false,
                ..RedirectOptions::default()
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let proxy = listener.local_addr().unwrap();
        let (shutdown, rx) = watch::channel(false);
        let server = tokio::spawn(sluice_proxy::server::serve(
            listener,
            handler.clone(),
            None,
            Default::default(),
            rx,
            Duration::from_secs(1),
        ));
        Self {
            dir,
            config,
            handler,
            proxy,
            shutdown,
            tasks: vec![server],
        }
    }

    /// The Prometheus exposition of the request metrics.
    pub fn metrics(&self) -> String {
        self.handler.prometheus_text()
    }

    /// Writes `file` into the config directory.
    pub fn write(&self, file: &str, yaml: &str) {
        std::fs::write(self.dir.path().join(file), yaml).expect("write config");
    }

    pub fn remove(&self, file: &str) {
        let _ = std::fs::remove_file(self.dir.path().join(file));
    }

    /// Rescans the directory and applies the result; panics on config errors unless `allow_errors`.
    pub fn reload_checked(&mut self, allow_errors: bool) -> Vec<sluice_config::Problem> {
        let outcome = self.config.reload();
        let errors: Vec<_> = outcome
            .problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .collect();
        assert!(
            allow_errors || errors.is_empty(),
            "config errors: {errors:#?}"
        );
        self.handler.apply(outcome.snapshot);
        outcome.problems
    }

    pub fn reload(&mut self) {
        self.reload_checked(false);
    }

    /// Starts a fake service with tutorial-style settings; its upstream calls go through the proxy.
    pub async fn fake_service(&mut self, name: &str, env: &[(&str, &str)]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind service");
        let port = listener.local_addr().unwrap().port();
        let proxy = format!("http://{}", self.proxy);
        let mut vars: Vec<(String, String)> =
            vec![("NAME".into(), name.into()), ("HTTP_PROXY".into(), proxy)];
        vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let cfg = fake_service::Config::from_lookup(|k| {
            vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })
        .expect("fake-service config");
        self.tasks.push(tokio::spawn(async move {
            let _ = fake_service::serve(cfg, listener).await;
        }));
        port
    }

    /// Follows the requests the proxy records from now on, as the admin API's `/tap` has them
    /// (typed, not the access log's text).
    pub fn access_log(&self) -> LogReader {
        LogReader {
            feed: self.handler.recent().subscribe(),
            handler: self.handler.clone(),
        }
    }

    /// One request through the proxy, as `curl -x PROXY --max-time T http://HOST/PATH` does it: a fresh
    /// connection, absolute-form request. `None` status means the client timed out (curl's 000).
    pub async fn get(&self, url: &str, max_time: Duration) -> Outcome {
        self.send(
            Request::get(url).body(Empty::<Bytes>::new()).unwrap(),
            max_time,
        )
        .await
    }

    pub async fn send(&self, req: Request<Empty<Bytes>>, max_time: Duration) -> Outcome {
        self.client().send(req, max_time).await
    }

    /// Live state of the cluster `outbound|PORT||HOST` (or with a subset).
    pub fn cluster(&self, name: &str) -> sluice_upstream::ClusterHandle {
        cluster_of(&self.handler, name)
    }
}

/// Live state of `handler`'s cluster `outbound|PORT||HOST` (or with a subset); panics if absent.
pub fn cluster_of(handler: &Handler, name: &str) -> sluice_upstream::ClusterHandle {
    let state = handler.state();
    state
        .upstreams
        .iter()
        .find(|(k, _)| k.to_string() == name)
        .map(|(_, up)| up.handle.clone())
        .unwrap_or_else(|| panic!("no cluster {name}"))
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A client of the proxy that owns nothing of the [`Mesh`], so it can run on its own task while the
/// test changes the configuration (`Mesh::reload` needs `&mut`).
#[derive(Clone, Copy, Debug)]
pub struct Client {
    pub proxy: SocketAddr,
}

impl Mesh {
    pub fn client(&self) -> Client {
        Client { proxy: self.proxy }
    }

    /// One request over HTTP/2 with prior knowledge (h2c) on a fresh connection to the proxy.
    pub async fn send_h2(&self, req: Request<Empty<Bytes>>, max_time: Duration) -> Outcome {
        self.client().send_h2(req, max_time).await
    }
}

impl Client {
    /// As [`Mesh::get`].
    pub async fn get(&self, url: &str, max_time: Duration) -> Outcome {
        self.send(
            Request::get(url).body(Empty::<Bytes>::new()).unwrap(),
            max_time,
        )
        .await
    }

    /// As [`Mesh::send`]: HTTP/1.1 on a fresh connection, absolute form.
    pub async fn send(&self, req: Request<Empty<Bytes>>, max_time: Duration) -> Outcome {
        let proxy = self.proxy;
        timed(max_time, async move {
            let stream = TcpStream::connect(proxy).await.ok()?;
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .ok()?;
            tokio::spawn(conn);
            let rsp = tx.send_request(req).await.ok()?;
            let (parts, body) = rsp.into_parts();
            let body = body.collect().await.ok()?.to_bytes();
            Some((parts, body))
        })
        .await
    }

    /// HTTP/2 with prior knowledge (h2c) on a fresh connection; the URL's authority is `:authority`.
    pub async fn send_h2(&self, req: Request<Empty<Bytes>>, max_time: Duration) -> Outcome {
        let proxy = self.proxy;
        timed(max_time, async move {
            let stream = TcpStream::connect(proxy).await.ok()?;
            let (mut tx, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                TokioIo::new(stream),
            )
            .await
            .ok()?;
            tokio::spawn(conn);
            let rsp = tx.send_request(req).await.ok()?;
            let (parts, body) = rsp.into_parts();
            let body = body.collect().await.ok()?.to_bytes();
            Some((parts, body))
        })
        .await
    }
}

/// Runs one client exchange under `max_time` and says what the client saw (no status when it
/// failed or timed out).
pub async fn timed(
    max_time: Duration,
    exchange: impl std::future::Future<Output = Option<(http::response::Parts, Bytes)>>,
) -> Outcome {
    let start = Instant::now();
    let result = tokio::time::timeout(max_time, exchange).await;
    let elapsed = start.elapsed();
    match result {
        Ok(Some((parts, body))) => Outcome {
            status: Some(parts.status),
            headers: parts.headers,
            body,
            elapsed,
        },
        _ => Outcome {
            status: None,
            headers: Default::default(),
            body: Bytes::new(),
            elapsed,
        },
    }
}

/// A loopback port that refuses connections until the test process ends: a socket bound to it
/// that never listens, so the kernel answers each connection with a reset, and gives the port to
/// no other bind meanwhile (a port released instead could become a parallel test's port-0
/// listener, which would then accept what was meant to be refused).
pub fn refusing_port() -> u16 {
    use socket2::{Domain, Socket, Type};
    static HELD: parking_lot::Mutex<Vec<Socket>> = parking_lot::Mutex::new(Vec::new());
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a socket");
    let any: SocketAddr = ([127, 0, 0, 1], 0).into();
    socket.bind(&any.into()).expect("bind");
    let port = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("a bound address")
        .port();
    HELD.lock().push(socket);
    port
}

/// Runs futures concurrently on the current task, results in input order.
pub async fn join_all<F: std::future::Future>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut pending: Vec<_> = futs.into_iter().map(Box::pin).enumerate().collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                results[*i] = Some(v);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().map(|r| r.expect("all done")).collect()
}

/// A client-side view of one response.
#[derive(Debug)]
pub struct Outcome {
    pub status: Option<StatusCode>,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn code(&self) -> u16 {
        self.status.map_or(0, |s| s.as_u16())
    }
}

/// What a test needs of one finished request, in the access log's terms: from the admin API's
/// typed record ([`LogLine::of`]), or parsed from an access-log line by the tests that check the
/// log itself ([`LogLine::parse`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LogLine {
    pub status: u16,
    pub flags: String,
    pub attempts: u32,
    /// Whole milliseconds, as the access log's `duration=`.
    pub duration_ms: u64,
    pub authority: String,
    pub upstream: String,
    pub service: String,
    /// Envoy's response code details, when the proxy decided the outcome.
    pub details: Option<String>,
}

impl LogLine {
    /// The request as the admin API describes it.
    pub fn of(r: &sluice_admin_api::Request) -> Self {
        Self {
            status: r.status,
            flags: r.flags.clone(),
            attempts: r.attempt_count,
            duration_ms: r.duration_ms as u64,
            authority: r.authority.clone().unwrap_or_else(|| "-".into()),
            upstream: r.upstream.clone().unwrap_or_else(|| "-".into()),
            service: r.service.clone(),
            details: r.details.clone(),
        }
    }

    /// Parses the proxy's access-log line (Envoy's text format, see `sluice_telemetry::access_log`):
    /// for tests of what the log itself says.
    pub fn parse(line: &str) -> Option<Self> {
        let after_req = line.split_once("\" ")?.1;
        let mut it = after_req.split_whitespace();
        let status = it.next()?.parse().ok()?;
        let flags = it.next()?.to_owned();
        let attempts = it.next()?.strip_prefix("attempts=")?.parse().ok()?;
        let duration_ms = it
            .next()?
            .strip_prefix("duration=")?
            .strip_suffix("ms")?
            .parse()
            .ok()?;
        let details = after_req
            .split('"')
            .next()?
            .split_whitespace()
            .find_map(|t| t.strip_prefix("details="))
            .map(str::to_owned);
        let quoted: Vec<&str> = after_req.split('"').collect();
        let authority = quoted.get(1)?.to_string();
        let upstream = quoted.get(3)?.to_string();
        let service = line.rsplit(' ').next()?.to_owned();
        Some(Self {
            status,
            flags,
            attempts,
            duration_ms,
            authority,
            upstream,
            service,
            details,
        })
    }

    pub fn has_flag(&self, flag: &str) -> bool {
        self.flags.split(',').any(|f| f == flag)
    }
}

/// The requests the proxy recorded since the reader was made.
pub struct LogReader {
    feed: sluice_telemetry::Listener<Arc<sluice_telemetry::Record>>,
    handler: Arc<Handler>,
}

impl LogReader {
    /// Every request recorded since the reader was made (waits briefly for records still being
    /// finished); connections proxied at L4 are left out.
    pub async fn drain(&mut self) -> Vec<LogLine> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut out = Vec::new();
        loop {
            match self.feed.try_recv() {
                Ok(record) => {
                    let r = sluice_proxy::admin::describe(&self.handler, &record);
                    if r.protocol != "TCP" {
                        out.push(LogLine::of(&r));
                    }
                }
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    panic!("the request feed's reader lagged by {n}")
                }
                Err(_) => return out,
            }
        }
    }
}

/// Requests from `lines` to `service` (short name).
pub fn to_service<'a>(
    lines: &'a [LogLine],
    service: &'a str,
) -> impl Iterator<Item = &'a LogLine> + 'a {
    let fqdn = format!("{service}.default.svc.cluster.local");
    lines.iter().filter(move |l| l.service == fqdn)
}

/// YAML for the Kubernetes and Istio objects the in-process tests deploy (namespace `default`).
pub mod yaml {
    /// A Service `name` with port 80 (`http`) targeting 9090.
    pub fn service(name: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  ports:\n  - name: http\n    port: 80\n    targetPort: 9090\n"
        )
    }

    /// A VirtualService for `host` whose `http:` list is `http` (already indented).
    pub fn virtual_service(host: &str, http: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  hosts:\n  - {host}\n  http:\n{http}"
        )
    }

    /// A DestinationRule for `host` whose spec continues with `spec` (already indented).
    pub fn destination_rule(host: &str, spec: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  host: {host}\n{spec}"
        )
    }

    /// Envoy's name for the cluster of `host`'s port 80.
    pub fn cluster_name(host: &str) -> String {
        format!("outbound|80||{host}.default.svc.cluster.local")
    }
}

impl Mesh {
    /// Writes a Service `name` (port 80) with one endpoint per loopback port; call [`Self::reload`].
    pub fn deploy(&self, name: &str, ports: &[u16]) {
        self.write(&format!("{name}.yaml"), &yaml::service(name));
        self.write(
            &format!("{name}-endpoints.yaml"),
            &endpoint_slice(name, ports),
        );
    }
}

/// fake-service settings: every call waits `delay`, then answers 200.
pub fn slow_env(delay: &'static str) -> [(&'static str, &'static str); 4] {
    [
        ("ERROR_RATE", "1"),
        ("ERROR_TYPE", "delay"),
        ("ERROR_DELAY", delay),
        ("ERROR_CODE", "200"),
    ]
}

/// fake-service settings: every call answers `code` at once.
pub fn failing_env(code: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("ERROR_RATE", "1"),
        ("ERROR_TYPE", "http_error"),
        ("ERROR_CODE", code),
    ]
}

/// A client connection with a request under way that the test can walk away from (by dropping
/// it), as a client does when its own timeout fires or a load generator stops mid-request.
pub struct Abandoning {
    _stream: TcpStream,
}

impl Abandoning {
    /// Opens a connection to `proxy` and writes `head` (a raw HTTP/1.1 request head, `\r\n\r\n`
    /// included) and `body`, without reading anything back.
    pub async fn start(proxy: SocketAddr, head: &str, body: &[u8]) -> Self {
        use tokio::io::AsyncWriteExt;
        let mut stream = TcpStream::connect(proxy).await.expect("connect to proxy");
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream.write_all(body).await.expect("write body");
        Self { _stream: stream }
    }

    /// `GET url` through the proxy (absolute form, as `curl -x` sends it).
    pub async fn get(proxy: SocketAddr, url: &str) -> Self {
        let host = url
            .strip_prefix("http://")
            .and_then(|r| r.split('/').next())
            .unwrap_or(url);
        Self::start(
            proxy,
            &format!("GET {url} HTTP/1.1\r\nhost: {host}\r\n\r\n"),
            b"",
        )
        .await
    }
}

/// Waits until `cond` holds, checking every 5 ms for at most `limit`; panics with `what` otherwise.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A memory figure of process `pid` from `/proc/PID/status` (`field` such as `VmRSS:` or `VmHWM:`),
/// in KiB; `None` if the process or the field is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// An HTTP/1 upstream on loopback (hyper's server) that answers each request at once with the
/// status `status_of` gives it and the body `ok`; it serves until the test's runtime ends.
pub async fn answering_upstream<F>(status_of: F) -> SocketAddr
where
    F: Fn(&Request<hyper::body::Incoming>) -> u16 + Clone + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let status_of = status_of.clone();
            let svc = hyper::service::service_fn(move |req| {
                let status = status_of(&req);
                async move {
                    http::Response::builder()
                        .status(status)
                        .body(http_body_util::Full::new(Bytes::from_static(b"ok")))
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    addr
}

/// A raw HTTP/1.1 upstream on loopback that answers every request with `200`, `content-length:
/// 1000000` and `body`, then either closes (`keep_writing: false`, a body cut short) or keeps
/// writing `body` every 10 ms for at most 10 s (a long download). Ends with the returned task.
pub async fn streaming_upstream(body: &'static [u8], keep_writing: bool) -> (u16, JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    let task = tokio::spawn(async move {
        // Bounded: a handful of requests per test.
        for _ in 0..32 {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n";
                if conn.write_all(head).await.is_err() || conn.write_all(body).await.is_err() {
                    return;
                }
                if keep_writing {
                    for _ in 0..1000 {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if conn.write_all(body).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_access_log_lines() {
        let l = LogLine::parse(
            "[2026-11-23T14:09:31.694Z] \"GET / HTTP/1.1\" 503 UO,URX attempts=2 duration=4ms \"pricing\" \"127.0.0.1:9091\" outbound|80||pricing.default.svc.cluster.local \"-\" pricing.default.svc.cluster.local",
        )
        .unwrap();
        assert_eq!(l.status, 503);
        assert!(l.has_flag("UO") && l.has_flag("URX") && !l.has_flag("UT"));
        assert_eq!(l.attempts, 2);
        assert_eq!(l.duration_ms, 4);
        assert_eq!(l.authority, "pricing");
        assert_eq!(l.upstream, "127.0.0.1:9091");
        assert_eq!(l.service, "pricing.default.svc.cluster.local");
        assert_eq!(l.details, None);
        let l = LogLine::parse(
            "[2026-11-23T14:09:31.694Z] \"GET /health HTTP/1.1\" 200 - attempts=0 duration=0ms details=direct_response \"web\" \"-\" - \"-\" web.default.svc.cluster.local",
        )
        .unwrap();
        assert_eq!(l.details.as_deref(), Some("direct_response"));
        assert_eq!((l.authority.as_str(), l.upstream.as_str()), ("web", "-"));
    }
}
