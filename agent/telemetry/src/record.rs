//! The one record of a request or of a connection proxied at L4, and [`Telemetry`], which turns a
//! finished record into everything observed of it: the access-log entry, the metric samples of
//! both reporters, and (when sampled) the trace spans. HTTP requests, L4 connections and the
//! proxy's own refusals all end here the same way.

use crate::access_log::AccessLog;
use crate::edges::Edges;
use crate::labels::{
    unknown_identity, Interned, Peer, Peers, Protocol, Reporter, RequestLabels, ServiceName,
};
use crate::metrics::{Metrics, Sample, TcpCounters};
use crate::recent::{Connections, Recent};
use crate::trace::{RequestSpan, TraceContext, Tracer};
use http::{HeaderValue, Method, Version};
use sluice_core::{AttemptRecord, RequestInfo, ResponseFlags};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// What is known of an HTTP request when it arrives, taken before the request moves on.
#[derive(Clone, Debug)]
pub struct HttpRequest {
    pub method: Method,
    pub path: String,
    pub version: Version,
    pub authority: String,
    /// The `x-request-id` sent upstream (the client's, or the one the proxy made).
    pub request_id: Option<HeaderValue>,
    pub protocol: Protocol,
    pub user_agent: Option<HeaderValue>,
    /// Request line and header bytes, as received (the body is counted as it flows).
    pub header_bytes: u64,
    /// Its place in a trace when it is sampled, to make its spans from (set by the handler from
    /// [`Tracer::start`](crate::trace::Tracer)); shared with the request's `RequestCtx`, which
    /// writes it on every attempt. `None` for a request that is not sampled.
    pub trace: Option<Arc<TraceContext>>,
}

impl HttpRequest {
    pub fn of<B>(req: &http::Request<B>, authority: String) -> Self {
        Self::with_request_id(req, authority, None)
    }

    /// As [`Self::of`], with the `x-request-id` the proxy made for the request (`made`: in an
    /// allocation of its own already, shared rather than copied).
    pub fn with_request_id<B>(
        req: &http::Request<B>,
        authority: String,
        made: Option<HeaderValue>,
    ) -> Self {
        let path = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let headers = req.headers();
        Self {
            header_bytes: header_bytes(headers)
                + (req.method().as_str().len() + path.len() + 12) as u64,
            method: req.method().clone(),
            path,
            version: req.version(),
            authority,
            request_id: made.or_else(|| headers.get(crate::trace::X_REQUEST_ID).map(detached)),
            protocol: crate::metrics::protocol_of(headers),
            user_agent: headers.get(http::header::USER_AGENT).map(detached),
            trace: None,
        }
    }
}

/// A copy of `value` in its own allocation. hyper's header values are slices of the connection's
/// read buffer (8 KiB or more); a record outlives its request (the last 4,096 are kept for
/// `sluice trace`), and a slice kept there would keep that whole buffer alive with it.
pub(crate) fn detached(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// Bytes of a header block as HTTP/1.1 writes it (`name: value\r\n` per field).
pub fn header_bytes(headers: &http::HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(k, v)| (k.as_str().len() + v.len() + 4) as u64)
        .sum::<u64>()
        + 2
}

/// How an exchange was carried.
// The record lives in the response body, boxed already; an L4 record's unused room costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Exchange {
    Http(HttpRequest),
    /// A connection proxied at L4.
    Tcp {
        /// Bytes from the client (Envoy's `%BYTES_RECEIVED%`).
        received: u64,
        /// Bytes to the client (`%BYTES_SENT%`).
        sent: u64,
    },
}

/// One request (or L4 connection), from its start to its end.
#[derive(Clone, Debug)]
pub struct Record {
    pub start: SystemTime,
    pub duration: Duration,
    pub exchange: Exchange,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The client pod, `unknown` when it is not a known pod.
    pub source: Peer,
    /// The Service it was addressed to (`unknown` before one was chosen).
    pub service: Interned<ServiceName>,
    /// What the layers learnt: flags, attempts, endpoints, cluster, details, attempt records.
    pub info: Arc<RequestInfo>,
    /// The response status; 0 when none was sent.
    pub status: u16,
    pub grpc_status: Option<u32>,
    /// Response header and body bytes sent to the client.
    pub response_bytes: u64,
}

impl Record {
    /// Request bytes received: headers and body.
    pub fn request_bytes(&self) -> u64 {
        match &self.exchange {
            Exchange::Http(r) => r.header_bytes + self.info.request_bytes(),
            Exchange::Tcp { received, .. } => *received,
        }
    }
}

/// Who the endpoint at an address is (the proxy's view of the cluster in force).
pub trait Endpoints {
    fn identity(&self, endpoint: SocketAddr) -> Option<Peer>;
}

impl<F: Fn(SocketAddr) -> Option<Peer>> Endpoints for F {
    fn identity(&self, endpoint: SocketAddr) -> Option<Peer> {
        self(endpoint)
    }
}

/// Where records go. Cloned into every request that outlives its handler call (one pointer).
#[derive(Clone)]
pub struct Telemetry(Arc<Inner>);

struct Inner {
    metrics: Metrics,
    access_log: AccessLog,
    /// `source_cluster` / `destination_cluster`.
    cluster: Interned<String>,
    tracer: Tracer,
    /// The last records and the live feed, for `sluice trace`, `top` and `tap`.
    recent: Arc<Recent>,
    /// The open connections that carry HTTP, for `sluice connections`.
    connections: Arc<Connections>,
    /// Requests per edge over the last minute, for `sluice top`.
    edges: Arc<Edges>,
}

/// The cluster name Istio reports when none is configured.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

impl Telemetry {
    pub fn new(metrics: Metrics, access_log: AccessLog, cluster_id: &str) -> Self {
        Self(Arc::new(Inner {
            metrics,
            access_log,
            cluster: Interned::new(cluster_id.to_owned()),
            tracer: Tracer::disabled(),
            recent: Arc::new(Recent::default()),
            connections: Arc::default(),
            edges: Arc::default(),
        }))
    }

    /// The same, with spans exported by `tracer`.
    pub fn with_tracer(self, tracer: Tracer) -> Self {
        self.with(|inner| inner.tracer = tracer)
    }

    /// The same, keeping the last `capacity` finished records for `sluice trace` (0: none).
    pub fn with_recent(self, capacity: usize) -> Self {
        self.with(|inner| inner.recent = Arc::new(Recent::with_capacity(capacity)))
    }

    fn with(self, change: impl FnOnce(&mut Inner)) -> Self {
        let inner = &self.0;
        let mut next = Inner {
            metrics: inner.metrics.clone(),
            access_log: inner.access_log.clone(),
            cluster: inner.cluster.clone(),
            tracer: inner.tracer.clone(),
            recent: inner.recent.clone(),
            connections: inner.connections.clone(),
            edges: inner.edges.clone(),
        };
        change(&mut next);
        Self(Arc::new(next))
    }

    pub fn tracer(&self) -> &Tracer {
        &self.0.tracer
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn access_log(&self) -> &AccessLog {
        &self.0.access_log
    }

    /// The open connections that carry HTTP.
    pub fn connections(&self) -> &Arc<Connections> {
        &self.0.connections
    }

    /// The recent records and their live feed.
    pub fn recent(&self) -> &Recent {
        &self.0.recent
    }

    /// Requests per edge over the last minute.
    pub fn edges(&self) -> &Edges {
        &self.0.edges
    }

    fn peers(&self, source: &Peer, destination: Peer, service: &Interned<ServiceName>) -> Peers {
        Peers {
            source: source.clone(),
            destination,
            service: service.clone(),
            cluster: self.0.cluster.clone(),
        }
    }

    /// A finished HTTP request: its access-log entry, the client side's sample (`reporter="source"`,
    /// final code and flags, total time) and one `reporter="destination"` sample per attempt that
    /// reached an endpoint (that attempt's code and time, as the endpoint's side reports it).
    ///
    /// The record is kept (moved, not copied) in the ring of recent ones once it has been counted.
    pub fn request(&self, record: Record, endpoints: &dyn Endpoints) {
        // The info's notes read once (one lock) for the log, the samples and the ring.
        let notes = record.info.summary();
        self.0.access_log.log(&record, &notes);
        if let Exchange::Http(req) = &record.exchange {
            self.0.edges.record(&record);
            self.http_samples(&record, req, &notes.attempts, endpoints);
        }
        self.0.recent.push(record, notes);
    }

    fn http_samples(
        &self,
        record: &Record,
        req: &HttpRequest,
        attempts: &[AttemptRecord],
        endpoints: &dyn Endpoints,
    ) {
        let request_bytes = record.request_bytes();
        // The client side names the endpoint that answered last, if one did.
        let last = attempts.iter().rev().find(|a| a.reached);
        let destination = last
            .and_then(|a| endpoints.identity(a.endpoint))
            .unwrap_or_else(unknown_identity);
        self.0.metrics.request(&Sample {
            labels: RequestLabels {
                reporter: Reporter::Source,
                peers: self.peers(&record.source, destination, &record.service),
                protocol: req.protocol,
                response_code: record.status,
                grpc_status: record.grpc_status,
                flags: record.info.flags(),
            },
            duration: record.duration,
            request_bytes,
            response_bytes: record.response_bytes,
        });
        // A sampled request's spans, built only when they are exported.
        if let Some(ctx) = req.trace.as_ref().filter(|c| c.sampled()) {
            if self.0.tracer.exporting() {
                let span = RequestSpan::of(record, req, ctx, attempts, &self.0.cluster);
                self.0.tracer.finish(span);
            }
        }
        for attempt in attempts.iter().filter(|a| a.reached) {
            let destination = endpoints
                .identity(attempt.endpoint)
                .unwrap_or_else(unknown_identity);
            let (code, flags) = as_destination_saw(attempt);
            let last = std::ptr::eq(attempt, *last.as_ref().expect("a reached attempt"));
            self.0.metrics.request(&Sample {
                labels: RequestLabels {
                    reporter: Reporter::Destination,
                    peers: self.peers(&record.source, destination, &record.service),
                    protocol: req.protocol,
                    response_code: code,
                    grpc_status: if last { record.grpc_status } else { None },
                    flags,
                },
                duration: attempt.duration,
                request_bytes,
                response_bytes: attempt.response_bytes,
            });
        }
    }

    /// A connection begins: counted now under `reporter` (the client's side at accept; the
    /// endpoint's once the upstream connection is made), with counters for its bytes.
    pub fn tcp_open(
        &self,
        reporter: Reporter,
        source: &Peer,
        destination: Option<Peer>,
        service: &Interned<ServiceName>,
    ) -> TcpCounters {
        let destination = destination.unwrap_or_else(unknown_identity);
        self.0
            .metrics
            .tcp_open(reporter, self.peers(source, destination, service))
    }

    /// A connection ended: `istio_tcp_connections_closed_total` under each reporter that counted
    /// it open, and (for an L4-proxied connection with a `record`) its access-log entry.
    pub fn tcp_close(
        &self,
        counters: &[&TcpCounters],
        flags: ResponseFlags,
        record: Option<Record>,
    ) {
        for c in counters {
            self.0.metrics.tcp_close(c, flags);
        }
        if let Some(record) = record {
            let notes = record.info.summary();
            self.0.access_log.log(&record, &notes);
            self.0.recent.push(record, notes);
        }
    }
}

/// An attempt as the endpoint's side of a sidecar mesh reports it: its status; for an upstream
/// reset before headers, the 503 that side's proxy answers; for an attempt the client proxy
/// abandoned (its timer, or its client gone), status 0 and `DC`: the endpoint saw its client leave.
fn as_destination_saw(a: &AttemptRecord) -> (u16, ResponseFlags) {
    let gone = a.timeout.is_some()
        || a.flags
            .contains(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
    if gone {
        return (a.status, ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
    }
    if a.status == 0 {
        return (503, a.flags);
    }
    (a.status, a.flags)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A connection's read buffer, as hyper's header values share it, that says when it is freed.
    pub(crate) struct ReadBuffer {
        bytes: Vec<u8>,
        freed: Arc<AtomicBool>,
    }

    impl ReadBuffer {
        /// `head` in an 8 KiB buffer, and the flag its drop sets.
        pub(crate) fn with(head: &[u8]) -> (Bytes, Arc<AtomicBool>) {
            let freed = Arc::new(AtomicBool::new(false));
            let mut bytes = head.to_vec();
            bytes.resize(8192, 0);
            let buffer = ReadBuffer {
                bytes,
                freed: freed.clone(),
            };
            (Bytes::from_owner(buffer), freed)
        }
    }

    impl AsRef<[u8]> for ReadBuffer {
        fn as_ref(&self) -> &[u8] {
            &self.bytes
        }
    }

    impl Drop for ReadBuffer {
        fn drop(&mut self) {
            self.freed.store(true, Ordering::SeqCst);
        }
    }

    /// A finished `GET /` with `x-request-id: id`, from a client that is not a known pod.
    pub(crate) fn record_of(id: &str) -> Record {
        let req = http::Request::get("/")
            .header("x-request-id", id)
            .body(())
            .unwrap();
        Record {
            start: std::time::SystemTime::now(),
            duration: std::time::Duration::ZERO,
            exchange: Exchange::Http(HttpRequest::of(&req, "pricing".to_owned())),
            peer: None,
            source: unknown_identity(),
            service: crate::ServiceName::unknown(),
            info: Arc::new(RequestInfo::new()),
            status: 200,
            grpc_status: None,
            response_bytes: 0,
        }
    }

    pub(crate) fn value(buf: &Bytes, at: std::ops::Range<usize>) -> HeaderValue {
        HeaderValue::from_maybe_shared(buf.slice(at)).expect("a valid header value")
    }

    #[test]
    fn a_record_keeps_no_part_of_its_request_s_read_buffer() {
        let (buf, freed) = ReadBuffer::with(b"curl/8.5.0 id-17");
        let mut sensitive = value(&buf, 11..16);
        sensitive.set_sensitive(true);
        let req = http::Request::builder()
            .header(http::header::USER_AGENT, value(&buf, 0..10))
            .header("x-request-id", sensitive)
            .body(())
            .unwrap();
        drop(buf);
        let record = HttpRequest::of(&req, "pricing".to_owned());
        assert!(!freed.load(Ordering::SeqCst), "the request still holds it");
        drop(req);
        assert!(
            freed.load(Ordering::SeqCst),
            "the record keeps the request's whole read buffer alive"
        );
        assert_eq!(record.user_agent.unwrap(), "curl/8.5.0");
        let id = record.request_id.unwrap();
        assert_eq!(id, "id-17");
        assert!(id.is_sensitive());
    }
}
