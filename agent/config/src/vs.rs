//! VirtualService -> checked routes: validation as Istio's webhook does it (`validation.go`) and
//! translation as pilot does it (`route.go`, `retry.ConvertPolicy`, `TranslateFault`). Destinations
//! stay unresolved here (host, optional port, subset); `build` binds them to clusters.

use crate::duration::{check_istio_duration, parse_duration};
use crate::istio::{Destination, HttpRetry, StringMatchSpec, VirtualService};
use crate::problem::Sink;
use crate::response;
use crate::views::{check_export_to, ExportTo};
use crate::{resolve_host, BuildOptions};
use sluice_policy::{
    DirectResponse, Fault, FaultAbort, FaultDelay, HeaderMatch, HeaderOperations, IpNet, L4Match,
    QueryMatch, RequestMatch, RetryOn, RetryPolicy, StringMatch,
};
use std::time::Duration;

/// A checked VirtualService, before its destinations are bound to clusters.
#[derive(Clone, Debug)]
pub struct CheckedVs {
    pub namespace: String,
    pub name: String,
    pub creation: Option<String>,
    /// `exportTo`: which client namespaces see it.
    pub export_to: ExportTo,
    /// Fully qualified hosts (or wildcards).
    pub hosts: Vec<String>,
    /// Bound to mesh traffic (`gateways` empty or containing `mesh`).
    pub mesh: bool,
    pub routes: Vec<RouteDraft>,
    pub tcp_routes: Vec<TcpRouteDraft>,
}

/// A checked `tcp[]` rule, before its destinations are bound to clusters.
#[derive(Clone, Debug)]
pub struct TcpRouteDraft {
    pub matches: Vec<L4Match>,
    pub destinations: Vec<DestinationDraft>,
}

#[derive(Clone, Debug)]
pub struct RouteDraft {
    pub name: String,
    pub matches: Vec<RequestMatch>,
    pub destinations: Vec<DestinationDraft>,
    pub timeout: Option<Duration>,
    pub retry: RetryPolicy,
    pub fault: Option<Fault>,
    pub direct_response: Option<DirectResponse>,
    pub response_headers: Option<HeaderOperations>,
}

#[derive(Clone, Debug)]
pub struct DestinationDraft {
    pub field: String,
    pub host: String,
    pub port: Option<u16>,
    pub subset: Option<String>,
    pub weight: u32,
}

/// Istio's accepted `retryOn` values (`supportedRetryOnPolicies` in validation.go).
const RETRY_ON_ISTIO: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "reset-before-request",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// Go's `http.StatusText` knows these codes; Istio accepts a bare number in `retryOn` only if known.
fn known_status(code: u16) -> bool {
    matches!(code,
        100..=103 | 200..=208 | 226 | 300..=305 | 307 | 308 | 400..=418 | 421..=426 | 428 | 429
        | 431 | 451 | 500..=508 | 510 | 511)
}

pub(crate) fn duration_field(
    sink: &mut Sink,
    field: &str,
    value: Option<&str>,
    istio_min: bool,
) -> Option<Duration> {
    let value = value?;
    match parse_duration(value) {
        Ok(d) => {
            if istio_min {
                if let Err(reason) = check_istio_duration(d) {
                    sink.error(field, format!("{reason} (got {value:?})"));
                    return None;
                }
            } else if !d.subsec_nanos().is_multiple_of(1_000_000) {
                sink.error(
                    field,
                    format!(
                        "only durations to millisecond precision are supported (got {value:?})"
                    ),
                );
                return None;
            }
            Some(d)
        }
        Err(e) => {
            sink.error(field, e.to_string());
            None
        }
    }
}

fn percent(sink: &mut Sink, field: &str, value: f64) -> Option<f64> {
    if !(0.0..=100.0).contains(&value) || value.is_nan() {
        sink.error(field, format!("percentage {value} is not in range 0..100"));
        return None;
    }
    Some(value)
}

fn string_match(sink: &mut Sink, field: &str, m: &StringMatchSpec) -> Option<StringMatch> {
    let set = [m.exact.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if set > 1 {
        sink.error(field, "only one of exact, prefix or regex may be set");
        return None;
    }
    if let Some(e) = &m.exact {
        return Some(StringMatch::Exact(e.clone()));
    }
    if let Some(p) = &m.prefix {
        return Some(StringMatch::Prefix(p.clone()));
    }
    if let Some(r) = &m.regex {
        if r.is_empty() {
            sink.error(
                format!("{field}.regex"),
                "regex string match should not be empty",
            );
            return None;
        }
        return match StringMatch::regex(r) {
            Ok(m) => Some(m),
            Err(e) => {
                sink.error(
                    format!("{field}.regex"),
                    format!("invalid RE2 regex {r:?}: {e}"),
                );
                None
            }
        };
    }
    Some(StringMatch::Present)
}

fn named_matches<'a>(
    sink: &mut Sink,
    field: &str,
    map: impl Iterator<Item = (&'a String, &'a Option<StringMatchSpec>)>,
    lowercase: bool,
) -> Vec<(String, StringMatch)> {
    let mut out = Vec::new();
    for (name, spec) in map {
        let f = format!("{field}.{name}");
        if name.is_empty() {
            sink.error(field, "header or parameter name cannot be empty");
            continue;
        }
        let mut name = name.clone();
        if lowercase && name != name.to_ascii_lowercase() {
            sink.warn(
                &f,
                "header names must be lowercase in Istio; matched case-insensitively",
            );
            name = name.to_ascii_lowercase();
        }
        let m = match spec {
            Some(spec) => string_match(sink, &f, spec),
            None => Some(StringMatch::Present),
        };
        if let Some(m) = m {
            out.push((name, m));
        }
    }
    out
}

/// `retries` as `retry.ConvertPolicy` translates it.
pub(crate) fn convert_retry(sink: &mut Sink, field: &str, r: Option<&HttpRetry>) -> RetryPolicy {
    let Some(r) = r else {
        return RetryPolicy::istio_default();
    };
    let attempts = r.attempts.unwrap_or(0);
    if attempts < 0 {
        sink.error(
            format!("{field}.attempts"),
            format!("attempts cannot be negative (got {attempts})"),
        );
    }
    if attempts == 0
        && (r.per_try_timeout.is_some()
            || r.retry_on.is_some()
            || r.retry_remote_localities.is_some())
    {
        sink.warn(
            field,
            "http retry policy configured when attempts are set to 0 (disabled)",
        );
    }
    let per_try = duration_field(
        sink,
        &format!("{field}.perTryTimeout"),
        r.per_try_timeout.as_deref(),
        true,
    );
    let mut policy = RetryPolicy::istio_default();
    if let Some(retry_on) = r.retry_on.as_deref().filter(|s| !s.is_empty()) {
        let mut on = RetryOn::default();
        let f = format!("{field}.retryOn");
        for part in retry_on.split(',') {
            // Istio's validation does not trim, so " 5xx" is rejected there too.
            if let Ok(code) = part.parse::<u16>() {
                if known_status(code) {
                    if !on.retriable_status_codes.contains(&code) {
                        on.retriable_status_codes.push(code);
                    }
                    continue;
                }
            }
            if !RETRY_ON_ISTIO.contains(&part) {
                sink.error(&f, format!("{part:?} is not a valid retryOn policy (valid: {}, or an HTTP status code)", RETRY_ON_ISTIO.join(", ")));
                continue;
            }
            match part {
                "5xx" => on.five_xx = true,
                "gateway-error" => on.gateway_error = true,
                "reset" => on.reset = true,
                "connect-failure" => on.connect_failure = true,
                "retriable-4xx" => on.retriable_4xx = true,
                "refused-stream" => on.refused_stream = true,
                "retriable-status-codes" => {}
                "cancelled" => on.cancelled = true,
                "deadline-exceeded" => on.deadline_exceeded = true,
                "internal" => on.internal = true,
                "resource-exhausted" => on.resource_exhausted = true,
                "unavailable" => on.unavailable = true,
                other => sink.warn(
                    &f,
                    format!("retryOn {other:?} is not supported by Sluice yet; ignored"),
                ),
            }
        }
        policy.retry_on = on;
    }
    if attempts <= 0 {
        return RetryPolicy::disabled();
    }
    policy.num_retries = u32::try_from(attempts).unwrap_or(u32::MAX);
    policy.per_try_timeout = per_try;
    policy.retry_remote_localities = r.retry_remote_localities.unwrap_or(false);
    // Istio adds the `previous_hosts` predicate unless this says `false`.
    policy.avoid_previous_hosts = r.retry_ignore_previous_hosts.unwrap_or(true);
    if let Some(base) = duration_field(
        sink,
        &format!("{field}.backoff"),
        r.backoff.as_deref(),
        true,
    ) {
        // Envoy: max interval defaults to 10 x base.
        policy.backoff_base = base;
        policy.backoff_max = base * 10;
    }
    policy
}

fn convert_fault(
    sink: &mut Sink,
    field: &str,
    f: &crate::istio::HttpFaultInjection,
) -> Option<Fault> {
    if f.delay.is_none() && f.abort.is_none() {
        sink.error(
            field,
            "HTTP fault injection must have an abort and/or a delay",
        );
        return None;
    }
    let delay = f.delay.as_ref().and_then(|d| {
        let df = format!("{field}.delay");
        if d.exponential_delay.is_some() {
            sink.error(
                format!("{df}.exponentialDelay"),
                "exponentialDelay not supported yet",
            );
            return None;
        }
        let Some(fixed) = duration_field(
            sink,
            &format!("{df}.fixedDelay"),
            d.fixed_delay.as_deref(),
            true,
        ) else {
            if d.fixed_delay.is_none() {
                sink.error(format!("{df}.fixedDelay"), "required");
            }
            return None;
        };
        // Istio (TranslateFault): percentage, else the legacy integer percent; neither = 0%.
        let percentage = match (&d.percentage, d.percent) {
            (Some(p), _) => percent(
                sink,
                &format!("{df}.percentage.value"),
                p.value.unwrap_or(0.0),
            )?,
            (None, Some(p)) => percent(sink, &format!("{df}.percent"), p as f64)?,
            (None, None) => 0.0,
        };
        Some(FaultDelay {
            fixed_delay: fixed,
            percentage,
        })
    });
    let abort = f.abort.as_ref().and_then(|a| {
        let af = format!("{field}.abort");
        // Istio (TranslateFault): no percentage = Envoy's zero default, i.e. never.
        let percentage = match &a.percentage {
            Some(p) => percent(
                sink,
                &format!("{af}.percentage.value"),
                p.value.unwrap_or(0.0),
            )?,
            None => 0.0,
        };
        if a.http2_error.is_some() {
            sink.error(
                format!("{af}.http2Error"),
                "HTTP/2 abort fault injection not supported yet",
            );
            return None;
        }
        match (a.http_status, &a.grpc_status) {
            (Some(s), None) => {
                if !(200..=599).contains(&s) {
                    sink.error(
                        format!("{af}.httpStatus"),
                        format!("HTTP status {s} is not in range 200-599"),
                    );
                    return None;
                }
                Some(FaultAbort::Http {
                    status: s as u16,
                    percentage,
                })
            }
            (None, Some(g)) => {
                if !sluice_policy::GRPC_STATUS_NAMES.contains(&g.as_str()) {
                    sink.error(
                        format!("{af}.grpcStatus"),
                        format!("{g:?} is not a valid gRPC status"),
                    );
                    return None;
                }
                Some(FaultAbort::Grpc {
                    status: g.clone(),
                    percentage,
                })
            }
            (Some(_), Some(_)) => {
                sink.error(&af, "only one of httpStatus or grpcStatus may be set");
                None
            }
            (None, None) => {
                sink.error(&af, "abort needs httpStatus or grpcStatus");
                None
            }
        }
    });
    Some(Fault { delay, abort })
}

/// `route[]` (HTTP or TCP) at `field`: checked destinations as Istio validates them
/// (`validateHTTPRouteDestinations`/`validateRouteDestinations`), weights as pilot uses them (a
/// lone destination gets everything; zero-weight ones are dropped when there are others).
fn convert_destinations<'a>(
    sink: &mut Sink,
    field: &str,
    items: impl ExactSizeIterator<Item = (Option<&'a Destination>, Option<i64>)>,
    ns: &str,
    opts: &BuildOptions,
) -> Vec<DestinationDraft> {
    let count = items.len();
    let mut destinations = Vec::new();
    let mut total: i64 = 0;
    for (j, (dest, weight)) in items.enumerate() {
        let df = format!("{field}[{j}]");
        let Some(dest) = dest else {
            sink.error(format!("{df}.destination"), "destination is required");
            continue;
        };
        if dest.host.is_empty() {
            sink.error(format!("{df}.destination.host"), "host is required");
            continue;
        }
        let weight = weight.unwrap_or(0);
        if weight < 0 {
            sink.error(format!("{df}.weight"), format!("weight {weight} < 0"));
            continue;
        }
        total += weight;
        let port = match dest.port.as_ref().map(|p| p.number.unwrap_or(0)) {
            None => None,
            Some(n) if (1..=65535).contains(&n) => Some(n as u16),
            Some(n) => {
                sink.error(
                    format!("{df}.destination.port.number"),
                    format!("port number {n} must be in the range 1..65535"),
                );
                continue;
            }
        };
        destinations.push(DestinationDraft {
            field: df,
            host: resolve_host(&dest.host, ns, &opts.cluster_domain),
            port,
            subset: dest.subset.clone().filter(|s| !s.is_empty()),
            weight: weight as u32,
        });
    }
    if count > 1 && total == 0 {
        sink.error(field, "total destination weight = 0");
    }
    if destinations.len() == 1 {
        destinations[0].weight = 100;
    } else {
        // Istio drops zero-weight destinations when there are others.
        destinations.retain(|d| d.weight > 0);
    }
    destinations
}

/// One `tcp[]` rule as Istio validates it (`validateTCPRoute`, `validateTCPMatch`); `None` when
/// it does not apply to mesh traffic or has errors.
fn convert_tcp(
    sink: &mut Sink,
    field: &str,
    tcp: &crate::istio::TcpRoute,
    ns: &str,
    opts: &BuildOptions,
) -> Option<TcpRouteDraft> {
    let mut matches = Vec::new();
    for (j, m) in tcp.matches.iter().enumerate() {
        let mf = format!("{field}.match[{j}]");
        if m.source_subnet.is_some() {
            sink.unsupported(format!("{mf}.sourceSubnet"));
        }
        let mut lm = L4Match {
            source_labels: m.source_labels.clone(),
            ..L4Match::default()
        };
        for (k, net) in m.destination_subnets.iter().enumerate() {
            match IpNet::parse(net) {
                Ok(net) => lm.destination_subnets.push(net),
                Err(why) => sink.error(format!("{mf}.destinationSubnets[{k}]"), why),
            }
        }
        // Istio reads port 0 as "any port".
        match m.port {
            None | Some(0) => {}
            Some(p @ 1..=65535) => lm.port = Some(p as u16),
            Some(p) => sink.error(
                format!("{mf}.port"),
                format!("port number {p} must be in the range 1..65535"),
            ),
        }
        if let Some(source_ns) = m.source_namespace.as_deref().filter(|n| !n.is_empty()) {
            if !is_dns1123_label(source_ns) {
                sink.error(
                    format!("{mf}.sourceNamespace"),
                    format!("sourceNamespace match {source_ns} is invalid"),
                );
            }
            lm.source_namespace = Some(source_ns.to_string());
        }
        if m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh") {
            matches.push(lm);
        }
    }
    if !tcp.matches.is_empty() && matches.is_empty() {
        sink.warn(
            format!("{field}.match"),
            "every match is bound to a gateway other than mesh; route ignored for mesh traffic",
        );
        return None;
    }
    if tcp.route.is_empty() {
        sink.error(format!("{field}.route"), "TCP route is required");
        return None;
    }
    let destinations = convert_destinations(
        sink,
        &format!("{field}.route"),
        tcp.route.iter().map(|d| (d.destination.as_ref(), d.weight)),
        ns,
        opts,
    );
    Some(TcpRouteDraft {
        matches,
        destinations,
    })
}

/// A Kubernetes namespace name: lower-case alphanumerics and `-`, at most 63, alphanumeric ends.
pub(crate) fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Checks and translates one VirtualService. Errors go to `sink`; the caller drops the object if any.
pub fn convert(vs: &VirtualService, sink: &mut Sink, opts: &BuildOptions) -> CheckedVs {
    let ns = vs.metadata.namespace().to_string();
    let spec = &vs.spec;
    if spec.hosts.is_empty() {
        sink.error("spec.hosts", "at least one host is required");
    }
    let hosts: Vec<String> = spec
        .hosts
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            if h.is_empty() {
                sink.error(format!("spec.hosts[{i}]"), "host cannot be empty");
                return None;
            }
            Some(resolve_host(h, &ns, &opts.cluster_domain))
        })
        .collect();
    let mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
    if spec.tls.is_some() {
        sink.unsupported("spec.tls");
    }
    let export_to = check_export_to(sink, &spec.export_to, &ns, false);
    let mut routes = Vec::new();
    for (i, http) in spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        let unsupported = [
            ("redirect", http.redirect.is_some()),
            ("delegate", http.delegate.is_some()),
            ("rewrite", http.rewrite.is_some()),
            ("mirror", http.mirror.is_some()),
            ("mirrors", http.mirrors.is_some()),
            ("mirrorPercent", http.mirror_percent.is_some()),
            ("mirror_percent", http.mirror_percent_legacy.is_some()),
            ("mirrorPercentage", http.mirror_percentage.is_some()),
            ("corsPolicy", http.cors_policy.is_some()),
            (
                "headers.request",
                http.headers.as_ref().is_some_and(|h| h.request.is_some()),
            ),
        ];
        for (name, present) in unsupported {
            if present {
                sink.unsupported(format!("{field}.{name}"));
            }
        }
        let response_headers = http
            .headers
            .as_ref()
            .and_then(|h| h.response.as_ref())
            .map(|ops| {
                response::header_operations(sink, &format!("{field}.headers.response"), ops)
            });
        let direct_response = http.direct_response.as_ref().and_then(|d| {
            let df = format!("{field}.directResponse");
            // Istio's validateHTTPRouteConflict, with its wording.
            for (present, other, reason) in [
                (
                    !http.route.is_empty(),
                    "route",
                    "HTTP route cannot contain both route and direct_response",
                ),
                (
                    http.redirect.is_some(),
                    "redirect",
                    "HTTP route rule cannot contain both direct_response and redirect",
                ),
                (
                    http.rewrite.is_some(),
                    "rewrite",
                    "HTTP route rule cannot contain both rewrite and direct_response",
                ),
                // Istio drops a root route's own action for its delegate's routes; Sluice has no
                // delegation, so the pair is refused rather than half applied.
                (
                    http.delegate.is_some(),
                    "delegate",
                    "HTTP route cannot contain both delegate and direct_response",
                ),
            ] {
                if present {
                    sink.error(format!("{field}.{other}"), reason);
                }
            }
            if http.fault.is_some() {
                // Istio's validation (validateHTTPRouteConflict) refuses the pair.
                sink.error(
                    format!("{field}.fault"),
                    "HTTP route cannot contain both fault and direct_response",
                );
            }
            response::direct_response(sink, &df, d)
        });
        let mut matches = Vec::new();
        let mut mesh_matches = 0;
        for (j, m) in http.matches.iter().enumerate() {
            let mf = format!("{field}.match[{j}]");
            if m.stat_prefix.is_some() {
                sink.unsupported(format!("{mf}.statPrefix"));
            }
            let mut rm = RequestMatch {
                source_labels: m.source_labels.clone(),
                ..RequestMatch::default()
            };
            if let Some(source_ns) = m.source_namespace.as_deref().filter(|n| !n.is_empty()) {
                if !is_dns1123_label(source_ns) {
                    sink.error(
                        format!("{mf}.sourceNamespace"),
                        format!("sourceNamespace match {source_ns} is invalid"),
                    );
                }
                rm.source_namespace = Some(source_ns.to_string());
            }
            let one = |sink: &mut Sink, name: &str, spec: &Option<StringMatchSpec>| {
                spec.as_ref()
                    .and_then(|s| match string_match(sink, &format!("{mf}.{name}"), s)? {
                        // An empty StringMatch on a pseudo-header constrains nothing.
                        StringMatch::Present => None,
                        m => Some(m),
                    })
            };
            rm.uri = one(sink, "uri", &m.uri);
            rm.scheme = one(sink, "scheme", &m.scheme);
            rm.method = one(sink, "method", &m.method);
            rm.authority = one(sink, "authority", &m.authority);
            rm.headers = named_matches(sink, &format!("{mf}.headers"), m.headers.iter(), true)
                .into_iter()
                .map(|(name, value)| HeaderMatch { name, value })
                .collect();
            rm.without_headers = named_matches(
                sink,
                &format!("{mf}.withoutHeaders"),
                m.without_headers.iter(),
                true,
            )
            .into_iter()
            .map(|(name, value)| HeaderMatch { name, value })
            .collect();
            rm.query_params = named_matches(
                sink,
                &format!("{mf}.queryParams"),
                m.query_params.iter(),
                false,
            )
            .into_iter()
            .map(|(name, value)| QueryMatch { name, value })
            .collect();
            if let Some(p) = m.port {
                if !(1..=65535).contains(&p) {
                    sink.error(
                        format!("{mf}.port"),
                        format!("port number {p} must be in the range 1..65535"),
                    );
                } else {
                    rm.port = Some(p as u16);
                }
            }
            rm.ignore_uri_case = m.ignore_uri_case.unwrap_or(false);
            // A match bound to gateways other than `mesh` does not apply to mesh traffic.
            if m.gateways.is_empty() || m.gateways.iter().any(|g| g == "mesh") {
                matches.push(rm);
                mesh_matches += 1;
            }
        }
        if !http.matches.is_empty() && mesh_matches == 0 {
            sink.warn(
                format!("{field}.match"),
                "every match is bound to a gateway other than mesh; route ignored for mesh traffic",
            );
            continue;
        }
        for (j, d) in http.route.iter().enumerate() {
            if d.headers.is_some() {
                sink.unsupported(format!("{field}.route[{j}].headers"));
            }
        }
        let destinations = convert_destinations(
            sink,
            &format!("{field}.route"),
            http.route
                .iter()
                .map(|d| (d.destination.as_ref(), d.weight)),
            &ns,
            opts,
        );
        if http.route.is_empty() && http.direct_response.is_none() {
            if http.redirect.is_none() && http.delegate.is_none() {
                sink.error(
                    format!("{field}.route"),
                    "HTTP route, redirect or direct_response is required",
                );
            } else {
                sink.warn(
                    &field,
                    "route without destinations ignored (its redirect/delegate is not supported)",
                );
            }
            continue;
        }
        let timeout = duration_field(
            sink,
            &format!("{field}.timeout"),
            http.timeout.as_deref(),
            false,
        )
        .filter(|d| !d.is_zero());
        let retry = convert_retry(sink, &format!("{field}.retries"), http.retries.as_ref());
        let fault = http
            .fault
            .as_ref()
            .and_then(|f| convert_fault(sink, &format!("{field}.fault"), f));
        let name = http
            .name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("{ns}/{}.{i}", vs.metadata.name));
        routes.push(RouteDraft {
            name,
            matches,
            destinations,
            timeout,
            retry,
            fault,
            direct_response,
            response_headers,
        });
    }
    let tcp_routes = spec
        .tcp
        .iter()
        .enumerate()
        .filter_map(|(i, tcp)| convert_tcp(sink, &format!("spec.tcp[{i}]"), tcp, &ns, opts))
        .collect();
    CheckedVs {
        tcp_routes,
        namespace: ns,
        export_to,
        name: vs.metadata.name.clone(),
        creation: vs.metadata.creation_timestamp.clone(),
        hosts,
        mesh,
        routes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_ignore_previous_hosts_false_drops_the_predicate() {
        let origin = crate::problem::Origin::file("t.yaml", 0);
        let mut sink = Sink::new(&origin, None);
        let retry = |ignore: Option<bool>| HttpRetry {
            attempts: Some(2),
            retry_ignore_previous_hosts: ignore,
            ..Default::default()
        };
        let f = "spec.http[0].retries";
        assert!(convert_retry(&mut sink, f, Some(&retry(None))).avoid_previous_hosts);
        assert!(convert_retry(&mut sink, f, Some(&retry(Some(true)))).avoid_previous_hosts);
        assert!(!convert_retry(&mut sink, f, Some(&retry(Some(false)))).avoid_previous_hosts);
        assert!(sink.problems.is_empty(), "{:?}", sink.problems);
    }
}
