//! Istio's standard metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_tcp_*`) and `istio_build`, kept in a
//! prometheus-client registry. Samples are added from a [`Record`](crate::Record) by
//! [`Telemetry`](crate::Telemetry), never piecemeal by the proxy.

use crate::labels::{Peers, Protocol, Reporter, RequestLabels, TcpLabels};
use parking_lot::RwLock;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_core::ResponseFlags;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

/// Istio's default duration buckets, in milliseconds.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets, in bytes: powers of ten from 1 to 10^8.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

type Hist = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn durations() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS.iter().copied())
}

fn sizes() -> Histogram {
    Histogram::new(SIZE_BUCKETS.iter().copied())
}

/// `istio_build{component,tag}`: which proxy build reports (the Mesh dashboard lists it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

/// The four HTTP series of one label set, looked up together: one map probe per sample instead
/// of one per family (each family's own map hashes with SipHash behind its lock). The families
/// hold the same series (the handles share their values) and are what the exposition encodes.
#[derive(Clone)]
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

type SeriesMap = HashMap<RequestLabels, Series, foldhash::fast::RandomState>;

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    series: Arc<RwLock<SeriesMap>>,
    requests: Family<RequestLabels, Counter>,
    duration: Hist,
    request_bytes: Hist,
    response_bytes: Hist,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// One HTTP sample: a request as its client's side saw it, or one attempt as its endpoint did.
pub(crate) struct Sample {
    pub labels: RequestLabels,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: Hist = Family::new_with_constructor(durations);
        let request_bytes: Hist = Family::new_with_constructor(sizes);
        let response_bytes: Hist = Family::new_with_constructor(sizes);
        registry.register("istio_requests", "Requests, by outcome", requests.clone());
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request size (headers and body) in bytes",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response size (headers and body) in bytes",
            response_bytes.clone(),
        );
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent in the response direction on TCP connections (counted as they flow)",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received in the request direction on TCP connections (counted as they flow)",
            tcp_received.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "proxy",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        Self {
            registry: Arc::new(registry),
            series: Arc::default(),
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
        }
    }

    pub(crate) fn request(&self, s: &Sample) {
        let record = |series: &Series| {
            series.requests.inc();
            series.duration.observe(s.duration.as_secs_f64() * 1000.0);
            series.request_bytes.observe(s.request_bytes as f64);
            series.response_bytes.observe(s.response_bytes as f64);
        };
        if let Some(series) = self.series.read().get(&s.labels) {
            return record(series);
        }
        let mut all = self.series.write();
        let series = all.entry(s.labels.clone()).or_insert_with(|| Series {
            requests: self.requests.get_or_create(&s.labels).clone(),
            duration: self.duration.get_or_create(&s.labels).clone(),
            request_bytes: self.request_bytes.get_or_create(&s.labels).clone(),
            response_bytes: self.response_bytes.get_or_create(&s.labels).clone(),
        });
        record(series);
    }

    /// A connection opened: counted now, with counters its bytes are added to as they flow (so a
    /// long connection shows its traffic while it is open, as Istio's proxies report it).
    pub(crate) fn tcp_open(&self, reporter: Reporter, peers: Peers) -> TcpCounters {
        let open = TcpLabels {
            reporter,
            peers,
            flags: ResponseFlags::empty(),
        };
        self.tcp_opened.get_or_create(&open).inc();
        TcpCounters {
            sent: self.tcp_sent.get_or_create(&open).clone(),
            received: self.tcp_received.get_or_create(&open).clone(),
            labels: open,
        }
    }

    pub(crate) fn tcp_close(&self, counters: &TcpCounters, flags: ResponseFlags) {
        let labels = TcpLabels {
            flags,
            ..counters.labels.clone()
        };
        self.tcp_closed.get_or_create(&labels).inc();
    }

    /// The families in OpenMetrics text, ending in `# EOF`.
    pub fn encode_openmetrics(&self, out: &mut String) {
        let _ = prometheus_client::encoding::text::encode(out, &self.registry);
    }

    /// The families in Prometheus' text format 0.0.4.
    pub fn encode(&self, out: &mut String) {
        let mut om = String::with_capacity(16 * 1024);
        let _ = prometheus_client::encoding::text::encode_registry(&mut om, &self.registry);
        out.push_str(&to_prometheus_text(&om));
    }
}

/// prometheus-client writes OpenMetrics: a counter family `x` has samples `x_total`, there are
/// `# UNIT` lines and a final `# EOF`. Prometheus' text format names a family by its samples, so
/// the counter's `# HELP`/`# TYPE` lines become `x_total`'s, and the rest goes.
pub(crate) fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters = std::collections::HashSet::new();
    // First pass: which families are counters.
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(name) = rest.strip_suffix(" counter") {
                counters.insert(name.to_owned());
            }
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                if counters.contains(name) {
                    let _ = writeln!(out, "{kind}{name}_total {tail}");
                } else {
                    let _ = writeln!(out, "{line}");
                }
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The byte counters of one open connection's series.
#[derive(Clone, Debug)]
pub struct TcpCounters {
    sent: Counter,
    received: Counter,
    labels: TcpLabels,
}

impl TcpCounters {
    /// Bytes from the client side (the request direction).
    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }

    /// Bytes to the client side (the response direction).
    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }
}

/// `request_protocol` of an HTTP request: gRPC by its content type, as Istio decides.
pub fn protocol_of(headers: &http::HeaderMap) -> Protocol {
    match headers.get(http::header::CONTENT_TYPE) {
        Some(ct) if ct.as_bytes().starts_with(b"application/grpc") => Protocol::Grpc,
        _ => Protocol::Http,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_typed_under_their_sample_names() {
        let om = "# HELP istio_requests Requests.\n# TYPE istio_requests counter\nistio_requests_total{a=\"1\"} 2\n# HELP istio_build Build.\n# TYPE istio_build gauge\nistio_build{tag=\"x\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP istio_requests_total Requests.\n# TYPE istio_requests_total counter\nistio_requests_total{a=\"1\"} 2\n# HELP istio_build Build.\n# TYPE istio_build gauge\nistio_build{tag=\"x\"} 1\n"
        );
    }
}
