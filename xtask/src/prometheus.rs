//! A real Prometheus (Debian's `prometheus` package) for the demo's Step 9: it scrapes Sluice's
//! `/stats/prometheus` every second into a throwaway TSDB, and answers instant queries over its
//! HTTP API, so the demo can show what Grafana's Istio dashboards and Kiali would read.

use crate::tutorial::{free_addrs, Proc};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// How often Prometheus scrapes (its default is 1 m; the demo's steps last seconds).
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);

/// One series of an instant query's result.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A Prometheus process; killed (by its PID) when dropped.
pub struct Prometheus {
    _proc: Proc,
    pub addr: SocketAddr,
}

/// The `prometheus` binary: on PATH, or installed from Debian's packages when `install` (root).
pub fn find(install: bool) -> std::result::Result<PathBuf, String> {
    let on_path = || {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("prometheus"))
                .find(|b| b.is_file())
        })
    };
    if let Some(bin) = on_path() {
        return Ok(bin);
    }
    if !install {
        return Err("prometheus is not installed (apt-get install prometheus)".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "prometheus is not installed and installing it needs root (apt-get install prometheus)"
                .into(),
        );
    }
    println!("installing Prometheus: apt-get install prometheus (Debian's package; its service is not started)");
    let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
    let quiet = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null());
        c
    };
    if !ok(&mut quiet(&["install", "-y", "-qq", "prometheus"])) {
        // A fresh machine has no package lists yet.
        let _ = ok(&mut quiet(&["update", "-qq"]));
        if !ok(&mut quiet(&["install", "-y", "-qq", "prometheus"])) {
            return Err("apt-get install prometheus failed".into());
        }
    }
    on_path().ok_or_else(|| "apt-get installed prometheus but it is not on PATH".into())
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `target`'s `/stats/prometheus` as job
    /// `sluice`; returns once it is ready.
    pub async fn start(bin: &Path, target: SocketAddr, dir: &Path) -> Result<Self> {
        let addr = free_addrs(1)?[0];
        let data = dir.join("prometheus-data");
        fs::create_dir_all(&data)?;
        let cfg = dir.join("prometheus.yml");
        fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: {s}s\n  evaluation_interval: {s}s\nscrape_configs:\n- job_name: sluice\n  metrics_path: /stats/prometheus\n  static_configs:\n  - targets: ['{target}']\n",
                s = SCRAPE_INTERVAL.as_secs()
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address={addr}"))
            // Step 9 reads samples seconds old; no lookback past the demo's own run is needed.
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn");
        let mut proc = Proc::spawn("prometheus", cmd, dir)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(why) = proc.exited() {
                bail!("Prometheus did not start: {why}");
            }
            if let Ok((200, _)) = get(addr, "/-/ready").await {
                break;
            }
            if Instant::now() > deadline {
                bail!("Prometheus on {addr} not ready after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self { _proc: proc, addr })
    }

    /// An instant query (`/api/v1/query`): the series of a vector result, or one unlabelled
    /// sample for a scalar.
    pub async fn query(&self, expr: &str) -> Result<Vec<Sample>> {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let (code, body) = get(self.addr, &path).await?;
        let v: Value = serde_json::from_slice(&body)
            .with_context(|| format!("Prometheus answered {code} with non-JSON"))?;
        if v["status"] != "success" {
            bail!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("error"),
                v["error"].as_str().unwrap_or("query failed")
            );
        }
        let data = &v["data"];
        let value = |pair: &Value| -> f64 {
            pair.get(1)
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .unwrap_or(f64::NAN)
        };
        Ok(match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| Sample {
                    labels: r["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect(),
                    value: value(&r["value"]),
                })
                .collect(),
            Some("scalar") => vec![Sample {
                labels: BTreeMap::new(),
                value: value(&data["result"]),
            }],
            other => bail!("unexpected result type {other:?}"),
        })
    }

    /// What Prometheus learnt of each metric family from the scrapes' metadata: name -> type.
    pub async fn metadata(&self) -> Result<BTreeMap<String, String>> {
        let (code, body) = get(self.addr, "/api/v1/metadata").await?;
        let v: Value = serde_json::from_slice(&body)
            .with_context(|| format!("Prometheus answered {code} with non-JSON"))?;
        Ok(v["data"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(name, entries)| {
                let kind = entries.get(0)?.get("type")?.as_str()?;
                Some((name.clone(), kind.to_owned()))
            })
            .collect())
    }

    /// Waits until `expr` returns a series (the first scrapes have landed).
    pub async fn wait_for(&self, expr: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if !self.query(expr).await?.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no data for {expr} after {limit:?}");
            }
            tokio::time::sleep(SCRAPE_INTERVAL / 2).await;
        }
    }
}

async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes)> {
    let fut = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        anyhow::Ok((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .with_context(|| format!("GET http://{addr}{path} timed out"))?
}

/// Percent-encodes a query parameter (PromQL is full of `{`, `"`, `=`, `~`, `|`, spaces).
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            encode(r#"sum(rate(x{a=~"b|c"}[1m]))"#),
            "sum%28rate%28x%7Ba%3D~%22b%7Cc%22%7D%5B1m%5D%29%29"
        );
    }
}
