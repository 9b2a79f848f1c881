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

/// Panels that have no data from Sluice's metrics yet, as `(dashboard title, panel title)`:
/// they read `reporter="destination"` (the "Server"/"Incoming" panels), `destination_workload`,
/// `istio_request_bytes`/`istio_response_bytes`, `istio_tcp_*` for HTTP connections, or
/// `istio_build`, none of which Sluice reports yet.
/// The check fails when a panel outside this list has no data, and when one in it gets data
/// (then it leaves the list), so the list stays the truth.
pub const KNOWN_NO_DATA: &[(&str, &str)] = &[
    ("Istio Mesh Dashboard", "Istio Component Versions"),
    ("Istio Mesh Dashboard", "TCP Workloads"),
    (
        "Istio Service Dashboard",
        "Bytes Received from Incoming TCP Connection",
    ),
    (
        "Istio Service Dashboard",
        "Bytes Sent to Incoming TCP Connection",
    ),
    (
        "Istio Service Dashboard",
        "Incoming Request Duration By Service Workload",
    ),
    (
        "Istio Service Dashboard",
        "Incoming Request Size By Service Workload",
    ),
    ("Istio Service Dashboard", "Incoming Request Size By Source"),
    (
        "Istio Service Dashboard",
        "Incoming Requests By Destination Workload And Response Code",
    ),
    (
        "Istio Service Dashboard",
        "Incoming Success Rate (non-5xx responses) By Destination Workload",
    ),
    (
        "Istio Service Dashboard",
        "Response Size By Service Workload",
    ),
    ("Istio Service Dashboard", "Response Size By Source"),
    ("Istio Service Dashboard", "Server Request Duration"),
    ("Istio Service Dashboard", "Server Request Volume"),
    (
        "Istio Service Dashboard",
        "Server Success Rate (non-5xx responses)",
    ),
    ("Istio Service Dashboard", "TCP Received Bytes"),
    ("Istio Service Dashboard", "TCP Sent Bytes"),
    (
        "Istio Workload Dashboard",
        "Bytes Received from Incoming TCP Connection",
    ),
    (
        "Istio Workload Dashboard",
        "Bytes Received from Outgoing TCP Connection",
    ),
    (
        "Istio Workload Dashboard",
        "Bytes Sent on Outgoing TCP Connection",
    ),
    (
        "Istio Workload Dashboard",
        "Bytes Sent to Incoming TCP Connection",
    ),
    (
        "Istio Workload Dashboard",
        "Incoming Request Duration By Source",
    ),
    (
        "Istio Workload Dashboard",
        "Incoming Request Size By Source",
    ),
    ("Istio Workload Dashboard", "Incoming Request Volume"),
    (
        "Istio Workload Dashboard",
        "Incoming Requests By Source And Response Code",
    ),
    (
        "Istio Workload Dashboard",
        "Incoming Success Rate (non-5xx responses)",
    ),
    (
        "Istio Workload Dashboard",
        "Incoming Success Rate (non-5xx responses) By Source",
    ),
    (
        "Istio Workload Dashboard",
        "Outgoing Request Size By Destination",
    ),
    ("Istio Workload Dashboard", "Request Duration"),
    ("Istio Workload Dashboard", "Response Size By Destination"),
    ("Istio Workload Dashboard", "Response Size By Source"),
    ("Istio Workload Dashboard", "TCP Client Traffic"),
    ("Istio Workload Dashboard", "TCP Server Traffic"),
];

/// Kiali draws no edge yet: every series lacks some of its grouping labels.
pub const KIALI_EDGES_KNOWN_MISSING: bool = true;

/// What Step 9 saw.
pub struct Report {
    pub prometheus: SocketAddr,
    pub services: Vec<ServiceRow>,
    pub edges: Vec<Edge>,
    /// Series Kiali would drop for lack of a label.
    pub dropped: usize,
    pub panels: Vec<PanelResult>,
}

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
        let report = Report {
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
            dashboards::KIALI_LABELS.join(", ")
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

/// Step 9's check: Prometheus ran and saw the services; no panel lacks data that should have it;
/// the known gaps are still gaps.
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
    let missing = missing(r);
    let unexpected: Vec<String> = missing
        .iter()
        .filter(|(d, t)| !KNOWN_NO_DATA.contains(&(d.as_str(), t.as_str())))
        .map(|(d, t)| format!("{d} / {t}"))
        .collect();
    if !unexpected.is_empty() {
        return Err(format!(
            "visualization: no data in {}",
            unexpected.join(", ")
        ));
    }
    let now_full: Vec<String> = KNOWN_NO_DATA
        .iter()
        .filter(|(d, t)| r.panels.iter().any(|p| p.dashboard == *d && p.title == *t))
        .filter(|k| !missing.iter().any(|(d, t)| (d.as_str(), t.as_str()) == **k))
        .map(|(d, t)| format!("{d} / {t}"))
        .collect();
    if !now_full.is_empty() {
        return Err(format!(
            "visualization: {} now have data: take them off KNOWN_NO_DATA",
            now_full.join(", ")
        ));
    }
    if KIALI_EDGES_KNOWN_MISSING != r.edges.is_empty() {
        return Err(format!(
            "visualization: Kiali edges {} but KIALI_EDGES_KNOWN_MISSING is {KIALI_EDGES_KNOWN_MISSING}",
            if r.edges.is_empty() { "missing" } else { "present" }
        ));
    }
    Ok(())
}
