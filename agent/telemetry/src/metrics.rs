//! Istio's standard metrics (`istio_requests_total`, `istio_request_duration_milliseconds`,
//! `istio_request_bytes`, `istio_response_bytes`, `istio_tcp_*`) and `istio_build`, kept in a
//! prometheus-client registry. Samples are added from a [`Record`](crate::Record) by
//! [`Telemetry`](crate::Telemetry), never piecemeal by the proxy.

use crate::labels::{Peers, Protocol, Reporter, RequestLabels, TcpLabels};
use parking_lot::{Mutex, RwLock};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
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

/// A histogram's figures: the sum and count of the observations and how many fell in each bucket
/// (not cumulated; the last bucket is `+Inf`).
#[derive(Clone, Copy, Debug)]
struct Buckets<const N: usize> {
    sum: f64,
    count: u64,
    counts: [u64; N],
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Self {
            sum: 0.0,
            count: 0,
            counts: [0; N],
        }
    }
}

impl<const N: usize> Buckets<N> {
    /// Counts `v` in the first bucket whose upper bound (`bounds`, then `+Inf`) is at least `v`,
    /// as Prometheus' `le` says.
    fn observe(&mut self, bounds: &[f64], v: f64) {
        self.sum += v;
        self.count += 1;
        let i = bounds.iter().position(|b| *b >= v).unwrap_or(bounds.len());
        self.counts[i] += 1;
    }

    fn encode(&self, bounds: &[f64], mut encoder: MetricEncoder) -> std::fmt::Result {
        // prometheus-client writes an upper bound of `f64::MAX` as `+Inf`.
        let buckets: Vec<(f64, u64)> = bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.counts)
            .collect();
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &buckets, None)
    }
}

/// The four HTTP series of one label set (`istio_requests_total` and the three histograms),
/// behind one lock: a sample takes it once for all four. prometheus-client's `Histogram` takes a
/// lock of its own per observation and its `Counter` makes an atomic add, seven atomic
/// read-modify-writes per sample where this makes two; the series map is looked up once either
/// way.
#[derive(Clone, Debug, Default)]
struct Series {
    requests: u64,
    duration: Buckets<{ DURATION_BUCKETS_MS.len() + 1 }>,
    request_bytes: Buckets<{ SIZE_BUCKETS.len() + 1 }>,
    response_bytes: Buckets<{ SIZE_BUCKETS.len() + 1 }>,
}

type SeriesMap = HashMap<RequestLabels, Arc<Mutex<Series>>, foldhash::fast::RandomState>;

/// Encodes the HTTP families from the series map at each scrape, as prometheus-client's
/// `Family` would (one `# HELP`/`# TYPE` per family, a sample set per label set).
#[derive(Debug)]
struct HttpFamilies(Arc<RwLock<SeriesMap>>);

impl Collector for HttpFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        // Copied out, so that requests never wait on a scrape's formatting.
        let series: Vec<(RequestLabels, Series)> = self
            .0
            .read()
            .iter()
            .map(|(labels, s)| (labels.clone(), s.lock().clone()))
            .collect();
        {
            let mut family = encoder.encode_descriptor(
                "istio_requests",
                "Requests, by outcome.",
                None,
                MetricType::Counter,
            )?;
            for (labels, s) in &series {
                family
                    .encode_family(labels)?
                    .encode_counter::<NoLabelSet, _, u64>(&s.requests, None)?;
            }
        }
        type Pick = fn(&Series, &[f64], MetricEncoder) -> std::fmt::Result;
        let histograms: [(&str, &str, &[f64], Pick); 3] = [
            (
                "istio_request_duration_milliseconds",
                "Request duration in milliseconds.",
                &DURATION_BUCKETS_MS,
                |s, b, e| s.duration.encode(b, e),
            ),
            (
                "istio_request_bytes",
                "Request size (headers and body) in bytes.",
                &SIZE_BUCKETS,
                |s, b, e| s.request_bytes.encode(b, e),
            ),
            (
                "istio_response_bytes",
                "Response size (headers and body) in bytes.",
                &SIZE_BUCKETS,
                |s, b, e| s.response_bytes.encode(b, e),
            ),
        ];
        for (name, help, bounds, pick) in histograms {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
            for (labels, s) in &series {
                pick(s, bounds, family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

/// `istio_build{component,tag}`: which proxy build reports (the Mesh dashboard lists it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    series: Arc<RwLock<SeriesMap>>,
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
        let series = Arc::<RwLock<SeriesMap>>::default();
        registry.register_collector(Box::new(HttpFamilies(series.clone())));
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
            series,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
        }
    }

    pub(crate) fn request(&self, s: &Sample) {
        let record = |series: &Mutex<Series>| {
            let mut series = series.lock();
            series.requests += 1;
            series
                .duration
                .observe(&DURATION_BUCKETS_MS, s.duration.as_secs_f64() * 1000.0);
            series
                .request_bytes
                .observe(&SIZE_BUCKETS, s.request_bytes as f64);
            series
                .response_bytes
                .observe(&SIZE_BUCKETS, s.response_bytes as f64);
        };
        if let Some(series) = self.series.read().get(&s.labels) {
            return record(series);
        }
        let series = self
            .series
            .write()
            .entry(s.labels.clone())
            .or_default()
            .clone();
        record(&series);
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
    use crate::labels::{unknown_identity, Interned, ServiceName};
    use prometheus_client::metrics::histogram::Histogram;

    fn labels(reporter: Reporter, code: u16) -> RequestLabels {
        RequestLabels {
            reporter,
            peers: Peers {
                source: unknown_identity(),
                destination: unknown_identity(),
                service: ServiceName::new(
                    "reviews.default.svc.cluster.local",
                    "reviews",
                    "default",
                ),
                cluster: Interned::new("Kubernetes".to_owned()),
            },
            protocol: Protocol::Http,
            response_code: code,
            grpc_status: None,
            flags: ResponseFlags::empty(),
        }
    }

    /// The HTTP families encode exactly as prometheus-client's own `Family` of `Counter` and
    /// `Histogram` would for the same samples: bucket bounds (values on a bound included, `+Inf`
    /// last), cumulated counts, sums, help texts, types and label sets.
    #[test]
    fn the_http_families_encode_as_prometheus_clients_own_types() {
        let ours = Metrics::new();
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        type Hist = Family<RequestLabels, Histogram, fn() -> Histogram>;
        let duration: Hist =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS_MS.iter().copied()));
        let request_bytes: Hist =
            Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS.iter().copied()));
        let response_bytes: Hist =
            Family::new_with_constructor(|| Histogram::new(SIZE_BUCKETS.iter().copied()));
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
        // On bounds, between them, past the last, zero: under two label sets.
        let samples = [
            (Reporter::Source, 200, 0.5, 0, 1),
            (Reporter::Source, 200, 0.7, 10, 100),
            (Reporter::Source, 503, 10.0, 11, 1e8 as u64),
            (Reporter::Destination, 200, 4e6, 1e8 as u64 + 1, 0),
            (Reporter::Source, 200, 3.6e6, 999, 1000),
        ];
        for (reporter, code, ms, req, rsp) in samples {
            let l = labels(reporter, code);
            ours.request(&Sample {
                labels: l.clone(),
                duration: Duration::from_secs_f64(ms / 1000.0),
                request_bytes: req,
                response_bytes: rsp,
            });
            requests.get_or_create(&l).inc();
            duration
                .get_or_create(&l)
                .observe(Duration::from_secs_f64(ms / 1000.0).as_secs_f64() * 1000.0);
            request_bytes.get_or_create(&l).observe(req as f64);
            response_bytes.get_or_create(&l).observe(rsp as f64);
        }
        let mut theirs = String::new();
        prometheus_client::encoding::text::encode_registry(&mut theirs, &registry).unwrap();
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &ours.registry).unwrap();
        // Label sets come out in map order, which differs between the two: compare each family's
        // lines as sets, in family order.
        let families = |t: &str| -> Vec<(String, std::collections::BTreeSet<String>)> {
            let mut out: Vec<(String, std::collections::BTreeSet<String>)> = Vec::new();
            for line in t.lines() {
                if line.starts_with("# HELP ") {
                    out.push((line.to_owned(), Default::default()));
                } else if let Some((_, lines)) = out.last_mut() {
                    lines.insert(line.to_owned());
                }
            }
            out.retain(|(help, _)| {
                help.contains("istio_request") || help.contains("istio_response")
            });
            out
        };
        let (want, got) = (families(&theirs), families(&text));
        assert_eq!(want.len(), 4, "{theirs}");
        assert_eq!(got, want, "ours:\n{text}\ntheirs:\n{theirs}");
        assert!(text.contains("le=\"+Inf\""), "{text}");
    }

    #[test]
    fn counters_are_typed_under_their_sample_names() {
        let om = "# HELP istio_requests Requests.\n# TYPE istio_requests counter\nistio_requests_total{a=\"1\"} 2\n# HELP istio_build Build.\n# TYPE istio_build gauge\nistio_build{tag=\"x\"} 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(om),
            "# HELP istio_requests_total Requests.\n# TYPE istio_requests_total counter\nistio_requests_total{a=\"1\"} 2\n# HELP istio_build Build.\n# TYPE istio_build gauge\nistio_build{tag=\"x\"} 1\n"
        );
    }
}
