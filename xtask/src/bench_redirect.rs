//! `cargo xtask bench-redirect`: what eBPF redirection costs and saves, in throwaway pods on this
//! machine (issue 3, point 7). Root only. Two parts, each in interleaved rounds:
//!
//! 1. **`connect()` cost.** From the `client` pod, `--connects` blocking `connect()`s (then an
//!    RST close, so no TIME_WAIT piles up) to a plain accept-and-drop listener on the host's
//!    bridge address, timed around the `connect` system call only:
//!    `detached` (no program attached), `attached` (programs attached, the pod not enrolled),
//!    `redirected` (enrolled; the pod connects to the Service's cluster IP and `connect4` rewrites
//!    it to that same listener) and `no_sockmap` (the same with the sk_msg fast path off, as
//!    `sluice run --no-sockmap`). Same pod, same veth, same listener, same handshake; the
//!    difference is the programs (`connect4`, both `sock_ops` callbacks, SOCKHASH inserts).
//! 2. **Pod -> proxy small requests.** One Sluice (`sluice run --redirect ebpf --workers 1`,
//!    pinned to CPU 1) on the host in front of an upstream pod (nginx `return 200`, or
//!    fake-service), reached four ways: `sk_msg` (enrolled pod -> cluster IP, redirected, sk_msg
//!    fast path), `veth_tcp` (unenrolled pod -> the proxy's address over the veth, plain TCP),
//!    `loopback` (the host -> the proxy over loopback TCP) and `iptables` (a Sluice sidecar in its
//!    own pod, reached through `iptables -t nat ... -j REDIRECT` in that pod's network namespace).
//!    The eBPF-mode proxy serves only enrolled pods' redirected connections, so `veth_tcp` and
//!    `loopback` reach its twin in explicit-proxy mode (same binary, configuration, address and
//!    CPU, another port).
//!    Two kinds of request: through the proxy to the upstream (`wrk -t1 -cC` saturated
//!    throughput and p50/p99; p50/p99 at a fixed rate from the open-loop `xtask loadgen`, all
//!    variants' generators running together and taking turns in 100 ms slots so that the
//!    machine's hiccups fall on every variant alike; the proxy's CPU per 1,000 requests, from a
//!    fixed-rate run of one variant at a time), and pod -> proxy alone, the proxy answering by itself
//!    (a `directResponse` Service; `wrk -t1 -c1`, one request at a time, with the client on the
//!    proxy's CPU and on the other one). The `sk_msg_redirected` counter's delta shows which runs
//!    took the fast path.
//!
//! Everything (pods, veths, cgroups, iptables rules inside pod namespaces, pins, processes by
//! PID) is removed at the end, also on error; a later run sweeps what a killed run left.

// A synchronous command-line task: no runtime whose paused time wall clocks could defeat.
#![allow(clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sluice_netns::{Pod, Topology};
use sluice_redirect::{Counter, Options, Redirect};

use crate::bench::{self, loadgen::LoadgenReport, parse, peers, stats};

#[derive(clap::Args, Debug)]
pub struct BenchRedirectArgs {
    /// Interleaved rounds (each: the three connect variants, then the four request variants).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds per request measurement (each variant gets a saturated and a fixed-rate run).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// `connect()`s per connect variant and round.
    #[arg(long, default_value_t = 20_000)]
    connects: u32,
    /// Smoke run: 2 rounds of 3 s, 5,000 connects.
    #[arg(long)]
    quick: bool,
    /// Rate of the latency measurement, requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Connections of the saturating `wrk`.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// Pause between runs, milliseconds.
    #[arg(long, default_value_t = 500)]
    gap_ms: u64,
    /// Do not apt-get install missing tools (wrk, iptables, nginx-light).
    #[arg(long)]
    no_install: bool,
    /// Do not pin processes with taskset.
    #[arg(long)]
    no_pin: bool,
    /// Do not rebuild the eBPF object (use target/bpf/sluice-ebpf.o as it is).
    #[arg(long)]
    no_build_ebpf: bool,
    /// Only part 1, the `connect()` cost (no proxy, no request variants).
    #[arg(long)]
    connect_only: bool,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/bench/redirect.json")]
    out: PathBuf,
}

/// The hidden helper run inside pods: a connect timer, or an accept-and-drop listener.
#[derive(clap::Args, Debug)]
pub struct ProbeArgs {
    /// Accept and drop connections on this address (until killed, at most `--lifetime` s).
    #[arg(long, conflicts_with = "case")]
    sink: Option<SocketAddr>,
    /// `CGROUP_DIR=IP:PORT[,no-sockmap]`, repeated: time `--count` blocking connect()s to the
    /// address from a socket made while this process is in that cgroup; the cases take turns in
    /// blocks. `no-sockmap`: the programs' sk_msg fast path is off during this case's blocks (set
    /// in the maps pinned under `--pins`, on again for the others). Prints a JSON array of
    /// reports, one per case.
    #[arg(long)]
    case: Vec<String>,
    /// The programs' pin directory (for `no-sockmap` cases).
    #[arg(long)]
    pins: Option<PathBuf>,
    #[arg(long, default_value_t = 20_000)]
    count: u32,
    /// Connects per turn (the first turn of each case is an untimed warm-up).
    #[arg(long, default_value_t = 250)]
    block: u32,
    /// The sink exits by itself after this many seconds.
    #[arg(long, default_value_t = 3600)]
    lifetime: u64,
}

/// One timed batch of connects.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectReport {
    /// Timed connects that succeeded.
    count: u32,
    /// Every connect() made, warm-up and failures included.
    attempts: u32,
    errors: u32,
    median_ns: u64,
    mean_ns: f64,
    p10_ns: u64,
    p90_ns: u64,
    p99_ns: u64,
    first_error: Option<String>,
}

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Slot length of the interleaved fixed-rate runs (see `LoadgenArgs::slots`).
const SLOT_MS: u64 = 100;
const SVC_PORT: u16 = 80;
const HOST: &str = "bench-upstream";
/// The Service the proxy answers by itself (pod -> proxy latency, no upstream hop).
const VIP_DIRECT: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const DIRECT_HOST: &str = "bench-direct";
const UPSTREAM_PORT: u16 = 8080;
const SIDECAR_PORT: u16 = 15001;
/// How long the bench's lease on redirection lasts (renewed at every phase).
const LEASE: Duration = Duration::from_secs(3600);
const CONNECT_VARIANTS: [&str; 4] = ["detached", "attached", "redirected", "no_sockmap"];
const L7_VARIANTS: [&str; 4] = ["sk_msg", "veth_tcp", "loopback", "iptables"];
/// Figures of the request variants: name, unit, higher is better.
/// Pod -> proxy with the proxy answering: one connection, one request at a time (`wrk -t1 -c1`),
/// the client on the proxy's CPU (`one_cpu`) or on the other one (`2cpu`).
const P2P_FIGURES: [(&str, &str, bool); 5] = [
    ("p2p_p50_one_cpu", "us", false),
    ("p2p_p99_one_cpu", "us", false),
    ("p2p_p50_2cpu", "us", false),
    ("p2p_p99_2cpu", "us", false),
    ("p2p_rps_one_cpu", "req/s", true),
];

const L7_FIGURES: [(&str, &str, bool); 8] = [
    ("throughput", "req/s", true),
    ("p50_at_rate", "us", false),
    ("p99_at_rate", "us", false),
    ("p50_one_cpu", "us", false),
    ("p99_one_cpu", "us", false),
    ("wrk_p50", "us", false),
    ("wrk_p99", "us", false),
    ("proxy_cpu_per_1k", "ms", false),
];

/// One variant's figures in one round.
#[derive(Debug, Clone, Serialize)]
struct Run {
    round: usize,
    variant: &'static str,
    figures: BTreeMap<&'static str, f64>,
    detail: serde_json::Value,
}

/// Removes the bench's pins (detaching the programs) when dropped.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        if sluice_redirect::is_installed(&self.0) || self.0.exists() {
            if let Err(e) = sluice_redirect::uninstall(&self.0) {
                eprintln!("bench-redirect: uninstall {}: {e}", self.0.display());
            }
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// The pods, tools and processes of one run.
struct Lab {
    pin: bool,
    xtask: PathBuf,
    object: PathBuf,
    client: Pod,
    plain: Pod,
    sidecar: Pod,
    node: Pod,
    logs: PathBuf,
}

impl Lab {
    /// `prog args` pinned to `cpu` (when pinning), inside `pod` or on the host (`None`).
    fn cmd(&self, topo: &Topology, pod: Option<&Pod>, cpu: &str, prog: &Path) -> Result<Command> {
        let (first, rest): (&OsStrRef, Vec<&OsStrRef>) = if self.pin {
            (
                OsStrRef::new("taskset"),
                vec![OsStrRef::new("-c"), OsStrRef::new(cpu), prog.as_os_str()],
            )
        } else {
            (prog.as_os_str(), vec![])
        };
        let mut cmd = match pod {
            Some(p) => topo.command(p, first)?,
            None => Command::new(first),
        };
        cmd.args(rest);
        Ok(cmd)
    }

    /// A host-network process in the `node` pod's cgroup (under the programs' attachment, not
    /// enrolled): `sock_ops` must see the proxy's accepted sockets to put them in the SOCKHASH.
    fn node_cmd(&self, cpu: &str, prog: &Path) -> Result<Command> {
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(self.node.cgroup.join("cgroup.procs"))
            .context("open the node cgroup's cgroup.procs")?;
        let mut cmd = self.cmd_host(cpu, prog);
        // SAFETY: only write(2) on a descriptor opened before fork: async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    fn cmd_host(&self, cpu: &str, prog: &Path) -> Command {
        if self.pin {
            let mut c = Command::new("taskset");
            c.args(["-c", cpu]).arg(prog);
            c
        } else {
            Command::new(prog)
        }
    }

    fn log(&self, name: &str) -> Result<(File, File)> {
        let f = File::create(self.logs.join(format!("{name}.log")))?;
        Ok((f.try_clone()?, f))
    }

    fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }
}

type OsStrRef = std::ffi::OsStr;

pub fn run(mut args: BenchRedirectArgs) -> Result<()> {
    if args.quick {
        args.rounds = 2;
        args.duration = 3;
        args.connects = args.connects.min(5_000);
    }
    if let Some(why) = sluice_netns::cannot_run() {
        bail!("bench-redirect cannot run here: {why}");
    }
    let root = bench::workspace_root();
    for what in sluice_netns::sweep_stale() {
        println!("bench-redirect: removed stale {what}");
    }
    sweep_stale_pins();

    if !args.no_install {
        bench::install_apt(&[
            ("wrk", "wrk"),
            ("iptables", "iptables"),
            ("nginx", "nginx-light"),
        ]);
    }
    let wrk = bench::which("wrk").context("wrk is missing (apt-get install wrk)")?;
    let iptables = bench::which("iptables");
    let nginx = bench::which("nginx");
    let pin = !args.no_pin && bench::which("taskset").is_some() && bench::cpu_count() >= 2;
    let pinning = if pin {
        "pinned with taskset: proxies on CPU 1; clients, connect timer and upstream on CPU 0"
    } else {
        "not pinned (taskset missing, fewer than 2 CPUs, or --no-pin): latency under ~100 us is noise"
    };
    println!("bench-redirect: {pinning}");

    let object = root.join(sluice_redirect::DEFAULT_OBJECT);
    if !args.no_build_ebpf {
        build_ebpf(&object)?;
    }
    if !object.is_file() {
        bail!(
            "{} is missing: run `cargo xtask build-ebpf`",
            object.display()
        );
    }
    let sluice = bench::build_sluice(&root).map_err(|e| anyhow::anyhow!(e))?;
    let xtask = bench::release_loadgen(&root)?;
    let fake_service = if nginx.is_none() {
        println!("bench-redirect: nginx unavailable, the upstream is fake-service");
        let ok = crate::tutorial::cargo()
            .args(["build", "--release", "-p", "fake-service"])
            .current_dir(&root)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!("neither nginx nor fake-service is available as the upstream");
        }
        Some(crate::tutorial::release_dir(&root).join("fake-service"))
    } else {
        None
    };

    let tmp = tempfile::Builder::new()
        .prefix("sluice-bench-redirect-")
        .tempdir()?;
    let d = tmp.path();

    // Declared before the pins: dropped after them (programs detached, then pods removed).
    let mut topo = Topology::create()?;
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/sluice-bench-{:x}",
        std::process::id()
    )));
    let node = topo.add_pod("node")?;
    let client = topo.add_pod("client")?;
    let plain = topo.add_pod("plain")?;
    let sidecar = topo.add_pod("sidecar")?;
    let upstream = topo.add_pod("upstream")?;
    let host_ip = topo.host_ip();
    // Cluster IPs are on-link from the client pods: connect() needs a route (no default route,
    // so a connection that escaped redirection cannot leave the machine).
    for pod in [&client, &plain, &sidecar] {
        run_ok(Command::new("ip").args([
            "-n",
            &pod.netns,
            "route",
            "add",
            "10.96.0.0/12",
            "dev",
            "eth0",
        ]))?;
    }
    let lab = Lab {
        pin,
        xtask: xtask.clone(),
        object,
        client,
        plain,
        sidecar,
        node,
        logs: d.to_path_buf(),
    };
    let (load_cpu, proxy_cpu) = ("0", "1");
    println!(
        "bench-redirect: topology {} on {host_ip}/24: client {}, plain {}, sidecar {}, upstream {}",
        topo.id(),
        lab.client.ip,
        lab.plain.ip,
        lab.sidecar.ip,
        upstream.ip
    );

    // ---- Part 1: connect() cost -------------------------------------------------------------
    let sink_addr = SocketAddr::from((host_ip, bench::free_port()?));
    let mut cmd = lab.node_cmd(proxy_cpu, &xtask)?;
    let (o, e) = lab.log("sink")?;
    cmd.args(["redirect-probe", "--sink", &sink_addr.to_string()])
        .stdin(Stdio::null())
        .stdout(o)
        .stderr(e);
    let sink_pid = topo.spawn(&mut cmd)?;
    wait_tcp(sink_addr).with_context(|| format!("sink: {}", lab.log_tail("sink")))?;

    let gap = Duration::from_millis(args.gap_ms);
    let vip = SocketAddr::from((VIP, SVC_PORT));
    let mut redirect: Option<Redirect> = None;
    let mut runs: Vec<Run> = Vec::new();
    let mut not_measured: BTreeMap<&'static str, String> = BTreeMap::new();
    // The programs stay attached to the topology's cgroup; the timer moves itself between three
    // cgroups (its socket is charged to the cgroup it is in when it creates it), staying in the
    // client pod's network namespace: outside the attachment (`detached`), the unenrolled `plain`
    // pod's cgroup (`attached`), the enrolled client's (`redirected`, to the cluster IP).
    let bare = BareCgroup::create(topo.id())?;
    {
        let r = ensure_installed(&mut redirect, &lab, &topo, &pins.0, sink_addr)?;
        r.maps().enroll_cgroup(&lab.client.cgroup)?;
        // A busy node's map: ids no cgroup has (cgroupfs inode numbers are small), so the
        // decision's lookups run against as many entries as a node with that many pods.
        for i in 1..ENROLLED_FOR_BENCH {
            r.maps().enroll_cgroup_id(u64::MAX - u64::from(i))?;
        }
    }
    let cases: [Case; 4] = [
        ("detached", &bare.0, sink_addr, true),
        ("attached", &lab.plain.cgroup, sink_addr, true),
        ("redirected", &lab.client.cgroup, vip, true),
        ("no_sockmap", &lab.client.cgroup, vip, false),
    ];
    for round in 1..=args.rounds {
        let before = counters(redirect.as_ref().map(Redirect::maps));
        let reports = time_connects(&lab, &topo, load_cpu, &pins.0, &cases, args.connects)?;
        let after = counters(redirect.as_ref().map(Redirect::maps));
        let redirected = delta(&before, &after, Counter::ConnectRedirected);
        let expected = u64::from(reports[2].attempts + reports[3].attempts);
        if redirected != expected {
            bail!(
                "round {round}: connect4 redirected {redirected} connects, expected exactly the \
                 {expected} of the two enrolled cases (none of the others)"
            );
        }
        // The fast path's inserts: two per connection with it, none without.
        let inserted = delta(&before, &after, Counter::SockOpsSockhashInserted);
        let with = u64::from(reports[2].attempts);
        if inserted != 2 * with {
            bail!(
                "round {round}: {inserted} SOCKHASH inserts, expected 2 x {with} (the fast-path \
                 case's connections; none for the no_sockmap case)"
            );
        }
        for ((variant, _, _, _), report) in cases.iter().zip(reports) {
            println!(
                "round {round}/{} connect {variant:<10} median {:>6} ns  mean {:>8.0} ns  p90 {:>6} ns  errors {}",
                args.rounds, report.median_ns, report.mean_ns, report.p90_ns, report.errors
            );
            let mut figures = BTreeMap::new();
            figures.insert("connect_median", report.median_ns as f64);
            figures.insert("connect_mean", report.mean_ns);
            runs.push(Run {
                round,
                variant,
                figures,
                detail: json!({
                    "connect": report,
                    "connect_redirected_in_round": redirected,
                }),
            });
        }
        pause(gap);
    }
    // Where the added time goes: the programs' own run time (helpers included), one extra
    // batch per case with BPF run-time statistics on (they cost a little, so not during the
    // rounds above).
    let mut breakdown = serde_json::Map::new();
    for case in [cases[2], cases[3], cases[1]] {
        match program_costs(&lab, &topo, load_cpu, &pins.0, case, args.connects) {
            Ok(rows) => {
                breakdown.insert(case.0.to_owned(), rows);
            }
            Err(e) => {
                eprintln!("bench-redirect: per-program run time not measured: {e:#}");
                break;
            }
        }
    }
    topo.kill(sink_pid);
    if args.connect_only {
        drop(redirect);
        drop(pins);
        drop(topo);
        return finish(&runs, &not_measured, &breakdown, pinning, "-", &args, &root);
    }

    // ---- Part 2: requests through the proxy -------------------------------------------------
    let cfg_dir = d.join("sluice");
    fs::create_dir_all(&cfg_dir)?;
    let yaml = peers::sluice_yaml(UPSTREAM_PORT);
    let yaml_up = yaml.replace("[\"127.0.0.1\"]", &format!("[\"{}\"]", upstream.ip));
    if yaml_up == yaml {
        bail!("the bench's Sluice config no longer lists 127.0.0.1 as the endpoint to replace");
    }
    fs::write(cfg_dir.join("bench.yaml"), yaml_up)?;
    fs::write(cfg_dir.join("direct.yaml"), direct_yaml())?;

    // The upstream, in its own pod.
    let up_addr = SocketAddr::from((upstream.ip, UPSTREAM_PORT));
    let up_pid = match (&nginx, &fake_service) {
        (Some(nginx), _) => {
            let ndir = d.join("nginx");
            fs::create_dir_all(&ndir)?;
            let conf = ndir.join("nginx.conf");
            let text = peers::nginx_conf(&ndir, UPSTREAM_PORT)
                .replace("listen 127.0.0.1:", "listen 0.0.0.0:");
            fs::write(&conf, text)?;
            let mut cmd = lab.cmd(&topo, Some(&upstream), load_cpu, nginx)?;
            let (o, e) = lab.log("upstream")?;
            cmd.args(["-c", bench::path_str(&conf), "-p", bench::path_str(&ndir)])
                .stdin(Stdio::null())
                .stdout(o)
                .stderr(e);
            topo.spawn(&mut cmd)?
        }
        (None, Some(fake)) => {
            let mut cmd = lab.cmd(&topo, Some(&upstream), load_cpu, fake)?;
            let (o, e) = lab.log("upstream")?;
            cmd.env("LISTEN_ADDR", format!("0.0.0.0:{UPSTREAM_PORT}"))
                .env("NAME", HOST)
                .stdin(Stdio::null())
                .stdout(o)
                .stderr(e);
            topo.spawn(&mut cmd)?
        }
        (None, None) => unreachable!("checked above"),
    };
    wait_http(&mut topo, up_pid, up_addr)
        .with_context(|| format!("upstream: {}", lab.log_tail("upstream")))?;
    let upstream_name = if nginx.is_some() {
        "nginx"
    } else {
        "fake-service"
    };

    // The node proxy, on the host in the node cgroup. When this sluice has it, the agent itself
    // attaches the programs (`--redirect ebpf`, its own pins), enrolls the client pod from its Pod
    // object, renews the lease and routes by original destination, as on a node; otherwise the
    // bench installs them and Sluice routes by Host header (`--redirect none`).
    let help = Command::new(&sluice)
        .args(["run", "--help"])
        .output()
        .context("sluice run --help")?;
    let agent_ebpf = String::from_utf8_lossy(&help.stdout).contains("--pin-dir");
    let agent_pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/sluice-bench-{:x}-agent",
        std::process::id()
    )));
    let mut pods = String::new();
    for (pod, enrolled) in [
        (&lab.client, true),
        (&lab.plain, false),
        (&lab.sidecar, false),
    ] {
        pods.push_str(&crate::tutorial::pod_yaml(
            &pod.name,
            &pod.name,
            "v1",
            std::net::IpAddr::V4(pod.ip),
            &[
                ("sluice.io/netns", pod.netns_path.display().to_string()),
                ("sluice.io/cgroup", pod.cgroup.display().to_string()),
            ],
            enrolled,
        ));
    }
    fs::write(cfg_dir.join("pods.yaml"), pods)?;
    let proxy_addr = SocketAddr::from((host_ip, bench::free_port()?));
    let local = |p: u16| format!("127.0.0.1:{p}");
    let (a, m, r) = (
        local(bench::free_port()?),
        local(bench::free_port()?),
        local(bench::free_port()?),
    );
    let proxy_s = proxy_addr.to_string();
    let r_node = r.clone();
    let mut argv = sluice_args(&cfg_dir, &proxy_s, &a, &m, &r);
    let host_ip_s = host_ip.to_string();
    if agent_ebpf {
        // The bench's own attachment goes first: one set of programs on the cgroup at a time.
        if redirect.take().is_some() {
            sluice_redirect::uninstall(&pins.0)?;
        }
        argv.retain(|a| *a != "none");
        argv.retain(|a| *a != "--redirect");
        argv.extend([
            "--redirect",
            "ebpf",
            "--cgroup",
            bench::path_str(topo.cgroup()),
            "--pin-dir",
            bench::path_str(&agent_pins.0),
            "--proxy-ip",
            &host_ip_s,
            "--ebpf-object",
            bench::path_str(&lab.object),
        ]);
    }
    let mut cmd = lab.node_cmd(proxy_cpu, &sluice)?;
    let (o, e) = lab.log("sluice-node")?;
    cmd.args(&argv).stdin(Stdio::null()).stdout(o).stderr(e);
    let node_pid = topo.spawn(&mut cmd)?;
    // `veth_tcp` and `loopback` send to a proxy's address from clients that are no enrolled pod.
    // In eBPF mode the node proxy refuses them (it is no open relay), so there they reach its
    // twin: the same Sluice, configuration and CPU in explicit-proxy mode, on another port of
    // the same address. Without agent-managed eBPF the node proxy is that explicit proxy.
    let (explicit_addr, explicit_pid) = if agent_ebpf {
        let twin_addr = SocketAddr::from((host_ip, bench::free_port()?));
        let twin_s = twin_addr.to_string();
        let (a, m, r) = (
            local(bench::free_port()?),
            local(bench::free_port()?),
            local(bench::free_port()?),
        );
        let mut cmd = lab.node_cmd(proxy_cpu, &sluice)?;
        let (o, e) = lab.log("sluice-explicit")?;
        cmd.args(sluice_args(&cfg_dir, &twin_s, &a, &m, &r))
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e);
        let pid = topo.spawn(&mut cmd)?;
        wait_http(&mut topo, pid, twin_addr)
            .with_context(|| format!("explicit proxy: {}", lab.log_tail("sluice-explicit")))?;
        wait_ready(&mut topo, node_pid, &r_node)
            .with_context(|| format!("node proxy: {}", lab.log_tail("sluice-node")))?;
        (twin_addr, pid)
    } else {
        wait_http(&mut topo, node_pid, proxy_addr)
            .with_context(|| format!("node proxy: {}", lab.log_tail("sluice-node")))?;
        (proxy_addr, node_pid)
    };

    // Redirection to the node proxy, the client pod enrolled.
    let mut agent_maps: Option<sluice_redirect::Maps> = None;
    if agent_ebpf {
        let id = sluice_redirect::cgroup_id(&lab.client.cgroup)?;
        let mut enrolled = false;
        for _ in 0..100 {
            if let Ok(m) = sluice_redirect::Maps::open(&agent_pins.0) {
                if m.enrolled_cgroups().contains(&id) {
                    agent_maps = Some(m);
                    enrolled = true;
                    break;
                }
            }
            pause(Duration::from_millis(100));
        }
        if !enrolled {
            bail!(
                "sluice run --redirect ebpf did not enroll the client pod within 10 s: {}",
                lab.log_tail("sluice-node")
            );
        }
        println!("bench-redirect: node proxy is `sluice run --redirect ebpf` (agent-managed programs, lease and enrollment)");
    } else {
        let r = ensure_installed(&mut redirect, &lab, &topo, &pins.0, proxy_addr)?;
        r.maps().set_proxy(Some(proxy_addr), None, true)?;
        r.maps().renew_lease(LEASE)?;
        r.maps().enroll_cgroup(&lab.client.cgroup)?;
        println!("bench-redirect: this sluice has no --redirect ebpf --pin-dir: the bench attaches the programs, Sluice routes by Host header");
    }

    // The sidecar: Sluice inside the sidecar pod, iptables REDIRECT of the cluster IP to it.
    let mut sidecar_pid = None;
    match &iptables {
        None => {
            not_measured.insert("iptables", "iptables is not installed".into());
        }
        Some(ipt) => {
            let mut cmd = lab.cmd(&topo, Some(&lab.sidecar), proxy_cpu, &sluice)?;
            let (o, e) = lab.log("sluice-sidecar")?;
            let listen = format!("0.0.0.0:{SIDECAR_PORT}");
            cmd.args(sluice_args(
                &cfg_dir,
                &listen,
                "127.0.0.1:15000",
                "127.0.0.1:15020",
                "127.0.0.1:15021",
            ))
            .stdin(Stdio::null())
            .stdout(o)
            .stderr(e);
            let pid = topo.spawn(&mut cmd)?;
            let sidecar_addr = SocketAddr::from((lab.sidecar.ip, SIDECAR_PORT));
            let started = wait_http(&mut topo, pid, sidecar_addr)
                .with_context(|| format!("sidecar: {}", lab.log_tail("sluice-sidecar")))
                .and_then(|()| {
                    for vip in [VIP, VIP_DIRECT] {
                        let out = topo.exec(
                            &lab.sidecar,
                            bench::path_str(ipt),
                            &[
                                "-t",
                                "nat",
                                "-A",
                                "OUTPUT",
                                "-p",
                                "tcp",
                                "-d",
                                &vip.to_string(),
                                "--dport",
                                &SVC_PORT.to_string(),
                                "-j",
                                "REDIRECT",
                                "--to-ports",
                                &SIDECAR_PORT.to_string(),
                            ],
                        )?;
                        if !out.status.success() {
                            bail!(
                                "iptables -t nat -A OUTPUT -d {vip} ... -j REDIRECT: {}",
                                String::from_utf8_lossy(&out.stderr).trim()
                            );
                        }
                    }
                    Ok(())
                });
            match started {
                Ok(()) => sidecar_pid = Some(pid),
                Err(e) => {
                    topo.kill(pid);
                    not_measured.insert("iptables", format!("{e:#}"));
                }
            }
        }
    }

    // Each variant: who sends, to where, which proxy works.
    let proxy_pid = |v: &str| match v {
        "iptables" => sidecar_pid,
        "veth_tcp" | "loopback" => Some(explicit_pid),
        _ => Some(node_pid),
    };
    let pod_of = |v: &str| match v {
        "sk_msg" => Some(&lab.client),
        "veth_tcp" => Some(&lab.plain),
        "iptables" => Some(&lab.sidecar),
        _ => None,
    };
    let target_of = |v: &str| match v {
        "sk_msg" | "iptables" => vip,
        _ => explicit_addr,
    };
    let direct_target_of = |v: &str| match v {
        "sk_msg" | "iptables" => SocketAddr::from((VIP_DIRECT, SVC_PORT)),
        _ => explicit_addr,
    };
    // `wrk -t1 -cC -dSs --latency` from variant `v`'s client to `url` with this Host header.
    let run_wrk = |v: &str, cpu: &str, conns: u32, secs: u64, url: &str, host: &str| {
        let mut cmd = lab.cmd(&topo, pod_of(v), cpu, &wrk)?;
        cmd.args([
            "-t1",
            &format!("-c{conns}"),
            &format!("-d{secs}s"),
            "--latency",
            "-H",
            &format!("Host: {host}"),
            url,
        ])
        .stdin(Stdio::null());
        cmd.output().context("cannot run wrk")
    };
    // Pod -> proxy, the proxy answering: one keep-alive connection, one request at a time.
    let p2p = |v: &str, cpu: &str, secs: u64| -> Result<bench::parse::WrkReport> {
        let url = format!("http://{}/", direct_target_of(v));
        let out = run_wrk(v, cpu, 1, secs, &url, DIRECT_HOST)?;
        let text = String::from_utf8_lossy(&out.stdout);
        match parse::wrk(&text) {
            Some(r) if r.requests > 0 && r.errors == 0 => Ok(r),
            _ => bail!(
                "wrk -c1 to {url} (Host: {DIRECT_HOST}): {}{}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }
    };
    let loadgen_cmd = |v: &str, cpu: &str, rate: u32, secs: u64| -> Result<Command> {
        let mut cmd = lab.cmd(&topo, pod_of(v), cpu, &xtask)?;
        cmd.args([
            "loadgen",
            "--target",
            &target_of(v).to_string(),
            "--host",
            HOST,
            "--rate",
            &rate.to_string(),
            "--duration",
            &secs.to_string(),
        ])
        .stdin(Stdio::null());
        Ok(cmd)
    };
    let loadgen = |v: &str, cpu: &str, rate: u32, secs: u64| -> Result<Output> {
        loadgen_cmd(v, cpu, rate, secs)?
            .output()
            .context("cannot run the load generator")
    };

    // Every variant answers before the rounds start (also warms connections and caches).
    let mut variants: Vec<&'static str> = Vec::new();
    for v in L7_VARIANTS {
        if not_measured.contains_key(v) {
            continue;
        }
        let out = loadgen(v, load_cpu, 200, 1)?;
        match serde_json::from_slice::<LoadgenReport>(&out.stdout) {
            Ok(rep) if rep.ok > 0 && rep.errors == 0 => match p2p(v, load_cpu, 1) {
                Ok(_) => variants.push(v),
                Err(e) => {
                    not_measured.insert(v, format!("warm-up, proxy-answered: {e:#}"));
                }
            },
            Ok(rep) => {
                not_measured.insert(v, format!("warm-up: {} ok, {} errors", rep.ok, rep.errors));
            }
            Err(_) => {
                not_measured.insert(
                    v,
                    format!(
                        "warm-up failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                );
            }
        }
    }
    for (v, why) in &not_measured {
        println!("{v}: not measured: {why}");
    }

    let ticks = bench::clock_ticks();
    for round in 1..=args.rounds {
        let mut order = variants.clone();
        let k = (round - 1) % order.len().max(1);
        order.rotate_left(k);
        for &v in &order {
            if let Some(r) = &redirect {
                r.maps().renew_lease(LEASE)?;
            }
            let maps = agent_maps
                .as_ref()
                .or(redirect.as_ref().map(Redirect::maps));
            let before = counters(maps);
            let url = format!("http://{}/", target_of(v));
            let out = run_wrk(v, load_cpu, args.connections, args.duration, &url, HOST)?;
            let sat = parse::wrk(&String::from_utf8_lossy(&out.stdout)).unwrap_or_default();
            pause(gap);

            let pid = proxy_pid(v).expect("measured variants have a proxy");
            let cpu0 = bench::cpu_ticks(pid);
            let lg = loadgen(v, load_cpu, args.rate, args.duration)?;
            let cpu1 = bench::cpu_ticks(pid);
            let fixed: Option<LoadgenReport> = serde_json::from_slice(&lg.stdout).ok();
            if fixed.is_none() {
                eprintln!(
                    "bench-redirect: round {round} {v}: load generator failed: {}",
                    String::from_utf8_lossy(&lg.stderr).trim()
                );
            }
            pause(gap);
            let mut p2p_runs = Vec::new();
            for cpu in [proxy_cpu, load_cpu] {
                if cpu == load_cpu && !pin {
                    break;
                }
                match p2p(v, cpu, args.duration) {
                    Ok(r) => p2p_runs.push(Some(r)),
                    Err(e) => {
                        eprintln!("bench-redirect: round {round} {v}: {e:#}");
                        p2p_runs.push(None);
                    }
                }
                pause(gap);
            }
            let after = counters(maps);

            let cpu_s = match (cpu0, cpu1) {
                (Some(a), Some(b)) => Some((b - a) as f64 / ticks),
                _ => None,
            };
            let mut figures = BTreeMap::new();
            if sat.requests_per_sec > 0.0 {
                figures.insert("throughput", sat.requests_per_sec);
            }
            if let Some(p) = sat.p50_us {
                figures.insert("wrk_p50", p);
            }
            if let Some(p) = sat.p99_us {
                figures.insert("wrk_p99", p);
            }
            // This run's latencies stay in the details: the judged ones come from the
            // interleaved run below, where every variant meets the same machine.
            if let Some(f) = &fixed {
                if let (Some(c), true) = (cpu_s, f.ok > 0) {
                    figures.insert("proxy_cpu_per_1k", c * 1e6 / f.ok as f64);
                }
            }
            for (i, r) in p2p_runs.iter().enumerate() {
                let Some(r) = r else { continue };
                let (p50, p99) = if i == 0 {
                    ("p2p_p50_one_cpu", "p2p_p99_one_cpu")
                } else {
                    ("p2p_p50_2cpu", "p2p_p99_2cpu")
                };
                if let Some(p) = r.p50_us {
                    figures.insert(p50, p);
                }
                if let Some(p) = r.p99_us {
                    figures.insert(p99, p);
                }
                if i == 0 {
                    figures.insert("p2p_rps_one_cpu", r.requests_per_sec);
                }
            }
            let sk = delta(&before, &after, Counter::SkMsgRedirected);
            figures.insert("sk_msg_redirected", sk as f64);
            let fig = |f: &str| figures.get(f).map_or("-".into(), |v| format!("{v:.0}"));
            println!(
                "round {round}/{} {v:<9} {:>8.0} req/s  wrk p50 {:>7} us  proxy CPU {:>5} ms/1k  \
                 proxy-answered p50 {:>4} us (one CPU) {:>4} us (2 CPUs)  sk_msg {sk}",
                args.rounds,
                sat.requests_per_sec,
                fig("wrk_p50"),
                fig("proxy_cpu_per_1k"),
                fig("p2p_p50_one_cpu"),
                fig("p2p_p50_2cpu"),
            );
            runs.push(Run {
                round,
                variant: v,
                figures,
                detail: json!({
                    "wrk": sat,
                    "fixed": fixed,
                    "proxy_answered": p2p_runs,
                    "proxy_cpu_s_at_rate": cpu_s,
                    "counters_delta": counter_deltas(&before, &after),
                }),
            });
        }

        // p50/p99 at the fixed rate, the variants taking turns: every variant's generator runs
        // at once and sends only in its own 100 ms slot of every len(order), so the machine's
        // hiccups (other tenants, the hypervisor) fall on all variants alike instead of on
        // whichever ran during them (one variant at a time, 10 s runs here differed 10x in p99
        // between rounds of one variant). Twice: client and upstream on the other CPU than the
        // proxy, then all three on the proxy's CPU (no cross-CPU wake-ups, about 55-60 us each
        // here, so what remains is the work on the path, which sk_msg shortens).
        for (cpu, p50, p99, what) in [
            (load_cpu, "p50_at_rate", "p99_at_rate", "at_rate"),
            (proxy_cpu, "p50_one_cpu", "p99_one_cpu", "one_cpu"),
        ] {
            if cpu == proxy_cpu && !pin {
                break;
            }
            if let Some(r) = &redirect {
                r.maps().renew_lease(LEASE)?;
            }
            if cpu == proxy_cpu {
                set_affinity(up_pid, proxy_cpu);
            }
            let reports = bench::loadgen::taking_turns(&order, SLOT_MS, |v| {
                loadgen_cmd(v, cpu, args.rate, args.duration)
            });
            if cpu == proxy_cpu {
                set_affinity(up_pid, load_cpu);
            }
            for (v, rep) in reports? {
                let Some(run) = runs.iter_mut().find(|r| r.round == round && r.variant == v) else {
                    continue;
                };
                match &rep {
                    Ok(f) => {
                        if let Some(p) = f.p50_us {
                            run.figures.insert(p50, p as f64);
                        }
                        if let Some(p) = f.p99_us {
                            run.figures.insert(p99, p as f64);
                        }
                        println!(
                            "round {round}/{} {v:<9} {what:<7} {} rps, taking turns: p50 {:>5} us  p99 {:>5} us  ({} ok, {} errors)",
                            args.rounds,
                            args.rate,
                            f.p50_us.map_or("-".into(), |p| p.to_string()),
                            f.p99_us.map_or("-".into(), |p| p.to_string()),
                            f.ok,
                            f.errors,
                        );
                    }
                    Err(e) => eprintln!("bench-redirect: round {round} {v} {what}: {e}"),
                }
                run.detail[what] = json!(rep.ok());
            }
            pause(gap);
        }
    }

    // Stop everything we started (by PID, through the topology), then detach and remove pins.
    if let Some(r) = redirect.take() {
        let _ = r.maps().end_lease();
    }
    topo.kill(node_pid);
    topo.kill(explicit_pid);
    drop(agent_maps);
    drop(agent_pins);
    drop(pins);
    drop(topo);
    drop(tmp);

    finish(
        &runs,
        &not_measured,
        &breakdown,
        pinning,
        upstream_name,
        &args,
        &root,
    )
}

/// Prints the summary and writes the JSON results.
fn finish(
    runs: &[Run],
    not_measured: &BTreeMap<&'static str, String>,
    breakdown: &serde_json::Map<String, serde_json::Value>,
    pinning: &str,
    upstream_name: &str,
    args: &BenchRedirectArgs,
    root: &Path,
) -> Result<()> {
    let summary = summarize(runs, not_measured, breakdown, pinning, upstream_name, args);
    print!("{}", summary.0);
    let out = root.join(&args.out);
    if let Some(parent) = out.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(&out, serde_json::to_string_pretty(&summary.1)?)?;
    println!("results: {}", out.display());
    Ok(())
}

/// A Service the proxy answers by itself: its VirtualService returns 200 "ok" with no upstream.
fn direct_yaml() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {DIRECT_HOST}
  namespace: default
spec:
  clusterIP: {VIP_DIRECT}
  ports:
  - name: http
    port: {SVC_PORT}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {DIRECT_HOST}
  namespace: default
spec:
  hosts:
  - {DIRECT_HOST}
  http:
  - directResponse:
      status: 200
      body:
        string: ok
"
    )
}

fn sluice_args<'a>(
    cfg: &'a Path,
    outbound: &'a str,
    admin: &'a str,
    metrics: &'a str,
    ready: &'a str,
) -> Vec<&'a str> {
    vec![
        "run",
        "--redirect",
        "none",
        "--config-dir",
        bench::path_str(cfg),
        "--outbound-addr",
        outbound,
        "--admin-addr",
        admin,
        "--admin-socket",
        "none",
        "--metrics-addr",
        metrics,
        "--ready-addr",
        ready,
        "--workers",
        "1",
        "--no-access-log",
        "--log",
        "warn",
    ]
}

/// Installs the programs on the topology's cgroup when they are not, proxy at `proxy`, leased.
fn ensure_installed<'r>(
    slot: &'r mut Option<Redirect>,
    lab: &Lab,
    topo: &Topology,
    pins: &Path,
    proxy: SocketAddr,
) -> Result<&'r Redirect> {
    if slot.is_none() {
        let r = sluice_redirect::install(&Options {
            object: lab.object.clone(),
            cgroup: topo.cgroup().to_path_buf(),
            pin_dir: pins.to_path_buf(),
        })
        .context("installing the redirect programs")?;
        r.maps().set_proxy(Some(proxy), None, true)?;
        r.maps().renew_lease(LEASE)?;
        *slot = Some(r);
    }
    Ok(slot.as_ref().expect("set above"))
}

fn counters(m: Option<&sluice_redirect::Maps>) -> BTreeMap<&'static str, u64> {
    m.and_then(|m| m.counters().ok())
        .map(|cs| cs.into_iter().map(|(c, v)| (c.name(), v)).collect())
        .unwrap_or_default()
}

fn delta(before: &BTreeMap<&str, u64>, after: &BTreeMap<&str, u64>, c: Counter) -> u64 {
    let a = after.get(c.name()).copied().unwrap_or(0);
    let b = before.get(c.name()).copied().unwrap_or(0);
    a.saturating_sub(b)
}

fn counter_deltas(
    before: &BTreeMap<&'static str, u64>,
    after: &BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, u64> {
    after
        .iter()
        .map(|(k, v)| (*k, v.saturating_sub(before.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// A connect case: name, the cgroup the timer's sockets are made in, the address connected to,
/// and whether the sk_msg fast path is on.
type Case<'a> = (&'static str, &'a Path, SocketAddr, bool);

fn time_connects(
    lab: &Lab,
    topo: &Topology,
    cpu: &str,
    pins: &Path,
    cases: &[Case],
    count: u32,
) -> Result<Vec<ConnectReport>> {
    let mut cmd = lab.cmd(topo, Some(&lab.client), cpu, &lab.xtask)?;
    cmd.args(["redirect-probe", "--count", &count.to_string()]);
    cmd.arg("--pins").arg(pins);
    for (_, cgroup, addr, sockmap) in cases {
        let flag = if *sockmap { "" } else { ",no-sockmap" };
        cmd.arg("--case")
            .arg(format!("{}={addr}{flag}", bench::path_str(cgroup)));
    }
    cmd.stdin(Stdio::null());
    let out = cmd.output().context("cannot run the connect timer")?;
    let reports: Vec<ConnectReport> = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "connect timer: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    for ((name, _, target, _), report) in cases.iter().zip(&reports) {
        if report.errors > report.count / 100 {
            bail!(
                "connect timer, {name} to {target}: {} of {} connects failed (first: {})",
                report.errors,
                report.count,
                report.first_error.as_deref().unwrap_or("-")
            );
        }
    }
    if reports.len() != cases.len() {
        bail!(
            "connect timer: {} reports for {} cases",
            reports.len(),
            cases.len()
        );
    }
    Ok(reports)
}

/// A cgroup outside the programs' attachment (`<cgroup2 root>/sluice-<topology id>-bare`, so that
/// `sluice_netns::sweep_stale` removes it after a killed run); removed on drop.
struct BareCgroup(PathBuf);

impl BareCgroup {
    fn create(topology_id: &str) -> Result<Self> {
        let path = sluice_redirect::cgroup2_root()?
            .join(format!("{}{topology_id}-bare", sluice_netns::PREFIX));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(BareCgroup(path))
    }
}

impl Drop for BareCgroup {
    fn drop(&mut self) {
        // Only the connect timer (exited by now) ever ran here: bounded retry, nothing to kill.
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            pause(Duration::from_millis(20));
        }
        eprintln!("bench-redirect: could not remove {}", self.0.display());
    }
}

/// Cgroups in the enrolled map while `connect()` is timed: the client pod and fillers, as many as
/// the enrollment test's node has pods.
const ENROLLED_FOR_BENCH: u32 = 524;

/// Programs whose run time is reported (pinned as `<pins>/progs/<name>` by sluice-redirect).
const PROGRAMS: [&str; 5] = [
    "sluice_connect4",
    "sluice_connect6",
    "sluice_sock_ops",
    "sluice_sk_msg",
    "sluice_getsockopt",
];

/// Runs one batch of `case` with BPF_ENABLE_STATS held, and returns each program's runs and
/// nanoseconds per connect attempt.
fn program_costs(
    lab: &Lab,
    topo: &Topology,
    cpu: &str,
    pins: &Path,
    case: Case,
    count: u32,
) -> Result<serde_json::Value> {
    let read = || -> BTreeMap<&'static str, (u64, u64)> {
        PROGRAMS
            .iter()
            .filter_map(|name| {
                let info =
                    aya::programs::ProgramInfo::from_pin(pins.join("progs").join(name)).ok()?;
                Some((*name, (info.run_time().as_nanos() as u64, info.run_count())))
            })
            .collect()
    };
    // Statistics stay on while this descriptor is open (kernel-wide, so only for this batch).
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")?;
    let before = read();
    let reports = time_connects(lab, topo, cpu, pins, &[case], count)?;
    let after = read();
    drop(stats);
    let attempts = f64::from(reports[0].attempts.max(1));
    let mut rows = serde_json::Map::new();
    let mut total = 0.0;
    for (name, (t1, n1)) in &after {
        let (t0, n0) = before.get(name).copied().unwrap_or((0, 0));
        let (dt, dn) = (t1.saturating_sub(t0), n1.saturating_sub(n0));
        if dn == 0 {
            continue;
        }
        total += dt as f64 / attempts;
        rows.insert(
            (*name).to_owned(),
            json!({
                "runs_per_connect": dn as f64 / attempts,
                "ns_per_run": dt as f64 / dn as f64,
                "ns_per_connect": dt as f64 / attempts,
            }),
        );
    }
    Ok(json!({
        "connects": reports[0].attempts,
        "connect_median_ns_with_stats": reports[0].median_ns,
        "programs": rows,
        "programs_ns_per_connect": total,
    }))
}

/// Re-pins a running process of ours (`taskset -p`); a failure only makes the figure noisier.
fn set_affinity(pid: u32, cpu: &str) {
    let ok = Command::new("taskset")
        .args(["-p", "-c", cpu, &pid.to_string()])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("bench-redirect: taskset -p -c {cpu} {pid} failed");
    }
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Rebuilds the eBPF object (incremental: seconds) so that it matches the loader compiled in.
fn build_ebpf(object: &Path) -> Result<()> {
    println!("bench-redirect: cargo xtask build-ebpf");
    let ok = Command::new(std::env::current_exe()?)
        .arg("build-ebpf")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        if object.is_file() {
            eprintln!(
                "bench-redirect: build-ebpf failed; using the existing {}",
                object.display()
            );
        } else {
            bail!("build-ebpf failed and there is no {}", object.display());
        }
    }
    Ok(())
}

/// Pins left by bench runs that were killed (their PID is gone).
fn sweep_stale_pins() {
    let Ok(dir) = fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("sluice-bench-")
            .map(|p| p.trim_end_matches("-agent"))
            .and_then(|p| u32::from_str_radix(p, 16).ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sluice_redirect::uninstall(&entry.path());
            let _ = fs::remove_dir_all(entry.path());
            println!(
                "bench-redirect: removed stale pins {}",
                entry.path().display()
            );
        }
    }
}

/// At most 100 tries, 50 ms apart.
fn wait_tcp(addr: SocketAddr) -> Result<()> {
    for _ in 0..100 {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        pause(Duration::from_millis(50));
    }
    bail!("nothing accepted on {addr} within 5 s")
}

/// Polls with a real request until a 200 comes back: at most 150 tries, 100 ms apart.
/// Waits until the agent `pid` answers 200 on its readiness address `ready` (`/healthz/ready`).
fn wait_ready(topo: &mut Topology, pid: u32, ready: &str) -> Result<()> {
    let addr: SocketAddr = ready.parse()?;
    let mut last = String::from("no answer");
    for _ in 0..150 {
        let probe = || -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            std::io::Write::write_all(
                &mut s,
                b"GET /healthz/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
            )?;
            let mut buf = [0u8; 64];
            let n = std::io::Read::read(&mut s, &mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned())
        };
        match probe() {
            Ok(line) if line.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(line) => last = line,
            Err(e) => last = e.to_string(),
        }
        if !topo.running(pid) {
            bail!("process {pid} exited before {addr} was ready");
        }
        pause(Duration::from_millis(100));
    }
    bail!("{addr} was not ready within 15 s (last: {last})")
}

fn wait_http(topo: &mut Topology, pid: u32, addr: SocketAddr) -> Result<()> {
    let mut last = String::from("no answer");
    for _ in 0..150 {
        match bench::probe(addr) {
            Ok(line) if line.starts_with("HTTP/1.1 200") => return Ok(()),
            Ok(line) => last = line,
            Err(e) => last = e.to_string(),
        }
        if !topo.running(pid) {
            bail!("process {pid} exited before {addr} answered");
        }
        pause(Duration::from_millis(100));
    }
    bail!("{addr} did not answer 200 within 15 s (last: {last})")
}

fn pause(d: Duration) {
    bench::pause(d);
}

// ---- the helper run inside pods --------------------------------------------------------------

pub fn probe_main(args: ProbeArgs) -> Result<()> {
    if let Some(addr) = args.sink {
        return sink(addr, Duration::from_secs(args.lifetime));
    }
    if args.case.is_empty() {
        bail!("redirect-probe: pass --sink ADDR or --case CGROUP=ADDR...");
    }
    let mut cases = Vec::new();
    for c in &args.case {
        let (cg, rest) = c
            .rsplit_once('=')
            .with_context(|| format!("--case {c}: expected CGROUP_DIR=IP:PORT[,no-sockmap]"))?;
        let (addr, sockmap) = match rest.split_once(',') {
            None => (rest, true),
            Some((a, "no-sockmap")) => (a, false),
            Some((_, other)) => bail!("--case {c}: unknown option {other:?}"),
        };
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(Path::new(cg).join("cgroup.procs"))
            .with_context(|| format!("open {cg}/cgroup.procs"))?;
        cases.push((procs, addr.parse::<SocketAddr>()?, sockmap));
    }
    let maps = match &args.pins {
        Some(p) if cases.iter().any(|c| !c.2) => Some(
            sluice_redirect::Maps::open(p)
                .with_context(|| format!("the programs' maps under {}", p.display()))?,
        ),
        _ => None,
    };
    let reports = connect_cases(&cases, maps.as_ref(), args.count, args.block.max(1));
    if let Some(m) = &maps {
        m.set_sockmap(true)?;
    }
    let reports = reports?;
    println!("{}", serde_json::to_string(&reports)?);
    Ok(())
}

fn sink(addr: SocketAddr, lifetime: Duration) -> Result<()> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        std::process::exit(0);
    });
    // Until killed by PID (or the lifetime above): accept and drop.
    loop {
        let _ = s.accept();
    }
}

#[derive(Default)]
struct CaseTimes {
    times: Vec<u64>,
    attempts: u32,
    errors: u32,
    first_error: Option<String>,
}

fn connect_cases(
    cases: &[(File, SocketAddr, bool)],
    maps: Option<&sluice_redirect::Maps>,
    count: u32,
    block: u32,
) -> Result<Vec<ConnectReport>> {
    use std::io::Write as _;
    let mut acc: Vec<CaseTimes> = cases.iter().map(|_| CaseTimes::default()).collect();
    let turns = count.div_ceil(block) + 1;
    for turn in 0..turns {
        for k in 0..cases.len() {
            // Rotate who goes first so no case always follows the same one.
            let i = (k + turn as usize) % cases.len();
            let (mut procs, target) = (&cases[i].0, cases[i].1);
            if let Some(m) = maps {
                m.set_sockmap(cases[i].2)
                    .context("setting the sk_msg fast path")?;
            }
            // Into the case's cgroup (this single-threaded process moves as a whole).
            procs
                .write_all(b"0")
                .context("moving into the case's cgroup")?;
            let sa: socket2::SockAddr = target.into();
            let a = &mut acc[i];
            let n = if turn == 0 {
                block
            } else {
                block.min(count.saturating_sub(a.times.len() as u32))
            };
            for _ in 0..n {
                let s = socket2::Socket::new(
                    socket2::Domain::for_address(target),
                    socket2::Type::STREAM,
                    None,
                )?;
                let t = Instant::now();
                let r = s.connect(&sa);
                let ns = t.elapsed().as_nanos() as u64;
                // RST on close: no TIME_WAIT, so ports never run out.
                let _ = s.set_linger(Some(Duration::ZERO));
                drop(s);
                a.attempts += 1;
                match r {
                    Ok(()) if turn > 0 => a.times.push(ns),
                    Ok(()) => {}
                    Err(e) => {
                        a.errors += 1;
                        a.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            if a.errors > count / 10 + 10 {
                bail!(
                    "connects to {target} keep failing: {}",
                    a.first_error.as_deref().unwrap_or("-")
                );
            }
        }
    }
    Ok(acc
        .into_iter()
        .map(|mut a| {
            a.times.sort_unstable();
            let mean = if a.times.is_empty() {
                0.0
            } else {
                a.times.iter().sum::<u64>() as f64 / a.times.len() as f64
            };
            let pct = |p| stats::percentile(&a.times, p).unwrap_or(0);
            ConnectReport {
                count: a.times.len() as u32,
                attempts: a.attempts,
                errors: a.errors,
                median_ns: pct(50.0),
                mean_ns: mean,
                p10_ns: pct(10.0),
                p90_ns: pct(90.0),
                p99_ns: pct(99.0),
                first_error: a.first_error,
            }
        })
        .collect())
}

// ---- summary ---------------------------------------------------------------------------------

fn values(runs: &[Run], variant: &str, fig: &str) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.variant == variant)
        .filter_map(|r| r.figures.get(fig).copied())
        .collect()
}

fn cell(v: &[f64]) -> (String, serde_json::Value) {
    let (m, rg) = (stats::median(v), stats::range(v));
    let text = stats::median_range_text(m, rg);
    (
        text,
        json!({ "median": m, "min": rg.map(|r| r.0), "max": rg.map(|r| r.1), "n": v.len() }),
    )
}

/// Per-round differences `a - b` of one figure (paired within a round).
fn paired(runs: &[Run], a: &str, b: &str, fig: &str) -> Vec<f64> {
    let rounds: std::collections::BTreeSet<usize> = runs.iter().map(|r| r.round).collect();
    let get = |round, v: &str| {
        runs.iter()
            .find(|r| r.round == round && r.variant == v)
            .and_then(|r| r.figures.get(fig).copied())
    };
    rounds
        .into_iter()
        .filter_map(|round| Some(get(round, a)? - get(round, b)?))
        .collect()
}

fn summarize(
    runs: &[Run],
    not_measured: &BTreeMap<&'static str, String>,
    breakdown: &serde_json::Map<String, serde_json::Value>,
    pinning: &str,
    upstream: &str,
    args: &BenchRedirectArgs,
) -> (String, serde_json::Value) {
    use std::fmt::Write as _;
    let mut t = String::new();
    let mut checks: Vec<serde_json::Value> = Vec::new();
    let mut check = |t: &mut String, what: &str, value: Option<f64>, op: &str, bound: f64| {
        let verdict = match value {
            None => "NOT MEASURED",
            Some(v) if stats::meets(v, op, bound) => "PASS",
            Some(_) => "MISS",
        };
        let shown = value.map_or("-".to_owned(), |v| format!("{v:.3}"));
        let _ = writeln!(t, "{verdict:<13} {what}: {shown} (target {op} {bound})");
        checks.push(
            json!({ "target": what, "value": value, "op": op, "bound": bound, "verdict": verdict }),
        );
    };

    // connect()
    let _ = writeln!(
        t,
        "\nconnect() from the client pod to a listener on the host's bridge address, {} per run, \
         {} rounds; {pinning}\nmedian [min - max] over rounds of each run's median (mean) connect \
         syscall time",
        args.connects, args.rounds
    );
    let _ = writeln!(
        t,
        "{:<31} {:>30} {:>30}",
        "variant", "connect median (ns)", "connect mean (ns)"
    );
    let mut connect_json = serde_json::Map::new();
    for v in CONNECT_VARIANTS {
        let (c1, j1) = cell(&values(runs, v, "connect_median"));
        let (c2, j2) = cell(&values(runs, v, "connect_mean"));
        let label = match v {
            "detached" => "detached (cgroup w/o programs)",
            "attached" => "attached, cgroup not enrolled",
            "redirected" => "redirected (enrolled, VIP)",
            _ => "redirected, --no-sockmap",
        };
        let _ = writeln!(t, "{label:<31} {c1:>30} {c2:>30}");
        connect_json.insert(
            v.into(),
            json!({ "connect_median_ns": j1, "connect_mean_ns": j2 }),
        );
    }
    let mut added_json = serde_json::Map::new();
    for (a, label) in [
        ("redirected", "added by redirect"),
        ("no_sockmap", "added, --no-sockmap"),
        ("attached", "added, not enrolled"),
    ] {
        let d1 = paired(runs, a, "detached", "connect_median");
        let d2 = paired(runs, a, "detached", "connect_mean");
        let (c1, j1) = cell(&d1);
        let (c2, j2) = cell(&d2);
        let _ = writeln!(t, "{label:<31} {c1:>30} {c2:>30}");
        added_json.insert(
            format!("{a}-detached"),
            json!({ "median_ns": j1, "mean_ns": j2 }),
        );
    }
    for (case, b) in breakdown {
        let _ = writeln!(
            t,
            "eBPF run time per {case} connect (one extra batch with BPF stats on): {:.0} ns in all",
            b["programs_ns_per_connect"].as_f64().unwrap_or(f64::NAN)
        );
        if let Some(progs) = b["programs"].as_object() {
            for (name, r) in progs {
                let _ = writeln!(
                    t,
                    "    {name:<18} {:>5.2} runs x {:>6.0} ns = {:>6.0} ns",
                    r["runs_per_connect"].as_f64().unwrap_or(f64::NAN),
                    r["ns_per_run"].as_f64().unwrap_or(f64::NAN),
                    r["ns_per_connect"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
    }
    let added = |case: &str, fig: &str| stats::median(&paired(runs, case, "detached", fig));

    let mut connect_checks = String::new();
    for (case, what) in [
        ("redirected", "with the sk_msg fast path (default)"),
        ("no_sockmap", "without it (--no-sockmap)"),
    ] {
        for (fig, stat) in [("connect_median", "median"), ("connect_mean", "mean")] {
            check(
                &mut connect_checks,
                &format!("connect() added by the redirect {what}, {stat} ns"),
                added(case, fig),
                "<",
                2000.0,
            );
        }
    }
    // The decision itself: connect4's run time per connect(), from the breakdown's batches
    // (enrolled client: a lookup per level up to the pod; unenrolled pod: every ancestor).
    for (case, what) in [
        ("redirected", "an enrolled pod"),
        ("attached", "an unenrolled pod"),
    ] {
        let ns = breakdown
            .get(case)
            .and_then(|b| b["programs"]["sluice_connect4"]["ns_per_run"].as_f64());
        check(
            &mut connect_checks,
            &format!(
                "connect4 run time per connect() from {what}, {ENROLLED_FOR_BENCH} cgroups enrolled, ns"
            ),
            ns,
            "<",
            2000.0,
        );
    }
    let mut json = json!({
        "rounds": args.rounds,
        "connects_per_run": args.connects,
        "pinning": pinning,
        "connect": connect_json,
        "connect_added": added_json,
        "connect_program_run_time": breakdown,
        "runs": runs,
    });
    if args.connect_only {
        t.push('\n');
        t.push_str(&connect_checks);
        json["targets"] = json!(checks);
        return (t, json);
    }

    // Requests.
    let _ = writeln!(
        t,
        "\nrequests: {} rounds x {} s per run, wrk -t1 -c{}, open loop at {} rps, upstream {upstream} \
         in a pod, one Sluice worker\nmedian [min - max] over rounds",
        args.rounds, args.duration, args.connections, args.rate
    );
    let _ = writeln!(
        t,
        "p50/p99 at rate: client and upstream on CPU 0, proxy on CPU 1, the four variants' generators running together and taking turns in {SLOT_MS} ms slots; one_cpu: one variant at a time with all three on CPU 1; proxy CPU per 1k: from a run of one variant at a time"
    );
    let m = |v: &str, f: &str| stats::median(&values(runs, v, f));
    let mut l7_json = serde_json::Map::new();
    let mut ratios_json = serde_json::Map::new();
    request_table(
        &mut t,
        runs,
        not_measured,
        &L7_FIGURES,
        &mut l7_json,
        &mut ratios_json,
    );
    let _ = writeln!(
        t,
        "\npod -> proxy, the proxy answering itself (VirtualService directResponse, no upstream): \
         wrk -t1 -c1 (one connection, one request at a time), {} s per run; one_cpu: client on the \
         proxy's CPU; 2cpu: client on the other CPU (a cross-CPU wake-up each way)",
        args.duration
    );
    request_table(
        &mut t,
        runs,
        not_measured,
        &P2P_FIGURES,
        &mut l7_json,
        &mut ratios_json,
    );

    // Rounds where the reference (loopback) moved more than 20% from its median.
    let mut unstable = Vec::new();
    for fig in ["throughput", "p50_at_rate"] {
        if let Some(mid) = m("loopback", fig) {
            for r in runs.iter().filter(|r| r.variant == "loopback") {
                let flagged = (r.figures.get(fig))
                    .and_then(|&v| stats::unstable("loopback", fig, r.round, v, mid));
                if let Some((record, line)) = flagged {
                    unstable.push(record);
                    let _ = writeln!(t, "{line}");
                }
            }
        }
    }

    // Targets.
    t.push('\n');
    t.push_str(&connect_checks);
    let ratio = |peer: &str, f: &str| stats::ratio(m("sk_msg", f), m(peer, f));
    // The target: pod -> proxy p50 at least 20% lower than over loopback TCP.
    for (fig, what) in [("p2p_p50_one_cpu", "one CPU"), ("p2p_p50_2cpu", "two CPUs")] {
        for (peer, name) in [("loopback", "loopback TCP"), ("veth_tcp", "pod veth TCP")] {
            check(
                &mut t,
                &format!("pod -> proxy p50, {what}, sk_msg / {name}"),
                ratio(peer, fig),
                "<=",
                0.8,
            );
        }
    }
    // Through the proxy to the upstream pod: the upstream hop (veth TCP both ways, nginx, two
    // more wake-ups) is the same in every variant and dilutes the ratio; reported, not judged.
    for (fig, what) in [("p50_at_rate", "at rate"), ("p50_one_cpu", "one CPU")] {
        if let Some(r) = ratio("loopback", fig) {
            let _ = writeln!(
                t,
                "INFO          full path p50 {what}, sk_msg / loopback TCP: {r:.3}"
            );
        }
    }
    for (name, _, higher_better) in P2P_FIGURES.iter().chain(L7_FIGURES.iter()) {
        let (op, bound) = if *higher_better {
            (">=", 1.0)
        } else {
            ("<=", 1.0)
        };
        check(
            &mut t,
            &format!("{name}, sk_msg / iptables REDIRECT"),
            ratio("iptables", name),
            op,
            bound,
        );
    }
    let sk = |v: &str| -> Option<f64> {
        (!not_measured.contains_key(v)).then(|| values(runs, v, "sk_msg_redirected").iter().sum())
    };
    check(
        &mut t,
        "sk_msg redirects in sk_msg runs",
        sk("sk_msg"),
        ">",
        0.0,
    );
    for v in ["veth_tcp", "loopback", "iptables"] {
        check(
            &mut t,
            &format!("sk_msg redirects in {v} runs"),
            sk(v),
            "<=",
            0.0,
        );
    }

    for (key, value) in [
        ("duration_s", json!(args.duration)),
        ("rate_rps", json!(args.rate)),
        ("wrk_connections", json!(args.connections)),
        ("upstream", json!(upstream)),
        ("not_measured", json!(not_measured)),
        ("requests", json!(l7_json)),
        ("ratios", json!(ratios_json)),
        ("unstable_rounds", json!(unstable)),
        ("targets", json!(checks)),
    ] {
        json[key] = value;
    }
    (t, json)
}

/// One table of request figures: per variant the median [min - max] over rounds, then the
/// sk_msg / peer ratios of medians. Adds to the JSON maps.
fn request_table(
    t: &mut String,
    runs: &[Run],
    not_measured: &BTreeMap<&'static str, String>,
    figures: &[(&str, &str, bool)],
    l7_json: &mut serde_json::Map<String, serde_json::Value>,
    ratios_json: &mut serde_json::Map<String, serde_json::Value>,
) {
    use std::fmt::Write as _;
    let m = |v: &str, f: &str| stats::median(&values(runs, v, f));
    let _ = write!(t, "{:<9}", "variant");
    for (name, unit, _) in figures {
        let _ = write!(t, " {:>24}", format!("{name} ({unit})"));
    }
    let _ = writeln!(t, " {:>18}", "sk_msg redirected");
    for v in L7_VARIANTS {
        if let Some(why) = not_measured.get(v) {
            let _ = writeln!(t, "{v:<9} not measured: {why}");
            continue;
        }
        let _ = write!(t, "{v:<9}");
        let per = l7_json
            .entry(v)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object");
        for (name, _, _) in figures {
            let (c, j) = cell(&values(runs, v, name));
            let _ = write!(t, " {c:>24}");
            per.insert((*name).into(), j);
        }
        let sk: f64 = values(runs, v, "sk_msg_redirected").iter().sum();
        let _ = writeln!(t, " {sk:>18.0}");
        per.insert("sk_msg_redirected_total".into(), json!(sk));
    }
    for peer in ["loopback", "veth_tcp", "iptables"] {
        let _ = write!(t, "{:<9}", format!("a/{}", &peer[..peer.len().min(7)]));
        let per = ratios_json
            .entry(format!("sk_msg/{peer}"))
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object");
        for (name, _, _) in figures {
            let r = stats::ratio(m("sk_msg", name), m(peer, name));
            let _ = write!(
                t,
                " {:>24}",
                r.map_or("-".to_owned(), |r| format!("{r:.3}x"))
            );
            per.insert((*name).into(), json!(r));
        }
        t.push('\n');
    }
}
