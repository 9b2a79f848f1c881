//! The Prometheus endpoint's exposition: Istio's metrics (from `sluice-telemetry`), Envoy's cluster
//! counters and gauges (`envoy_cluster_*`, read by the dashboards' circuit-breaker panels) and the
//! L4 proxy's timeout counters (`envoy_tcp_*`). Prometheus' text format 0.0.4 by default, every
//! family with its `# TYPE` under the name its samples carry; OpenMetrics when the scraper asks for
//! it (`Accept: application/openmetrics-text`).

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

/// Why the L4 proxy closed a connection itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcpTimeout {
    /// `tcp.idleTimeout` (Envoy: `tcp.<prefix>.idle_timeout`).
    Idle = 0,
    /// `tcp.maxConnectionDuration` (Envoy: `tcp.<prefix>.max_downstream_connection_duration`).
    MaxDuration = 1,
}

/// L4 connections closed by `idleTimeout` and by `maxConnectionDuration`, by cluster (rare, so a
/// lock is fine); exposed under Envoy's TCP proxy names.
#[derive(Clone, Default)]
pub(crate) struct TcpTimeouts(Arc<Mutex<BTreeMap<Arc<str>, [u64; 2]>>>);

impl TcpTimeouts {
    /// The L4 proxy closed a connection of `cluster` for `why`.
    pub(crate) fn count(&self, cluster: &Arc<str>, why: TcpTimeout) {
        let mut counts = self.0.lock();
        counts.entry(cluster.clone()).or_default()[why as usize] += 1;
    }

    fn encode(&self, out: &mut String) {
        let counts = self.0.lock();
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

/// The two exposition formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// `text/plain; version=0.0.4`.
    Prometheus,
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
}

impl Format {
    /// What the scraper's `Accept` header asks for (Prometheus asks for OpenMetrics first).
    pub(crate) fn negotiate(accept: Option<&http::HeaderValue>) -> Self {
        match accept.and_then(|v| v.to_str().ok()) {
            Some(a) if a.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The whole exposition: Istio's families, then Envoy's cluster and TCP proxy series.
pub(crate) fn encode(handler: &crate::Handler, format: Format) -> String {
    let mut envoy = String::with_capacity(4 * 1024);
    crate::cluster_stats::encode_prometheus(&handler.state(), &mut envoy);
    handler.tcp_timeouts.encode(&mut envoy);
    let tracer = handler.tracer();
    for (name, n) in [
        ("exported", tracer.exported()),
        ("dropped", tracer.dropped()),
    ] {
        let _ = writeln!(envoy, "# TYPE sluice_trace_spans_{name}_total counter");
        let _ = writeln!(envoy, "sluice_trace_spans_{name}_total {n}");
    }
    // Entries the access log dropped because stdout did not keep up, and the batches written.
    let log = handler.access_log();
    for (name, n) in [("dropped", log.dropped()), ("writes", log.writes())] {
        let _ = writeln!(envoy, "# TYPE sluice_access_log_{name}_total counter");
        let _ = writeln!(envoy, "sluice_access_log_{name}_total {n}");
    }
    handler.downstream.encode(&mut envoy);
    handler.clients.encode(&mut envoy);
    handler.isolation.encode(&mut envoy);
    match format {
        Format::OpenMetrics => {
            let mut istio = String::with_capacity(16 * 1024);
            handler.metrics().encode_openmetrics(&mut istio);
            // Envoy's counters keep Envoy's names (no `_total`), which OpenMetrics allows only
            // for untyped families: the dashboards query them by those names.
            let mut out = istio.trim_end_matches("# EOF\n").to_owned();
            for line in envoy.lines() {
                match line.strip_suffix(" counter") {
                    Some(head) if line.starts_with("# TYPE ") => {
                        let _ = writeln!(out, "{head} unknown");
                    }
                    _ => {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
            out.push_str("# EOF\n");
            out
        }
        Format::Prometheus => {
            let mut out = String::with_capacity(16 * 1024 + envoy.len());
            handler.metrics().encode(&mut out);
            out.push_str(&envoy);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_accept() {
        let prom = http::HeaderValue::from_static("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1");
        assert_eq!(Format::negotiate(Some(&prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Prometheus);
        let curl = http::HeaderValue::from_static("*/*");
        assert_eq!(Format::negotiate(Some(&curl)), Format::Prometheus);
    }
}
