//! Step 9, "Visualizing Resilience in Action": the tutorial opens Kiali's graph and Grafana's
//! Istio Service Dashboard while continuous traffic flows. Here a real Prometheus has scraped
//! Sluice since the lab started; this step reads from it what those tools would show: per service
//! the request rate, success rate and p50/p90 latency, the edges Kiali would draw, and which panels
//! of Istio's Service, Workload and Mesh dashboards have data.

use super::{workspace_root, Lab, StepRun};
use crate::dashboards::{self, Edge, PanelResult};
use crate::prometheus::{self, Prometheus};
use anyhow::Result;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What Step 9 saw.
pub struct Report {
    pub prometheus: SocketAddr,
    pub services: Vec<ServiceRow>,
    pub edges: Vec<Edge>,
    /// Series Kiali would drop for lack of a label.
    pub dropped: usize,
    pub panels: Vec<PanelResult>,
    /// The type Prometheus recorded for each of [`TYPED`], if any.
    pub types: Vec<(&'static str, Option<String>)>,
    /// Spans the OTLP receiver got, and one trace picked from them.
    pub spans: usize,
    pub trace: Option<crate::traces::Trace>,
}

/// Families whose type Prometheus must know from Sluice's exposition, with that type (Envoy's
/// counters keep Envoy's names without `_total`: untyped under OpenMetrics, which Prometheus asks
/// for, as OpenMetrics allows no other way).
pub const TYPED: &[(&str, &[&str])] = &[
    ("istio_requests_total", &["counter"]),
    ("istio_request_duration_milliseconds", &["histogram"]),
    ("istio_request_bytes", &["histogram"]),
    ("istio_response_bytes", &["histogram"]),
    ("istio_tcp_connections_opened_total", &["counter"]),
    ("istio_tcp_sent_bytes_total", &["counter"]),
    ("istio_build", &["gauge"]),
    ("envoy_cluster_upstream_rq_total", &["counter", "unknown"]),
    ("envoy_cluster_upstream_rq_active", &["gauge"]),
];

pub struct ServiceRow {
    pub service: String,
    pub rate: f64,
    pub success: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
}

/// Where Istio's dashboards are: `../shared/istio/dashboards` beside the repository.
fn dashboards_dir() -> PathBuf {
    workspace_root().join("../shared/istio/dashboards")
}

/// Starts Prometheus for the lab (installing it as root if needed), or says why it cannot.
pub async fn start_prometheus(
    metrics: SocketAddr,
    dir: &std::path::Path,
) -> Result<Prometheus, String> {
    let bin = prometheus::find(true)?;
    Prometheus::start(&bin, metrics, dir)
        .await
        .map_err(|e| format!("{e:#}"))
}

impl Lab {
    /// Queries Prometheus after the step's traffic (`run` holds that traffic's results).
    pub(super) async fn visualize(&mut self, run: &mut StepRun) -> Result<()> {
        let prom = match &self.prometheus {
            Ok(p) => p,
            Err(why) => {
                println!("Step 9 needs Prometheus: {why}");
                return Ok(());
            }
        };
        // The last requests land in the next scrape.
        tokio::time::sleep(prometheus::SCRAPE_INTERVAL * 2).await;
        prom.wait_for("istio_requests_total", Duration::from_secs(10))
            .await?;
        let services =
            dashboards::label_values(prom, "istio_requests_total", "destination_service").await?;
        let mut rows = Vec::new();
        for svc in &services {
            let sel = format!(r#"reporter="source",destination_service="{svc}""#);
            let scalar =
                |v: Vec<prometheus::Sample>| v.first().map(|s| s.value).filter(|v| v.is_finite());
            let rate = scalar(
                prom.query(&format!("sum(rate(istio_requests_total{{{sel}}}[1m]))"))
                    .await?,
            );
            let success = scalar(prom.query(&format!(r#"sum(rate(istio_requests_total{{{sel},response_code!~"5.."}}[1m])) / sum(rate(istio_requests_total{{{sel}}}[1m]))"#)).await?);
            let q = |p: f64| {
                format!("histogram_quantile({p}, sum(rate(istio_request_duration_milliseconds_bucket{{{sel}}}[1m])) by (le))")
            };
            rows.push(ServiceRow {
                service: svc.clone(),
                rate: rate.unwrap_or(0.0),
                success,
                p50_ms: scalar(prom.query(&q(0.5)).await?),
                p90_ms: scalar(prom.query(&q(0.9)).await?),
            });
        }
        let (edges, dropped) = dashboards::kiali_graph(prom, "default").await?;

        let dir = dashboards_dir();
        let mut panels = Vec::new();
        if dir.is_dir() {
            let workloads =
                dashboards::label_values(prom, "istio_requests_total", "destination_workload")
                    .await?;
            for file in dashboards::DASHBOARDS {
                let loaded = dashboards::load(&dir.join(file))?;
                let settings = settings(file, &services, &workloads);
                panels.extend(dashboards::evaluate(prom, &loaded, &settings).await);
            }
        } else {
            println!(
                "Istio's dashboards are not at {} (../shared): panels not checked",
                dir.display()
            );
        }
        // Prometheus keys OpenMetrics counters by their family name (no `_total`).
        let metadata = prom.metadata().await?;
        let types = TYPED
            .iter()
            .map(|(name, _)| {
                let family = name.strip_suffix("_total").unwrap_or(name);
                let t = metadata
                    .get(*name)
                    .or_else(|| metadata.get(family))
                    .cloned();
                (*name, t)
            })
            .collect();
        let spans = self.collector.spans();
        let trace = crate::traces::pick(&spans);
        let report = Report {
            spans: spans.len(),
            trace,
            types,
            prometheus: prom.addr,
            services: rows,
            edges,
            dropped,
            panels,
        };
        print_report(&report);
        run.visual = Some(report);
        Ok(())
    }
}

/// The variable settings a user would pick: each service (Service dashboard) or workload
/// (Workload dashboard) with each reporter; the Mesh dashboard has no variables.
fn settings<'a>(
    file: &str,
    services: &[String],
    workloads: &[String],
) -> Vec<BTreeMap<&'a str, String>> {
    let reporters = ["source", "destination"];
    let mut out = Vec::new();
    match file {
        "istio-service-dashboard.json" => {
            for s in services {
                for r in reporters {
                    out.push(BTreeMap::from([
                        ("service", s.clone()),
                        ("qrep", r.to_string()),
                    ]));
                }
            }
        }
        "istio-workload-dashboard.json" => {
            for w in workloads.iter().filter(|w| w.as_str() != "unknown") {
                for r in reporters {
                    out.push(BTreeMap::from([
                        ("namespace", "default".to_string()),
                        ("workload", w.clone()),
                        ("qrep", r.to_string()),
                    ]));
                }
            }
            if out.is_empty() {
                // No workload label yet: the dashboard's default selection is empty.
                for r in reporters {
                    out.push(BTreeMap::from([
                        ("namespace", "default".to_string()),
                        ("workload", "frontend".to_string()),
                        ("qrep", r.to_string()),
                    ]));
                }
            }
        }
        _ => out.push(BTreeMap::new()),
    }
    out
}

fn print_report(r: &Report) {
    println!("Prometheus {} (scrapes Sluice every {} s; its own UI is at http://{}/graph, try `istio_requests_total`)", r.prometheus, prometheus::SCRAPE_INTERVAL.as_secs(), r.prometheus);
    println!(
        "  {:<40} {:>8} {:>9} {:>9} {:>9}",
        "service (from Prometheus)", "req/s", "success", "p50", "p90"
    );
    let ms = |v: Option<f64>| {
        v.map_or("-".to_string(), |v| {
            if v < 10.0 {
                format!("{v:.1} ms")
            } else {
                format!("{v:.0} ms")
            }
        })
    };
    for s in &r.services {
        println!(
            "  {:<40} {:>8.2} {:>9} {:>9} {:>9}",
            s.service,
            s.rate,
            s.success
                .map_or("-".to_string(), |v| format!("{:.0}%", v * 100.0)),
            ms(s.p50_ms),
            ms(s.p90_ms)
        );
    }
    if r.edges.is_empty() {
        println!(
            "Kiali's graph: no edges ({} series dropped: Kiali needs every one of {} on a series)",
            r.dropped,
            dashboards::KIALI_REQUIRED.join(", ")
        );
    } else {
        println!("Kiali's graph (namespace default, last minute):");
        for e in &r.edges {
            println!(
                "  {} -> {} ({}): {:.2} req/s, {:.0}% errors",
                e.from,
                e.to,
                e.reporter,
                e.rate,
                e.error_rate * 100.0
            );
        }
    }
    let mut per: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for p in &r.panels {
        let e = per.entry(p.dashboard.as_str()).or_default();
        e.1 += 1;
        if p.has_data() {
            e.0 += 1;
        }
    }
    for (d, (with, all)) in &per {
        println!("{d}: {with} of {all} panel views have data");
    }
    let types: Vec<String> = r
        .types
        .iter()
        .map(|(n, t)| format!("{n} {}", t.as_deref().unwrap_or("(none)")))
        .collect();
    println!("metric types Prometheus recorded: {}", types.join(", "));
    println!(
        "traces: {} spans received over OTLP (sluice run --otlp-endpoint, --trace-sampling 100); one of them:",
        r.spans
    );
    match &r.trace {
        Some(t) => crate::traces::print(t),
        None => println!("  (no trace with an attempt yet)"),
    }
    for (d, t) in missing(r) {
        println!("  no data: {d} / {t}");
    }
}

/// Panels with no data under any setting, as `(dashboard, title)`.
fn missing(r: &Report) -> Vec<(String, String)> {
    let mut by: BTreeMap<(String, String), bool> = BTreeMap::new();
    for p in &r.panels {
        *by.entry((p.dashboard.clone(), p.title.clone()))
            .or_default() |= p.has_data();
    }
    by.into_iter()
        .filter(|(_, has)| !has)
        .map(|(k, _)| k)
        .collect()
}

/// Step 9's check: Prometheus ran and saw the services; every panel of Istio's Service, Workload
/// and Mesh dashboards has data (under at least one of the settings a user would pick); Kiali's
/// graph has the tutorial's call graph under both reporters.
pub(super) fn check(run: &StepRun) -> Result<(), String> {
    let Some(r) = &run.visual else {
        return if std::env::var("CI").as_deref() == Ok("true") {
            Err("visualization: Prometheus did not run".into())
        } else {
            Ok(())
        };
    };
    if !r
        .services
        .iter()
        .any(|s| s.service.starts_with("frontend.") && s.rate > 0.0)
    {
        return Err("visualization: Prometheus has no request rate for frontend".into());
    }
    let errors: Vec<String> = r
        .panels
        .iter()
        .flat_map(|p| {
            p.errors
                .iter()
                .map(move |e| format!("{} / {} ({}): {e}", p.dashboard, p.title, p.setting))
        })
        .collect();
    if !errors.is_empty() {
        return Err(format!(
            "visualization: panel queries failed: {}",
            errors.join("; ")
        ));
    }
    match &r.trace {
        Some(t) if !t.attempts.is_empty() => {}
        _ => {
            return Err(format!(
                "visualization: no trace of a request with its attempts among {} spans received",
                r.spans
            ))
        }
    }
    for ((name, t), (_, want)) in r.types.iter().zip(TYPED) {
        if !t.as_deref().is_some_and(|t| want.contains(&t)) {
            return Err(format!(
                "visualization: Prometheus has {name} as {t:?}, not {}",
                want.join(" or ")
            ));
        }
    }
    let missing = missing(r);
    if !missing.is_empty() {
        let names: Vec<String> = missing.iter().map(|(d, t)| format!("{d} / {t}")).collect();
        return Err(format!("visualization: no data in {}", names.join(", ")));
    }
    // The tutorial's call graph, as Kiali would draw it from both reporters.
    let calls = [
        ("traffic-generator", "frontend"),
        ("frontend", "product"),
        ("product", "pricing"),
        ("product", "inventory"),
    ];
    let workload = |node: &str, app: &str| {
        node.strip_prefix("default/")
            .is_some_and(|w| w == app || w.starts_with(&format!("{app}-")))
    };
    for reporter in ["source", "destination"] {
        for (from, to) in calls {
            if !r.edges.iter().any(|e| {
                e.reporter == reporter
                    && workload(&e.from, from)
                    && workload(&e.to, to)
                    && e.rate > 0.0
            }) {
                return Err(format!(
                    "visualization: Kiali would draw no {from} -> {to} edge from {reporter} telemetry"
                ));
            }
        }
    }
    Ok(())
}
