//! What a trace shows of the policy a request ran under, made once per configuration generation:
//! one note per `match` entry of each route plan and one per live cluster, shared by every request
//! they apply to ([`sluice_core::PolicyNote`]), so `sluice trace` shows the VirtualService route,
//! match and DestinationRule in force when the request was routed, not what is in force now.

use sluice_admin_api as api;
use sluice_core::{ClusterNote, PolicyNote};
use sluice_policy::{Cluster, Route};
use std::sync::Arc;

/// One note per way `route` can take a request: `[0]` for a route without `match` (or when the
/// match is unknown), then one per `match` entry.
pub(crate) fn route_notes(virtual_service: &str, route: &Route) -> Arc<[PolicyNote]> {
    let base = route_policy(virtual_service, route);
    std::iter::once(None)
        .chain(route.matches.iter().enumerate().map(Some))
        .map(|m| {
            PolicyNote::new(Arc::new(api::RoutePolicy {
                matched: m.map(|(index, conditions)| api::Match {
                    index,
                    conditions: compact(serde_json::to_value(conditions).unwrap_or_default()),
                }),
                ..base.clone()
            }))
        })
        .collect()
}

fn route_policy(virtual_service: &str, route: &Route) -> api::RoutePolicy {
    let retry = &route.retry;
    let on = &retry.retry_on;
    let mut retry_on: Vec<String> = [
        (on.five_xx, "5xx"),
        (on.gateway_error, "gateway-error"),
        (on.reset, "reset"),
        (on.connect_failure, "connect-failure"),
        (on.retriable_4xx, "retriable-4xx"),
        (on.refused_stream, "refused-stream"),
        (on.cancelled, "cancelled"),
        (on.deadline_exceeded, "deadline-exceeded"),
        (on.internal, "internal"),
        (on.resource_exhausted, "resource-exhausted"),
        (on.unavailable, "unavailable"),
    ]
    .into_iter()
    .filter(|(set, _)| *set)
    .map(|(_, name)| name.to_owned())
    .collect();
    retry_on.extend(on.retriable_status_codes.iter().map(|c| c.to_string()));
    api::RoutePolicy {
        virtual_service: virtual_service.to_owned(),
        route: route.name.clone(),
        matched: None,
        timeout_ms: route.timeout.map(|d| d.as_millis() as u64),
        retries: retry.num_retries,
        retry_on,
        per_try_timeout_ms: retry.per_try_timeout.map(|d| d.as_millis() as u64),
        fault: route
            .fault
            .as_ref()
            .and_then(|f| serde_json::to_value(f).ok())
            .map(compact),
    }
}

/// The note of a live cluster named `name`: its DestinationRule and the limits it set.
pub(crate) fn cluster_note(name: &Arc<str>, spec: &Cluster) -> Arc<ClusterNote> {
    Arc::new(ClusterNote::new(name.clone(), Some(cluster_policy(spec))))
}

fn cluster_policy(spec: &Cluster) -> PolicyNote {
    let p = &spec.policy;
    let pool = &p.connection_pool;
    PolicyNote::new(Arc::new(api::DestinationPolicy {
        destination_rule: spec.destination_rule.clone(),
        max_connections: pool.max_connections,
        max_pending_requests: pool.max_pending_requests,
        max_requests: pool.max_requests,
        max_retries: pool.max_retries,
        outlier_detection: p
            .outlier_detection
            .as_ref()
            .and_then(|o| serde_json::to_value(o).ok())
            .map(compact),
        load_balancer: serde_json::to_value(p.load_balancer).unwrap_or_default(),
    }))
}

/// `v` without what says nothing (nulls, empty lists and maps, `false`): the conditions a match
/// sets, as a person reads them.
fn compact(v: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, compact(v)))
                .filter(|(_, v)| match v {
                    Value::Null | Value::Bool(false) => false,
                    Value::Array(a) => !a.is_empty(),
                    Value::Object(o) => !o.is_empty(),
                    _ => true,
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(compact).collect()),
        v => v,
    }
}
