//! `cargo xtask build-pgo`: the agent built with profile-guided optimization.
//!
//! Much of a proxied request's user time in the agent goes to fetching code: its path runs
//! through hyper's server and client, tower's layers, tokio and the proxy's own code, more than
//! the first-level instruction cache holds (callgrind's cache simulation at 32 connections: about
//! 2,200 instruction-cache misses per request, HAProxy about 90, for as many instructions). A profile lets LLVM lay the hot code
//! out together and inline by measured frequency rather than by guess.
//!
//! Steps: an instrumented release build (`-Cprofile-generate`), a training run of that build in
//! front of an upstream served by this process, `llvm-profdata merge` (rustup's `llvm-tools`,
//! installed if missing), the release build that uses the profile (`-Cprofile-use`), and BOLT's
//! layout of that binary from a second training ([`crate::bolt`]; `--no-bolt` skips it). The
//! training is not the benchmark: its own Services, routes and a request mix (small and 16 KiB
//! responses, request bodies, 5xx answers that are retried, one connection and 32, the access log
//! on and off), so that the profile favours the proxy's common path rather than one benchmark's.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::bench::{free_port, path_str, spawn_proc, workspace_root, Proc};

#[derive(clap::Args, Debug)]
pub struct BuildPgoArgs {
    /// Where to put the optimized binary.
    #[arg(long, default_value = "target/pgo/sluice")]
    out: PathBuf,
    /// Seconds of each of the training's four load phases (32 connections and one, access log
    /// off and on).
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Stop at the profile-guided build: no BOLT layout.
    #[arg(long)]
    no_bolt: bool,
}

pub fn run(args: BuildPgoArgs) -> Result<()> {
    let root = workspace_root();
    let bin = build(&root, args.seconds, !args.no_bolt, true)?;
    let out = root.join(&args.out);
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    if bin != out {
        fs::copy(&bin, &out)
            .with_context(|| format!("copying {} to {}", bin.display(), out.display()))?;
    }
    println!("build-pgo: {}", out.display());
    Ok(())
}

/// Builds, trains and rebuilds, then (`bolt`) lays the result out again with BOLT from a second
/// training; returns the optimized binary (`target/pgo/bolt/sluice`, or under `target/pgo/use`
/// without BOLT). `install`: BOLT's tools may be installed with apt-get.
pub(crate) fn build(root: &Path, seconds: u64, bolt: bool, install: bool) -> Result<PathBuf> {
    let profdata = llvm_profdata()?;
    let bolt_tools = if bolt {
        let tools = crate::bolt::Tools::find(install);
        if tools.is_none() {
            println!("build-pgo: llvm-bolt not found (Debian: bolt-N for rustc's LLVM N); the binary is profile-guided only");
        }
        tools
    } else {
        None
    };
    let host = host_triple()?;
    let pgo = root.join("target/pgo");
    let profiles = pgo.join("profiles");
    let _ = fs::remove_dir_all(&profiles);
    fs::create_dir_all(&profiles)?;
    for old in fs::read_dir(&pgo)?.filter_map(|e| e.ok().map(|e| e.path())) {
        if old.extension().is_some_and(|e| e == "profdata") {
            let _ = fs::remove_file(old);
        }
    }

    println!("build-pgo: instrumented release build (target/pgo/generate)");
    let generate = cargo_build(
        root,
        &host,
        &pgo.join("generate"),
        &format!("-Cprofile-generate={}", path_str(&profiles)),
    )?;

    println!("build-pgo: training ({seconds} s per phase)");
    train(&generate, &pgo, Some(seconds))?;
    let raw = profiles_in(&profiles, "profraw")?;
    let merged = pgo.join("sluice.profdata");
    let status = Command::new(&profdata)
        .arg("merge")
        .arg("-o")
        .arg(&merged)
        .args(&raw)
        .status()
        .with_context(|| format!("running {}", profdata.display()))?;
    if !status.success() {
        bail!("llvm-profdata merge failed ({status})");
    }

    // Cargo fingerprints the flags, not the file they name: a profile under a name of its own
    // content makes every crate whose profile changed build again.
    let named = pgo.join(format!(
        "sluice-{:016x}.profdata",
        content_hash(&fs::read(&merged)?)
    ));
    fs::rename(&merged, &named)?;

    println!("build-pgo: optimized release build (target/pgo/use)");
    let mut flags = format!("-Cprofile-use={}", path_str(&named));
    if bolt_tools.is_some() {
        flags.push(' ');
        flags.push_str(crate::bolt::LINK_ARGS);
    }
    let used = cargo_build(root, &host, &pgo.join("use"), &flags)?;
    let Some(tools) = bolt_tools else {
        return Ok(used);
    };
    match bolt_layout(&tools, &used, &pgo, seconds) {
        Ok(out) => Ok(out),
        Err(e) => {
            println!("build-pgo: BOLT failed, the binary is profile-guided only: {e:#}");
            Ok(used)
        }
    }
}

/// The BOLT stage: instrument `used`, train it, lay `used` out by that profile.
fn bolt_layout(
    tools: &crate::bolt::Tools,
    used: &Path,
    pgo: &Path,
    seconds: u64,
) -> Result<PathBuf> {
    let dir = pgo.join("bolt");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let instrumented = dir.join("sluice-instrumented");
    println!("build-pgo: BOLT instrumentation (target/pgo/bolt)");
    tools.instrument(used, &instrumented, &dir.join("profile"))?;
    println!("build-pgo: BOLT training ({seconds} s per phase)");
    train(&instrumented, pgo, Some(seconds))?;
    let out = dir.join("sluice");
    println!("build-pgo: BOLT layout");
    tools.optimize(used, &dir, &out)?;
    let _ = fs::remove_file(&instrumented);
    // A rewritten binary is only kept if it serves: started with the training's policy (access
    // log off and on), it must route a request to the upstream.
    train(&out, pgo, None).context("the binary BOLT wrote")?;
    Ok(out)
}

/// The profiles a training wrote into `dir` (files ending `.ext`); none is an error, as the agent
/// writes its profile only when it exits cleanly.
pub(crate) fn profiles_in(dir: &Path, ext: &str) -> Result<Vec<PathBuf>> {
    let found: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    if found.is_empty() {
        bail!(
            "the training wrote no profile into {}: the agent did not exit cleanly",
            dir.display()
        );
    }
    Ok(found)
}

/// FNV-1a: stable across runs and builds (std's hashers promise neither).
fn content_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `cargo build --release -p sluice` for the host triple named explicitly, so that `rustflags`
/// reach the agent's crates and not build scripts or proc macros.
fn cargo_build(root: &Path, host: &str, target_dir: &Path, rustflags: &str) -> Result<PathBuf> {
    let status = crate::tutorial::cargo()
        .args([
            "build",
            "--release",
            "--locked",
            "-p",
            "sluice",
            "--target",
            host,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", rustflags)
        .current_dir(root)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo build --release -p sluice with {rustflags} failed ({status})");
    }
    Ok(target_dir.join(host).join("release/sluice"))
}

fn host_triple() -> Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::to_owned)
        .context("rustc -vV names no host triple")
}

/// The toolchain's own `llvm-profdata` (its LLVM reads the profiles its rustc writes; a
/// distribution's older one does not): from rustup's `llvm-tools`, added when missing.
fn llvm_profdata() -> Result<PathBuf> {
    let find = || -> Result<PathBuf> {
        let out = Command::new("rustc")
            .args(["--print", "target-libdir"])
            .output()
            .context("running rustc --print target-libdir")?;
        let libdir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Ok(libdir
            .parent()
            .map(|d| d.join("bin/llvm-profdata"))
            .unwrap_or_default())
    };
    let tool = find()?;
    if tool.is_file() {
        return Ok(tool);
    }
    println!("build-pgo: rustup component add llvm-tools (for llvm-profdata)");
    let status = Command::new("rustup")
        .args(["component", "add", "llvm-tools"])
        .status()
        .context("running rustup (llvm-profdata comes with rustup's llvm-tools)")?;
    let tool = find()?;
    if !status.success() || !tool.is_file() {
        bail!("llvm-profdata is missing and `rustup component add llvm-tools` did not provide it");
    }
    Ok(tool)
}

/// The training's policy: a routed Service (path and header matches, a retried route, a
/// timeout, outlier detection) and one without a VirtualService.
fn training_yaml(upstream: u16) -> String {
    let service = |name, ip| crate::bench::peers::service_yaml(name, ip, upstream) + "---\n";
    format!(
        "{}{}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: shop
  namespace: default
spec:
  hosts:
  - shop
  http:
  - match:
    - uri:
        prefix: /flaky
    route:
    - destination:
        host: shop
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: 5xx
  - match:
    - headers:
        x-variant:
          exact: b
    route:
    - destination:
        host: shop
        subset: b
  - route:
    - destination:
        host: shop
        subset: a
      weight: 90
    - destination:
        host: shop
        subset: b
      weight: 10
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: shop
  namespace: default
spec:
  host: shop
  trafficPolicy:
    connectionPool:
      http:
        http1MaxPendingRequests: 1000
    outlierDetection:
      consecutive5xxErrors: 1000
      interval: 10s
      baseEjectionTime: 30s
  subsets:
  - name: a
  - name: b
",
        service("shop", "10.96.1.10"),
        service("catalog", "10.96.1.11"),
    )
}

/// Runs the agent in front of this process's upstream, twice (access log off, then on), each
/// under the request mix at 32 connections and at one for `seconds`; stops it with SIGTERM so that
/// an instrumented build writes its profile on the way out. With `None`, each run only checks that
/// the agent routes a request.
fn train(agent: &Path, pgo: &Path, seconds: Option<u64>) -> Result<()> {
    let dir = pgo.join("training");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("config"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let upstream = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let up_port = upstream.local_addr()?.port();
    rt.spawn(serve_upstream(upstream));
    fs::write(dir.join("config/train.yaml"), training_yaml(up_port))?;

    for access_log in [false, true] {
        let ports: Vec<String> = (0..4)
            .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
            .collect::<Result<_>>()?;
        let mut cmd = Command::new(agent);
        cmd.args(["run", "--redirect", "none", "--config-dir"])
            .arg(dir.join("config"))
            .args(["--outbound-addr", &ports[0], "--admin-addr", &ports[1]])
            .args(["--admin-socket", "none", "--metrics-addr", &ports[2]])
            .args(["--ready-addr", &ports[3], "--workers", "1"])
            .stdin(Stdio::null());
        if !access_log {
            cmd.arg("--no-access-log");
        }
        let mut proc = spawn_proc("sluice-training", cmd, &dir)?;
        let addr: SocketAddr = ports[0].parse()?;
        if !rt.block_on(serving(addr)) {
            bail!(
                "the agent in training did not answer within 20 s: {}",
                proc.log_tail()
            );
        }
        let Some(seconds) = seconds else {
            terminate(&mut proc)?;
            continue;
        };
        for connections in [32, 1] {
            let counts = rt.block_on(drive(addr, connections, Duration::from_secs(seconds)))?;
            println!(
                "build-pgo: access log {}, {connections} connection(s): {}",
                if access_log { "on" } else { "off" },
                counts
                    .iter()
                    .map(|(k, v)| format!("{k} x{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            if counts.get("200").copied().unwrap_or(0) == 0 {
                bail!(
                    "no request of the training succeeded; agent log: {}",
                    proc.log_tail()
                );
            }
        }
        terminate(&mut proc)?;
    }
    Ok(())
}

/// A keep-alive HTTP/1.1 client connection to `addr`.
async fn connect(addr: SocketAddr) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    crate::http1::connect(addr).await
}

/// Whether the agent at `addr` routes a request to the upstream within 20 s (200 tries).
async fn serving(addr: SocketAddr) -> bool {
    for _ in 0..200 {
        if let Some(mut send) = connect(addr).await {
            // The mix's plain GET to the routed Service.
            if let Ok(rsp) = send.send_request(request(5)).await {
                if rsp.status() == http::StatusCode::OK {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// SIGTERM, then waits (bounded) for the exit during which the profile is written.
fn terminate(proc: &mut Proc) -> Result<()> {
    let pid = libc::pid_t::try_from(proc.pid()).context("pid out of range")?;
    // SAFETY: `kill` only sends a signal to the process we started, by its PID.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..600 {
        if proc.try_wait()?.is_some() {
            return Ok(());
        }
        crate::bench::pause(Duration::from_millis(50));
    }
    bail!("the agent in training did not exit within 30 s of SIGTERM")
}

/// The training's upstream: `/flaky` answers 503 to every other request (the route retries it),
/// `/big` 16 KiB, anything else a short body; a request's body is read to its end.
async fn serve_upstream(listener: tokio::net::TcpListener) {
    let flaky = Arc::new(AtomicU64::new(0));
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let flaky = flaky.clone();
        async move {
            let path = req.uri().path().to_owned();
            let _ = req.into_body().collect().await;
            let (status, body) = match path.as_str() {
                "/flaky" if flaky.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) => {
                    (503, Bytes::from_static(b"unavailable"))
                }
                "/big" => (200, Bytes::from(vec![b'x'; 16 * 1024])),
                _ => (200, Bytes::from_static(b"ok")),
            };
            let rsp = http::Response::builder()
                .status(status)
                .header("content-type", "text/plain")
                .body(Full::new(body))
                .expect("a valid response");
            Ok::<_, std::convert::Infallible>(rsp)
        }
    });
    crate::http1::serve(listener, svc).await;
}

/// `connections` keep-alive clients, each cycling through the request mix until `for_`
/// has passed; returns the responses counted by status ("error" for failed exchanges).
async fn drive(
    addr: SocketAddr,
    connections: usize,
    for_: Duration,
) -> Result<BTreeMap<String, u64>> {
    let until = tokio::time::Instant::now() + for_;
    let mut tasks = Vec::new();
    for c in 0..connections {
        tasks.push(tokio::spawn(async move {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            let mut i = c;
            'connect: while tokio::time::Instant::now() < until {
                let Some(mut send) = connect(addr).await else {
                    *counts.entry("error".into()).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                while tokio::time::Instant::now() < until {
                    i += 1;
                    let outcome = match send.send_request(request(i)).await {
                        Ok(rsp) => {
                            let status = rsp.status().as_u16().to_string();
                            match rsp.into_body().collect().await {
                                Ok(_) => status,
                                Err(_) => "error".into(),
                            }
                        }
                        Err(_) => "error".into(),
                    };
                    let failed = outcome == "error";
                    *counts.entry(outcome).or_default() += 1;
                    if failed {
                        continue 'connect;
                    }
                }
            }
            counts
        }));
    }
    let mut total: BTreeMap<String, u64> = BTreeMap::new();
    for t in tasks {
        for (k, v) in t.await? {
            *total.entry(k).or_default() += v;
        }
    }
    Ok(total)
}

/// The `i`th request of the mix: mostly small GETs to the routed Service, some 16 KiB answers,
/// header-matched and retried routes, 1 KiB POSTs, and the Service without a VirtualService.
fn request(i: usize) -> http::Request<Full<Bytes>> {
    let get = |host: &str, path: &str| {
        http::Request::get(path)
            .header("host", host)
            .header("user-agent", "sluice-pgo-training")
            .body(Full::new(Bytes::new()))
    };
    match i % 10 {
        0 => get("shop", "/big"),
        1 => get("shop", "/flaky"),
        2 => http::Request::get("/")
            .header("host", "shop")
            .header("x-variant", "b")
            .body(Full::new(Bytes::new())),
        3 => http::Request::post("/orders")
            .header("host", "catalog")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(vec![b'{'; 1024]))),
        4 => get("catalog.default.svc.cluster.local", "/items?page=2"),
        _ => get("shop", "/"),
    }
    .expect("a valid request")
}

#[cfg(test)]
mod tests {
    /// The training's policy is valid as a whole: a rejected object would leave the training
    /// exercising error paths instead of the proxy's routes.
    #[test]
    fn profile_names_follow_content() {
        assert_eq!(super::content_hash(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::content_hash(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(super::content_hash(b"ab"), super::content_hash(b"ba"));
    }

    #[test]
    fn training_policy_is_accepted() {
        let yaml = super::training_yaml(18080);
        let parsed = sluice_config::parse_str("train.yaml", &yaml);
        assert!(parsed.problems.is_empty(), "{:#?}", parsed.problems);
        let (snap, problems) =
            sluice_config::build(&parsed.objects, &sluice_config::BuildOptions::default());
        assert!(problems.is_empty(), "{problems:#?}");
        let shop = &snap.virtual_hosts["shop.default.svc.cluster.local"];
        assert_eq!(shop.routes.len(), 3);
        assert!(snap
            .services
            .contains_key("catalog.default.svc.cluster.local"));
    }

    /// Every request of the mix is well formed and the mix reaches every route.
    #[test]
    fn request_mix_covers_the_routes() {
        let mix: Vec<_> = (0..10).map(super::request).collect();
        let hosts: std::collections::BTreeSet<_> = mix
            .iter()
            .map(|r| r.headers()["host"].to_str().unwrap().to_owned())
            .collect();
        assert_eq!(hosts.len(), 3, "{hosts:?}");
        assert!(mix.iter().any(|r| r.uri().path() == "/flaky"));
        assert!(mix.iter().any(|r| r.headers().contains_key("x-variant")));
        assert!(mix.iter().any(|r| r.method() == http::Method::POST));
    }
}
