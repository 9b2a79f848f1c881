//! Tables for people, from the admin API's types.

use sluice_admin_api as api;
use std::fmt::Write as _;

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map_or_else(|| "-".to_owned(), ToString::to_string)
}

fn list(items: &[impl std::fmt::Display]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn status(v: &api::Status) -> String {
    let mut o = String::new();
    let a = &v.agent;
    let _ = writeln!(o, "Sluice {} (redirect: {})", a.version, a.redirect);
    if a.mode == "kubernetes" {
        let _ = writeln!(
            o,
            "mode:             kubernetes (node {}, kubeconfig {}, cluster domain {})",
            opt(&a.node_name),
            a.kubeconfig.as_deref().unwrap_or("in-cluster"),
            a.cluster_domain
        );
    } else {
        let _ = writeln!(o, "config dir:       {}", opt(&a.config_dir));
    }
    if let Some(k) = &v.kubernetes {
        kubernetes(&mut o, k);
    }
    let _ = writeln!(o, "generation:       {}", v.generation);
    let _ = writeln!(
        o,
        "services:         {}   clusters: {}   routes (VirtualServices): {}   pods: {}",
        v.services, v.clusters, v.virtual_hosts, v.workloads
    );
    let l = &a.listeners;
    let _ = writeln!(
        o,
        "listeners:        outbound {}, admin {}{}, metrics {}, ready {}",
        l.outbound,
        l.admin,
        l.admin_socket
            .as_ref()
            .map(|s| format!(" and {s}"))
            .unwrap_or_default(),
        l.metrics,
        l.ready
    );
    match &v.redirect {
        api::RedirectStatus::None => {
            let _ = writeln!(
                o,
                "redirect:         none (clients use the outbound listener explicitly)"
            );
        }
        api::RedirectStatus::Ebpf(e) => redirect(&mut o, e),
    }
    for (list, title) in [
        (&v.rejections, "rejected config"),
        (&v.warnings, "warnings"),
    ] {
        let _ = writeln!(o, "{title}: {}", list.len());
        for r in list {
            let rv = r
                .resource_version
                .as_ref()
                .map(|v| format!(" (resourceVersion {v})"))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "  {}{rv}: {} {}: {}",
                r.source, r.object, r.field, r.reason
            );
        }
    }
    o
}

fn kubernetes(o: &mut String, k: &api::KubeStatus) {
    let _ = writeln!(
        o,
        "kubernetes:       {}",
        if k.synced {
            "synced"
        } else {
            "NOT SYNCED (not ready; the previous state stays in force)"
        }
    );
    for kind in &k.kinds {
        let _ = writeln!(
            o,
            "  {:<16} {:<32} {:<9} {:>6} objects{}",
            kind.kind,
            kind.api_version,
            if kind.synced { "synced" } else { "listing" },
            kind.objects,
            kind.last_error
                .as_ref()
                .map(|e| format!("   last error: {e}"))
                .unwrap_or_default()
        );
    }
    for f in &k.forbidden {
        let _ = writeln!(
            o,
            "  FORBIDDEN: {} {} (apiGroup {:?}): add it to the agent's ClusterRole ({})",
            f.verb, f.resource, f.group, f.message
        );
    }
}

/// The redirect as `sluice status` and `sluice redirects` show it.
pub fn redirects(r: &api::RedirectStatus) -> String {
    let mut o = String::new();
    match r {
        api::RedirectStatus::None => {
            let _ = writeln!(o, "redirect: none (--redirect none: clients use the outbound listener explicitly; nothing is attached)");
        }
        api::RedirectStatus::Ebpf(e) => redirect(&mut o, e),
    }
    o
}

fn redirect(o: &mut String, r: &api::EbpfStatus) {
    let lease = &r.lease;
    let lease_text = match &lease.state {
        api::LeaseState::Valid { remaining_ms } => format!("valid, {remaining_ms} ms left"),
        api::LeaseState::Expired { expired_ms_ago } => {
            format!("EXPIRED {expired_ms_ago} ms ago (failing open)")
        }
        api::LeaseState::None => "never renewed (failing open)".into(),
        api::LeaseState::Unknown { error } => error.clone(),
    };
    let _ = writeln!(
        o,
        "redirect:         ebpf -> {} / {}   {}   lease {} (renewed every {} ms for {} ms)",
        opt(&r.proxy.ipv4),
        opt(&r.proxy.ipv6),
        if r.enabled {
            "enabled"
        } else {
            "DISABLED (failing open)"
        },
        lease_text,
        lease.renew_every_ms,
        lease.duration_ms,
    );
    let _ = writeln!(
        o,
        "  pins {}   cgroup {}   object {}   sk_msg fast path {}",
        r.pin_dir,
        r.cgroup,
        r.object,
        if r.sockmap { "on" } else { "off" }
    );
    let p = &r.programs;
    let _ = writeln!(
        o,
        "  programs attached: {}   reused: {}   upgraded: {}   replaced maps: {}",
        list(&p.attached),
        list(&p.reused),
        list(&p.upgraded),
        list(&p.replaced_maps)
    );
    let _ = writeln!(
        o,
        "  excluded ports: {}   excluded CIDRs: {}",
        list(&r.exclusions.ports),
        list(&r.exclusions.cidrs)
    );
    let _ = writeln!(o, "  enrolled pods: {}", r.enrolled.len());
    if !r.enrolled.is_empty() {
        // Ages from the agent's wall-clock stamps.
        let now = now_unix_ms();
        let ago = |t: Option<u64>| t.map_or("-".to_string(), |t| secs(now.saturating_sub(t)));
        let _ = writeln!(
            o,
            "    {:<32} {:>10} {:>9} {:>9} {:<12} CGROUP",
            "POD", "CGROUP ID", "ENROLLED", "VERIFIED", "FOUND BY"
        );
        for p in &r.enrolled {
            let _ = writeln!(
                o,
                "    {:<32} {:>10} {:>9} {:>9} {:<12} {}",
                p.pod,
                opt(&p.cgroup_id),
                ago(p.enrolled_since_unix_ms),
                ago(p.last_verified_unix_ms),
                opt(&p.found_by),
                opt(&p.cgroup)
            );
        }
    }
    let e = &r.enrollment;
    let repairs: Vec<String> = e.repairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        o,
        "  cgroup root {}   reconciliations {} (last took {} us CPU)   repairs: {}",
        e.cgroup_root,
        e.reconciliations,
        opt(&e.last_reconcile_cpu_us),
        if repairs.is_empty() {
            "none".to_string()
        } else {
            repairs.join(" ")
        }
    );
    if let Some(err) = &r.enrollment_error {
        let _ = writeln!(o, "  enrollment error: {err}");
    }
    for p in &r.not_redirected {
        let _ = writeln!(o, "    not redirected: {}: {}", p.pod, opt(&p.reason));
    }
    let counters: Vec<String> = r.counters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(o, "  eBPF counters: {}", counters.join(" "));
    let d = &r.original_dst;
    let _ = writeln!(
        o,
        "  original destinations: {} from the map, {} from SO_ORIGINAL_DST, {} unknown",
        d.from_map, d.from_sockopt, d.unknown
    );
}

pub fn clusters(v: &[api::Cluster]) -> String {
    let mut o = String::new();
    for c in v {
        let _ = writeln!(
            o,
            "{}  rq_active={} pending={} pending_overflow={} cx_active={} ejections_active={} retry_overflow={}",
            c.name,
            c.stat("upstream_rq_active"),
            c.stat("upstream_rq_pending_active"),
            c.stat("upstream_rq_pending_overflow"),
            c.stat("upstream_cx_active"),
            c.stat("outlier_detection_ejections_active"),
            c.retry_budget.upstream_rq_retry_overflow,
        );
        let _ = writeln!(
            o,
            "  {:<22} {:<28} {:<8} {:>11} {:>9} {:>7} {:>6} {:>6}",
            "ENDPOINT", "POD", "HEALTH", "EJECTED FOR", "EJECTIONS", "5XX RUN", "ACTIVE", "CONNS"
        );
        for h in &c.hosts {
            let _ = writeln!(
                o,
                "  {:<22} {:<28} {:<8} {:>11} {:>9} {:>7} {:>6} {:>6}",
                h.addr,
                opt(&h.pod),
                if h.ejected { "EJECTED" } else { "healthy" },
                h.ejected_for_ms.map_or("-".into(), secs),
                h.ejection_count,
                h.consecutive_5xx,
                h.active_requests,
                h.connections,
            );
        }
        if !c.outlier_events.is_empty() {
            let _ = writeln!(o, "  recent ejections (oldest first):");
            for e in &c.outlier_events {
                let what = match &e.kind {
                    api::OutlierEventKind::Ejected {
                        reason,
                        ejections,
                        duration_ms,
                    } => format!(
                        "ejected ({reason}) for {}, ejection #{ejections}",
                        secs(*duration_ms)
                    ),
                    api::OutlierEventKind::Unejected => "returned".into(),
                };
                let _ = writeln!(o, "    {:>9} ago  {:<22} {what}", secs(e.ago_ms), e.host);
            }
        }
    }
    o
}

/// `sluice endpoints`: Istio's `proxy-config endpoint` columns plus the outlier detector's state.
pub fn endpoints(v: &[api::Endpoint]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<22} {:<10} {:<13} {:<44} {:<28} {:>7} {:>12} {:>9} {:>6} {:>5}",
        "ENDPOINT",
        "STATUS",
        "OUTLIER CHECK",
        "CLUSTER",
        "POD",
        "5XX RUN",
        "EJECTED FOR",
        "EJECTIONS",
        "ACTIVE",
        "CONNS"
    );
    for e in v {
        let h = &e.host;
        let _ = writeln!(
            o,
            "{:<22} {:<10} {:<13} {:<44} {:<28} {:>7} {:>12} {:>9} {:>6} {:>5}",
            h.addr,
            e.status,
            e.outlier_check,
            e.cluster,
            opt(&h.pod),
            h.consecutive_5xx,
            h.ejected_for_ms.map_or("-".into(), secs),
            h.ejection_count,
            h.active_requests,
            h.connections,
        );
    }
    o
}

pub fn workloads(v: &[api::Workload]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<36} {:<16} {:<8} {:<10} {:<46} LABELS",
        "POD", "IP", "ENROLLED", "CGROUP ID", "REDIRECTED"
    );
    for w in v {
        let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let _ = writeln!(
            o,
            "{:<36} {:<16} {:<8} {:<10} {:<46} {}",
            format!("{}/{}", w.namespace, w.name),
            list(&w.ips),
            if w.enrolled { "yes" } else { "no" },
            opt(&w.cgroup_id),
            w.not_redirected
                .as_ref()
                .map_or_else(|| "yes".to_owned(), |why| format!("no: {why}")),
            list(&labels),
        );
        if let Some(c) = &w.cgroup {
            let _ = writeln!(o, "  cgroup {c}");
        }
    }
    o
}

/// How `sluice top` sorts its edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TopSort {
    Rps,
    Success,
    P50,
    P99,
    Retries,
    Source,
    Service,
}

/// The response flags `sluice top` gives a column each.
pub const TOP_FLAGS: [&str; 8] = ["UO", "URX", "UT", "UF", "UH", "DC", "FI", "DI"];

pub fn top(v: &api::Top, sort: TopSort) -> String {
    let mut edges = v.edges.clone();
    let desc = |a: f64, b: f64| b.total_cmp(&a);
    edges.sort_by(|a, b| match sort {
        TopSort::Rps => desc(a.requests_per_s, b.requests_per_s),
        // Worst first.
        TopSort::Success => a.success_pct.total_cmp(&b.success_pct),
        TopSort::P50 => desc(a.p50_ms, b.p50_ms),
        TopSort::P99 => desc(a.p99_ms, b.p99_ms),
        TopSort::Retries => desc(a.retries_per_s, b.retries_per_s),
        TopSort::Source => a.source.cmp(&b.source),
        TopSort::Service => a.service.cmp(&b.service),
    });
    let mut o = String::new();
    let _ = writeln!(
        o,
        "last {:.0}s: {} requests through this node",
        v.window_s, v.requests
    );
    let _ = write!(
        o,
        "{:<30} {:<40} {:>7} {:>8} {:>8} {:>8} {:>9}",
        "SOURCE", "SERVICE", "RPS", "SUCCESS", "P50", "P99", "RETRIES/S"
    );
    for f in TOP_FLAGS {
        let _ = write!(o, " {f:>4}");
    }
    o.push('\n');
    for e in &edges {
        let _ = write!(
            o,
            "{:<30} {:<40} {:>7.1} {:>7.1}% {:>6.1}ms {:>6.1}ms {:>9.1}",
            e.source,
            e.service,
            e.requests_per_s,
            e.success_pct,
            e.p50_ms,
            e.p99_ms,
            e.retries_per_s
        );
        for f in TOP_FLAGS {
            let _ = write!(o, " {:>4}", e.flags.get(f).copied().unwrap_or(0));
        }
        o.push('\n');
    }
    o
}

/// One line of `sluice tap`.
pub fn tap_line(r: &api::Request) -> String {
    format!(
        "{} {} {} {}{} -> {} {} {} {:.1}ms attempts={} id={}",
        r.source,
        r.method.as_deref().unwrap_or(&r.protocol),
        r.authority.as_deref().unwrap_or("-"),
        r.path.as_deref().unwrap_or(""),
        "",
        r.service,
        r.status,
        r.flags,
        r.duration_ms,
        r.attempts.len(),
        r.request_id.as_deref().unwrap_or("-"),
    )
}

/// Why the request went on after `a` (or ended with it).
fn next_step(a: &api::Attempt, next: Option<&api::Attempt>) -> String {
    let outcome = match (a.timeout.as_deref(), a.status) {
        (Some("per_try"), _) => "per-try timeout fired".to_owned(),
        (Some("route"), _) => "the route timeout fired".to_owned(),
        (_, 0) if a.flags.contains("UF") => "connect failure (UF)".to_owned(),
        (_, 0) if a.flags.contains("UO") => {
            "connection pool or pending queue full (UO: maxConnections, http1MaxPendingRequests, http2MaxRequests)".to_owned()
        }
        (_, 0) if a.flags.contains("UC") => "the endpoint closed the connection (UC)".to_owned(),
        (_, 0) if a.flags.contains("DC") => "the client went away".to_owned(),
        (_, 0) => format!("no response ({})", a.flags),
        (_, s) => format!("answered {s}"),
    };
    match next {
        Some(n) => {
            let gap = n.start_offset_ms - (a.start_offset_ms + a.duration_ms);
            let why = if a.timeout.as_deref() == Some("per_try") {
                "per-try timeout is retried (retryOn)"
            } else if a.status >= 500 || a.status == 0 {
                "retryOn matched"
            } else {
                "retryOn matched (retriable status)"
            };
            format!(
                "{outcome}; {why}: retry after {:.1}ms back-off{}",
                gap.max(0.0),
                if n.endpoint != a.endpoint {
                    " on another endpoint"
                } else {
                    ""
                }
            )
        }
        None => format!("{outcome}; last attempt"),
    }
}

/// `sluice trace`: one request's timeline.
pub fn trace(r: &api::Request) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "request {}  {} {}{}  from {} ({}, {})",
        r.request_id.as_deref().unwrap_or("-"),
        r.method.as_deref().unwrap_or(&r.protocol),
        r.authority.as_deref().unwrap_or("-"),
        r.path.as_deref().unwrap_or(""),
        r.source,
        r.source_workload,
        opt(&r.peer),
    );
    let _ = writeln!(o, "service  {}", r.service);
    let _ = writeln!(o, "cluster  {}", opt(&r.cluster));
    if let Some(p) = &r.route {
        let matched = match &p.matched {
            Some(m) => format!("match[{}] {}", m.index, m.conditions),
            None => "no match conditions".into(),
        };
        let _ = writeln!(o, "route    {} {}  ({matched})", p.virtual_service, p.route);
        let _ = writeln!(
            o,
            "         timeout {}  retries {} on {} (per try {}){}",
            p.timeout_ms.map_or("none".into(), |t| format!("{t}ms")),
            p.retries,
            list(&p.retry_on),
            p.per_try_timeout_ms
                .map_or("none".into(), |t| format!("{t}ms")),
            p.fault
                .as_ref()
                .map(|f| format!("  fault {f}"))
                .unwrap_or_default(),
        );
    }
    if let Some(d) = &r.destination {
        let _ = writeln!(
            o,
            "policy   {}  maxConnections {}  pending {}  requests {}  maxRetries {}  lb {}  outlier {}",
            d.destination_rule
                .as_deref()
                .unwrap_or("no DestinationRule (defaults)"),
            limit(d.max_connections),
            limit(d.max_pending_requests),
            limit(d.max_requests),
            limit(d.max_retries),
            d.load_balancer
                .as_str()
                .map_or_else(|| d.load_balancer.to_string(), str::to_owned),
            d.outlier_detection
                .as_ref()
                .map_or("none".into(), |v| v.to_string()),
        );
    }
    let _ = writeln!(o, "attempts {}", r.attempts.len());
    for (i, a) in r.attempts.iter().enumerate() {
        let _ = writeln!(
            o,
            "  #{} +{:>7.1}ms  {:<22} {:<24} {:>7.1}ms  status {} flags {}{}",
            a.attempt,
            a.start_offset_ms,
            a.endpoint,
            opt(&a.pod),
            a.duration_ms,
            a.status,
            a.flags,
            if a.reached { "" } else { " (never reached it)" }
        );
        let _ = writeln!(o, "      -> {}", next_step(a, r.attempts.get(i + 1)));
    }
    let _ = writeln!(
        o,
        "result   {} flags {} in {:.1}ms{}",
        r.status,
        r.flags,
        r.duration_ms,
        r.details
            .as_ref()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    );
    o
}

/// A connection-pool limit; Envoy's default (2^32 - 1) reads as no limit.
fn limit(n: u32) -> String {
    if n == u32::MAX {
        "unlimited".into()
    } else {
        n.to_string()
    }
}

pub fn connections(v: &[api::Connection]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<10} {:<22} {:<28} {:<28} {:<40} {:<8} {:>8} {:>10} {:>10}",
        "SIDE", "PEER", "POD", "WORKLOAD", "SERVICE", "PROTOCOL", "AGE", "RECEIVED", "SENT"
    );
    for c in v {
        let _ = writeln!(
            o,
            "{:<10} {:<22} {:<28} {:<28} {:<40} {:<8} {:>8} {:>10} {:>10}",
            c.side,
            opt(&c.peer),
            opt(&c.pod),
            c.workload,
            c.service,
            c.protocol,
            secs(c.age_ms),
            c.bytes_received,
            c.bytes_sent
        );
    }
    o
}

pub fn services(v: &[api::Service]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{:<48} {:<32} PORTS", "SERVICE", "CLUSTER IPS");
    for s in v {
        let _ = writeln!(
            o,
            "{:<48} {:<32} {}",
            s.hostname,
            list(&s.cluster_ips),
            list(&s.ports)
        );
    }
    o
}
