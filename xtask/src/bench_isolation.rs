//! `cargo xtask bench-isolation`: what one pod's misbehaviour costs another pod on the same node
//! proxy. A well-behaved pod (127.0.0.3) sends a fixed rate through the release `sluice` (default
//! limits, one worker, pinned to CPU 1) while another pod (127.0.0.2) does nothing, opens
//! connections without limit (every other one with half a request line, past the per-pod limit),
//! or keeps 400 slow requests in flight. Each misbehaviour also runs as a control aimed at an
//! upstream directly (on the proxy's CPU): the clients' load on this 2-CPU machine is then the
//! same, and only the sharing of the proxy differs. Rounds interleave the cases, and the report
//! gives the well-behaved pod's p50/p99 and errors in each, with p99 as a ratio to the quiet case
//! and to the control: the machine is shared and noisy, so only ratios within one run mean
//! something.

// A synchronous orchestrator of processes: wall-clock time is what it measures.
#![allow(clippy::disallowed_methods)]

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::bench::loadgen::LoadgenReport;
use crate::bench::{free_port, path_str, pause, peers, pinned};

#[derive(clap::Args, Debug)]
pub struct BenchIsolationArgs {
    /// Rounds of (quiet, connection flood, slow requests).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds the well-behaved pod sends in each case.
    #[arg(long, default_value_t = 8)]
    duration: u64,
    /// Its rate, requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Connections the flooding pod opens (the agent's default per-pod limit is 10,000).
    #[arg(long, default_value_t = 15_000)]
    flood_connections: u32,
    /// Slow requests the other pod keeps in flight.
    #[arg(long, default_value_t = 400)]
    slow_requests: u32,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/isolation.json")]
    out: std::path::PathBuf,
}

const GOOD: &str = "127.0.0.3";
const GREEDY: &str = "127.0.0.2";
/// Each misbehaviour runs twice: through the proxy the good pod uses, and (`*_control`) at an
/// upstream directly, on the proxy's CPU, so the clients' own load on the shared machine is the
/// same in both and only the proxy's sharing differs.
const CASES: [&str; 5] = [
    "quiet",
    "connection_flood_control",
    "connection_flood",
    "slow_requests_control",
    "slow_requests",
];

#[derive(Debug, Serialize)]
struct Run {
    round: usize,
    case: &'static str,
    report: LoadgenReport,
    /// What the other pod did: connections held / shed, or slow requests answered.
    other: String,
}

pub fn run(args: BenchIsolationArgs) -> Result<()> {
    let root = crate::bench::workspace_root();
    crate::bench::raise_nofile();
    let sluice = crate::bench::build_sluice(&root).map_err(anyhow::Error::msg)?;
    let xtask = crate::bench::release_loadgen(&root)?;
    let pin = crate::bench::which("taskset").is_some() && crate::bench::cpu_count() >= 2;
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-isolation-")
        .tempdir()?;
    let d = dir.path();

    // Upstreams: a fast one for the well-behaved pod, a slow one (1.5 s) for the other.
    let (fast, slow) = (free_port()?, free_port()?);
    let _fast = crate::bench::spawn_proc(
        "fast-upstream",
        pinned(
            pin,
            "0",
            &xtask,
            &[
                "slow-upstream",
                "--port",
                &fast.to_string(),
                "--delay-ms",
                "0",
            ],
        ),
        d,
    )?;
    // On the proxy's CPU: the control cases send the other pod's traffic straight to it.
    let _slow = crate::bench::spawn_proc(
        "slow-upstream",
        pinned(
            pin,
            "1",
            &xtask,
            &[
                "slow-upstream",
                "--port",
                &slow.to_string(),
                "--delay-ms",
                "1500",
            ],
        ),
        d,
    )?;
    let slow_addr = format!("127.0.0.1:{slow}");
    let cfg = d.join("sluice");
    fs::create_dir_all(&cfg)?;
    fs::write(
        cfg.join("bench.yaml"),
        format!(
            "{}---\n{}",
            peers::service_yaml("bench-upstream", "10.96.0.10", fast),
            peers::service_yaml("slow", "10.96.0.11", slow)
        ),
    )?;
    let ports: Vec<String> = (0..4)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    let argv = [
        "run",
        "--redirect",
        "none",
        "--config-dir",
        path_str(&cfg),
        "--outbound-addr",
        &ports[0],
        "--admin-addr",
        &ports[1],
        "--admin-socket",
        "none",
        "--metrics-addr",
        &ports[2],
        "--ready-addr",
        &ports[3],
        "--workers",
        "1",
        "--no-access-log",
    ];
    let agent = crate::bench::spawn_proc("sluice", pinned(pin, "1", &sluice, &argv), d)?;
    let proxy: SocketAddr = ports[0].parse()?;
    crate::bench::wait_ready_proc(&agent, proxy)?;
    let nofile = crate::bench::nofile_of(agent.pid());
    println!(
        "bench-isolation: sluice (default per-pod limits, RLIMIT_NOFILE {}) {}; the good pod {GOOD} sends {} req/s for {} s per case, the other pod is {GREEDY}",
        nofile.map_or("?".into(), |n| n.to_string()),
        if pin { "pinned to CPU 1, clients on CPU 0" } else { "not pinned" },
        args.rate,
        args.duration
    );

    let mut runs = Vec::new();
    for round in 0..args.rounds {
        for case in CASES {
            let flood_args = |target: &str, what: &'static str, n: u32| {
                let n = n.to_string();
                let argv = ["flood", "--target", target, "--source", GREEDY, what, &n];
                crate::bench::spawn_proc("other-pod", pinned(pin, "0", &xtask, &argv), d)
            };
            let (conns, slows) = (args.flood_connections, args.slow_requests);
            let mut other = match case {
                "quiet" => None,
                "connection_flood_control" => Some(flood_args(&slow_addr, "--connections", conns)?),
                "connection_flood" => Some(flood_args(&ports[0], "--connections", conns)?),
                "slow_requests_control" => Some(flood_args(&slow_addr, "--slow-requests", slows)?),
                _ => Some(flood_args(&ports[0], "--slow-requests", slows)?),
            };
            // The other pod's misbehaviour in full swing before the measurement.
            if other.is_some() {
                pause(Duration::from_secs(2));
            }
            let out = pinned(
                pin,
                "0",
                &xtask,
                &[
                    "loadgen",
                    "--target",
                    &ports[0],
                    "--source",
                    GOOD,
                    "--rate",
                    &args.rate.to_string(),
                    "--duration",
                    &args.duration.to_string(),
                    "--connections",
                    "16",
                ],
            )
            .stderr(Stdio::inherit())
            .output()
            .context("running the load generator")?;
            if !out.status.success() {
                bail!("loadgen failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            let report: LoadgenReport = serde_json::from_slice(&out.stdout)
                .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
            let said = match other.take() {
                Some(mut p) => {
                    p.stop();
                    p.log_tail()
                }
                None => String::new(),
            };
            println!(
                "round {round} {case:>16}: ok {}/{} p50 {} us p99 {} us  {said}",
                report.ok,
                report.sent,
                report.p50_us.unwrap_or(0),
                report.p99_us.unwrap_or(0)
            );
            runs.push(Run {
                round,
                case,
                report,
                other: said,
            });
            pause(Duration::from_secs(1));
        }
    }

    let median = |case: &str, f: &dyn Fn(&LoadgenReport) -> Option<u64>| {
        let mut v: Vec<u64> = runs
            .iter()
            .filter(|r| r.case == case)
            .filter_map(|r| f(&r.report))
            .collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    };
    let quiet_p99 = median("quiet", &|r| r.p99_us).unwrap_or(1).max(1);
    println!("\nthe good pod, medians of {} rounds:", args.rounds);
    println!("| case | p50 us | p99 us | p99 / quiet | p99 / control | errors |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut summary = Vec::new();
    for case in CASES {
        let p50 = median(case, &|r| r.p50_us).unwrap_or(0);
        let p99 = median(case, &|r| r.p99_us).unwrap_or(0);
        let errors: u64 = runs
            .iter()
            .filter(|r| r.case == case)
            .map(|r| r.report.errors)
            .sum();
        let ratio = p99 as f64 / quiet_p99 as f64;
        let control_case = format!("{case}_control");
        let control = CASES
            .contains(&control_case.as_str())
            .then(|| median(&control_case, &|r| r.p99_us))
            .flatten()
            .map(|c| p99 as f64 / c.max(1) as f64);
        let shown = control.map_or("-".to_owned(), |c| format!("{c:.2}x"));
        println!("| {case} | {p50} | {p99} | {ratio:.2}x | {shown} | {errors} |");
        summary.push(serde_json::json!({
            "case": case, "p50_us": p50, "p99_us": p99, "p99_ratio": ratio,
            "p99_ratio_to_control": control, "errors": errors,
        }));
    }
    if let Some(parent) = args.out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(
        root.join(&args.out),
        serde_json::to_string_pretty(&serde_json::json!({ "runs": runs, "summary": summary }))?,
    )?;
    println!("bench-isolation: results in {}", args.out.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The other pod and the upstreams, run from the release xtask binary.

#[derive(clap::Args, Debug)]
pub struct FloodArgs {
    /// The proxy.
    #[arg(long)]
    target: SocketAddr,
    /// The pod's address.
    #[arg(long)]
    source: IpAddr,
    /// Open this many connections and hold them (every other one with half a request line).
    #[arg(long, default_value_t = 0)]
    connections: u32,
    /// Keep this many slow requests (to Service `slow`) in flight.
    #[arg(long, default_value_t = 0)]
    slow_requests: u32,
    /// Give up after this long (the bench stops it earlier).
    #[arg(long, default_value_t = 120)]
    max_seconds: u64,
}

/// The misbehaving pod: holds connections or slow requests until killed; prints what it got.
pub fn flood(args: FloodArgs) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    crate::bench::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let connect = move || async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::new(args.source, 0))?;
            socket.connect(args.target).await
        };
        let until = tokio::time::Instant::now() + Duration::from_secs(args.max_seconds);
        let mut held = Vec::new();
        let mut failed = 0u32;
        for i in 0..args.connections {
            match connect().await {
                Ok(mut s) => {
                    if i % 2 == 0 {
                        let _ = s.write_all(b"GET /sl").await;
                    }
                    held.push(s);
                }
                Err(_) => failed += 1,
            }
        }
        if args.connections > 0 {
            // Which the target kept: those it has not closed (one non-blocking read each, so
            // this pod's own CPU use stays what the flood is).
            tokio::time::sleep(Duration::from_millis(500)).await;
            let mut kept = 0;
            for s in held.iter_mut() {
                let mut b = [0u8; 1];
                if matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                    kept += 1;
                }
            }
            eprintln!(
                "flood: {} connections opened, {kept} held by the target, {failed} failed to connect",
                held.len()
            );
        }
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        for _ in 0..args.slow_requests {
            let answered = answered.clone();
            tokio::spawn(async move {
                while let Ok(mut s) = connect().await {
                    loop {
                        if s
                            .write_all(b"GET /slow HTTP/1.1\r\nhost: slow\r\n\r\n")
                            .await
                            .is_err()
                        {
                            break;
                        }
                        let mut buf = [0u8; 512];
                        match s.read(&mut buf).await {
                            Ok(n) if n > 0 => {
                                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            _ => break,
                        }
                    }
                }
            });
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        while tokio::time::Instant::now() < until {
            tick.tick().await;
            if args.slow_requests > 0 {
                eprintln!(
                    "slow: {} slow requests answered",
                    answered.load(std::sync::atomic::Ordering::Relaxed)
                );
            }
        }
        drop(held);
    });
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct SlowUpstreamArgs {
    #[arg(long)]
    port: u16,
    #[arg(long, default_value_t = 1500)]
    delay_ms: u64,
}

/// An HTTP/1.1 upstream answering `200 ok` after `--delay-ms`.
pub fn slow_upstream(args: SlowUpstreamArgs) -> Result<()> {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    crate::bench::raise_nofile();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let delay = Duration::from_millis(args.delay_ms);
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| async move {
                        if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
