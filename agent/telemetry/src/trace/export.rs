//! Span export, off the proxy's path: finished requests go into a bounded queue (a full queue
//! drops them, counted, and never blocks a request) read by one thread of its own ("otlp-export",
//! with a current-thread runtime) that batches them as OpenTelemetry's batch span processor does
//! (a batch leaves when it holds `max_batch` spans or `delay` after the last one left) and sends
//! each batch over OTLP: `POST` of the protobuf body (http/protobuf) or the `TraceService/Export`
//! call (grpc, cleartext HTTP/2), on one kept connection, re-made once when a reused one fails.
//! A batch the collector refuses or does not take within the timeout is dropped and counted.

use super::config::{ExportConfig, OtlpProtocol};
use super::otlp::{self, Resource};
use super::span::RequestSpan;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

enum Msg {
    Span(RequestSpan),
    /// Export everything queued before this, then answer.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// Spans that reached the collector, and those that never will.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) exported: AtomicU64,
    pub(crate) dropped: AtomicU64,
}

pub(crate) struct Exporter {
    tx: mpsc::Sender<Msg>,
    pub(crate) stats: Arc<Stats>,
}

impl Exporter {
    /// Starts the export thread. It ends, after exporting what is queued, when the last
    /// [`Exporter`] handle is dropped.
    pub(crate) fn start(cfg: ExportConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(cfg.max_queue);
        let stats = Arc::new(Stats::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread_stats = stats.clone();
        std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn(move || rt.block_on(run(rx, cfg, thread_stats)))?;
        Ok(Self { tx, stats })
    }

    /// Queues `span`; drops it (counted) when the queue is full.
    pub(crate) fn send(&self, span: RequestSpan) {
        let n = span.span_count() as u64;
        if self.tx.try_send(Msg::Span(span)).is_err() {
            self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Waits (blocking the calling thread, which must not be a runtime's) until everything
    /// queued so far was exported or dropped; `false` if that took longer than `timeout`.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        // The export thread always drains the queue, so a place comes soon.
        if self.tx.blocking_send(Msg::Flush(ack)).is_err() {
            return false;
        }
        done.recv_timeout(timeout).is_ok()
    }
}

async fn run(mut rx: mpsc::Receiver<Msg>, cfg: ExportConfig, stats: Arc<Stats>) {
    let mut resource = vec![
        ("service.name".to_owned(), cfg.service_name.clone()),
        ("telemetry.sdk.name".to_owned(), "sluice".to_owned()),
        ("telemetry.sdk.language".to_owned(), "rust".to_owned()),
        (
            "telemetry.sdk.version".to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ];
    resource.extend(cfg.resource.iter().cloned());
    let resource = Resource {
        attributes: resource,
    };
    let mut client = Client::new(&cfg);
    let mut batch = Batch::default();
    let mut due = Instant::now() + cfg.delay;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Msg::Span(span)) => {
                    batch.spans += span.span_count();
                    batch.requests.push(span);
                    if batch.spans >= cfg.max_batch {
                        batch.export(&mut client, &resource, &stats, cfg.max_batch).await;
                        due = Instant::now() + cfg.delay;
                    }
                }
                Some(Msg::Flush(ack)) => {
                    batch.export(&mut client, &resource, &stats, cfg.max_batch).await;
                    let _ = ack.send(());
                }
                None => {
                    batch.export(&mut client, &resource, &stats, cfg.max_batch).await;
                    return;
                }
            },
            () = tokio::time::sleep_until(due) => {
                batch.export(&mut client, &resource, &stats, cfg.max_batch).await;
                due = Instant::now() + cfg.delay;
            }
        }
    }
}

#[derive(Default)]
struct Batch {
    requests: Vec<RequestSpan>,
    spans: usize,
}

impl Batch {
    /// Sends what is queued in exports of at most `max` spans (a request's spans stay together).
    async fn export(&mut self, client: &mut Client, res: &Resource, stats: &Stats, max: usize) {
        let mut requests = std::mem::take(&mut self.requests).into_iter().peekable();
        self.spans = 0;
        while requests.peek().is_some() {
            let mut chunk = Vec::new();
            let mut n = 0;
            while let Some(r) = requests.next_if(|r| n == 0 || n + r.span_count() <= max) {
                n += r.span_count();
                chunk.push(r);
            }
            let body = otlp::encode(res, &chunk);
            match client.send(body).await {
                Ok(()) => {
                    stats.exported.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(why) => {
                    stats.dropped.fetch_add(n as u64, Ordering::Relaxed);
                    client.warn(n, &why);
                }
            }
        }
    }
}

type Sender1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Sender2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

enum Conn {
    H1(Sender1),
    H2(Sender2),
}

struct Client {
    cfg: ExportConfig,
    /// `host:port` to connect to (resolved at each connect: a collector Service may move).
    addr: String,
    conn: Option<Conn>,
    last_warning: Option<Instant>,
}

impl Client {
    fn new(cfg: &ExportConfig) -> Self {
        let authority = cfg.endpoint.authority().expect("checked endpoint");
        let addr = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        Self {
            cfg: cfg.clone(),
            addr,
            conn: None,
            last_warning: None,
        }
    }

    /// At most one warning a minute: a collector that is down must not flood the log.
    fn warn(&mut self, spans: usize, why: &str) {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(60))
        {
            return;
        }
        self.last_warning = Some(now);
        tracing::warn!(
            endpoint = %self.cfg.endpoint,
            spans,
            "could not export spans: {why}; they are dropped (check the collector)"
        );
    }

    async fn send(&mut self, body: Vec<u8>) -> Result<(), String> {
        let body = Bytes::from(match self.cfg.protocol {
            OtlpProtocol::HttpProtobuf => body,
            OtlpProtocol::Grpc => {
                // One uncompressed gRPC message: flag, length, bytes.
                let mut framed = Vec::with_capacity(body.len() + 5);
                framed.push(0);
                framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
                framed.extend_from_slice(&body);
                framed
            }
        });
        let timeout = self.cfg.timeout;
        match tokio::time::timeout(timeout, self.send_retrying(body)).await {
            Ok(r) => r,
            Err(_) => {
                self.conn = None;
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }

    async fn send_retrying(&mut self, body: Bytes) -> Result<(), String> {
        let reused = self.conn.is_some();
        match self.send_once(body.clone()).await {
            Err(Failure::Connection(_)) if reused => {
                // The collector may have closed the idle connection: once more on a new one.
                self.conn = None;
                self.send_once(body).await.map_err(Failure::into_string)
            }
            r => r.map_err(Failure::into_string),
        }
    }

    async fn send_once(&mut self, body: Bytes) -> Result<(), Failure> {
        if self.conn.is_none() {
            self.conn = Some(self.connect().await.map_err(Failure::Connection)?);
        }
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.cfg.endpoint.clone())
            .header(
                header::USER_AGENT,
                concat!("sluice/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in &self.cfg.headers {
            req = req.header(k, v);
        }
        let grpc = self.cfg.protocol == OtlpProtocol::Grpc;
        req = if grpc {
            req.header(header::CONTENT_TYPE, "application/grpc")
                .header(header::TE, "trailers")
        } else {
            let host = self.cfg.endpoint.authority().expect("checked").as_str();
            req.header(header::CONTENT_TYPE, "application/x-protobuf")
                .header(header::HOST, host)
        };
        let mut req = req
            .body(Full::new(body))
            .map_err(|e| Failure::Refused(e.to_string()))?;
        let sent = match self.conn.as_mut().expect("connected above") {
            Conn::H1(s) => {
                s.ready()
                    .await
                    .map_err(|e| Failure::Connection(e.to_string()))?;
                // HTTP/1.1 wants the origin form; the Host header carries the authority.
                let pq = req.uri().path_and_query().cloned();
                if let Some(pq) = pq {
                    *req.uri_mut() = http::Uri::from(pq);
                }
                s.send_request(req).await
            }
            Conn::H2(s) => s.send_request(req).await,
        };
        let rsp = sent.map_err(|e| {
            self.conn = None;
            Failure::Connection(e.to_string())
        })?;
        let status = rsp.status();
        let grpc_header = rsp.headers().get("grpc-status").cloned();
        let collected = rsp.into_body().collect().await.map_err(|e| {
            self.conn = None;
            Failure::Connection(format!("reading the answer: {e}"))
        })?;
        if !status.is_success() {
            return Err(Failure::Refused(format!("the collector answered {status}")));
        }
        if grpc {
            let code = grpc_header.or_else(|| {
                collected
                    .trailers()
                    .and_then(|t| t.get("grpc-status").cloned())
            });
            return match code.as_ref().map(HeaderValue::as_bytes) {
                Some(b"0") => Ok(()),
                Some(c) => Err(Failure::Refused(format!(
                    "grpc-status {}",
                    String::from_utf8_lossy(c)
                ))),
                None => Err(Failure::Refused("no grpc-status".into())),
            };
        }
        Ok(())
    }

    async fn connect(&self) -> Result<Conn, String> {
        let stream = TcpStream::connect(&self.addr)
            .await
            .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        Ok(match self.cfg.protocol {
            OtlpProtocol::HttpProtobuf => {
                let (sender, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Conn::H1(sender)
            }
            OtlpProtocol::Grpc => {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Conn::H2(sender)
            }
        })
    }
}

enum Failure {
    /// The connection failed: a reused one is worth one more try.
    Connection(String),
    /// The collector answered, and not with success.
    Refused(String),
}

impl Failure {
    fn into_string(self) -> String {
        match self {
            Failure::Connection(s) | Failure::Refused(s) => s,
        }
    }
}
