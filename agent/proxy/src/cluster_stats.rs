//! Cluster state for people and scrapers: the admin API's `/clusters` JSON (endpoints with outlier
//! state, pool occupancy, Envoy-named counters, recent ejections) and the `envoy_cluster_*` Prometheus
//! series Istio dashboards read for circuit breaking and outlier detection.

use crate::state::State;
use serde_json::{json, Value};
use std::fmt::Write as _;

pub(crate) fn clusters_json(state: &State) -> Value {
    let mut keys: Vec<_> = state.upstreams.keys().collect();
    keys.sort();
    let now = tokio::time::Instant::now();
    let clusters: Vec<Value> = keys
        .into_iter()
        .map(|key| {
            let up = &state.upstreams[key];
            let hosts: Vec<Value> = up
                .handle
                .hosts()
                .into_iter()
                .map(|h| {
                    json!({
                        "addr": h.addr.to_string(),
                        "pod": h.pod,
                        "ejected": h.ejected,
                        "ejected_for_ms": h.ejected_for.map(|d| d.as_millis() as u64),
                        "ejection_count": h.ejections,
                        "multiplier": h.multiplier,
                        "consecutive_5xx": h.consecutive_5xx,
                        "consecutive_gateway": h.consecutive_gateway,
                        "consecutive_local": h.consecutive_local,
                        "active_requests": h.active_requests,
                        "connections": h.connections,
                        "idle_connections": h.idle_connections,
                        "total_requests": h.total_requests,
                    })
                })
                .collect();
            let events: Vec<Value> = up
                .handle
                .outlier_events()
                .into_iter()
                .map(|e| {
                    let ago = now.saturating_duration_since(e.at).as_millis() as u64;
                    match e.kind {
                        sluice_upstream::OutlierEventKind::Ejected {
                            reason,
                            ejections,
                            duration,
                        } => json!({
                            "host": e.host.to_string(), "event": "ejected", "ago_ms": ago,
                            "reason": format!("{reason:?}"), "ejections": ejections,
                            "duration_ms": duration.as_millis() as u64,
                        }),
                        sluice_upstream::OutlierEventKind::Unejected => json!({
                            "host": e.host.to_string(), "event": "unejected", "ago_ms": ago,
                        }),
                    }
                })
                .collect();
            json!({
                "name": key.to_string(),
                "protocol": format!("{:?}", up.handle.protocol()),
                "stats": up.handle.stats(),
                "retry_budget": {
                    "max": up.retry_budget.max(),
                    "active": up.retry_budget.active(),
                    "upstream_rq_retry_overflow": up.retry_budget.overflows(),
                },
                "hosts": hosts,
                "outlier_events": events,
            })
        })
        .collect();
    Value::Array(clusters)
}

/// Appends `envoy_cluster_<stat>{cluster_name="..."}` series for every cluster.
pub(crate) fn encode_prometheus(state: &State, out: &mut String) {
    let mut keys: Vec<_> = state.upstreams.keys().collect();
    keys.sort();
    let stats: Vec<(String, Value)> = keys
        .into_iter()
        .map(|k| {
            let up = &state.upstreams[k];
            let mut v = serde_json::to_value(up.handle.stats()).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert(
                    "upstream_rq_retry_overflow".into(),
                    up.retry_budget.overflows().into(),
                );
            }
            (k.to_string(), v)
        })
        .collect();
    let Some((_, Value::Object(first))) = stats.first() else {
        return;
    };
    let names: Vec<String> = first.keys().cloned().collect();
    for name in names {
        let _ = writeln!(out, "# TYPE envoy_cluster_{name} gauge");
        for (cluster, v) in &stats {
            if let Some(n) = v.get(&name).and_then(Value::as_u64) {
                let _ = writeln!(
                    out,
                    "envoy_cluster_{name}{{cluster_name=\"{cluster}\"}} {n}"
                );
            }
        }
    }
}
