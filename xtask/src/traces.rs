//! An OTLP/HTTP receiver for the demo: Sluice exports its spans here (`--otlp-endpoint`), and
//! Step 9 shows one received trace (a request's span and its attempts), decoded with
//! `opentelemetry-proto` as a collector would.

use anyhow::Result;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use prost::Message;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Spans kept at most (the oldest are dropped first).
const KEEP: usize = 20_000;

/// The receiver and what it got.
pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    /// Listens on loopback (the agent runs on the host).
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let sink = spans.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let sink = sink.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let status = match ExportTraceServiceRequest::decode(body) {
                            Ok(export) => {
                                let mut kept = sink.lock();
                                for ss in export
                                    .resource_spans
                                    .into_iter()
                                    .flat_map(|rs| rs.scope_spans)
                                {
                                    kept.extend(ss.spans);
                                }
                                let over = kept.len().saturating_sub(KEEP);
                                kept.drain(..over);
                                200
                            }
                            Err(_) => 400,
                        };
                        Ok::<_, hyper::Error>(
                            Response::builder()
                                .status(status)
                                .body(Full::new(Bytes::new()))
                                .expect("response"),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        Ok(Self { addr, spans, task })
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().clone()
    }
}

/// A span attribute as text.
pub fn attr(span: &Span, key: &str) -> Option<String> {
    let v = span.attributes.iter().find(|kv| kv.key == key)?;
    Some(match v.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => s.clone(),
        Value::IntValue(i) => i.to_string(),
        Value::BoolValue(b) => b.to_string(),
        Value::DoubleValue(d) => d.to_string(),
        _ => return None,
    })
}

/// One request's span and its attempts' spans.
pub struct Trace {
    pub request: Span,
    pub attempts: Vec<Span>,
}

/// The most telling recent request: the latest that was retried if any, else the latest with an
/// attempt.
pub fn pick(spans: &[Span]) -> Option<Trace> {
    let children = |parent: &Span| -> Vec<Span> {
        let mut c: Vec<Span> = spans
            .iter()
            .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
            .cloned()
            .collect();
        c.sort_by_key(|s| s.start_time_unix_nano);
        c
    };
    let requests = spans.iter().rev().filter(|s| {
        !spans
            .iter()
            .any(|p| p.span_id == s.parent_span_id && p.trace_id == s.trace_id)
    });
    let mut fallback = None;
    for r in requests {
        let attempts = children(r);
        if attempts.len() > 1 {
            return Some(Trace {
                request: r.clone(),
                attempts,
            });
        }
        if fallback.is_none() && !attempts.is_empty() {
            fallback = Some(Trace {
                request: r.clone(),
                attempts,
            });
        }
    }
    fallback
}

fn ms(s: &Span) -> f64 {
    s.end_time_unix_nano.saturating_sub(s.start_time_unix_nano) as f64 / 1e6
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The trace as a small tree.
pub fn print(t: &Trace) {
    let a = |s: &Span, k: &str| attr(s, k).unwrap_or_else(|| "-".into());
    println!(
        "  trace {} (x-request-id {}): {} -> {} {} in {:.1} ms",
        hex(&t.request.trace_id),
        a(&t.request, "guid:x-request-id"),
        t.request.name,
        a(&t.request, "http.status_code"),
        a(&t.request, "response_flags"),
        ms(&t.request)
    );
    for (i, s) in t.attempts.iter().enumerate() {
        println!(
            "    attempt {}: {} -> {} {} in {:.1} ms{}",
            i + 1,
            a(s, "upstream_address"),
            a(s, "http.status_code"),
            a(s, "response_flags"),
            ms(s),
            attr(s, "sluice.timeout").map_or(String::new(), |t| format!(" ({t} timeout)"))
        );
    }
}
