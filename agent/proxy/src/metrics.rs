//! Request metrics under Istio's standard names and labels, so the Istio Grafana dashboards and Kiali
//! read Sluice as they read Envoy sidecars; cluster circuit-breaker and outlier counters under Envoy's
//! names (`envoy_cluster_upstream_rq_pending_overflow{cluster_name=...}`) are added at scrape time.

use crate::state::{ServiceLabels, SourceLabels};
use parking_lot::Mutex;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_core::ResponseFlags;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Istio's request labels (the subset Sluice knows on a node).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<String>,
    pub source_workload_namespace: Arc<String>,
    pub destination_service: Arc<String>,
    pub destination_service_name: Arc<String>,
    pub destination_service_namespace: Arc<String>,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: FlagsLabel,
}

/// Istio's TCP labels: the request labels without a response code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<String>,
    pub source_workload_namespace: Arc<String>,
    pub destination_service: Arc<String>,
    pub destination_service_name: Arc<String>,
    pub destination_service_namespace: Arc<String>,
    pub request_protocol: &'static str,
    pub response_flags: FlagsLabel,
}

/// Response flags as a label value, written straight into the exposition (no per-request string).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct FlagsLabel(pub ResponseFlags);

impl EncodeLabelValue for FlagsLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        write!(encoder, "{}", self.0)
    }
}

/// Istio's default duration buckets, in milliseconds.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    /// L4 connections closed by `idleTimeout` and by `maxConnectionDuration`, by cluster (rare,
    /// so a lock is fine); exposed under Envoy's TCP proxy names.
    tcp_timeouts: Arc<Mutex<BTreeMap<Arc<str>, [u64; 2]>>>,
    unknown: Arc<String>,
}

/// Why the L4 proxy closed a connection itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcpTimeout {
    /// `tcp.idleTimeout` (Envoy: `tcp.<prefix>.idle_timeout`).
    Idle = 0,
    /// `tcp.maxConnectionDuration` (Envoy: `tcp.<prefix>.max_downstream_connection_duration`).
    MaxDuration = 1,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration =
            Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS_MS.iter().copied())
            });
        registry.register(
            "istio_requests",
            "Requests proxied, by outcome",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds",
            duration.clone(),
        );
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (proxied at L4)",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed (proxied at L4)",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client (the response direction) on TCP connections",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client (the request direction) on TCP connections",
            tcp_received.clone(),
        );
        Self {
            registry: Arc::new(registry),
            requests,
            duration,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            tcp_timeouts: Arc::default(),
            unknown: Arc::new("unknown".to_owned()),
        }
    }

    /// The L4 proxy closed a connection of `cluster` for `why`.
    pub(crate) fn tcp_timeout(&self, cluster: &Arc<str>, why: TcpTimeout) {
        let mut counts = self.tcp_timeouts.lock();
        counts.entry(cluster.clone()).or_default()[why as usize] += 1;
    }

    fn tcp_labels(
        &self,
        source: Option<&SourceLabels>,
        service: Option<&ServiceLabels>,
        flags: ResponseFlags,
    ) -> TcpLabels {
        let unknown = &self.unknown;
        let pick = |f: fn(&ServiceLabels) -> &Arc<String>| {
            service.map_or_else(|| unknown.clone(), |s| f(s).clone())
        };
        let from = |f: fn(&SourceLabels) -> &Arc<String>| {
            source.map_or_else(|| unknown.clone(), |s| f(s).clone())
        };
        TcpLabels {
            reporter: "source",
            source_workload: from(|s| &s.workload),
            source_workload_namespace: from(|s| &s.namespace),
            destination_service: pick(|s| &s.hostname),
            destination_service_name: pick(|s| &s.name),
            destination_service_namespace: pick(|s| &s.namespace),
            request_protocol: "tcp",
            response_flags: FlagsLabel(flags),
        }
    }

    /// A TCP connection is being proxied (counted before the upstream connect, as Istio does).
    pub(crate) fn tcp_open(&self, source: Option<&SourceLabels>, service: Option<&ServiceLabels>) {
        self.tcp_opened
            .get_or_create(&self.tcp_labels(source, service, ResponseFlags::empty()))
            .inc();
    }

    /// A TCP connection ended; its byte counts are added now (Istio also reports them while the
    /// connection is open; here long connections show their bytes when they close).
    pub(crate) fn tcp_close(
        &self,
        source: Option<&SourceLabels>,
        service: Option<&ServiceLabels>,
        flags: ResponseFlags,
        received: u64,
        sent: u64,
    ) {
        let labels = self.tcp_labels(source, service, flags);
        self.tcp_closed.get_or_create(&labels).inc();
        self.tcp_received.get_or_create(&labels).inc_by(received);
        self.tcp_sent.get_or_create(&labels).inc_by(sent);
    }

    /// One request; `status` 0 when no response was sent (Istio's `response_code="0"`, flag `DC`).
    pub(crate) fn record(
        &self,
        source: Option<&SourceLabels>,
        service: Option<&ServiceLabels>,
        status: u16,
        flags: ResponseFlags,
        elapsed: Duration,
    ) {
        let unknown = &self.unknown;
        let pick = |f: fn(&ServiceLabels) -> &Arc<String>| {
            service.map_or_else(|| unknown.clone(), |s| f(s).clone())
        };
        let from = |f: fn(&SourceLabels) -> &Arc<String>| {
            source.map_or_else(|| unknown.clone(), |s| f(s).clone())
        };
        let labels = RequestLabels {
            reporter: "source",
            source_workload: from(|s| &s.workload),
            source_workload_namespace: from(|s| &s.namespace),
            destination_service: pick(|s| &s.hostname),
            destination_service_name: pick(|s| &s.name),
            destination_service_namespace: pick(|s| &s.namespace),
            request_protocol: "http",
            response_code: status,
            response_flags: FlagsLabel(flags),
        };
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
        self.requests.get_or_create(&labels).inc();
    }

    /// Prometheus text exposition of the request metrics.
    pub fn encode(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
        let counts = self.tcp_timeouts.lock();
        if counts.is_empty() {
            return;
        }
        for (i, name) in ["idle_timeout", "max_downstream_connection_duration"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(out, "# TYPE envoy_tcp_{name} counter");
            for (cluster, n) in counts.iter() {
                let _ = writeln!(
                    out,
                    "envoy_tcp_{name}{{envoy_tcp_prefix=\"{cluster}\"}} {}",
                    n[i]
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_labels_and_flags() {
        let m = Metrics::new();
        let svc = ServiceLabels {
            hostname: Arc::new("pricing.default.svc.cluster.local".into()),
            name: Arc::new("pricing".into()),
            namespace: Arc::new("default".into()),
        };
        let uo = ResponseFlags::UPSTREAM_OVERFLOW;
        m.record(None, Some(&svc), 503, uo, Duration::from_millis(3));
        m.record(None, Some(&svc), 503, uo, Duration::from_millis(3));
        let client = SourceLabels {
            workload: Arc::new("frontend".into()),
            namespace: Arc::new("shop".into()),
            pod: Arc::new(sluice_policy::Workload {
                name: "frontend-1".into(),
                namespace: "shop".into(),
                ips: vec![],
                labels: Default::default(),
                enrolled: true,
                netns: None,
                cgroup: None,
                ..Default::default()
            }),
        };
        m.record(
            Some(&client),
            None,
            200,
            ResponseFlags::empty(),
            Duration::from_millis(700),
        );
        let mut out = String::new();
        m.encode(&mut out);
        assert!(
            out.contains("istio_requests_total{reporter=\"source\",source_workload=\"unknown\",source_workload_namespace=\"unknown\",destination_service=\"pricing.default.svc.cluster.local\",destination_service_name=\"pricing\",destination_service_namespace=\"default\",request_protocol=\"http\",response_code=\"503\",response_flags=\"UO\"} 2"),
            "{out}"
        );
        assert!(out.contains("istio_requests_total{reporter=\"source\",source_workload=\"frontend\",source_workload_namespace=\"shop\",destination_service=\"unknown\""), "{out}");
        assert!(out.contains("response_flags=\"-\"} 1"), "{out}");
        // The 700 ms request is in the 1000 ms bucket and not in the 500 ms one.
        let bucket = |le: &str| {
            out.lines()
                .find(|l| {
                    l.starts_with("istio_request_duration_milliseconds_bucket{")
                        && l.contains(&format!("le=\"{le}\""))
                        && l.contains("response_code=\"200\"")
                })
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        assert_eq!(bucket("500.0").as_deref(), Some("0"), "{out}");
        assert_eq!(bucket("1000.0").as_deref(), Some("1"), "{out}");
    }
}
