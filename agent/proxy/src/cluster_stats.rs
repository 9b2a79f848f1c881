//! Cluster state for people and scrapers: the admin API's `/clusters` JSON (endpoints with outlier
//! state, pool occupancy, Envoy-named counters, recent ejections) and the `envoy_cluster_*` Prometheus
//! series Istio dashboards read for circuit breaking and outlier detection.

use crate::state::State;
use serde_json::Value;
use sluice_admin_api as api;
use std::collections::BTreeMap;
use std::fmt::Write as _;

pub(crate) fn clusters(state: &State) -> Vec<api::Cluster> {
    let mut keys: Vec<_> = state.upstreams.keys().collect();
    keys.sort();
    let now = tokio::time::Instant::now();
    keys.into_iter()
        .map(|key| {
            let up = &state.upstreams[key];
            let hosts = up.handle.hosts().into_iter().map(host).collect();
            let outlier_events = up
                .handle
                .outlier_events()
                .into_iter()
                .map(|e| api::OutlierEvent {
                    host: e.host.to_string(),
                    ago_ms: now.saturating_duration_since(e.at).as_millis() as u64,
                    kind: match e.kind {
                        sluice_upstream::OutlierEventKind::Ejected {
                            reason,
                            ejections,
                            duration,
                        } => api::OutlierEventKind::Ejected {
                            reason: format!("{reason:?}"),
                            ejections,
                            duration_ms: duration.as_millis() as u64,
                        },
                        sluice_upstream::OutlierEventKind::Unejected => {
                            api::OutlierEventKind::Unejected
                        }
                    },
                })
                .collect();
            api::Cluster {
                name: key.to_string(),
                protocol: format!("{:?}", up.handle.protocol()),
                stats: stats(&up.handle.stats()),
                retry_budget: api::RetryBudget {
                    max: up.retry_budget.max(),
                    active: up.retry_budget.active(),
                    upstream_rq_retry_overflow: up.retry_budget.overflows(),
                },
                hosts,
                outlier_events,
            }
        })
        .collect()
}

/// `/endpoints`: every cluster's endpoints as rows, with the outlier check's verdict.
pub(crate) fn endpoints(state: &State) -> Vec<api::Endpoint> {
    let mut keys: Vec<_> = state.upstreams.keys().collect();
    keys.sort();
    let now_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    keys.into_iter()
        .flat_map(|key| {
            state.upstreams[key]
                .handle
                .hosts()
                .into_iter()
                .map(move |h| {
                    let host = host(h);
                    api::Endpoint {
                        service: key.host.clone(),
                        cluster: key.to_string(),
                        status: if host.ejected { "UNHEALTHY" } else { "HEALTHY" }.into(),
                        outlier_check: if host.ejected { "FAILED" } else { "OK" }.into(),
                        ejected_until_unix_ms: host.ejected_for_ms.map(|ms| now_unix_ms + ms),
                        host,
                    }
                })
        })
        .collect()
}

fn host(h: sluice_upstream::HostStatus) -> api::Host {
    api::Host {
        addr: h.addr.to_string(),
        pod: h.pod,
        ejected: h.ejected,
        ejected_for_ms: h.ejected_for.map(|d| d.as_millis() as u64),
        ejection_count: h.ejections,
        multiplier: h.multiplier,
        consecutive_5xx: h.consecutive_5xx,
        consecutive_gateway: h.consecutive_gateway,
        consecutive_local: h.consecutive_local,
        active_requests: h.active_requests,
        connections: h.connections,
        idle_connections: h.idle_connections,
        total_requests: h.total_requests,
    }
}

/// Envoy's names and values of a cluster's stats.
fn stats(s: &sluice_upstream::ClusterStats) -> BTreeMap<String, u64> {
    // ClusterStats serialises as a flat struct of counters: every field is a u64 under its name.
    serde_json::to_value(s)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// Envoy's stat type: what is in use now (`*_active`, `membership_*`) is a gauge; every other
/// cluster stat counts events.
fn envoy_type(stat: &str) -> &'static str {
    if stat.ends_with("_active") || stat.starts_with("membership_") {
        "gauge"
    } else {
        "counter"
    }
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
        let _ = writeln!(out, "# TYPE envoy_cluster_{name} {}", envoy_type(&name));
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

#[cfg(test)]
mod tests {
    use super::envoy_type;

    #[test]
    fn envoy_stat_types() {
        for gauge in [
            "upstream_rq_active",
            "upstream_cx_active",
            "upstream_rq_pending_active",
            "membership_healthy",
            "outlier_detection_ejections_active",
        ] {
            assert_eq!(envoy_type(gauge), "gauge", "{gauge}");
        }
        for counter in [
            "upstream_rq_pending_overflow",
            "upstream_rq_total",
            "upstream_cx_connect_fail",
            "outlier_detection_ejections_enforced_total",
            "upstream_rq_retry_overflow",
        ] {
            assert_eq!(envoy_type(counter), "counter", "{counter}");
        }
    }
}
