//! Request metrics under Istio's standard names and labels, so the Istio Grafana dashboards and Kiali
//! read Sluice as they read Envoy sidecars; cluster circuit-breaker and outlier counters under Envoy's
//! names (`envoy_cluster_upstream_rq_pending_overflow{cluster_name=...}`) are added at scrape time.

use http::StatusCode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_core::ResponseFlags;
use sluice_policy::Service;
use std::sync::Arc;
use std::time::Duration;

/// Istio's request labels (the subset Sluice knows on a node).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: String,
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
        Self {
            registry: Arc::new(registry),
            requests,
            duration,
        }
    }

    pub(crate) fn record(
        &self,
        service: Option<&Service>,
        status: StatusCode,
        flags: ResponseFlags,
        elapsed: Duration,
    ) {
        let labels = RequestLabels {
            reporter: "source",
            source_workload: "unknown".into(),
            source_workload_namespace: "unknown".into(),
            destination_service: service.map_or_else(|| "unknown".into(), |s| s.hostname.clone()),
            destination_service_name: service.map_or_else(|| "unknown".into(), |s| s.name.clone()),
            destination_service_namespace: service
                .map_or_else(|| "unknown".into(), |s| s.namespace.clone()),
            request_protocol: "http",
            response_code: status.as_u16(),
            response_flags: flags.to_string(),
        };
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64() * 1000.0);
        self.requests.get_or_create(&labels).inc();
    }

    /// Prometheus text exposition of the request metrics.
    pub fn encode(&self, out: &mut String) {
        let _ = prometheus_client::encoding::text::encode_registry(out, &self.registry);
    }
}
