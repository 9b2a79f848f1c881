//! Grafana's Istio dashboards and Kiali's graph, read the way they read Prometheus: every panel's
//! PromQL with its template variables filled in as Grafana fills them, and Kiali's namespace-graph
//! queries with its rule that a series lacking one of the grouping labels is dropped. The demo's
//! Step 9 runs them against the Prometheus that scraped Sluice and reports which panels have data
//! and which edges Kiali would draw.

use crate::prometheus::{Prometheus, Sample};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The dashboards the tutorial's Step 9 opens (Istio's own definitions, kept in `../shared`).
pub const DASHBOARDS: &[&str] = &[
    "istio-service-dashboard.json",
    "istio-workload-dashboard.json",
    "istio-mesh-dashboard.gen.json",
];

/// The labels Kiali groups `istio_requests_total` by.
pub const KIALI_LABELS: &[&str] = &[
    "source_cluster",
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_cluster",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
];

/// The labels a series must have for Kiali's graph to keep it (its HTTP traffic map skips a
/// series missing one, "missing expected TS labels"); the clusters and `grpc_response_status` may
/// be absent (Prometheus drops a label whose value is empty, as `grpc_response_status` is for
/// HTTP).
pub const KIALI_REQUIRED: &[&str] = &[
    "source_workload_namespace",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_service_namespace",
    "destination_service",
    "destination_service_name",
    "destination_workload_namespace",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "request_protocol",
    "response_code",
    "response_flags",
];

/// One panel and the PromQL of its targets, as written in the dashboard.
#[derive(Clone, Debug)]
pub struct Panel {
    pub dashboard: String,
    pub title: String,
    pub exprs: Vec<String>,
}

/// Every panel with at least one query, rows' nested panels included.
pub fn load(path: &Path) -> Result<Vec<Panel>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let dashboard = json["title"].as_str().unwrap_or_default().to_owned();
    let mut panels = Vec::new();
    fn walk(list: &Value, dashboard: &str, out: &mut Vec<Panel>) {
        for p in list.as_array().into_iter().flatten() {
            walk(&p["panels"], dashboard, out);
            let exprs: Vec<String> = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["expr"].as_str())
                .filter(|e| !e.trim().is_empty())
                .map(str::to_owned)
                .collect();
            if !exprs.is_empty() {
                out.push(Panel {
                    dashboard: dashboard.to_owned(),
                    title: p["title"].as_str().unwrap_or_default().to_owned(),
                    exprs,
                });
            }
        }
    }
    walk(&json["panels"], &dashboard, &mut panels);
    Ok(panels)
}

/// Fills Grafana's template variables (`$name`, `${name}`, `${name:format}`, `[[name]]`) from
/// `vars`, and its built-in intervals; a variable not in `vars` is "All" (`.*`, the dashboards'
/// regex matchers take it as any value).
pub fn substitute(expr: &str, vars: &BTreeMap<&str, String>) -> String {
    let builtin = |name: &str| -> Option<String> {
        match name {
            // Grafana's rate interval: at least four scrape intervals.
            "__rate_interval" => Some("1m".into()),
            "__interval" | "__interval_ms" => Some("15s".into()),
            "__range" => Some("5m".into()),
            _ => None,
        }
    };
    let value = |name: &str| -> String {
        builtin(name)
            .or_else(|| vars.get(name).cloned())
            .unwrap_or_else(|| ".*".into())
    };
    let mut out = String::with_capacity(expr.len());
    let bytes = expr.as_bytes();
    let mut i = 0;
    let ident = |from: usize| -> usize {
        let mut j = from;
        while j < bytes.len() && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_') {
            j += 1;
        }
        j
    };
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() && bytes[i + 1] == b'{' {
            if let Some(end) = expr[i..].find('}') {
                let inner = &expr[i + 2..i + end];
                let name = inner.split(':').next().unwrap_or(inner);
                out.push_str(&value(name));
                i += end + 1;
                continue;
            }
        } else if bytes[i] == b'$' {
            let end = ident(i + 1);
            if end > i + 1 {
                out.push_str(&value(&expr[i + 1..end]));
                i = end;
                continue;
            }
        } else if expr[i..].starts_with("[[") {
            let end = ident(i + 2);
            if end > i + 2 && expr[end..].starts_with("]]") {
                out.push_str(&value(&expr[i + 2..end]));
                i = end + 2;
                continue;
            }
        }
        let ch = expr[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// What one panel showed for one setting of the dashboard's variables.
#[derive(Clone, Debug)]
pub struct PanelResult {
    pub dashboard: String,
    pub title: String,
    /// The variable settings, e.g. `service=pricing.default.svc.cluster.local qrep=destination`.
    pub setting: String,
    /// Series returned by all of the panel's queries together.
    pub series: usize,
    pub errors: Vec<String>,
}

impl PanelResult {
    pub fn has_data(&self) -> bool {
        self.series > 0
    }
}

/// Runs every panel once per setting (each a map of variable values).
pub async fn evaluate(
    prom: &Prometheus,
    panels: &[Panel],
    settings: &[BTreeMap<&str, String>],
) -> Vec<PanelResult> {
    let mut out = Vec::new();
    for vars in settings {
        let setting = vars
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ");
        for p in panels {
            let mut series = 0;
            let mut errors = Vec::new();
            for e in &p.exprs {
                match prom.query(&substitute(e, vars)).await {
                    Ok(s) => series += s.len(),
                    Err(err) => errors.push(format!("{err:#}")),
                }
            }
            out.push(PanelResult {
                dashboard: p.dashboard.clone(),
                title: p.title.clone(),
                setting: setting.clone(),
                series,
                errors,
            });
        }
    }
    out
}

/// An edge of Kiali's graph: who called whom, how often, how many failed.
#[derive(Clone, Debug, PartialEq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub reporter: &'static str,
    pub rate: f64,
    pub error_rate: f64,
}

/// What Kiali's namespace graph would show for `namespace` over the last minute: outgoing edges
/// from source telemetry, incoming from destination telemetry, after dropping series that lack
/// one of [`KIALI_REQUIRED`]. Returns the edges and how many series were dropped.
pub async fn kiali_graph(prom: &Prometheus, namespace: &str) -> Result<(Vec<Edge>, usize)> {
    let by = KIALI_LABELS.join(",");
    let queries = [
        (
            "source",
            format!(
                r#"sum(rate(istio_requests_total{{reporter="source",source_workload_namespace="{namespace}"}}[60s])) by ({by}) > 0"#
            ),
        ),
        (
            "destination",
            format!(
                r#"sum(rate(istio_requests_total{{reporter="destination",destination_workload_namespace="{namespace}"}}[60s])) by ({by}) > 0"#
            ),
        ),
    ];
    let mut edges: BTreeMap<(String, String, &'static str), (f64, f64)> = BTreeMap::new();
    let mut dropped = 0;
    for (reporter, q) in &queries {
        for Sample { labels, value } in prom.query(q).await? {
            if KIALI_REQUIRED.iter().any(|l| !labels.contains_key(*l)) {
                dropped += 1;
                continue;
            }
            let from = format!(
                "{}/{}",
                labels["source_workload_namespace"], labels["source_workload"]
            );
            let to = if labels["destination_workload"] == "unknown" {
                labels["destination_service"].clone()
            } else {
                format!(
                    "{}/{}",
                    labels["destination_workload_namespace"], labels["destination_workload"]
                )
            };
            let e = edges.entry((from, to, reporter)).or_default();
            e.0 += value;
            if labels["response_code"].starts_with('5') || labels["response_code"] == "0" {
                e.1 += value;
            }
        }
    }
    Ok((
        edges
            .into_iter()
            .map(|((from, to, reporter), (rate, errors))| Edge {
                from,
                to,
                reporter,
                rate,
                error_rate: if rate > 0.0 { errors / rate } else { 0.0 },
            })
            .collect(),
        dropped,
    ))
}

/// The label values Sluice's metrics hold for `label` (to fill the dashboards' variables).
pub async fn label_values(prom: &Prometheus, metric: &str, label: &str) -> Result<Vec<String>> {
    let set: BTreeSet<String> = prom
        .query(&format!("count by ({label}) ({metric})"))
        .await?
        .into_iter()
        .filter_map(|s| s.labels.get(label).cloned())
        .collect();
    Ok(set.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_filled_as_grafana_does() {
        let vars: BTreeMap<&str, String> = [
            ("service", "pricing.default.svc.cluster.local".to_string()),
            ("qrep", "destination".to_string()),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            substitute(
                r#"sum(irate(istio_requests_total{reporter=~"$qrep",destination_service="$service",source_workload=~"${srcwl}"}[$__rate_interval]))"#,
                &vars
            ),
            r#"sum(irate(istio_requests_total{reporter=~"destination",destination_service="pricing.default.svc.cluster.local",source_workload=~".*"}[1m]))"#
        );
        assert_eq!(
            substitute("[[service]] ${qrep:regex} $", &vars),
            "pricing.default.svc.cluster.local destination $"
        );
    }

    #[test]
    fn the_service_and_workload_dashboards_select_by_their_variable() {
        let dir = crate::tutorial::workspace_root().join("../shared/istio/dashboards");
        if !dir.is_dir() {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "{} is missing",
                dir.display()
            );
            eprintln!("SKIP: {} is missing", dir.display());
            return;
        }
        // Every query of these two is about the service or workload the user picked; a loader
        // that missed nested panels or read the wrong field would break this.
        for (file, var, at_least) in [
            ("istio-service-dashboard.json", "$service", 20),
            ("istio-workload-dashboard.json", "$workload", 18),
        ] {
            let panels = load(&dir.join(file)).unwrap();
            assert!(panels.len() >= at_least, "{file}: {} panels", panels.len());
            for p in &panels {
                assert!(
                    p.exprs.iter().all(|e| e.contains(var)),
                    "{file} {}: {:?}",
                    p.title,
                    p.exprs
                );
            }
        }
        assert!(!load(&dir.join("istio-mesh-dashboard.gen.json"))
            .unwrap()
            .is_empty());
    }
}
