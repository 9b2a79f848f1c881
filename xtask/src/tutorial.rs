//! The seed tutorial's steps 3-8 and the blog's three experiments, on this machine: what
//! `cargo xtask demo` (pods in network namespaces, eBPF redirection, as root) and `cargo xtask tutorial`
//! (fake-service processes on loopback, explicit proxy, no root) share.
//!
//! Owns the lab (fake-service instances standing in for the tutorial's Deployments, one `sluice run`, a
//! temp config dir holding the tutorial's and the blog's YAML verbatim plus generated Pod /
//! EndpointSlice files), the tutorial's two traffic generators and the blog's fortio runs re-implemented
//! in Rust, the per-step report (the tutorial's results table next to what Sluice saw: metrics diff,
//! access log, outlier events) and the direction checks. Where the instances run and how clients reach
//! the proxy is the [`Net`]: loopback here, pods in [`crate::demo`].

#[path = "visualize.rs"]
mod visualize;

use sluice_admin_api as api;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::demo::PodNet;

#[derive(clap::Args, Debug, Clone)]
pub struct TutorialArgs {
    /// Use the existing target/release binaries.
    #[arg(long)]
    pub no_build: bool,
    /// Quick run: no 0.5 s sleep between requests, 20 requests (40 in the outlier and fault steps).
    #[arg(long)]
    pub fast: bool,
    /// Run only this step (after the setup).
    #[arg(long, value_enum)]
    pub step: Option<Step>,
    /// Leave everything running afterwards, until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Step {
    None,
    Timeouts,
    Retries,
    CircuitBreakers,
    OutlierDetection,
    FaultInjection,
    /// Continuous traffic while a real Prometheus scrapes Sluice; what Grafana's Istio
    /// dashboards and Kiali's graph would show, queried from it.
    Visualization,
    /// The blog's `timeout: 0.5s` in front of a 2 s endpoint.
    BlogTimeout,
    /// The blog's `timeout: 2s` with 3 retries, `perTryTimeout: 0.5s`.
    BlogRetries,
    /// The blog's connection-pool breaker under 1, 2 and 3 concurrent clients.
    BlogCircuitBreaker,
}

pub const TUTORIAL_STEPS: [Step; 7] = [
    Step::None,
    Step::Timeouts,
    Step::Retries,
    Step::CircuitBreakers,
    Step::OutlierDetection,
    Step::FaultInjection,
    Step::Visualization,
];

pub const BLOG_STEPS: [Step; 3] = [
    Step::BlogTimeout,
    Step::BlogRetries,
    Step::BlogCircuitBreaker,
];

/// How a step loads the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Load {
    /// traffic-generator.yaml: one request after the other.
    Sequential,
    /// high-traffic-generator.yaml: `total` requests, at most `concurrency` at once.
    High,
    /// `fortio load -c C -n N -qps 0`: C clients, each sending its share of N one after the other.
    Clients,
}

#[derive(Debug, Clone, Copy)]
pub struct Traffic {
    pub load: Load,
    pub requests: usize,
    pub concurrency: usize,
    pub sleep: Duration,
}

impl Step {
    pub fn is_blog(self) -> bool {
        BLOG_STEPS.contains(&self)
    }

    fn heading(self) -> String {
        match self {
            Step::BlogTimeout => "Blog experiment 1: Request Timeouts (timeout: 0.5s in front of the 2 s `/version` of greeter-service v3)".into(),
            Step::BlogRetries => "Blog experiment 2: Request Retries (timeout: 2s, retries: attempts: 3, perTryTimeout: 0.5s)".into(),
            Step::BlogCircuitBreaker => "Blog experiment 3: Circuit Breakers (http1MaxPendingRequests: 1, maxRequestsPerConnection: 1; fortio -c 1/2/3)".into(),
            s => format!("Step {}: {}", s as u8 + 3, s.title()),
        }
    }

    pub fn number(self) -> u8 {
        self as u8 + 3
    }

    fn short(self) -> String {
        match self {
            Step::BlogTimeout => "blog 1".into(),
            Step::BlogRetries => "blog 2".into(),
            Step::BlogCircuitBreaker => "blog 3".into(),
            s => format!("step {}", s.number()),
        }
    }

    fn title(self) -> &'static str {
        match self {
            Step::None => "Testing the Application Without Resiliency",
            Step::Timeouts => "Implementing Timeouts",
            Step::Retries => "Implementing Retries",
            Step::CircuitBreakers => "Implementing Circuit Breakers",
            Step::OutlierDetection => "Implementing Outlier Detection",
            Step::FaultInjection => "Implementing Fault Injection",
            Step::Visualization => "Visualizing Resilience in Action",
            Step::BlogTimeout => "Request Timeouts",
            Step::BlogRetries => "Request Retries",
            Step::BlogCircuitBreaker => "Circuit Breakers",
        }
    }

    /// The policy files in force during the step, relative to examples/ (copied verbatim).
    fn policy_files(self) -> &'static [&'static str] {
        match self {
            Step::None => &[],
            Step::Timeouts => &["tutorial/timeout-config.yaml"],
            Step::Retries => &["tutorial/retry-config.yaml"],
            // The tutorial applies the breaker on top of the step-5 retries.
            Step::CircuitBreakers => &[
                "tutorial/retry-config.yaml",
                "tutorial/circuit-breaker.yaml",
            ],
            Step::OutlierDetection => &["tutorial/outlier-detection.yaml"],
            Step::FaultInjection => &["tutorial/fault-injection.yaml"],
            // The tutorial keeps step 8's faults in force while it looks at the dashboards.
            Step::Visualization => &["tutorial/fault-injection.yaml"],
            // The blog applies the v3 subset, then the VirtualService with the timeout.
            Step::BlogTimeout => &["blog/01-subsets-dr.yaml", "blog/02-timeout-vs.yaml"],
            Step::BlogRetries => &["blog/01-subsets-dr.yaml", "blog/03-retries-vs.yaml"],
            Step::BlogCircuitBreaker => &[
                "blog/05-circuit-breaker-dr.yaml",
                "blog/06-vs-no-subsets.yaml",
            ],
        }
    }

    fn high_traffic(self) -> bool {
        self == Step::CircuitBreakers
    }

    /// (host, port, path) the clients call.
    pub fn url(self) -> (&'static str, u16, &'static str) {
        match self {
            Step::BlogTimeout | Step::BlogRetries => ("greeter-service", 3000, "/version"),
            Step::BlogCircuitBreaker => ("greeter-service", 3000, "/hello"),
            _ => ("frontend", 80, "/"),
        }
    }

    /// The loads of the step, one report each.
    fn traffic(self, fast: bool) -> Vec<Traffic> {
        let seq = |requests: usize, sleep_ms: u64| Traffic {
            load: Load::Sequential,
            requests,
            concurrency: 1,
            sleep: if fast {
                Duration::ZERO
            } else {
                Duration::from_millis(sleep_ms)
            },
        };
        let clients = |concurrency: usize, requests: usize| Traffic {
            load: Load::Clients,
            requests,
            concurrency,
            sleep: Duration::ZERO,
        };
        match (fast, self) {
            (_, Step::CircuitBreakers) => vec![Traffic {
                load: Load::High,
                requests: 200,
                concurrency: 20,
                sleep: Duration::ZERO,
            }],
            // The blog's loop: `while true; do sleep 1; curl ...; done`.
            (false, Step::BlogTimeout | Step::BlogRetries) => vec![seq(10, 1000)],
            (true, Step::BlogTimeout | Step::BlogRetries) => vec![seq(4, 0)],
            // One client cannot overflow (the baseline), then the blog's two fortio runs.
            (_, Step::BlogCircuitBreaker) => vec![clients(1, 20), clients(2, 20), clients(3, 50)],
            // continuous-traffic.yaml (`sleep 0.5`), long enough for several scrapes.
            (false, Step::Visualization) => vec![seq(60, 500)],
            // Each frontend call takes up to 5 s (pricing's slow calls plus step 8's delays).
            (true, Step::Visualization) => vec![seq(12, 100)],
            (false, _) => vec![seq(50, 500)],
            // The failing instance gets each inventory call with odds 1 in 4 (least request among
            // idle hosts picks at random): its 5 failures in a row take 20 requests on average,
            // and the check needs traffic after the ejection. With 40 requests that missed 1 run
            // in 50 (binomial: fewer than 5 of the first 39); with 64, 1 in 8,000.
            (true, Step::OutlierDetection) => vec![seq(64, 0)],
            // Faults hit 5-10%: 20 may show none.
            (true, Step::FaultInjection) => vec![seq(40, 0)],
            (true, _) => vec![seq(20, 0)],
        }
    }

    fn tutorial_says(self) -> &'static str {
        match self {
            Step::None => "high error rates and timeouts; some requests take a long time",
            Step::Timeouts => "requests that took 3+ s now fail much faster; response time more consistent; still errors",
            Step::Retries => "higher success rate than with timeouts alone; attempts: 3 = initial request + 2 retries",
            Step::CircuitBreakers => "a small percentage succeed, the rest fail fast with \"circuit open\" (503 overflow in Envoy's log)",
            Step::OutlierDetection => "the 90%-failing instance is ejected after 5 consecutive errors, back after 30 s, spends most of its time out",
            Step::FaultInjection => "10% of inventory calls delayed 2 s, 5% of pricing calls answered 500",
            Step::Visualization => "Kiali's graph shows the traffic flow between the services with error rates; Grafana's Istio Service Dashboard shows each service's request volume, error rate and latency",
            Step::BlogTimeout => "504 (gateway timeout) responses; the failing call always takes ~500 ms, the timeout set on the service",
            Step::BlogRetries => "three retries at a 0.5 s interval that eventually fail anyway; the whole request takes 2 s, the route timeout",
            Step::BlogCircuitBreaker => "2 clients: Code 200: 11 (55 %), Code 503: 9 (45 %); 3 clients: Code 200: 19 (38 %), Code 503: 31 (62 %); the 503s carry flag UO (upstream overflow)",
        }
    }
}

/// The tutorial's services as fake-service settings (from examples/tutorial/*.yaml).
pub struct ServiceDef {
    pub name: &'static str,
    pub env: &'static [(&'static str, &'static str)],
}

pub const SERVICES: [ServiceDef; 4] = [
    ServiceDef {
        name: "frontend",
        env: &[("UPSTREAM_URIS", "http://product")],
    },
    ServiceDef {
        name: "product",
        env: &[("UPSTREAM_URIS", "http://pricing,http://inventory")],
    },
    ServiceDef {
        name: "pricing",
        env: &[
            ("ERROR_RATE", "0.4"),
            ("ERROR_TYPE", "delay"),
            ("ERROR_DELAY", "3s"),
        ],
    },
    ServiceDef {
        name: "inventory",
        env: &[
            ("ERROR_RATE", "0.3"),
            ("ERROR_TYPE", "http_error"),
            ("ERROR_CODE", "500"),
        ],
    },
];

/// failing-instance-config.yaml's container.
const FAILING_ENV: &[(&str, &str)] = &[
    ("ERROR_RATE", "0.9"),
    ("ERROR_TYPE", "http_error"),
    ("ERROR_CODE", "500"),
];

/// The blog's greeter-service v3 `/version`: every call waits 2 s, then answers 200.
const GREETER_SLOW_ENV: &[(&str, &str)] = &[
    ("ERROR_RATE", "1"),
    ("ERROR_TYPE", "delay"),
    ("ERROR_DELAY", "2s"),
    ("ERROR_CODE", "200"),
];

/// The blog deploys greeter-service from files it does not show (code/ch4/*.yaml): the one
/// generated object besides Pods and EndpointSlices. Port 3000 as the blog calls it.
pub const GREETER_SERVICE_YAML: &str = "# Generated by cargo xtask: the blog's greeter-service (its YAML is not in the blog).\napiVersion: v1\nkind: Service\nmetadata:\n  name: greeter-service\n  labels:\n    app: greeter-service\nspec:\n  ports:\n  - port: 3000\n    targetPort: 9090\n    name: http\n  selector:\n    app: greeter-service\n";

/// The container port of every fake-service in a pod, as in the Deployments.
pub const CONTAINER_PORT: u16 = 9090;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// `cargo xtask tutorial`: the tutorial's steps on loopback, explicit proxy (`--step` may name a blog
/// experiment too).
pub fn run(args: TutorialArgs) -> Result<ExitCode> {
    let steps = match args.step {
        Some(s) => vec![s],
        None => TUTORIAL_STEPS.to_vec(),
    };
    crate::demo::run_lab(args, steps, None)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where `cargo build --release` puts binaries: `$CARGO_TARGET_DIR/release` (relative to `root` if
/// relative) or `root/target/release`.
pub fn release_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => root.join(dir).join("release"),
        None => root.join("target/release"),
    }
}

/// A nested `cargo`, without what the outer `cargo run` set for xtask itself: passed on, those
/// variables describe xtask, reach build scripts (cc's, ring's) as a changed environment and make
/// them rebuild, and the test suite's own nested release build (which strips them too) would be
/// thrown away.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let injected = key == "OUT_DIR"
            || key == "CARGO_MANIFEST_DIR"
            || key == "CARGO_MANIFEST_PATH"
            || key == "CARGO_MANIFEST_LINKS"
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
            || key == "CARGO_RUSTC_CURRENT_DIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_");
        if injected {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `cargo build --release -p sluice -p fake-service`.
pub fn build_release(root: &Path) -> Result<()> {
    println!("building: cargo build --release -p sluice -p fake-service");
    let status = cargo()
        .args(["build", "--release", "-p", "sluice", "-p", "fake-service"])
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release -p sluice -p fake-service failed ({status})");
    }
    Ok(())
}

/// Runs `steps` on `lab`, prints each report and check; returns the failed checks.
pub async fn run_steps(lab: &mut Lab, steps: &[Step], args: &TutorialArgs) -> Result<Vec<String>> {
    let mut runs: BTreeMap<Step, StepRun> = BTreeMap::new();
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for &step in steps {
        let run = lab.run_step(step, args).await?;
        let verdict = match check(step, &run, &runs) {
            Err(why) => {
                println!("CHECK FAILED ({}): {why}", step.short());
                failed.push(format!("{}: {why}", step.short()));
                "FAILED"
            }
            Ok(()) => {
                println!("check passed ({})", step.short());
                "passed"
            }
        };
        summary.push(run.summary_row(step, verdict));
        runs.insert(step, run);
    }
    println!();
    println!("Summary ({} mode)", lab.mode_name());
    println!(
        "  {:<8} {:>5} {:>5} {:>6} {:>8} {:>5} {:>8} {:>8}  Sluice saw",
        "step", "total", "ok", "errors", "timeouts", "cbo", "time", "slowest"
    );
    for row in &summary {
        println!("  {row}");
    }
    println!();
    if failed.is_empty() {
        println!("all checks passed");
    } else {
        println!("{} check(s) failed:", failed.len());
        for f in &failed {
            println!("  {f}");
        }
    }
    Ok(failed)
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process killed (by its own PID) when dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!(
                "{} exited ({st}):\n{}",
                self.name,
                log_tail(&self.log)
            )),
            _ => None,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

pub fn log_tail(log: &Path) -> String {
    let log = fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(10).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    tail.join("\n")
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where an instance runs.
enum Runs {
    /// A fake-service process on loopback.
    Local(Proc),
    /// A fake-service in a pod, started (and ended) by the topology.
    Pod { pid: u32, netns: String },
}

pub struct Instance {
    /// Pod name, e.g. `inventory-failing`.
    pub label: String,
    /// The Service (the pod's `app` label).
    pub service: &'static str,
    /// The pod's `version` label.
    pub version: &'static str,
    pub addr: SocketAddr,
    runs: Runs,
}

/// Where the instances and clients run and how clients reach the proxy.
pub enum Net {
    /// fake-service processes on 127.0.0.1, clients send to the outbound listener as an HTTP proxy.
    Loopback,
    /// Pods in network namespaces ([`crate::demo`]).
    Pods(Box<PodNet>),
}

pub struct Lab {
    // Dropped by hand in Drop, in this order: sluice, then the net (pods, pins), then the rest.
    sluice: Option<Proc>,
    net: Option<Net>,
    instances: Vec<Instance>,
    fake_bin: PathBuf,
    sluice_bin: PathBuf,
    /// Where clients send: the outbound listener (explicit proxy) or unused (eBPF).
    outbound: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
    ready: SocketAddr,
    examples: PathBuf,
    /// Policy files (relative to examples/) currently in the config dir.
    applied: Vec<&'static str>,
    log_rx: mpsc::UnboundedReceiver<(Instant, LogEntry)>,
    log_tx: mpsc::UnboundedSender<(Instant, LogEntry)>,
    /// Scrapes Sluice from the start, for Step 9 (or why it is not running).
    prometheus: std::result::Result<crate::prometheus::Prometheus, String>,
    /// Receives the agent's spans over OTLP, for Step 9.
    collector: crate::traces::Collector,
    dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        // The proxy first, so that nothing reconnects while the pods go; then the pods, cgroups
        // and pins; the temp dir last (a field).
        self.sluice.take();
        self.instances.clear();
        if let Some(Net::Pods(p)) = self.net.take() {
            p.teardown(&self.sluice_bin);
        }
    }
}

pub fn free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    // Hold all listeners at once so the ports differ.
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    ls.iter()
        .map(|l| l.local_addr().map_err(Into::into))
        .collect()
}

impl Lab {
    /// Builds the lab: config dir, `sluice run`, the tutorial's four services and the blog's
    /// greeter-service v1-v3. `net` is [`Net::Loopback`] or pods prepared by [`crate::demo`].
    pub async fn start(root: &Path, mut net: Net) -> Result<Lab> {
        let fake_bin = release_dir(root).join("fake-service");
        let sluice_bin = release_dir(root).join("sluice");
        for b in [&fake_bin, &sluice_bin] {
            if !b.exists() {
                bail!("{} missing: run without --no-build", b.display());
            }
        }
        let examples = root.join("examples");
        let dir = tempfile::Builder::new().prefix("sluice-demo.").tempdir()?;
        let cfg = dir.path().join("config");
        let logs = dir.path().join("logs");
        fs::create_dir_all(&cfg)?;
        fs::create_dir_all(&logs)?;
        let a = free_addrs(4)?;
        let (admin, metrics, ready) = (a[1], a[2], a[3]);
        let outbound = match &net {
            Net::Loopback => a[0],
            Net::Pods(p) => p.outbound(),
        };

        println!(
            "config dir: {} (process logs in {})",
            cfg.display(),
            logs.display()
        );
        for s in &SERVICES {
            let f = format!("{}.yaml", s.name);
            fs::copy(examples.join("tutorial").join(&f), cfg.join(&f))
                .with_context(|| format!("copying {f}"))?;
        }
        fs::write(
            cfg.join("greeter-service.generated.yaml"),
            GREETER_SERVICE_YAML,
        )?;
        println!("registry: examples/tutorial/{{frontend,product,pricing,inventory}}.yaml copied verbatim (their Deployments are ignored by Sluice)");
        match &net {
            Net::Loopback => println!("          + endpoints.generated.yaml: 127.0.0.1:<port> per fake-service as EndpointSlice + Pod (what Kubernetes would derive from the Deployments)"),
            Net::Pods(_) => println!("          + pods.generated.yaml: one Pod object per pod (status.podIP, labels, istio.io/dataplane-mode: ambient, sluice.io/netns and sluice.io/cgroup annotations); endpoints come from the Services' selectors"),
        }
        println!("          + greeter-service.generated.yaml: the blog's Service (port 3000; the blog does not show its YAML)");

        // Every request traced, its spans sent to a receiver here (Step 9 shows one trace).
        let collector = crate::traces::Collector::start().await?;
        let mut cmd = Command::new(&sluice_bin);
        cmd.arg("run")
            .arg("--config-dir")
            .arg(&cfg)
            .args(["--otlp-endpoint", &format!("http://{}", collector.addr)])
            .args(["--trace-sampling", "100"])
            .args(["--admin-addr", &admin.to_string()])
            // The admin API on TCP only: the node's default socket stays free for its own agent.
            .args(["--admin-socket", "none"])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--ready-addr", &ready.to_string()]);
        match &net {
            Net::Loopback => {
                cmd.args(["--redirect", "none", "--no-access-log"])
                    .args(["--outbound-addr", &outbound.to_string()]);
            }
            Net::Pods(p) => p.sluice_args(&mut cmd)?,
        }
        let sluice = Proc::spawn("sluice", cmd, &logs)?;
        let (log_tx, log_rx) = mpsc::unbounded_channel();
        let mut lab = Lab {
            sluice: Some(sluice),
            net: None,
            instances: Vec::new(),
            fake_bin,
            sluice_bin,
            outbound,
            admin,
            metrics,
            ready,
            examples,
            applied: Vec::new(),
            log_rx,
            log_tx,
            prometheus: Err("not started".into()),
            collector,
            dir,
        };
        lab.wait_ready().await?;
        lab.prometheus = visualize::start_prometheus(metrics, &logs).await;
        match &lab.prometheus {
            Ok(p) => println!(
                "prometheus: http://{} scrapes sluice's metrics every {} s (Step 9 reads it)",
                p.addr,
                crate::prometheus::SCRAPE_INTERVAL.as_secs()
            ),
            Err(why) => {
                println!("prometheus: not running ({why}); Step 9 will have nothing to show")
            }
        }
        if let Net::Pods(p) = &mut net {
            // Service names resolve to the cluster IPs Sluice allocated, as cluster DNS would.
            let services: Vec<api::Service> = admin_get(admin, api::paths::SERVICES).await?;
            p.set_hosts(&cluster_ips(&services))?;
        }
        lab.net = Some(net);
        tokio::spawn(follow_requests(admin, lab.log_tx.clone()));
        for s in &SERVICES {
            lab.add_instance(&format!("{}-1", s.name), s.name, "v1", s.env)
                .await?;
        }
        lab.write_registry()?;
        lab.wait_generation_settles(None).await?;
        let st: api::Status = admin_get(admin, api::paths::STATUS).await?;
        println!(
            "sluice ready ({}): admin {admin}, metrics {metrics}, generation {}, {} services",
            lab.mode_name(),
            st.generation,
            st.services
        );
        if let Some(Net::Pods(p)) = &lab.net {
            p.describe();
        } else {
            println!("  outbound (HTTP proxy) {outbound}");
        }
        for i in &lab.instances {
            println!(
                "  {:<12} {}  (fake-service, {})",
                i.label, i.addr, i.service
            );
        }
        if let api::RedirectStatus::Ebpf(r) = &st.redirect {
            println!(
                "  eBPF: programs on {} (pins {}), {} pods enrolled, proxy address {}, lease {}",
                r.cgroup,
                r.pin_dir,
                r.enrolled.len(),
                r.proxy.ipv4.as_deref().unwrap_or("?"),
                match r.lease.state {
                    api::LeaseState::Valid { .. } => "valid",
                    api::LeaseState::Expired { .. } => "expired",
                    api::LeaseState::None => "none",
                    api::LeaseState::Unknown { .. } => "unknown",
                }
            );
        }
        print_rejections(&st);
        Ok(lab)
    }

    pub fn mode_name(&self) -> &'static str {
        match &self.net {
            Some(Net::Pods(p)) => p.mode_name(),
            _ => "explicit proxy, loopback",
        }
    }

    fn cfg_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    fn logs_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    fn sluice_exited(&mut self) -> Option<String> {
        self.sluice.as_mut().and_then(Proc::exited)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        for _ in 0..150 {
            if let Some(e) = self.sluice_exited() {
                bail!("{e}");
            }
            if let Ok((200, _)) = get(
                self.ready,
                "/healthz/ready",
                "localhost",
                Duration::from_secs(1),
            )
            .await
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!(
            "sluice not ready on {} after 15 s (log: {})",
            self.ready,
            self.logs_dir().join("sluice.log").display()
        )
    }

    /// Starts one fake-service (a process on loopback, or a new pod) and waits until it listens.
    async fn add_instance(
        &mut self,
        label: &str,
        service: &'static str,
        version: &'static str,
        env: &[(&str, &str)],
    ) -> Result<()> {
        let logs = self.logs_dir();
        let mut env: Vec<(&str, &str)> = env.to_vec();
        env.push(("NAME", service));
        let (addr, runs) = match self.net.as_mut().expect("started") {
            Net::Loopback => {
                let addr = free_addrs(1)?[0];
                let proxy = format!("http://{}", self.outbound);
                let listen = addr.to_string();
                let mut cmd = Command::new(&self.fake_bin);
                cmd.env_clear()
                    .env("LISTEN_ADDR", &listen)
                    .env("HTTP_PROXY", &proxy)
                    .envs(env.iter().copied());
                let mut proc = Proc::spawn(label, cmd, &logs)?;
                for _ in 0..100 {
                    if let Some(e) = proc.exited() {
                        bail!("{e}");
                    }
                    if TcpStream::connect(addr).await.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (addr, Runs::Local(proc))
            }
            Net::Pods(p) => {
                let (ip, pid, netns) = p.start_fake(label, &self.fake_bin, &env, &logs).await?;
                (
                    SocketAddr::new(IpAddr::V4(ip), CONTAINER_PORT),
                    Runs::Pod { pid, netns },
                )
            }
        };
        if TcpStream::connect(addr).await.is_err() {
            bail!(
                "{label} not listening on {addr} after 5 s (log: {})",
                logs.join(format!("{label}.log")).display()
            );
        }
        self.instances.push(Instance {
            label: label.to_owned(),
            service,
            version,
            addr,
            runs,
        });
        Ok(())
    }

    /// Ends one instance (its process; its pod stays until the end).
    fn remove_instance(&mut self, label: &str) {
        if let Some(i) = self.instances.iter().position(|i| i.label == label) {
            let inst = self.instances.remove(i);
            if let (Runs::Pod { pid, .. }, Some(Net::Pods(p))) = (&inst.runs, self.net.as_mut()) {
                p.kill(*pid);
            }
        }
    }

    /// Writes what Kubernetes would hold for the instances: Pod objects (and, on loopback, one
    /// EndpointSlice per instance since they share 127.0.0.1 and differ by port).
    fn write_registry(&self) -> Result<()> {
        let cfg = self.cfg_dir();
        let (file, yaml) = match &self.net {
            Some(Net::Pods(p)) => ("pods.generated.yaml", p.pods_yaml(&self.instances)),
            _ => (
                "endpoints.generated.yaml",
                loopback_registry_yaml(&self.instances),
            ),
        };
        // Write then rename, so the reloader never reads half a file.
        let tmp = cfg.join(".registry.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, cfg.join(file))?;
        Ok(())
    }

    /// Waits for a generation other than `from` (any, when None), then no further change for
    /// 3 reload intervals (bounded: 10 s).
    async fn wait_generation_settles(&mut self, from: Option<u64>) -> Result<u64> {
        let g0 = match from {
            Some(g) => g,
            None => generation(self.admin).await?,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = g0;
        let mut stable_since = Instant::now();
        loop {
            if let Some(e) = self.sluice_exited() {
                bail!("{e}");
            }
            let g = generation(self.admin).await?;
            if g != last {
                last = g;
                stable_since = Instant::now();
            }
            let changed = last != g0 || from.is_none();
            if changed && stable_since.elapsed() >= Duration::from_millis(750) {
                return Ok(last);
            }
            if Instant::now() > deadline {
                bail!("sluice did not load the change within 10 s (generation still {g0})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Applies `files` (verbatim copies) after deleting the other policy files, then waits for
    /// Sluice to load a new generation and settle.
    async fn apply(&mut self, files: &[&'static str], registry_changed: bool) -> Result<u64> {
        let cfg = self.cfg_dir();
        let g0 = generation(self.admin).await?;
        let base = |f: &str| f.rsplit('/').next().unwrap_or(f).to_owned();
        let mut removed = Vec::new();
        for f in std::mem::take(&mut self.applied) {
            if files.contains(&f) {
                self.applied.push(f);
            } else {
                fs::remove_file(cfg.join(base(f)))?;
                removed.push(base(f));
            }
        }
        let mut added = Vec::new();
        for &f in files {
            if !self.applied.contains(&f) {
                fs::copy(self.examples.join(f), cfg.join(base(f)))
                    .with_context(|| format!("copying {f}"))?;
                self.applied.push(f);
                added.push(format!("examples/{f}"));
            }
        }
        if !removed.is_empty() {
            println!("deleted {} (as `kubectl delete -f` would: Istio keeps the OLDEST VirtualService per host if two stay)", removed.join(", "));
        }
        if !added.is_empty() {
            println!("applied verbatim: {}", added.join(", "));
        }
        if files.is_empty() {
            println!("no policy in force");
        }
        let changed = registry_changed || !removed.is_empty() || !added.is_empty();
        let g = if changed {
            self.wait_generation_settles(Some(g0)).await?
        } else {
            g0
        };
        let st: api::Status = admin_get(self.admin, api::paths::STATUS).await?;
        print_rejections(&st);
        Ok(g)
    }

    /// Step 7: `kubectl scale deployment inventory --replicas=3` and failing-instance-config.yaml.
    async fn scale_inventory(&mut self) -> Result<bool> {
        if self
            .instances
            .iter()
            .any(|i| i.label == "inventory-failing")
        {
            return Ok(false);
        }
        let inv_env = SERVICES[3].env;
        self.add_instance("inventory-2", "inventory", "v1", inv_env)
            .await?;
        self.add_instance("inventory-3", "inventory", "v1", inv_env)
            .await?;
        self.add_instance("inventory-failing", "inventory", "failing", FAILING_ENV)
            .await?;
        println!("scaled inventory to 3 replicas (inventory-2, inventory-3) and started inventory-failing (failing-instance-config.yaml: ERROR_RATE 0.9)");
        Ok(true)
    }

    /// The blog's greeter-service: v1 and v2 answer at once, v3 waits 2 s (its `/version`).
    async fn deploy_greeter(&mut self, step: Step) -> Result<bool> {
        let mut changed = false;
        if !self
            .instances
            .iter()
            .any(|i| i.service == "greeter-service")
        {
            self.add_instance("greeter-service-v1", "greeter-service", "v1", &[])
                .await?;
            self.add_instance("greeter-service-v2", "greeter-service", "v2", &[])
                .await?;
            self.add_instance(
                "greeter-service-v3",
                "greeter-service",
                "v3",
                GREETER_SLOW_ENV,
            )
            .await?;
            println!("deployed greeter-service v1, v2 (answer at once) and v3 (every call waits 2 s then answers 200: the blog's v3 `/version`)");
            changed = true;
        }
        if step == Step::BlogCircuitBreaker
            && self
                .instances
                .iter()
                .any(|i| i.label == "greeter-service-v3")
        {
            self.remove_instance("greeter-service-v3");
            println!("removed greeter-service-v3: the blog's breaker runs call `/hello`, which v3 answers at once; our stand-in delays every path, so v1 and v2 serve this experiment");
            changed = true;
        }
        Ok(changed)
    }

    pub async fn run_step(&mut self, step: Step, args: &TutorialArgs) -> Result<StepRun> {
        println!();
        println!("==== {} ====", step.heading());
        let mut registry_changed = false;
        if step == Step::OutlierDetection {
            registry_changed |= self.scale_inventory().await?;
        }
        if step.is_blog() {
            registry_changed |= self.deploy_greeter(step).await?;
        }
        if registry_changed {
            self.write_registry()?;
            println!(
                "rewrote the generated registry: {}",
                self.describe_registry()
            );
        }
        let generation = self.apply(step.policy_files(), registry_changed).await?;
        println!("sluice generation {generation}");
        let mut parts = Vec::new();
        for t in step.traffic(args.fast) {
            parts.push(self.measure(step, t).await?);
        }
        let mut run = parts.pop().expect("every step has traffic");
        run.earlier_parts = parts;
        if step == Step::Visualization {
            self.visualize(&mut run).await?;
        }
        if run.earlier_parts.is_empty() {
            print!("{}", format_results(&run.results, step.high_traffic()));
            print!("{}", run.sluice_saw());
        }
        println!("tutorial says: {}", step.tutorial_says());
        println!("what happened: {}", run.what_happened(step));
        Ok(run)
    }

    fn describe_registry(&self) -> String {
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for i in &self.instances {
            *per.entry(i.service).or_default() += 1;
        }
        per.iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One load of a step: the traffic, and what Sluice recorded meanwhile.
    async fn measure(&mut self, step: Step, t: Traffic) -> Result<StepRun> {
        let (host, port, path) = step.url();
        match t.load {
            Load::Sequential => println!(
                "traffic generator: {} sequential requests to http://{host}{}{path}, --max-time 5, sleep {:.1} s{}",
                t.requests,
                if port == 80 { String::new() } else { format!(":{port}") },
                t.sleep.as_secs_f64(),
                if args_fast(t) { " (--fast)" } else { "" }
            ),
            Load::High => println!("high-traffic generator: {} requests, {} concurrent, --max-time 5 (high-traffic-generator.yaml)", t.requests, t.concurrency),
            Load::Clients => println!("fortio load -c {} -qps 0 -n {} http://{host}:{port}{path}", t.concurrency, t.requests),
        }
        let redirect_before = redirect_counters(self.admin).await;
        while self.log_rx.try_recv().is_ok() {}
        let started = Instant::now();
        let results = match self.net.as_ref().expect("started") {
            Net::Loopback => {
                let target = Target {
                    connect: self.outbound.to_string(),
                    uri: format!("http://{host}:{port}{path}").replace(":80/", "/"),
                    host: if port == 80 {
                        host.to_owned()
                    } else {
                        format!("{host}:{port}")
                    },
                };
                generate(&target, t.load, t.requests, t.concurrency, t.sleep).await
            }
            Net::Pods(p) => p.generate(step, t).await?,
        };
        let elapsed = started.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut log = Vec::new();
        while let Ok(e) = self.log_rx.try_recv() {
            log.push(e);
        }
        let clusters: Vec<api::Cluster> = admin_get(self.admin, api::paths::CLUSTERS).await?;
        let queried = started.elapsed();
        let redirect = match (redirect_before, redirect_counters(self.admin).await) {
            (Some(b), Some(a)) => Some(
                a.iter()
                    .filter_map(|(k, v)| {
                        let d = v.saturating_sub(b.get(k).copied().unwrap_or(0));
                        (d > 0).then(|| format!("{k} +{d}"))
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            _ => None,
        };
        let labels: BTreeMap<String, String> = self
            .instances
            .iter()
            .map(|i| (i.addr.to_string(), i.label.clone()))
            .collect();
        let ejections = ejections(&clusters, queried, &labels);
        let run = StepRun {
            traffic: Some(t),
            results,
            diff: count_requests(log.iter().map(|(_, e)| e)),
            log: log
                .into_iter()
                .map(|(t, e)| (t.saturating_duration_since(started), e))
                .collect(),
            ejections,
            failing_addr: self
                .instances
                .iter()
                .find(|i| i.label == "inventory-failing")
                .map(|i| i.addr.to_string()),
            elapsed,
            earlier_parts: Vec::new(),
            redirect,
            visual: None,
        };
        if t.load == Load::Clients {
            print!("{}", format_fortio(&run.results));
            print!("{}", run.sluice_saw());
        }
        Ok(run)
    }

    /// Stops collecting access-log lines nobody will read.
    pub fn stop_log(&mut self) {
        self.log_rx.close();
    }

    pub fn print_keep(&self) {
        println!();
        println!(
            "--keep: everything stays up until Ctrl-C ({})",
            self.mode_name()
        );
        match &self.net {
            Some(Net::Pods(p)) => p.print_keep(),
            _ => println!(
                "  proxy:   curl -x http://{} http://frontend/",
                self.outbound
            ),
        }
        println!("  metrics: curl http://{}/stats/prometheus", self.metrics);
        println!(
            "  config:  {} (edit or copy examples/ files in; reloaded within a second)",
            self.cfg_dir().display()
        );
        println!(
            "  page:    http://{}/ui (edges, endpoints, tap)",
            self.admin
        );
        for c in [
            "status",
            "endpoints inventory",
            "top",
            "tap --status 5xx",
            "trace REQUEST_ID",
            "workloads",
            "clusters",
            "config",
            "policy inventory",
            "logs",
        ] {
            println!("  {} {c} --admin {}", self.sluice_bin.display(), self.admin);
        }
        for i in &self.instances {
            let runs = match &i.runs {
                Runs::Local(p) => format!("pid {}", p.id()),
                Runs::Pod { pid, netns } => format!("pid {pid}, netns {netns}"),
            };
            println!("  {:<20} {:<18} {runs}", i.label, i.addr);
        }
    }
}

fn args_fast(t: Traffic) -> bool {
    t.load == Load::Sequential && t.sleep.is_zero()
}

/// The eBPF programs' counters from `/status` (None in explicit-proxy mode).
async fn redirect_counters(admin: SocketAddr) -> Option<BTreeMap<String, u64>> {
    let st: api::Status = admin_get(admin, api::paths::STATUS).await.ok()?;
    match st.redirect {
        api::RedirectStatus::Ebpf(r) => Some(r.counters),
        api::RedirectStatus::None => None,
    }
}

/// Service name -> cluster IPs, from `/services`.
fn cluster_ips(services: &[api::Service]) -> Vec<(Ipv4Addr, Vec<String>)> {
    let mut out = Vec::new();
    for s in services {
        let (name, ns) = (&s.name, &s.namespace);
        for ip in &s.cluster_ips {
            if let Ok(ip) = ip.parse::<Ipv4Addr>() {
                out.push((
                    ip,
                    vec![
                        name.to_owned(),
                        format!("{name}.{ns}"),
                        format!("{name}.{ns}.svc"),
                        s.hostname.clone(),
                    ],
                ));
            }
        }
    }
    out
}

/// A bare Pod document (no controller) with these labels, annotations and pod IP.
pub fn pod_yaml(
    label: &str,
    app: &str,
    version: &str,
    ip: IpAddr,
    annotations: &[(&str, String)],
    enrolled: bool,
) -> String {
    controlled_pod_yaml(
        label,
        app,
        Some(version),
        ip,
        annotations,
        enrolled,
        Controller::None,
    )
}

/// What made a demo pod, as the tutorial's manifests say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller<'a> {
    /// The Deployment of this name, through its ReplicaSet.
    Deployment(&'a str),
    /// The Job of this name.
    Job(&'a str),
    None,
}

/// The tutorial's (and the blog's) Deployment an instance stands for: its label without a replica
/// number (`inventory-1`..`inventory-3` are the Deployment `inventory`'s pods); `inventory-failing`
/// and `greeter-service-v1` are Deployments of their own.
pub fn deployment_of(label: &str) -> &str {
    match label.rsplit_once('-') {
        Some((name, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => label,
    }
}

/// A stable stand-in for the `pod-template-hash` the Deployment controller writes: FNV-1a of the
/// template, its decimal digits spelled in Kubernetes' safe alphabet (`rand.SafeEncodeString`), as
/// the real ones are.
fn template_hash(template: &str) -> String {
    const SAFE: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let h = template.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    h.to_string()
        .bytes()
        .map(|b| char::from(SAFE[usize::from(b) % SAFE.len()]))
        .collect()
}

/// A uid for a generated owner: stable across runs, shaped like the API server's (v4 UUID).
fn owner_uid(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 52) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

/// A Pod document for one instance as its controller would create it: the template's labels
/// (`version` only when the template has one), the controller's own labels and an
/// `ownerReferences` entry naming it (for a Deployment: its ReplicaSet `<deployment>-<hash>` and the
/// `pod-template-hash` label, so Istio's rule names the workload after the Deployment), the given
/// annotations and pod IP. The pod keeps the instance's name (the lab's pods, logs and reports are
/// named so); a real one would be `<generateName><5 random characters>`.
pub fn controlled_pod_yaml(
    label: &str,
    app: &str,
    version: Option<&str>,
    ip: IpAddr,
    annotations: &[(&str, String)],
    enrolled: bool,
    controller: Controller,
) -> String {
    let mut y = format!("---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {label}\n");
    let mut labels = vec![("app".to_string(), app.to_string())];
    labels.extend(version.map(|v| ("version".to_string(), v.to_string())));
    let owner = match controller {
        Controller::Deployment(deployment) => {
            let hash = template_hash(&format!("{deployment}/app={app}/version={version:?}"));
            labels.push(("pod-template-hash".into(), hash.clone()));
            let rs = format!("{deployment}-{hash}");
            let _ = writeln!(y, "  generateName: {rs}-");
            Some(("apps/v1", "ReplicaSet", rs))
        }
        Controller::Job(job) => {
            let uid = owner_uid(&format!("Job/{job}"));
            for k in ["batch.kubernetes.io/controller-uid", "controller-uid"] {
                labels.push((k.into(), uid.clone()));
            }
            for k in ["batch.kubernetes.io/job-name", "job-name"] {
                labels.push((k.into(), job.into()));
            }
            let _ = writeln!(y, "  generateName: {job}-");
            Some(("batch/v1", "Job", job.to_string()))
        }
        Controller::None => None,
    };
    if enrolled {
        labels.push(("istio.io/dataplane-mode".into(), "ambient".into()));
    }
    y.push_str("  labels:\n");
    for (k, v) in &labels {
        let _ = writeln!(y, "    {k}: {v}");
    }
    if let Some((api_version, kind, name)) = owner {
        let uid = owner_uid(&format!("{kind}/{name}"));
        let _ = writeln!(
            y,
            "  ownerReferences:\n  - {{apiVersion: {api_version}, kind: {kind}, name: {name}, uid: {uid}, controller: true, blockOwnerDeletion: true}}"
        );
    }
    if !annotations.is_empty() {
        y.push_str("  annotations:\n");
        for (k, v) in annotations {
            let _ = writeln!(y, "    {k}: {v}");
        }
    }
    let _ = write!(
        y,
        "spec:\n  containers:\n  - name: {app}\n    ports:\n    - containerPort: {CONTAINER_PORT}\nstatus:\n  phase: Running\n  podIP: {ip}\n"
    );
    y
}

/// Loopback: one EndpointSlice per instance (a slice has one port list, the instances differ by
/// port), naming its Pod so subsets see the pod's labels.
fn loopback_registry_yaml(instances: &[Instance]) -> String {
    let list: Vec<(String, String, String, u16)> = instances
        .iter()
        .map(|i| {
            (
                i.label.clone(),
                i.service.to_owned(),
                i.version.to_owned(),
                i.addr.port(),
            )
        })
        .collect();
    endpoints_yaml(&list)
}

fn endpoints_yaml(instances: &[(String, String, String, u16)]) -> String {
    let mut y = String::from("# Generated by cargo xtask: the only non-verbatim file besides greeter-service's Service.\n# Kubernetes derives these from the Deployments' pods; here each pod is a fake-service on 127.0.0.1.\n");
    for (label, service, version, port) in instances {
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {label}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n- addresses: [\"127.0.0.1\"]\n  targetRef: {{kind: Pod, name: {label}}}\nports:\n- name: http\n  port: {port}\n"
        );
        y.push_str(&controlled_pod_yaml(
            label,
            service,
            Some(version),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            &[],
            false,
            Controller::Deployment(deployment_of(label)),
        ));
    }
    y
}

fn print_rejections(st: &api::Status) {
    for r in &st.rejections {
        println!(
            "sluice REJECTED config: {}: {} {}: {}",
            r.source, r.object, r.field, r.reason
        );
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// One GET over a fresh connection (as curl does) to `addr` (`host:port`, resolved like curl does,
/// through /etc/hosts); `uri` absolute for a proxy, origin-form otherwise. The whole exchange, body
/// included, is bounded by `timeout`.
async fn get<A: tokio::net::ToSocketAddrs>(
    addr: A,
    uri: &str,
    host: &str,
    timeout: Duration,
) -> Result<(u16, Bytes)> {
    let fut = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let req = http::Request::get(uri)
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "curl/8 (cargo xtask demo)")
            .body(Empty::<Bytes>::new())?;
        let resp = send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        conn.abort();
        anyhow::Ok((status, body))
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => bail!("timed out after {timeout:?}"),
    }
}

async fn get_text(addr: SocketAddr, path: &str) -> Result<String> {
    let (code, body) = get(addr, path, "localhost", Duration::from_secs(5))
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    if code != 200 {
        bail!("GET http://{addr}{path}: {code}");
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A typed admin API answer.
async fn admin_get<T: serde::de::DeserializeOwned>(admin: SocketAddr, path: &str) -> Result<T> {
    serde_json::from_str(&get_text(admin, path).await?)
        .with_context(|| format!("the admin API's answer to {path}"))
}

async fn generation(admin: SocketAddr) -> Result<u64> {
    Ok(admin_get::<api::Status>(admin, api::paths::STATUS)
        .await?
        .generation)
}

/// Streams `/tap` (each finished request, typed) into `tx` until the channel or the connection
/// closes.
async fn follow_requests(admin: SocketAddr, tx: mpsc::UnboundedSender<(Instant, LogEntry)>) {
    let Ok(mut s) = TcpStream::connect(admin).await else {
        return;
    };
    let head = format!(
        "GET {} HTTP/1.0\r\nHost: localhost\r\n\r\n",
        api::paths::TAP
    );
    if s.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    let mut lines = BufReader::new(s).lines();
    let mut in_body = false;
    while let Ok(Some(line)) = lines.next_line().await {
        if !in_body {
            in_body = line.trim().is_empty();
            continue;
        }
        // Requests only: connections proxied at L4 are not what the steps count.
        if let Some(r) = serde_json::from_str::<api::Request>(&line)
            .ok()
            .filter(|r| r.protocol != "TCP")
        {
            if tx.send((Instant::now(), LogEntry::of(&r))).is_err() {
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic generators

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Ok,
    Timeout,
    CircuitOpen,
    Err,
}

/// traffic-generator.yaml: 200 success, 000 timeout, anything else error.
fn classify(code: u16) -> Class {
    match code {
        200 => Class::Ok,
        0 => Class::Timeout,
        _ => Class::Err,
    }
}

/// high-traffic-generator.yaml's `one()`, in its order.
fn classify_high(code: u16, body: &str) -> Class {
    let lower = body.to_ascii_lowercase();
    match code {
        200 => Class::Ok,
        0 => Class::Timeout,
        500 => Class::CircuitOpen,
        _ if lower.contains("overflow") || lower.contains("circuit") => Class::CircuitOpen,
        _ => Class::Err,
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Results {
    pub total: usize,
    pub ok: usize,
    pub errors: usize,
    pub timeouts: usize,
    pub circuit_open: usize,
    pub total_time: Duration,
    pub slowest: Duration,
    /// Status code (0: client timeout or transport failure) -> count, as fortio prints them.
    #[serde(default)]
    pub codes: BTreeMap<u16, usize>,
}

impl Results {
    fn add(&mut self, code: u16, class: Class, took: Duration) {
        self.total += 1;
        self.slowest = self.slowest.max(took);
        *self.codes.entry(code).or_default() += 1;
        match class {
            Class::Ok => self.ok += 1,
            Class::Timeout => self.timeouts += 1,
            Class::CircuitOpen => self.circuit_open += 1,
            Class::Err => self.errors += 1,
        }
    }

    fn count(&self, code: u16) -> usize {
        self.codes.get(&code).copied().unwrap_or(0)
    }
}

/// Where a client sends: `connect` (`host:port`) with request target `uri` and Host `host`.
#[derive(Debug, Clone)]
pub struct Target {
    pub connect: String,
    pub uri: String,
    pub host: String,
}

/// curl -s --max-time 5: code 000 on timeout or any transport failure.
async fn one(target: &Target) -> (u16, String, Duration) {
    let t = Instant::now();
    match get(
        target.connect.as_str(),
        &target.uri,
        &target.host,
        CLIENT_TIMEOUT,
    )
    .await
    {
        Ok((code, body)) => (
            code,
            String::from_utf8_lossy(&body).into_owned(),
            t.elapsed(),
        ),
        Err(_) => (0, String::new(), t.elapsed()),
    }
}

/// Runs one load against `target` (in this process: on loopback directly, in a pod through the
/// hidden `demo-client` subcommand).
pub async fn generate(
    target: &Target,
    load: Load,
    requests: usize,
    concurrency: usize,
    sleep: Duration,
) -> Results {
    match load {
        Load::Sequential => sequential(target, requests, sleep).await,
        Load::High => high_traffic(target, requests, concurrency).await,
        Load::Clients => clients(target, requests, concurrency).await,
    }
}

async fn sequential(target: &Target, n: usize, sleep: Duration) -> Results {
    let mut r = Results::default();
    let start = Instant::now();
    for _ in 0..n {
        let (code, _, took) = one(target).await;
        r.add(code, classify(code), took);
        tokio::time::sleep(sleep).await;
    }
    r.total_time = start.elapsed();
    r
}

async fn high_traffic(target: &Target, total: usize, concurrency: usize) -> Results {
    let mut r = Results::default();
    let start = Instant::now();
    let mut set: tokio::task::JoinSet<(u16, String, Duration)> = tokio::task::JoinSet::new();
    for _ in 0..total {
        if set.len() >= concurrency {
            if let Some(Ok((code, body, took))) = set.join_next().await {
                r.add(code, classify_high(code, &body), took);
            }
        }
        let target = target.clone();
        set.spawn(async move { one(&target).await });
    }
    while let Some(res) = set.join_next().await {
        if let Ok((code, body, took)) = res {
            r.add(code, classify_high(code, &body), took);
        }
    }
    r.total_time = start.elapsed();
    r
}

/// fortio's closed loop: `concurrency` clients share `total` requests, each client sending its
/// next request when the previous one ends.
async fn clients(target: &Target, total: usize, concurrency: usize) -> Results {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for c in 0..concurrency {
        let n = total / concurrency + usize::from(c < total % concurrency);
        let target = target.clone();
        set.spawn(async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(one(&target).await);
            }
            out
        });
    }
    let mut r = Results::default();
    while let Some(res) = set.join_next().await {
        for (code, _, took) in res.unwrap_or_default() {
            r.add(code, classify(code), took);
        }
    }
    r.total_time = start.elapsed();
    r
}

fn pct(n: usize, total: usize) -> String {
    if total == 0 {
        return "0.00".into();
    }
    format!("{:.2}", n as f64 * 100.0 / total as f64)
}

/// The tutorial's "Results:" block, plus the slowest request.
fn format_results(r: &Results, high: bool) -> String {
    let mut s = String::from("Results:\n");
    let _ = writeln!(s, "  Total requests: {}", r.total);
    let _ = writeln!(s, "  Successful: {} ({}%)", r.ok, pct(r.ok, r.total));
    let _ = writeln!(s, "  Errors: {} ({}%)", r.errors, pct(r.errors, r.total));
    let _ = writeln!(
        s,
        "  Timeouts: {} ({}%)",
        r.timeouts,
        pct(r.timeouts, r.total)
    );
    if high {
        let _ = writeln!(
            s,
            "  Circuit open: {} ({}%)",
            r.circuit_open,
            pct(r.circuit_open, r.total)
        );
    }
    let _ = writeln!(s, "  Total time: {:.3}s", r.total_time.as_secs_f64());
    let _ = writeln!(s, "  Slowest request: {:.3}s", r.slowest.as_secs_f64());
    s
}

/// fortio's `Code N : count (share %)` lines, plus the slowest request.
fn format_fortio(r: &Results) -> String {
    let mut s = String::new();
    for (code, n) in &r.codes {
        let code = if *code == 0 {
            "-1 (client timeout)".to_owned()
        } else {
            code.to_string()
        };
        let _ = writeln!(
            s,
            "  Code {code} : {n} ({:.1} %)",
            *n as f64 * 100.0 / r.total.max(1) as f64
        );
    }
    let _ = writeln!(
        s,
        "  {} requests in {:.3}s, slowest {:.3}s",
        r.total,
        r.total_time.as_secs_f64(),
        r.slowest.as_secs_f64()
    );
    s
}

// ---------------------------------------------------------------------------------------------
// What Sluice saw

/// (short service name, response code, response flags) -> count.
type Counts = BTreeMap<(String, String, String), f64>;

fn short(service: &str) -> String {
    service.split('.').next().unwrap_or(service).to_owned()
}

/// Requests per (service, code, flags) among `entries`: what `istio_requests_total` counts under
/// `reporter="source"`, from the typed records.
fn count_requests<'a>(entries: impl Iterator<Item = &'a LogEntry>) -> Counts {
    let mut out = Counts::new();
    for e in entries {
        *out.entry((e.service.clone(), e.status.to_string(), e.flags.clone()))
            .or_default() += 1.0;
    }
    out
}

/// `pricing: 200 x23, 504 UT x12`, one line per service.
fn format_counts(c: &Counts) -> Vec<String> {
    let mut per: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for ((svc, code, flags), n) in c {
        let flags = if flags.is_empty() || flags == "-" {
            String::new()
        } else {
            format!(" {flags}")
        };
        per.entry(svc)
            .or_default()
            .push(format!("{code}{flags} x{n}"));
    }
    let order = ["frontend", "product", "pricing", "inventory"];
    let mut keys: Vec<&str> = per.keys().copied().collect();
    keys.sort_by_key(|k| order.iter().position(|o| o == k).unwrap_or(order.len()));
    keys.iter()
        .map(|k| format!("{k}: {}", per[k].join(", ")))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct LogEntry {
    status: u16,
    flags: String,
    attempts: u32,
    duration_ms: u64,
    authority: String,
    upstream: String,
    service: String,
}

impl LogEntry {
    /// What the demo's reports need of one finished request (`/tap`'s typed record), in the
    /// access log's terms.
    fn of(r: &api::Request) -> Self {
        Self {
            status: r.status,
            flags: r.flags.clone(),
            attempts: r.attempt_count,
            // The access log's `duration=`: whole milliseconds.
            duration_ms: r.duration_ms as u64,
            authority: r.authority.clone().unwrap_or_else(|| "-".into()),
            upstream: r.upstream.clone().unwrap_or_else(|| "-".into()),
            service: short(&r.service),
        }
    }
}

#[derive(Debug, Clone)]
struct Ejection {
    /// `ejected` or `unejected`.
    event: String,
    host: String,
    label: String,
    at: Duration,
    duration_ms: u64,
    reason: String,
}

/// Ejections during the step from `/clusters` outlier_events (`ago_ms` relative to `queried`).
fn ejections(
    clusters: &[api::Cluster],
    queried: Duration,
    labels: &BTreeMap<String, String>,
) -> Vec<Ejection> {
    let mut out = Vec::new();
    for c in clusters {
        for e in &c.outlier_events {
            let Some(at) = queried.checked_sub(Duration::from_millis(e.ago_ms)) else {
                continue; // before this step
            };
            let (event, duration_ms, reason) = match &e.kind {
                api::OutlierEventKind::Ejected {
                    reason,
                    duration_ms,
                    ..
                } => ("ejected", *duration_ms, reason.clone()),
                api::OutlierEventKind::Unejected => ("unejected", 0, String::new()),
            };
            out.push(Ejection {
                event: event.to_owned(),
                label: labels
                    .get(&e.host)
                    .cloned()
                    .unwrap_or_else(|| e.host.clone()),
                host: e.host.clone(),
                at,
                duration_ms,
                reason,
            });
        }
    }
    out.sort_by_key(|e| e.at);
    out
}

pub struct StepRun {
    traffic: Option<Traffic>,
    results: Results,
    diff: Counts,
    log: Vec<(Duration, LogEntry)>,
    ejections: Vec<Ejection>,
    failing_addr: Option<String>,
    elapsed: Duration,
    /// The step's earlier loads (the blog's breaker runs 1, 2, then 3 clients; this is the last).
    earlier_parts: Vec<StepRun>,
    /// eBPF redirect counters that moved during the load (None: explicit proxy).
    redirect: Option<String>,
    /// Step 9: what Prometheus, the dashboards and Kiali showed.
    visual: Option<visualize::Report>,
}

impl StepRun {
    fn count(&self, f: impl Fn(&str, &str, &str) -> bool) -> f64 {
        self.diff
            .iter()
            .filter(|((s, c, fl), _)| f(s, c, fl))
            .map(|(_, n)| n)
            .sum()
    }

    fn overflows(&self) -> f64 {
        self.count(|_, _, f| f.split(',').any(|x| x == "UO"))
    }

    /// Per service: (retries, requests, most tries of one request).
    fn retries(&self) -> BTreeMap<String, (u64, u64, u32)> {
        let mut m: BTreeMap<String, (u64, u64, u32)> = BTreeMap::new();
        for (_, e) in &self.log {
            let r = m.entry(e.service.clone()).or_default();
            r.0 += u64::from(e.attempts.saturating_sub(1));
            r.1 += 1;
            r.2 = r.2.max(e.attempts);
        }
        m
    }

    /// (requests to the failing instance, all inventory requests) after its first ejection.
    fn failing_share_after_ejection(&self) -> Option<(usize, usize)> {
        let failing = self.failing_addr.as_deref()?;
        let first = self
            .ejections
            .iter()
            .find(|e| e.host == failing && e.event == "ejected")?
            .at;
        let inv: Vec<&LogEntry> = self
            .log
            .iter()
            // Requests that started after the ejection (the one that caused it is logged just after).
            .filter(|(t, e)| {
                e.service == "inventory"
                    && t.saturating_sub(Duration::from_millis(e.duration_ms)) > first
            })
            .map(|(_, e)| e)
            .collect();
        Some((
            inv.iter().filter(|e| e.upstream == failing).count(),
            inv.len(),
        ))
    }

    /// How long the failing instance was ejected during the step, and the step's length: from
    /// Sluice's ejection and un-ejection events; an ejection still running at the end counts up
    /// to the end.
    fn failing_time_ejected(&self) -> Option<(Duration, Duration)> {
        let failing = self.failing_addr.as_deref()?;
        let mut out = Duration::ZERO;
        let mut since: Option<Duration> = None;
        for e in self.ejections.iter().filter(|e| e.host == failing) {
            match (e.event.as_str(), since) {
                ("ejected", None) => since = Some(e.at),
                ("unejected", Some(t)) => {
                    out += e.at.saturating_sub(t);
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(t) = since {
            out += self.elapsed.saturating_sub(t);
        }
        Some((out, self.elapsed))
    }

    fn sluice_saw(&self) -> String {
        let mut s = format!(
            "Sluice saw (its request records, as /tap streams them, over {:.1} s):\n",
            self.elapsed.as_secs_f64()
        );
        for l in format_counts(&self.diff) {
            let _ = writeln!(s, "  {l}");
        }
        let retries: Vec<String> = self
            .retries()
            .iter()
            .map(|(svc, (r, n, max))| format!("{svc} {r} (over {n} requests, max {max} tries)"))
            .collect();
        let _ = writeln!(
            s,
            "  retries (each record's attempts=N, N-1 each): {}",
            if retries.is_empty() {
                "no log lines".into()
            } else {
                retries.join(", ")
            }
        );
        let _ = writeln!(s, "  overflows (UO): {}", self.overflows() as u64);
        if let Some(r) = &self.redirect {
            let _ = writeln!(
                s,
                "  eBPF redirect counters: {}",
                if r.is_empty() { "no change" } else { r }
            );
        }
        let seen = self.count(|svc, _, _| svc == "frontend" || svc == "greeter-service") as usize;
        if seen < self.results.total {
            let _ = writeln!(
                s,
                "  not recorded: {} request(s) of the client are not among Sluice's records: they never reached it (a connection that was never established, say); a request the client abandons once Sluice has it is recorded with code 0 and flag DC, as Envoy logs it",
                self.results.total - seen
            );
        }
        if self.ejections.is_empty() {
            let _ = writeln!(s, "  ejections: none");
        }
        for e in &self.ejections {
            if e.event == "ejected" {
                let _ = writeln!(
                    s,
                    "  ejected: {} ({}) at +{:.1}s for {} ms ({})",
                    e.label,
                    e.host,
                    e.at.as_secs_f64(),
                    e.duration_ms,
                    e.reason
                );
            } else {
                let _ = writeln!(
                    s,
                    "  {}: {} ({}) at +{:.1}s",
                    e.event,
                    e.label,
                    e.host,
                    e.at.as_secs_f64()
                );
            }
        }
        if let Some((f, n)) = self.failing_share_after_ejection() {
            let _ = writeln!(s, "  inventory-failing after its first ejection: {f} of {n} inventory requests ({}%; an even share of 4 is 25%)", pct(f, n));
        }
        s
    }

    fn what_happened(&self, step: Step) -> String {
        let r = &self.results;
        let svc = |name: &str, pred: &dyn Fn(&str, &str) -> bool| {
            self.count(|s, c, f| s == name && pred(c, f))
        };
        let base = format!(
            "{}/{} OK, {} errors, {} timeouts, slowest {:.2} s",
            r.ok,
            r.total,
            r.errors,
            r.timeouts,
            r.slowest.as_secs_f64()
        );
        match step {
            Step::Visualization => format!(
                "{base}. The same requests, read back from Prometheus as Grafana and Kiali would (above): step 8's faults are still in force."
            ),
            Step::None => format!(
                "{base}. No client timeouts: pricing's delay is 3 s, curl waits 5 s. The image's integer arithmetic (every int(1/0.4)=2nd pricing call waits 3 s then answers 500; every int(1/0.3)=3rd inventory call answers 500) and product answering 500 when either fails leave ~1/3 successful; frontend sees 500 ({} pricing 500s, {} inventory 500s).",
                svc("pricing", &|c, _| c == "500"),
                svc("inventory", &|c, _| c == "500"),
            ),
            Step::Timeouts => format!(
                "{base}. As the tutorial says the slow calls now fail after ~1 s (pricing 504 UT x{}), but the success rate does not improve: the slow pricing calls were failing anyway (the image answers 500 after the 3 s delay), and product answers 500 either way.",
                svc("pricing", &|c, f| c == "504" && f.contains("UT")),
            ),
            Step::Retries => format!(
                "{base}. Retries: {}. Istio's `attempts: 3` means 3 RETRIES (up to 4 tries), not \"initial + 2\" as the tutorial says; here one retry is enough because the failures are deterministic: the slow pricing call is cut at perTryTimeout 0.5 s and pricing's next call is a fast one, inventory's next call after a failure succeeds.",
                self.retries().iter().filter(|(_, v)| v.0 > 0).map(|(k, v)| format!("{k} {} (max {} tries)", v.0, v.2)).collect::<Vec<_>>().join(", "),
            ),
            Step::CircuitBreakers => format!(
                "{base}, {} \"circuit open\". The script counts every 500 as CBOPEN: most requests end as fast 500s at frontend because product's calls to pricing/inventory overflow (maxConnections 1, 1 pending) with 503 UO x{}; the breaker here is the connection pool, not outlier detection.",
                r.circuit_open,
                self.overflows(),
            ),
            Step::OutlierDetection => {
                let ej = self.ejections.iter().filter(|e| e.label == "inventory-failing" && e.event == "ejected").count();
                let share = match self.failing_time_ejected() {
                    Some((out, total)) if !total.is_zero() => {
                        let pct = 100.0 * out.as_secs_f64() / total.as_secs_f64();
                        let verdict = if pct >= 50.0 {
                            "most of its time, as the tutorial says".to_owned()
                        } else {
                            "NOT most of its time as the tutorial says: each ejection lasts baseEjectionTime x its ejection count (30 s, then 60 s, ...), and in between it must collect 5 consecutive errors again from its ~1/4 share of the generator's one inventory call per request; over a longer run the growing ejection time makes its share grow".to_owned()
                        };
                        format!(" It was out {:.0} s of the step's {:.0} s ({pct:.0}%): {verdict}.", out.as_secs_f64(), total.as_secs_f64())
                    }
                    _ => String::new(),
                };
                format!(
                    "{base}.{share} inventory-failing (ERROR_RATE 0.9 = every int(1/0.9)=1st request, i.e. ALL of them, not 90%) ejected {ej} time(s); the regular replicas fail every 3rd call so they never reach 5 in a row. Spread over 4 endpoints (Istio's default LEAST_REQUEST picks among idle hosts at random) its 5 consecutive failures take ~20 inventory calls on average; as in Envoy the ejection happens at the 5th failure, not at the 10 s `interval` (the tutorial says errors are checked every 10 s), and un-ejection happens at an interval tick after 30 s. Frontend's success rate barely moves: pricing still fails every 2nd call (3 s, then 500) and product answers 500."
                )
            }
            Step::FaultInjection => format!(
                "{base}. DI x{} (inventory delayed 2 s), FI x{} (pricing aborted 500). No retry or timeout VirtualService is left (each step's files were deleted), so pricing's own 3 s slow calls are back and every abort reaches frontend as a 500 from product{}{}",
                self.count(|_, _, f| f.split(',').any(|x| x == "DI")) as u64,
                self.count(|_, _, f| f.split(',').any(|x| x == "FI")) as u64,
                if r.timeouts > 0 {
                    if self.count(|_, c, f| c == "0" && f.split(',').any(|x| x == "DC")) > 0.0 {
                        "; a 2 s injected delay on top of a 3 s slow pricing call adds up to curl's 5 s --max-time: those are the timeouts (000); the client hangs up while inventory's delay runs, and Sluice records those requests as Envoy does, code 0 with flag DC"
                    } else {
                        "; a 2 s injected delay on top of a 3 s slow pricing call adds up to curl's 5 s --max-time: those are the timeouts (000), and since the client hangs up while inventory's delay runs, this Sluice did not record those requests (Envoy logs code 0, flag DC)"
                    }
                } else {
                    ""
                },
                if self.failing_addr.is_some() {
                    ". inventory-failing from step 7 is still deployed (as in the tutorial) and, with outlier-detection.yaml deleted, gets its 1/4 share of inventory calls again."
                } else {
                    "."
                },
            ),
            Step::BlogTimeout => format!(
                "{base}. As the blog says: 504 x{} with flag UT after {} (the route's 0.5 s timeout), not the endpoint's 2 s.",
                r.count(504),
                self.durations("greeter-service"),
            ),
            Step::BlogRetries => format!(
                "{base}. 504 x{} with flag UT after {}, attempts {}. The blog shows three retries at 0.5 s and a 2 s request; Envoy under current Istio does not retry here: `retries` without `retryOn` gets Istio's default conditions (connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes), and a per-try timeout is none of them, so the first try's 0.5 s timeout ends the request. With `retryOn: 5xx` (or gateway-error) the blog's picture appears: 4 tries cut by the 2 s route timeout (tests/direct.rs per_try_timeouts_are_retried_under_5xx_until_the_route_timeout).",
                r.count(504),
                self.durations("greeter-service"),
                self.attempts("greeter-service"),
            ),
            Step::BlogCircuitBreaker => {
                let mut parts: Vec<String> = Vec::new();
                for p in self.earlier_parts.iter().chain(std::iter::once(self)) {
                    let c = p.traffic.map_or(0, |t| t.concurrency);
                    parts.push(format!(
                        "{c} client(s): 200 x{}, 503 x{} ({} %), UO x{}",
                        p.results.count(200),
                        p.results.count(503),
                        pct(p.results.count(503), p.results.total),
                        p.overflows() as u64
                    ));
                }
                format!(
                    "{}. With maxRequestsPerConnection: 1 every request opens a new connection and is pending while it does; a second request pending at that moment exceeds http1MaxPendingRequests: 1 and gets 503 UO at once, so one client never overflows and more clients collide more often. How often they collide depends on how long a connection takes to set up (here: a veth or loopback, well under a millisecond; the blog's cluster: far longer, hence its 45 % and 62 %). The outlier part never fires: its consecutiveErrors: 1 is ignored (as by Istio since 1.7, so Envoy's 5 consecutive 5xx apply), and overflows are local, not upstream errors anyway.",
                    parts.join("; ")
                )
            }
        }
    }

    /// `min-max ms` of the access log's durations for `service`.
    fn durations(&self, service: &str) -> String {
        let d: Vec<u64> = self
            .log
            .iter()
            .filter(|(_, e)| e.service == service)
            .map(|(_, e)| e.duration_ms)
            .collect();
        match (d.iter().min(), d.iter().max()) {
            (Some(a), Some(b)) => format!("{a}-{b} ms"),
            _ => "? ms (no access-log lines)".into(),
        }
    }

    /// Distinct `attempts=` values of the access log for `service`.
    fn attempts(&self, service: &str) -> String {
        let mut a: Vec<u32> = self
            .log
            .iter()
            .filter(|(_, e)| e.service == service)
            .map(|(_, e)| e.attempts)
            .collect();
        a.sort_unstable();
        a.dedup();
        a.iter().map(u32::to_string).collect::<Vec<_>>().join("/")
    }

    fn max_attempts(&self, service: &str) -> u32 {
        self.log
            .iter()
            .filter(|(_, e)| e.service == service)
            .map(|(_, e)| e.attempts)
            .max()
            .unwrap_or(0)
    }

    /// One line of the closing summary table.
    pub fn summary_row(&self, step: Step, verdict: &str) -> String {
        let r = &self.results;
        let saw = match step {
            Step::CircuitBreakers | Step::BlogCircuitBreaker => {
                let uo: f64 = self
                    .earlier_parts
                    .iter()
                    .map(StepRun::overflows)
                    .sum::<f64>()
                    + self.overflows();
                format!("UO x{}", uo as u64)
            }
            Step::OutlierDetection => format!(
                "{} ejection(s) of inventory-failing",
                self.ejections
                    .iter()
                    .filter(|e| e.label == "inventory-failing" && e.event == "ejected")
                    .count()
            ),
            Step::FaultInjection => format!(
                "DI x{}, FI x{}",
                self.count(|_, _, f| f.split(',').any(|x| x == "DI")) as u64,
                self.count(|_, _, f| f.split(',').any(|x| x == "FI")) as u64
            ),
            Step::Retries => format!(
                "retries {}",
                self.retries().values().map(|v| v.0).sum::<u64>()
            ),
            Step::None => format!(
                "frontend 500 x{}",
                self.count(|svc, c, _| svc == "frontend" && c == "500") as u64
            ),
            _ => format!(
                "UT x{}",
                self.count(|_, _, f| f.split(',').any(|x| x == "UT")) as u64
            ),
        };
        format!(
            "{:<8} {:>5} {:>5} {:>6} {:>8} {:>5} {:>7.1}s {:>7.2}s  {saw}  [{verdict}]",
            step.short(),
            r.total,
            r.ok,
            r.errors,
            r.timeouts,
            r.circuit_open,
            r.total_time.as_secs_f64(),
            r.slowest.as_secs_f64()
        )
    }
}

/// Did the step's policy move things in the right direction?
fn check(step: Step, run: &StepRun, earlier: &BTreeMap<Step, StepRun>) -> Result<(), String> {
    let r = &run.results;
    match step {
        Step::None => Ok(()),
        Step::Visualization => visualize::check(run),
        Step::Timeouts => {
            let limit = earlier
                .get(&Step::None)
                .map_or(Duration::from_secs(2), |s3| {
                    (s3.results.slowest * 2 / 3).min(Duration::from_secs(2))
                });
            if r.slowest < limit {
                Ok(())
            } else {
                Err(format!(
                    "timeouts: slowest request {:.2} s is not well below step 3's (limit {:.2} s)",
                    r.slowest.as_secs_f64(),
                    limit.as_secs_f64()
                ))
            }
        }
        Step::Retries => match earlier.get(&Step::Timeouts) {
            Some(s4) if r.ok < s4.results.ok => Err(format!(
                "retries: {} successful, fewer than step 4's {}",
                r.ok, s4.results.ok
            )),
            Some(_) => Ok(()),
            None if r.ok * 2 < r.total => Err(format!(
                "retries: only {}/{} successful (step 4 not run to compare)",
                r.ok, r.total
            )),
            None => Ok(()),
        },
        Step::CircuitBreakers => {
            if r.circuit_open == 0 {
                Err("circuit breakers: no \"Circuit open\" result".into())
            } else if run.overflows() == 0.0 {
                Err("circuit breakers: no UO (pool overflow) in Sluice's metrics".into())
            } else {
                Ok(())
            }
        }
        Step::OutlierDetection => {
            if !run
                .ejections
                .iter()
                .any(|e| e.label == "inventory-failing" && e.event == "ejected")
            {
                return Err("outlier detection: inventory-failing was never ejected".into());
            }
            match run.failing_share_after_ejection() {
                Some((f, n)) if n > 0 && f * 2 >= n => Err(format!("outlier detection: inventory-failing still got {f} of {n} inventory requests after its first ejection")),
                Some((_, 0)) => Err("outlier detection: no inventory requests after the first ejection to judge by".into()),
                _ => Ok(()),
            }
        }
        Step::FaultInjection => {
            if run.count(|_, _, f| f.split(',').any(|x| x == "DI" || x == "FI")) > 0.0 {
                Ok(())
            } else {
                Err("fault injection: no DI or FI response flag in Sluice's metrics".into())
            }
        }
        Step::BlogTimeout => {
            if r.count(504) != r.total {
                Err(format!(
                    "blog timeout: {} of {} responses were 504",
                    r.count(504),
                    r.total
                ))
            } else if r.slowest >= Duration::from_millis(1500) {
                Err(format!(
                    "blog timeout: slowest request {:.2} s, not bounded near the 0.5 s timeout",
                    r.slowest.as_secs_f64()
                ))
            } else if run.count(|s, _, f| s == "greeter-service" && f.split(',').any(|x| x == "UT"))
                == 0.0
            {
                Err("blog timeout: no UT flag in Sluice's metrics".into())
            } else {
                Ok(())
            }
        }
        Step::BlogRetries => {
            // Envoy's behaviour is the reference: bounded by the per-try timeout, not retried.
            if r.count(504) != r.total {
                Err(format!(
                    "blog retries: {} of {} responses were 504",
                    r.count(504),
                    r.total
                ))
            } else if r.slowest >= Duration::from_millis(1500) {
                Err(format!("blog retries: slowest request {:.2} s; without retryOn the 0.5 s per-try timeout ends it", r.slowest.as_secs_f64()))
            } else if run.max_attempts("greeter-service") > 1 {
                Err("blog retries: per-try timeouts were retried without retryOn (Envoy under Istio does not)".into())
            } else {
                Ok(())
            }
        }
        Step::BlogCircuitBreaker => {
            let parts: Vec<&StepRun> = run
                .earlier_parts
                .iter()
                .chain(std::iter::once(run))
                .collect();
            let one = parts
                .iter()
                .find(|p| p.traffic.is_some_and(|t| t.concurrency == 1));
            if let Some(one) = one {
                if one.overflows() > 0.0 || one.results.ok != one.results.total {
                    return Err(format!(
                        "blog breaker: one client overflowed ({} UO, {} of {} OK)",
                        one.overflows(),
                        one.results.ok,
                        one.results.total
                    ));
                }
            }
            let many: Vec<&&StepRun> = parts
                .iter()
                .filter(|p| p.traffic.is_some_and(|t| t.concurrency > 1))
                .collect();
            for p in &many {
                let other = p.results.total - p.results.count(200) - p.results.count(503);
                if other > 0 {
                    return Err(format!(
                        "blog breaker: {other} response(s) neither 200 nor 503"
                    ));
                }
                if p.results.count(503) as f64 != p.overflows() {
                    return Err(format!(
                        "blog breaker: {} 503s but {} UO in Sluice's metrics",
                        p.results.count(503),
                        p.overflows()
                    ));
                }
            }
            if many.iter().map(|p| p.overflows()).sum::<f64>() == 0.0 {
                return Err("blog breaker: no 503 UO with 2 or 3 concurrent clients".into());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_matches_the_scripts() {
        assert_eq!(classify(200), Class::Ok);
        assert_eq!(classify(0), Class::Timeout);
        assert_eq!(classify(500), Class::Err);
        assert_eq!(classify(504), Class::Err);
        assert_eq!(classify_high(200, ""), Class::Ok);
        assert_eq!(classify_high(0, ""), Class::Timeout);
        assert_eq!(classify_high(500, "anything"), Class::CircuitOpen);
        assert_eq!(
            classify_high(503, "upstream connect error: Overflow"),
            Class::CircuitOpen
        );
        assert_eq!(classify_high(503, "circuit"), Class::CircuitOpen);
        assert_eq!(classify_high(503, "no healthy upstream"), Class::Err);
    }

    #[test]
    fn results_table() {
        let mut r = Results::default();
        r.add(200, Class::Ok, Duration::from_millis(100));
        r.add(500, Class::Err, Duration::from_millis(1500));
        r.add(0, Class::Timeout, Duration::from_secs(5));
        r.add(503, Class::CircuitOpen, Duration::from_millis(3));
        r.total_time = Duration::from_millis(12_345);
        let t = format_results(&r, true);
        assert_eq!(
            t,
            "Results:\n  Total requests: 4\n  Successful: 1 (25.00%)\n  Errors: 1 (25.00%)\n  Timeouts: 1 (25.00%)\n  Circuit open: 1 (25.00%)\n  Total time: 12.345s\n  Slowest request: 5.000s\n"
        );
        assert!(!format_results(&r, false).contains("Circuit open"));
        assert_eq!(pct(0, 0), "0.00");
    }

    #[test]
    fn counts_from_records() {
        let entry = |service: &str, status: u16, flags: &str| LogEntry {
            status,
            flags: flags.into(),
            attempts: 1,
            duration_ms: 1,
            authority: service.into(),
            upstream: "-".into(),
            service: service.into(),
        };
        let mut entries = vec![entry("pricing", 200, "-"); 23];
        entries.extend(vec![entry("pricing", 504, "UT"); 12]);
        entries.extend(vec![entry("inventory", 503, "UO,URX"); 2]);
        assert_eq!(
            format_counts(&count_requests(entries.iter())),
            vec!["pricing: 200 x23, 504 UT x12", "inventory: 503 UO,URX x2"]
        );
    }

    #[test]
    fn log_entry_from_a_tapped_request() {
        let r = api::Request {
            status: 503,
            flags: "UO,URX".into(),
            attempt_count: 4,
            duration_ms: 12.7,
            authority: Some("pricing".into()),
            upstream: Some("127.0.0.1:9091".into()),
            service: "pricing.default.svc.cluster.local".into(),
            ..api::Request::default()
        };
        assert_eq!(
            LogEntry::of(&r),
            LogEntry {
                status: 503,
                flags: "UO,URX".into(),
                attempts: 4,
                duration_ms: 12,
                authority: "pricing".into(),
                upstream: "127.0.0.1:9091".into(),
                service: "pricing".into(),
            }
        );
        let none = LogEntry::of(&api::Request::default());
        assert_eq!(
            (none.upstream.as_str(), none.authority.as_str()),
            ("-", "-")
        );
    }

    #[test]
    fn endpoint_slices_one_per_instance() {
        let y = endpoints_yaml(&[
            ("inventory-1".into(), "inventory".into(), "v1".into(), 4001),
            (
                "inventory-failing".into(),
                "inventory".into(),
                "failing".into(),
                4002,
            ),
        ]);
        assert_eq!(y.matches("kind: EndpointSlice").count(), 2);
        assert!(y.contains("kubernetes.io/service-name: inventory"));
        assert!(y.contains("port: 4002"));
        // Pods named by the slices' targetRef carry the labels subsets select on.
        assert_eq!(y.matches("\nkind: Pod\n").count(), 2);
        assert!(y.contains("targetRef: {kind: Pod, name: inventory-failing}"));
        assert!(y.contains("    version: failing\n"));
    }

    #[test]
    fn instances_belong_to_the_tutorials_deployments() {
        for (label, deployment) in [
            ("frontend-1", "frontend"),
            ("inventory-1", "inventory"),
            ("inventory-3", "inventory"),
            ("inventory-failing", "inventory-failing"),
            ("greeter-service-v1", "greeter-service-v1"),
            ("traffic-generator", "traffic-generator"),
        ] {
            assert_eq!(deployment_of(label), deployment, "{label}");
        }
    }

    /// The generated pods read as the agent reads them: each the workload of its Deployment (or
    /// Job), with the tutorial's app/version as canonical service and revision.
    #[test]
    fn generated_pods_are_their_deployments_workloads() {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
        let mut y = String::new();
        for (label, app, version) in [
            ("inventory-1", "inventory", "v1"),
            ("inventory-2", "inventory", "v1"),
            ("inventory-failing", "inventory", "failing"),
            ("frontend-1", "frontend", "v1"),
        ] {
            y.push_str(&controlled_pod_yaml(
                label,
                app,
                Some(version),
                ip,
                &[("sluice.io/netns", "/var/run/netns/x".into())],
                true,
                Controller::Deployment(deployment_of(label)),
            ));
        }
        y.push_str(&controlled_pod_yaml(
            "traffic-generator",
            "traffic-generator",
            None,
            ip,
            &[],
            true,
            Controller::Job("traffic-generator"),
        ));
        let parsed = sluice_config::parse_str("pods.generated.yaml", &y);
        assert!(parsed.problems.is_empty(), "{:#?}\n{y}", parsed.problems);
        let (snap, _) =
            sluice_config::build(&parsed.objects, &sluice_config::BuildOptions::default());
        let id = |pod: &str| snap.workloads[&format!("default/{pod}")].identity();
        for (pod, workload, revision) in [
            ("inventory-1", "inventory", "v1"),
            ("inventory-2", "inventory", "v1"),
            ("inventory-failing", "inventory-failing", "failing"),
            ("frontend-1", "frontend", "v1"),
        ] {
            let id = id(pod);
            assert_eq!(
                (
                    id.workload.as_str(),
                    id.canonical_service.as_str(),
                    id.canonical_revision.as_str()
                ),
                (workload, pod.split('-').next().unwrap(), revision),
                "{pod}"
            );
            assert!(snap.workloads[&format!("default/{pod}")].enrolled);
        }
        // One ReplicaSet for a Deployment's replicas, another for another Deployment.
        let owner = |pod: &str| {
            snap.workloads[&format!("default/{pod}")]
                .owner
                .clone()
                .unwrap()
        };
        assert_eq!(owner("inventory-1"), owner("inventory-2"));
        assert_ne!(owner("inventory-1"), owner("inventory-failing"));
        assert_eq!(owner("inventory-1").kind, "ReplicaSet");
        let client = id("traffic-generator");
        assert_eq!(
            (client.workload.as_str(), client.canonical_revision.as_str()),
            ("traffic-generator", "latest")
        );
    }

    #[test]
    fn steps_and_ejections() {
        assert_eq!(Step::None.number(), 3);
        assert_eq!(Step::FaultInjection.number(), 8);
        let event = |host: &str, ago_ms, kind| api::OutlierEvent {
            host: host.into(),
            ago_ms,
            kind,
        };
        let ejected = |duration_ms| api::OutlierEventKind::Ejected {
            reason: "Consecutive5xx".into(),
            ejections: 1,
            duration_ms,
        };
        let clusters = vec![api::Cluster {
            name: "inventory".into(),
            protocol: "Http1".into(),
            stats: BTreeMap::new(),
            retry_budget: api::RetryBudget::default(),
            hosts: vec![],
            outlier_events: vec![
                event("127.0.0.1:5", 4000, ejected(30000)),
                event("127.0.0.1:5", 1000, api::OutlierEventKind::Unejected),
                event("127.0.0.1:6", 99000, ejected(1)),
            ],
        }];
        let labels = BTreeMap::from([("127.0.0.1:5".to_owned(), "inventory-failing".to_owned())]);
        let e = ejections(&clusters, Duration::from_secs(10), &labels);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].label, "inventory-failing");
        assert_eq!(e[0].event, "ejected");
        assert_eq!(e[0].at, Duration::from_secs(6));
        assert_eq!(e[1].event, "unejected");
        assert_eq!(e[1].at, Duration::from_secs(9));
    }

    fn entry(upstream: &str, duration_ms: u64) -> LogEntry {
        LogEntry {
            status: 500,
            flags: "-".into(),
            attempts: 1,
            duration_ms,
            authority: "inventory".into(),
            upstream: upstream.into(),
            service: "inventory".into(),
        }
    }

    #[test]
    fn outlier_check_counts_requests_started_after_the_ejection() {
        let failing = "127.0.0.1:5";
        let run = StepRun {
            traffic: None,
            earlier_parts: Vec::new(),
            redirect: None,
            visual: None,
            results: Results::default(),
            diff: Counts::new(),
            log: vec![
                (Duration::from_millis(900), entry(failing, 1)),
                // Caused the ejection at 1 s, logged just after it.
                (Duration::from_millis(1002), entry(failing, 5)),
                (Duration::from_millis(2000), entry("127.0.0.1:6", 1)),
                (Duration::from_millis(3000), entry("127.0.0.1:7", 1)),
            ],
            ejections: vec![Ejection {
                event: "ejected".into(),
                host: failing.into(),
                label: "inventory-failing".into(),
                at: Duration::from_secs(1),
                duration_ms: 30_000,
                reason: "Consecutive5xx".into(),
            }],
            failing_addr: Some(failing.into()),
            elapsed: Duration::from_secs(4),
        };
        assert_eq!(run.failing_share_after_ejection(), Some((0, 2)));
        assert!(check(Step::OutlierDetection, &run, &BTreeMap::new()).is_ok());
        let none = StepRun {
            ejections: vec![],
            ..run
        };
        assert!(check(Step::OutlierDetection, &none, &BTreeMap::new())
            .unwrap_err()
            .contains("never ejected"));
    }

    #[test]
    fn direction_checks() {
        let run = |ok: usize, slowest_ms: u64| StepRun {
            traffic: None,
            earlier_parts: Vec::new(),
            redirect: None,
            visual: None,
            results: Results {
                total: 20,
                ok,
                slowest: Duration::from_millis(slowest_ms),
                ..Results::default()
            },
            diff: Counts::new(),
            log: vec![],
            ejections: vec![],
            failing_addr: None,
            elapsed: Duration::ZERO,
        };
        let mut earlier = BTreeMap::new();
        earlier.insert(Step::None, run(7, 3008));
        assert!(check(Step::Timeouts, &run(6, 1005), &earlier).is_ok());
        assert!(check(Step::Timeouts, &run(6, 2900), &earlier).is_err());
        earlier.insert(Step::Timeouts, run(6, 1005));
        assert!(check(Step::Retries, &run(20, 551), &earlier).is_ok());
        assert!(check(Step::Retries, &run(5, 551), &earlier).is_err());
        assert!(check(Step::CircuitBreakers, &run(2, 1), &earlier).is_err());
        assert!(check(Step::FaultInjection, &run(2, 1), &earlier).is_err());
    }
}
