//! The spans of one finished request, made from its [`Record`] as Envoy makes them when every
//! upstream request gets a span of its own (`spawn_upstream_span`, which Sluice's per-attempt
//! propagation corresponds to):
//!
//! - the request span: named by Istio's route decorator, `<service host>:<port>/*`; kind SERVER
//!   (Envoy's downstream span is SERVER once upstream spans are spawned, which are CLIENT); Envoy's
//!   tags (`node_id`, `guid:x-request-id`, `http.url`, `http.method`, `downstream_cluster`,
//!   `user_agent`, `http.protocol`, `peer.address`, `request_size`, `response_size`, `component`,
//!   `upstream_cluster`, `upstream_cluster.name`, `http.status_code`, `response_flags`, `error`)
//!   and Istio's (`istio.canonical_service`, `istio.canonical_revision`, `istio.namespace`,
//!   `istio.mesh_id`, `istio.cluster_id`, of the client workload);
//! - one span per attempt that picked an endpoint: `router <cluster> egress`, kind CLIENT, child
//!   of the request span, with `upstream_address`, `peer.address`, `http.status_code`,
//!   `response_flags`, `retry.count` (retries only), `canceled` (the proxy abandoned it), `error`,
//!   Istio's tags, and `network.peer.address`/`network.peer.port` and `sluice.timeout`
//!   (`per_try` or `route`: the proxy's timer that ended it).
//!
//! Tag values are strings, as Envoy writes them; an error also sets the span status to ERROR.

use super::context::TraceContext;
use crate::record::{HttpRequest, Record};
use sluice_core::{AttemptRecord, Deadline, ResponseFlags};
use std::time::{Duration, Instant, SystemTime};

/// An attribute value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

impl From<&str> for AttrValue {
    fn from(s: &str) -> Self {
        AttrValue::Str(s.to_owned())
    }
}

impl From<String> for AttrValue {
    fn from(s: String) -> Self {
        AttrValue::Str(s)
    }
}

pub type Attributes = Vec<(&'static str, AttrValue)>;

/// A finished request's span and its attempts' spans, ready for export.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestSpan {
    pub trace_id: u128,
    pub span_id: u64,
    /// The client's span.
    pub parent: Option<u64>,
    pub tracestate: Option<String>,
    pub name: String,
    pub start: SystemTime,
    pub duration: Duration,
    pub attributes: Attributes,
    pub error: bool,
    pub attempts: Vec<AttemptSpan>,
}

/// One upstream attempt's span (a child of its request's span).
#[derive(Clone, Debug, PartialEq)]
pub struct AttemptSpan {
    /// 1 for the first attempt.
    pub attempt: u32,
    pub span_id: u64,
    pub name: String,
    pub start: SystemTime,
    pub duration: Duration,
    pub attributes: Attributes,
    pub error: bool,
}

impl RequestSpan {
    /// Spans in this request: its own and one per attempt.
    pub fn span_count(&self) -> usize {
        1 + self.attempts.len()
    }

    /// The spans of `record` (just finished), whose request continued `ctx`.
    pub fn of(
        record: &Record,
        req: &HttpRequest,
        ctx: &TraceContext,
        attempts: &[AttemptRecord],
        cluster_id: &str,
    ) -> Self {
        // The record's wall-clock start and the attempts' monotonic starts meet here: the request
        // began `duration` before now on the clock the attempts were timed with.
        let now = tokio::time::Instant::now().into_std();
        Self::at(record, req, ctx, attempts, cluster_id, now)
    }

    pub(crate) fn at(
        record: &Record,
        req: &HttpRequest,
        ctx: &TraceContext,
        attempts: &[AttemptRecord],
        cluster_id: &str,
        finished: Instant,
    ) -> Self {
        let began = finished.checked_sub(record.duration).unwrap_or(finished);
        let src = &record.source;
        let cluster = record.info.cluster();
        let flags = record.info.flags();
        let istio = |attrs: &mut Attributes| {
            attrs.push((
                "istio.canonical_service",
                src.canonical_service.as_str().into(),
            ));
            attrs.push((
                "istio.canonical_revision",
                src.canonical_revision.as_str().into(),
            ));
            attrs.push(("istio.namespace", src.namespace.as_str().into()));
            // Istio's default mesh id is the trust domain.
            attrs.push(("istio.mesh_id", "cluster.local".into()));
            attrs.push(("istio.cluster_id", cluster_id.into()));
        };
        let cluster_tags = |attrs: &mut Attributes| {
            if let Some(c) = &cluster {
                attrs.push(("upstream_cluster", c.as_ref().into()));
                attrs.push(("upstream_cluster.name", c.as_ref().into()));
            }
        };

        let mut attrs = Attributes::with_capacity(24);
        let peer_ip = record.peer.map(|p| p.ip().to_string());
        attrs.push((
            "node_id",
            format!(
                "sluice~{}~{}.{}~{}.svc.cluster.local",
                peer_ip.as_deref().unwrap_or("-"),
                src.workload,
                src.namespace,
                src.namespace
            )
            .into(),
        ));
        if let Some(id) = req.request_id.as_ref().and_then(|v| v.to_str().ok()) {
            attrs.push(("guid:x-request-id", id.into()));
        }
        attrs.push((
            "http.url",
            format!("http://{}{}", req.authority, truncate(&req.path, 256)).into(),
        ));
        attrs.push(("http.method", req.method.as_str().into()));
        attrs.push(("downstream_cluster", "-".into()));
        attrs.push((
            "user_agent",
            req.user_agent
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .into(),
        ));
        attrs.push(("http.protocol", protocol(req.version).into()));
        if let Some(ip) = peer_ip {
            attrs.push(("peer.address", ip.into()));
        }
        attrs.push((
            "request_size",
            record.info.request_bytes().to_string().into(),
        ));
        attrs.push(("response_size", record.response_bytes.to_string().into()));
        attrs.push(("component", "proxy".into()));
        cluster_tags(&mut attrs);
        attrs.push(("http.status_code", record.status.to_string().into()));
        attrs.push(("response_flags", flags.to_string().into()));
        let error = is_error(record.status);
        if error {
            attrs.push(("error", "true".into()));
        }
        istio(&mut attrs);

        let attempt_name = match &cluster {
            Some(c) => format!("router {c} egress"),
            None => "router egress".to_owned(),
        };
        let attempts = attempts
            .iter()
            .map(|a| {
                let mut attrs = Attributes::with_capacity(16);
                if a.attempt > 1 {
                    attrs.push(("retry.count", (a.attempt - 1).to_string().into()));
                }
                let canceled = a.timeout.is_some()
                    || a.flags
                        .contains(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
                if canceled {
                    attrs.push(("canceled", "true".into()));
                }
                attrs.push(("upstream_address", a.endpoint.to_string().into()));
                attrs.push(("peer.address", a.endpoint.to_string().into()));
                attrs.push(("network.peer.address", a.endpoint.ip().to_string().into()));
                attrs.push((
                    "network.peer.port",
                    AttrValue::Int(a.endpoint.port().into()),
                ));
                attrs.push(("component", "proxy".into()));
                cluster_tags(&mut attrs);
                attrs.push(("http.status_code", a.status.to_string().into()));
                attrs.push(("response_flags", a.flags.to_string().into()));
                if let Some(d) = a.timeout {
                    let which = match d {
                        Deadline::PerTry => "per_try",
                        Deadline::Route => "route",
                    };
                    attrs.push(("sluice.timeout", which.into()));
                }
                let error = is_error(a.status);
                if error {
                    attrs.push(("error", "true".into()));
                }
                istio(&mut attrs);
                let offset = a.started.saturating_duration_since(began);
                AttemptSpan {
                    attempt: a.attempt,
                    span_id: ctx.attempt_span_id(a.attempt),
                    name: attempt_name.clone(),
                    start: record.start + offset,
                    duration: a.duration,
                    attributes: attrs,
                    error,
                }
            })
            .collect();

        RequestSpan {
            trace_id: ctx.trace_id,
            span_id: ctx.span_id,
            parent: ctx.parent,
            tracestate: ctx
                .tracestate
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            name: span_name(cluster.as_deref(), &req.authority),
            start: record.start,
            duration: record.duration,
            attributes: attrs,
            error,
            attempts,
        }
    }
}

/// Istio's route decorator, `<host>:<port>/*`, from the cluster's name
/// (`outbound|<port>|<subset>|<host>`); Istio's own cluster names (`PassthroughCluster`) as
/// they are; without a cluster, Envoy's undecorated egress name.
fn span_name(cluster: Option<&str>, authority: &str) -> String {
    match cluster {
        Some(c) => {
            let mut parts = c.split('|');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("outbound"), Some(port), Some(_), Some(host)) => format!("{host}:{port}/*"),
                _ => c.to_owned(),
            }
        }
        None => format!("egress {authority}"),
    }
}

/// Envoy marks a span as an error for a 5xx or when no response was sent.
fn is_error(status: u16) -> bool {
    status == 0 || (500..600).contains(&status)
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// Envoy's `max_path_tag_length` (256 by default).
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_istios_decorator() {
        assert_eq!(
            span_name(
                Some("outbound|80|v1|pricing.default.svc.cluster.local"),
                "x"
            ),
            "pricing.default.svc.cluster.local:80/*"
        );
        assert_eq!(
            span_name(Some("outbound|9090||inventory.shop.svc.cluster.local"), "x"),
            "inventory.shop.svc.cluster.local:9090/*"
        );
        assert_eq!(
            span_name(Some("PassthroughCluster"), "x"),
            "PassthroughCluster"
        );
        assert_eq!(span_name(None, "nowhere:80"), "egress nowhere:80");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
