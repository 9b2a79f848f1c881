//! DestinationRule -> traffic-policy layers: validation as Istio's webhook does it, translation as
//! pilot's cluster builder does it (`applyConnectionPool`, `applyOutlierDetection`), and the override
//! order of `MergeSubsetTrafficPolicy` (pilot/pkg/networking/util): a matching port-level entry
//! replaces every section (absent ones fall back to defaults); otherwise each section present in the
//! subset replaces the whole section below it. Sections are never merged field by field.

use crate::istio::{
    ConnectionPoolSpec, DestinationRule, LoadBalancerSpec, OutlierDetectionSpec, TrafficPolicySpec,
};
use crate::problem::Sink;
use crate::views::{check_export_to, ExportTo};
use crate::vs::duration_field;
use crate::{resolve_host, BuildOptions};
use sluice_policy::{
    ConnectionPool, H2UpgradePolicy, LoadBalancer, OutlierDetection, RetryBudgetPolicy,
    TcpKeepalive, TrafficPolicy, Warmup,
};
use std::collections::BTreeMap;
use std::time::Duration;

/// The sections of one `trafficPolicy` (or port-level entry); `None` = not given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sections {
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    /// `simple`, and `warmup` where it applies.
    pub load_balancer: Option<(LoadBalancer, Option<Warmup>)>,
}

impl Sections {
    fn into_policy(self) -> TrafficPolicy {
        TrafficPolicy {
            connection_pool: self.connection_pool.unwrap_or_default(),
            outlier_detection: self.outlier_detection,
            load_balancer: self.load_balancer.map(|l| l.0).unwrap_or_default(),
            retry_budget: None,
            warmup: self.load_balancer.and_then(|l| l.1),
        }
    }
}

/// A checked `trafficPolicy`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layer {
    pub sections: Sections,
    /// `portLevelSettings` by port number (first entry for a port wins, as in Istio).
    pub ports: BTreeMap<u16, Sections>,
    /// `retryBudget` (there is no port-level one).
    pub retry_budget: Option<RetryBudgetPolicy>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CheckedSubset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub policy: Option<Layer>,
}

#[derive(Clone, Debug)]
pub struct CheckedDr {
    pub namespace: String,
    pub name: String,
    pub creation: Option<String>,
    /// `exportTo`: which client namespaces see it.
    pub export_to: ExportTo,
    pub host: String,
    pub policy: Option<Layer>,
    pub subsets: Vec<CheckedSubset>,
}

/// Istio's `MergeSubsetTrafficPolicy` for one port, then defaults for what is still unset.
pub fn effective(top: Option<&Layer>, subset: Option<&Layer>, port: u16) -> TrafficPolicy {
    let base = match top {
        None => Sections::default(),
        Some(t) => t
            .ports
            .get(&port)
            .cloned()
            .unwrap_or_else(|| t.sections.clone()),
    };
    let merged = match subset {
        None => base,
        Some(s) => match s.ports.get(&port) {
            Some(port_level) => port_level.clone(),
            None => Sections {
                connection_pool: s.sections.connection_pool.clone().or(base.connection_pool),
                outlier_detection: s
                    .sections
                    .outlier_detection
                    .clone()
                    .or(base.outlier_detection),
                load_balancer: s.sections.load_balancer.or(base.load_balancer),
            },
        },
    };
    let mut policy = merged.into_policy();
    // A subset's retry budget replaces the top-level one (`MergeSubsetTrafficPolicy`).
    policy.retry_budget = subset
        .and_then(|s| s.retry_budget)
        .or_else(|| top.and_then(|t| t.retry_budget));
    policy
}

fn non_negative(sink: &mut Sink, field: &str, v: Option<i64>) -> Option<u32> {
    match v {
        Some(n) if n < 0 => {
            sink.error(field, format!("must be non-negative (got {n})"));
            None
        }
        Some(n) => Some(u32::try_from(n).unwrap_or(u32::MAX)),
        None => None,
    }
}

fn connection_pool(sink: &mut Sink, f: &str, cp: &ConnectionPoolSpec) -> ConnectionPool {
    let mut out = ConnectionPool::default();
    if cp.tcp.is_none() && cp.http.is_none() {
        sink.error(f, "must have at least one of tcp or http");
    }
    if let Some(tcp) = &cp.tcp {
        let tf = format!("{f}.tcp");
        // Istio only sets a limit when it is > 0; 0 keeps the (unlimited) default.
        if let Some(n) = non_negative(sink, &format!("{tf}.maxConnections"), tcp.max_connections)
            .filter(|n| *n > 0)
        {
            out.max_connections = n;
        }
        if let Some(d) = duration_field(
            sink,
            &format!("{tf}.connectTimeout"),
            tcp.connect_timeout.as_deref(),
            true,
        ) {
            out.connect_timeout = d;
        }
        if let Some(ka) = &tcp.tcp_keepalive {
            let kf = format!("{tf}.tcpKeepalive");
            out.tcp_keepalive = Some(TcpKeepalive {
                probes: non_negative(sink, &format!("{kf}.probes"), ka.probes),
                time: duration_field(sink, &format!("{kf}.time"), ka.time.as_deref(), true),
                interval: duration_field(
                    sink,
                    &format!("{kf}.interval"),
                    ka.interval.as_deref(),
                    true,
                ),
            });
        }
        // The L4 proxy's limits (Envoy's TCP proxy `max_downstream_connection_duration` and
        // `idle_timeout`, as Istio sets them); `idleTimeout: 0s` disables the idle timeout. Istio
        // also writes both into the cluster's HTTP protocol options (`max_connection_duration`,
        // and `idle_timeout` when `http.idleTimeout` is unset), so they bound upstream HTTP
        // connections as well.
        out.max_connection_duration = duration_field(
            sink,
            &format!("{tf}.maxConnectionDuration"),
            tcp.max_connection_duration.as_deref(),
            true,
        );
        if let Some(d) = duration_field(
            sink,
            &format!("{tf}.idleTimeout"),
            tcp.idle_timeout.as_deref(),
            false,
        ) {
            out.tcp_idle_timeout = (!d.is_zero()).then_some(d);
            // Istio applies it to HTTP connections too unless `http.idleTimeout` is set (below).
            out.idle_timeout = out.tcp_idle_timeout;
        }
    }
    if let Some(http) = &cp.http {
        let hf = format!("{f}.http");
        let positive = |sink: &mut Sink, name: &str, v: Option<i64>| {
            non_negative(sink, &format!("{hf}.{name}"), v).filter(|n| *n > 0)
        };
        if let Some(n) = positive(
            sink,
            "http1MaxPendingRequests",
            http.http1_max_pending_requests,
        ) {
            out.max_pending_requests = n;
        }
        if let Some(n) = positive(sink, "http2MaxRequests", http.http2_max_requests) {
            out.max_requests = n;
        }
        if let Some(n) = positive(
            sink,
            "maxRequestsPerConnection",
            http.max_requests_per_connection,
        ) {
            out.max_requests_per_connection = n;
        }
        if let Some(n) = positive(sink, "maxRetries", http.max_retries) {
            out.max_retries = n;
        }
        if let Some(d) = duration_field(
            sink,
            &format!("{hf}.idleTimeout"),
            http.idle_timeout.as_deref(),
            true,
        ) {
            out.idle_timeout = Some(d);
        }
        match http.h2_upgrade_policy.as_deref() {
            None | Some("DEFAULT") => {}
            Some("DO_NOT_UPGRADE") => out.h2_upgrade = H2UpgradePolicy::DoNotUpgrade,
            Some("UPGRADE") => out.h2_upgrade = H2UpgradePolicy::Upgrade,
            Some(other) => sink.error(
                format!("{hf}.h2UpgradePolicy"),
                format!("unknown value {other:?} (use DEFAULT, DO_NOT_UPGRADE or UPGRADE)"),
            ),
        }
        out.use_client_protocol = http.use_client_protocol.unwrap_or(false);
        if http.max_concurrent_streams.is_some() {
            sink.unsupported(format!("{hf}.maxConcurrentStreams"));
        }
        if http.http2_keep_alive.is_some() {
            sink.unsupported(format!("{hf}.http2KeepAlive"));
        }
    }
    out
}

/// As pilot's `applyOutlierDetection` sets Envoy's detectors.
fn outlier_detection(sink: &mut Sink, f: &str, od: &OutlierDetectionSpec) -> OutlierDetection {
    let mut out = OutlierDetection::default();
    // Istio stopped translating the deprecated field in 1.7: Envoy's defaults apply instead
    // (5 consecutive 5xx eject; gateway errors are counted but do not eject).
    if let Some(n) = od.consecutive_errors {
        if n < 0 {
            sink.error(
                format!("{f}.consecutiveErrors"),
                format!("must be non-negative (got {n})"),
            );
        } else {
            sink.warn(format!("{f}.consecutiveErrors"), "deprecated and ignored since Istio 1.7: Envoy's defaults apply (5 consecutive 5xx eject a host); set consecutive5xxErrors or consecutiveGatewayErrors instead");
        }
    }
    if let Some(n) = non_negative(
        sink,
        &format!("{f}.consecutive5xxErrors"),
        od.consecutive_5xx_errors,
    ) {
        out.consecutive_5xx = (n > 0).then_some(n);
    }
    if let Some(n) = non_negative(
        sink,
        &format!("{f}.consecutiveGatewayErrors"),
        od.consecutive_gateway_errors,
    ) {
        out.consecutive_gateway_errors = (n > 0).then_some(n);
    }
    let local = non_negative(
        sink,
        &format!("{f}.consecutiveLocalOriginFailures"),
        od.consecutive_local_origin_failures,
    );
    if od.split_external_local_origin_errors.unwrap_or(false) {
        // Envoy's default for consecutive_local_origin_failure is 5 when Istio does not set it.
        out.consecutive_local_origin_failures = Some(local.filter(|n| *n > 0).unwrap_or(5));
    } else if local.is_some() {
        sink.warn(
            format!("{f}.consecutiveLocalOriginFailures"),
            "has no effect unless splitExternalLocalOriginErrors is true (as in Istio)",
        );
    }
    if let Some(d) = duration_field(sink, &format!("{f}.interval"), od.interval.as_deref(), true) {
        out.interval = d;
    }
    if let Some(d) = duration_field(
        sink,
        &format!("{f}.baseEjectionTime"),
        od.base_ejection_time.as_deref(),
        true,
    ) {
        out.base_ejection_time = d;
    }
    for (name, v, target) in [
        (
            "maxEjectionPercent",
            od.max_ejection_percent,
            &mut out.max_ejection_percent,
        ),
        (
            "minHealthPercent",
            od.min_health_percent,
            &mut out.min_health_percent,
        ),
    ] {
        match v {
            Some(n) if !(0..=100).contains(&n) => {
                sink.error(
                    format!("{f}.{name}"),
                    format!("must be in range [0..100] (got {n})"),
                );
            }
            // Istio sets maxEjectionPercent only when > 0 (0 keeps Envoy's 10).
            Some(0) if name == "maxEjectionPercent" => {}
            Some(n) => *target = n as u32,
            None => {}
        }
    }
    if od.outlier_detection_http_error_codes.is_some() {
        sink.unsupported(format!("{f}.outlierDetectionHttpErrorCodes"));
    }
    out
}

fn load_balancer(
    sink: &mut Sink,
    f: &str,
    lb: &LoadBalancerSpec,
) -> (LoadBalancer, Option<Warmup>) {
    for (name, present) in [
        ("consistentHash", lb.consistent_hash.is_some()),
        ("localityLbSetting", lb.locality_lb_setting.is_some()),
        ("zoneAwareLbSetting", lb.zone_aware_lb_setting.is_some()),
    ] {
        if present {
            sink.unsupported(format!("{f}.{name}"));
        }
    }
    let simple = simple_lb(sink, f, lb);
    let warmup = match (&lb.warmup, &lb.warmup_duration_secs) {
        (Some(w), _) => warmup(sink, &format!("{f}.warmup"), w),
        (None, Some(secs)) => {
            let field = format!("{f}.warmupDurationSecs");
            match secs.as_str() {
                Some(text) => duration_field(sink, &field, Some(text), true).map(|window| Warmup {
                    window,
                    minimum_percent: 10.0,
                    aggression: 1.0,
                }),
                None => {
                    sink.error(field, "must be a duration such as 60s");
                    None
                }
            }
        }
        (None, None) => None,
    };
    // istiod writes `slow_start_config` only for ROUND_ROBIN and LEAST_REQUEST.
    let warmup = warmup.filter(|_| {
        matches!(
            simple,
            LoadBalancer::RoundRobin | LoadBalancer::LeastRequest
        )
    });
    (simple, warmup)
}

/// `warmup`, validated as Istio does: `duration` (at least 1 ms) is required, `minimumPercent`
/// is 0-100 (default 10), `aggression` at least 0 (default 1).
fn warmup(sink: &mut Sink, f: &str, v: &serde_yaml::Value) -> Option<Warmup> {
    let Some(map) = v.as_mapping() else {
        sink.error(
            f,
            "must be an object with duration, minimumPercent and aggression",
        );
        return None;
    };
    let mut window = None;
    let mut out = Warmup {
        window: Duration::ZERO,
        minimum_percent: 10.0,
        aggression: 1.0,
    };
    let mut ok = true;
    for (key, value) in map {
        let name = key.as_str().unwrap_or("?");
        let field = format!("{f}.{name}");
        match name {
            "duration" => match value.as_str() {
                Some(text) => window = duration_field(sink, &field, Some(text), true),
                None => {
                    sink.error(
                        field,
                        format!("must be a duration such as 60s (got {value:?})"),
                    );
                    ok = false;
                }
            },
            "minimumPercent" => match value.as_f64() {
                Some(p) if (0.0..=100.0).contains(&p) => out.minimum_percent = p,
                _ => {
                    sink.error(
                        field,
                        format!("must be a number from 0 to 100 (got {value:?})"),
                    );
                    ok = false;
                }
            },
            "aggression" => match value.as_f64() {
                Some(a) if a >= 0.0 => out.aggression = a,
                _ => {
                    sink.error(field, format!("must be a number >= 0 (got {value:?})"));
                    ok = false;
                }
            },
            _ => {
                sink.error(
                    field,
                    "unknown field (warmup has duration, minimumPercent and aggression)",
                );
                ok = false;
            }
        }
    }
    match window {
        Some(w) if ok => {
            out.window = w;
            Some(out)
        }
        Some(_) => None,
        None => {
            if !map.contains_key("duration") {
                sink.error(format!("{f}.duration"), "is required");
            }
            None
        }
    }
}

fn simple_lb(sink: &mut Sink, f: &str, lb: &LoadBalancerSpec) -> LoadBalancer {
    match lb.simple.as_deref() {
        None | Some("UNSPECIFIED") | Some("LEAST_REQUEST") => LoadBalancer::LeastRequest,
        Some("LEAST_CONN") => {
            sink.warn(
                format!("{f}.simple"),
                "LEAST_CONN is deprecated; it means LEAST_REQUEST",
            );
            LoadBalancer::LeastRequest
        }
        Some("ROUND_ROBIN") => LoadBalancer::RoundRobin,
        Some("RANDOM") => LoadBalancer::Random,
        Some("PASSTHROUGH") => LoadBalancer::Passthrough,
        Some(other) => {
            sink.error(
                format!("{f}.simple"),
                format!("unknown load balancer {other:?} (use ROUND_ROBIN, LEAST_REQUEST, RANDOM or PASSTHROUGH)"),
            );
            LoadBalancer::default()
        }
    }
}

fn sections(
    sink: &mut Sink,
    f: &str,
    cp: Option<&ConnectionPoolSpec>,
    od: Option<&OutlierDetectionSpec>,
    lb: Option<&LoadBalancerSpec>,
) -> Sections {
    Sections {
        connection_pool: cp.map(|c| connection_pool(sink, &format!("{f}.connectionPool"), c)),
        outlier_detection: od.map(|o| outlier_detection(sink, &format!("{f}.outlierDetection"), o)),
        load_balancer: lb.map(|l| load_balancer(sink, &format!("{f}.loadBalancer"), l)),
    }
}

/// `retryBudget`, as istiod's `applyRetryBudget` renders it: `percent` (0-100) defaults to 0.2
/// (what istiod writes, although its comment says 20%), `minRetryConcurrency` to 3 when unset or 0.
fn retry_budget(sink: &mut Sink, f: &str, v: &serde_yaml::Value) -> Option<RetryBudgetPolicy> {
    let Some(map) = v.as_mapping() else {
        sink.error(f, "must be an object with percent and minRetryConcurrency");
        return None;
    };
    let mut out = RetryBudgetPolicy {
        percent: 0.2,
        min_retry_concurrency: 3,
    };
    let mut ok = true;
    for (key, value) in map {
        match key.as_str() {
            Some("percent") => match value.as_f64() {
                Some(p) if (0.0..=100.0).contains(&p) => out.percent = p,
                _ => {
                    sink.error(
                        format!("{f}.percent"),
                        format!("must be a number from 0 to 100 (got {value:?})"),
                    );
                    ok = false;
                }
            },
            Some("minRetryConcurrency") => match value.as_u64().map(u32::try_from) {
                Some(Ok(0)) => {}
                Some(Ok(n)) => out.min_retry_concurrency = n,
                _ => {
                    sink.error(
                        format!("{f}.minRetryConcurrency"),
                        format!("must be a non-negative 32-bit integer (got {value:?})"),
                    );
                    ok = false;
                }
            },
            _ => {
                sink.error(
                    format!("{f}.{}", key.as_str().unwrap_or("?")),
                    "unknown field (retryBudget has percent and minRetryConcurrency)",
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

fn layer(sink: &mut Sink, f: &str, tp: &TrafficPolicySpec) -> Layer {
    let mut out = Layer {
        sections: sections(
            sink,
            f,
            tp.connection_pool.as_ref(),
            tp.outlier_detection.as_ref(),
            tp.load_balancer.as_ref(),
        ),
        ports: BTreeMap::new(),
        retry_budget: tp
            .retry_budget
            .as_ref()
            .and_then(|v| retry_budget(sink, &format!("{f}.retryBudget"), v)),
    };
    for (name, present) in [
        ("tls", tp.tls.is_some()),
        ("tunnel", tp.tunnel.is_some()),
        ("proxyProtocol", tp.proxy_protocol.is_some()),
    ] {
        if present {
            sink.unsupported(format!("{f}.{name}"));
        }
    }
    for (i, p) in tp.port_level_settings.iter().enumerate() {
        let pf = format!("{f}.portLevelSettings[{i}]");
        let number = p.port.as_ref().and_then(|p| p.number).unwrap_or(0);
        if !(1..=65535).contains(&number) {
            sink.error(
                format!("{pf}.port.number"),
                format!("port number {number} must be in the range 1..65535"),
            );
            continue;
        }
        if p.tls.is_some() {
            sink.unsupported(format!("{pf}.tls"));
        }
        let s = sections(
            sink,
            &pf,
            p.connection_pool.as_ref(),
            p.outlier_detection.as_ref(),
            p.load_balancer.as_ref(),
        );
        out.ports.entry(number as u16).or_insert(s);
    }
    out
}

/// Checks and translates one DestinationRule. Errors go to `sink`.
pub fn convert(dr: &DestinationRule, sink: &mut Sink, opts: &BuildOptions) -> CheckedDr {
    let ns = dr.metadata.namespace().to_string();
    let spec = &dr.spec;
    if spec.host.is_empty() {
        sink.error("spec.host", "host is required");
    }
    if spec.workload_selector.is_some() {
        sink.unsupported("spec.workloadSelector");
    }
    let export_to = check_export_to(sink, &spec.export_to, &ns, spec.workload_selector.is_some());
    let policy = spec
        .traffic_policy
        .as_ref()
        .map(|tp| layer(sink, "spec.trafficPolicy", tp));
    let mut subsets: Vec<CheckedSubset> = Vec::new();
    for (i, s) in spec.subsets.iter().enumerate() {
        let f = format!("spec.subsets[{i}]");
        if s.name.is_empty() {
            sink.error(format!("{f}.name"), "subset name is required");
            continue;
        }
        if subsets.iter().any(|o| o.name == s.name) {
            sink.error(
                format!("{f}.name"),
                format!("duplicate subset name {:?}", s.name),
            );
            continue;
        }
        subsets.push(CheckedSubset {
            name: s.name.clone(),
            labels: s.labels.clone(),
            policy: s
                .traffic_policy
                .as_ref()
                .map(|tp| layer(sink, &format!("{f}.trafficPolicy"), tp)),
        });
    }
    CheckedDr {
        namespace: ns.clone(),
        name: dr.metadata.name.clone(),
        creation: dr.metadata.creation_timestamp.clone(),
        export_to,
        host: resolve_host(&spec.host, &ns, &opts.cluster_domain),
        policy,
        subsets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> ((LoadBalancer, Option<Warmup>), Vec<String>) {
        let spec: LoadBalancerSpec = serde_yaml::from_str(yaml).unwrap();
        let origin = crate::problem::Origin::file("t.yaml", 0);
        let mut sink = Sink::new(&origin, None);
        let out = load_balancer(&mut sink, "spec.trafficPolicy.loadBalancer", &spec);
        let errors = sink
            .problems
            .iter()
            .filter(|p| p.is_error())
            .map(|p| format!("{p}"))
            .collect();
        (out, errors)
    }

    #[test]
    fn warmup_is_translated_with_istios_defaults() {
        let ((lb, w), errors) = parse("{simple: ROUND_ROBIN, warmup: {duration: 30s}}");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(lb, LoadBalancer::RoundRobin);
        let w = w.unwrap();
        assert_eq!(w.window, Duration::from_secs(30));
        assert_eq!((w.minimum_percent, w.aggression), (10.0, 1.0));
        let ((_, w), _) = parse("{warmup: {duration: 1s, minimumPercent: 5, aggression: 2}}");
        assert_eq!(
            w.map(|w| (w.minimum_percent, w.aggression)),
            Some((5.0, 2.0))
        );
        // The deprecated field.
        let ((_, w), _) = parse("{simple: LEAST_REQUEST, warmupDurationSecs: 60s}");
        assert_eq!(w.map(|w| w.window), Some(Duration::from_secs(60)));
        // Not for RANDOM.
        let ((_, w), errors) = parse("{simple: RANDOM, warmup: {duration: 30s}}");
        assert!(w.is_none() && errors.is_empty());
    }

    #[test]
    fn bad_warmup_names_the_field() {
        for (yaml, field) in [
            (
                "{warmup: {minimumPercent: 5}}",
                "loadBalancer.warmup.duration",
            ),
            ("{warmup: {duration: 0s}}", "loadBalancer.warmup.duration"),
            (
                "{warmup: {duration: 1s, minimumPercent: 101}}",
                "loadBalancer.warmup.minimumPercent",
            ),
            (
                "{warmup: {duration: 1s, aggression: -1}}",
                "loadBalancer.warmup.aggression",
            ),
        ] {
            let ((_, w), errors) = parse(yaml);
            assert!(w.is_none(), "{yaml}");
            assert!(
                errors.iter().any(|e| e.contains(field)),
                "{yaml}: {errors:?}"
            );
        }
    }
}
