//! The operator side: talks to a running agent's admin API (localhost:15000) and prints tables.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One HTTP/1.0 request to the admin API; the body of a 2xx answer.
pub fn request(admin: SocketAddr, method: &str, path: &str) -> Result<String> {
    let mut stream = connect(admin)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .context("reading the admin API's answer")?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("admin API answered {path} with {status}: {}", body.trim());
    }
    Ok(body.to_owned())
}

fn connect(admin: SocketAddr) -> Result<TcpStream> {
    TcpStream::connect_timeout(&admin, Duration::from_secs(2)).with_context(|| {
        format!("cannot reach the agent's admin API at {admin}: is `sluice run` running on this node? (pass --admin ADDR if it listens elsewhere)")
    })
}

/// Streams `/access_log` to stdout.
pub fn follow_logs(admin: SocketAddr, count: Option<usize>) -> Result<()> {
    let mut stream = connect(admin)?;
    write!(
        stream,
        "GET /access_log HTTP/1.0\r\nHost: localhost\r\n\r\n"
    )?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    // Skip the response head.
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    let mut seen = 0;
    while count.is_none_or(|c| seen < c) {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        print!("{line}");
        seen += 1;
    }
    Ok(())
}

/// Percent-encodes a query value.
pub fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub fn print_yaml(v: &Value) -> Result<()> {
    print!("{}", serde_yaml::to_string(v)?);
    Ok(())
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn print_status(v: &Value) -> Result<()> {
    let agent = &v["agent"];
    println!(
        "Sluice {} (redirect: {})",
        s(&agent["version"]),
        s(&agent["redirect"])
    );
    match agent["mode"].as_str() {
        Some("kubernetes") => println!(
            "mode:             kubernetes (node {}, kubeconfig {}, cluster domain {})",
            s(&agent["node_name"]),
            agent["kubeconfig"].as_str().unwrap_or("in-cluster"),
            s(&agent["cluster_domain"])
        ),
        _ => println!("config dir:       {}", s(&agent["config_dir"])),
    }
    print_kubernetes(&v["kubernetes"]);
    println!("generation:       {}", s(&v["generation"]));
    println!(
        "services:         {}   clusters: {}   routes (VirtualServices): {}   pods: {}",
        s(&v["services"]),
        s(&v["clusters"]),
        s(&v["virtual_hosts"]),
        s(&v["workloads"])
    );
    if let Some(l) = agent["listeners"].as_object() {
        let parts: Vec<String> = l.iter().map(|(k, a)| format!("{k} {}", s(a))).collect();
        println!("listeners:        {}", parts.join(", "));
    }
    print_redirect(&v["redirect"]);
    for (key, title) in [("rejections", "rejected config"), ("warnings", "warnings")] {
        let list = v[key].as_array().cloned().unwrap_or_default();
        println!("{title}: {}", list.len());
        for r in list {
            let rv = r["resource_version"]
                .as_str()
                .map(|v| format!(" (resourceVersion {v})"))
                .unwrap_or_default();
            println!(
                "  {}{rv}: {} {}: {}",
                s(&r["source"]),
                s(&r["object"]),
                s(&r["field"]),
                s(&r["reason"])
            );
        }
    }
    Ok(())
}

/// Kubernetes mode: sync per kind and refused permissions.
fn print_kubernetes(k: &Value) {
    if k.is_null() {
        return;
    }
    let synced = k["synced"].as_bool() == Some(true);
    println!(
        "kubernetes:       {}",
        if synced {
            "synced"
        } else {
            "NOT SYNCED (not ready; the previous state stays in force)"
        }
    );
    for kind in k["kinds"].as_array().into_iter().flatten() {
        println!(
            "  {:<16} {:<32} {:<9} {:>6} objects{}",
            s(&kind["kind"]),
            s(&kind["api_version"]),
            if kind["synced"].as_bool() == Some(true) {
                "synced"
            } else {
                "listing"
            },
            s(&kind["objects"]),
            kind["last_error"]
                .as_str()
                .map(|e| format!("   last error: {e}"))
                .unwrap_or_default()
        );
    }
    for f in k["forbidden"].as_array().into_iter().flatten() {
        let group = f["group"].as_str().unwrap_or("");
        println!(
            "  FORBIDDEN: {} {} (apiGroup {:?}): add it to the agent's ClusterRole ({})",
            s(&f["verb"]),
            s(&f["resource"]),
            group,
            s(&f["message"])
        );
    }
}

fn print_redirect(r: &Value) {
    if r["mode"].as_str() != Some("ebpf") {
        println!("redirect:         none (clients use the outbound listener explicitly)");
        return;
    }
    let lease = &r["lease"];
    let lease_text = match lease["state"].as_str() {
        Some("valid") => format!("valid, {} ms left", s(&lease["remaining_ms"])),
        Some("expired") => format!(
            "EXPIRED {} ms ago (failing open)",
            s(&lease["expired_ms_ago"])
        ),
        Some("none") => "never renewed (failing open)".into(),
        _ => s(&lease["error"]),
    };
    println!(
        "redirect:         ebpf -> {} / {}   {}   lease {} (renewed every {} ms for {} ms)",
        s(&r["proxy"]["ipv4"]),
        s(&r["proxy"]["ipv6"]),
        if r["enabled"].as_bool() == Some(true) {
            "enabled"
        } else {
            "DISABLED (failing open)"
        },
        lease_text,
        s(&lease["renew_every_ms"]),
        s(&lease["duration_ms"]),
    );
    println!(
        "  pins {}   cgroup {}   object {}   sk_msg fast path {}",
        s(&r["pin_dir"]),
        s(&r["cgroup"]),
        s(&r["object"]),
        if r["sockmap"].as_bool() == Some(false) {
            "off"
        } else {
            "on"
        }
    );
    let list = |v: &Value| {
        let items: Vec<String> = v.as_array().into_iter().flatten().map(s).collect();
        if items.is_empty() {
            "-".to_string()
        } else {
            items.join(",")
        }
    };
    println!(
        "  programs attached: {}   reused: {}",
        list(&r["programs"]["attached"]),
        list(&r["programs"]["reused"])
    );
    println!(
        "  excluded ports: {}   excluded CIDRs: {}",
        list(&r["exclusions"]["ports"]),
        list(&r["exclusions"]["cidrs"])
    );
    let enrolled = r["enrolled"].as_array().cloned().unwrap_or_default();
    println!("  enrolled pods: {}", enrolled.len());
    if !enrolled.is_empty() {
        println!("    {:<32} {:>10}  CGROUP", "POD", "CGROUP ID");
        for p in &enrolled {
            println!(
                "    {:<32} {:>10}  {}",
                s(&p["pod"]),
                s(&p["cgroup_id"]),
                s(&p["cgroup"])
            );
        }
    }
    for p in r["not_redirected"].as_array().into_iter().flatten() {
        println!("    not redirected: {}: {}", s(&p["pod"]), s(&p["reason"]));
    }
    if let Some(c) = r["counters"].as_object() {
        let parts: Vec<String> = c.iter().map(|(k, v)| format!("{k}={}", s(v))).collect();
        println!("  eBPF counters: {}", parts.join(" "));
    }
    let o = &r["original_dst"];
    println!(
        "  original destinations: {} from the map, {} from SO_ORIGINAL_DST, {} unknown",
        s(&o["from_map"]),
        s(&o["from_sockopt"]),
        s(&o["unknown"])
    );
}

pub fn print_clusters(v: &Value) -> Result<()> {
    let clusters = v.as_array().cloned().unwrap_or_default();
    for c in clusters {
        let st = &c["stats"];
        println!(
            "{}  rq_active={} pending={} pending_overflow={} cx_active={} ejections_active={}",
            s(&c["name"]),
            s(&st["upstream_rq_active"]),
            s(&st["upstream_rq_pending_active"]),
            s(&st["upstream_rq_pending_overflow"]),
            s(&st["upstream_cx_active"]),
            s(&st["outlier_detection_ejections_active"]),
        );
        println!(
            "  {:<22} {:<28} {:<8} {:>11} {:>9} {:>7} {:>6} {:>6}",
            "ENDPOINT", "POD", "HEALTH", "EJECTED FOR", "EJECTIONS", "5XX RUN", "ACTIVE", "CONNS"
        );
        for h in c["hosts"].as_array().cloned().unwrap_or_default() {
            println!(
                "  {:<22} {:<28} {:<8} {:>11} {:>9} {:>7} {:>6} {:>6}",
                s(&h["addr"]),
                s(&h["pod"]),
                if h["ejected"].as_bool() == Some(true) {
                    "EJECTED"
                } else {
                    "healthy"
                },
                h["ejected_for_ms"]
                    .as_u64()
                    .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                s(&h["ejection_count"]),
                s(&h["consecutive_5xx"]),
                s(&h["active_requests"]),
                s(&h["connections"]),
            );
        }
    }
    Ok(())
}

pub fn print_policy(v: &Value) -> Result<()> {
    print_yaml(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_queries() {
        assert_eq!(encode_query("pricing.default"), "pricing.default");
        assert_eq!(encode_query("a b,c=d"), "a%20b%2Cc%3Dd");
    }
}
