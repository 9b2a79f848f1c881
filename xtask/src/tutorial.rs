//! `cargo xtask tutorial`: the seed tutorial's steps 3-8 on this machine, in explicit-proxy mode.
//!
//! Owns the lab (fake-service processes standing in for the tutorial's Deployments, one `sluice run`,
//! a temp config dir holding the tutorial's YAML verbatim plus one generated EndpointSlice file), the
//! tutorial's two traffic generators re-implemented in Rust, and the per-step report: the tutorial's
//! results table next to what Sluice saw (metrics diff, access log, outlier events).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

#[derive(clap::Args, Debug)]
pub struct TutorialArgs {
    /// Use the existing target/release binaries.
    #[arg(long)]
    no_build: bool,
    /// Quick run: no 0.5 s sleep between requests, 20 requests (40 in the outlier and fault steps).
    #[arg(long)]
    fast: bool,
    /// Run only this step (after the setup).
    #[arg(long, value_enum)]
    step: Option<Step>,
    /// Leave everything running afterwards, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Step {
    None,
    Timeouts,
    Retries,
    CircuitBreakers,
    OutlierDetection,
    FaultInjection,
}

const ALL_STEPS: [Step; 6] = [
    Step::None,
    Step::Timeouts,
    Step::Retries,
    Step::CircuitBreakers,
    Step::OutlierDetection,
    Step::FaultInjection,
];

impl Step {
    fn number(self) -> u8 {
        self as u8 + 3
    }

    fn title(self) -> &'static str {
        match self {
            Step::None => "Testing the Application Without Resiliency",
            Step::Timeouts => "Implementing Timeouts",
            Step::Retries => "Implementing Retries",
            Step::CircuitBreakers => "Implementing Circuit Breakers",
            Step::OutlierDetection => "Implementing Outlier Detection",
            Step::FaultInjection => "Implementing Fault Injection",
        }
    }

    /// The policy files in force during the step (examples/tutorial, copied verbatim).
    fn policy_files(self) -> &'static [&'static str] {
        match self {
            Step::None => &[],
            Step::Timeouts => &["timeout-config.yaml"],
            Step::Retries => &["retry-config.yaml"],
            // The tutorial applies the breaker on top of the step-5 retries.
            Step::CircuitBreakers => &["retry-config.yaml", "circuit-breaker.yaml"],
            Step::OutlierDetection => &["outlier-detection.yaml"],
            Step::FaultInjection => &["fault-injection.yaml"],
        }
    }

    fn high_traffic(self) -> bool {
        self == Step::CircuitBreakers
    }

    fn requests(self, fast: bool) -> usize {
        match (fast, self) {
            (false, _) => 50,
            // The failing instance gets every 4th inventory call: 5 in a row takes 20 requests,
            // and the check needs traffic after the ejection. Faults hit 5-10%: 20 may show none.
            (true, Step::OutlierDetection | Step::FaultInjection) => 40,
            (true, _) => 20,
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
        }
    }
}

/// The tutorial's services as fake-service settings (from examples/tutorial/*.yaml).
struct ServiceDef {
    name: &'static str,
    env: &'static [(&'static str, &'static str)],
}

const SERVICES: [ServiceDef; 4] = [
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

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

pub fn run(args: TutorialArgs) -> Result<ExitCode> {
    println!("explicit-proxy mode: clients send traffic to Sluice as an HTTP proxy; eBPF redirection (issue 3) is not built yet");
    let root = workspace_root();
    if !args.no_build {
        println!("building: cargo build --release -p sluice -p fake-service");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "sluice", "-p", "fake-service"])
            .current_dir(&root)
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release -p sluice -p fake-service failed ({status})");
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        tokio::select! {
            r = main_async(args, root) => r,
            _ = tokio::signal::ctrl_c() => {
                // Dropping main_async's future drops the lab, which kills what it started.
                eprintln!("\ninterrupted: stopping the processes this task started");
                Ok(ExitCode::from(130))
            }
        }
    })
}

async fn main_async(args: TutorialArgs, root: PathBuf) -> Result<ExitCode> {
    let mut lab = Lab::start(&root).await.context("setup failed")?;
    let steps: Vec<Step> = match args.step {
        Some(s) => vec![s],
        None => ALL_STEPS.to_vec(),
    };
    let mut runs: BTreeMap<Step, StepRun> = BTreeMap::new();
    let mut failed = Vec::new();
    for step in steps {
        let run = lab.run_step(step, &args).await?;
        if let Err(why) = check(step, &run, &runs) {
            println!("CHECK FAILED (step {} {:?}): {why}", step.number(), step);
            failed.push(format!("step {}: {why}", step.number()));
        } else {
            println!("check passed (step {})", step.number());
        }
        runs.insert(step, run);
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
    if args.keep {
        lab.print_keep();
        // Stop collecting access-log lines nobody will read.
        lab.log_rx.close();
        tokio::signal::ctrl_c().await?;
    }
    drop(lab);
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process killed (by its own PID) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Result<Proc> {
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

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => {
                let log = fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Some(format!("{} exited ({st}):\n{}", self.name, tail.join("\n")))
            }
            _ => None,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Instance {
    label: String,
    service: &'static str,
    addr: SocketAddr,
    proc: Proc,
}

struct Lab {
    // Field order matters for Drop: processes die before the temp dir goes.
    instances: Vec<Instance>,
    sluice: Proc,
    fake_bin: PathBuf,
    sluice_bin: PathBuf,
    outbound: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
    ready: SocketAddr,
    examples: PathBuf,
    log_rx: mpsc::UnboundedReceiver<(Instant, LogEntry)>,
    dir: tempfile::TempDir,
}

fn free_addrs(n: usize) -> Result<Vec<SocketAddr>> {
    // Hold all listeners at once so the ports differ.
    let ls: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    ls.iter()
        .map(|l| l.local_addr().map_err(Into::into))
        .collect()
}

impl Lab {
    async fn start(root: &Path) -> Result<Lab> {
        let fake_bin = root.join("target/release/fake-service");
        let sluice_bin = root.join("target/release/sluice");
        for b in [&fake_bin, &sluice_bin] {
            if !b.exists() {
                bail!("{} missing: run without --no-build", b.display());
            }
        }
        let examples = root.join("examples/tutorial");
        let dir = tempfile::Builder::new()
            .prefix("sluice-tutorial.")
            .tempdir()?;
        let cfg = dir.path().join("config");
        let logs = dir.path().join("logs");
        fs::create_dir_all(&cfg)?;
        fs::create_dir_all(&logs)?;
        let a = free_addrs(8)?;
        let (outbound, admin, metrics, ready) = (a[0], a[1], a[2], a[3]);

        println!(
            "config dir: {} (process logs in {})",
            cfg.display(),
            logs.display()
        );
        for s in &SERVICES {
            let f = format!("{}.yaml", s.name);
            fs::copy(examples.join(&f), cfg.join(&f)).with_context(|| format!("copying {f}"))?;
        }
        println!("registry: examples/tutorial/{{frontend,product,pricing,inventory}}.yaml copied verbatim (their Deployments are ignored by Sluice)");
        println!("          + endpointslices.generated.yaml: the ONLY non-verbatim file, 127.0.0.1:<port> per fake-service (what Kubernetes would derive from the pods)");

        let mut instances = Vec::new();
        for (i, s) in SERVICES.iter().enumerate() {
            let label = format!("{}-1", s.name);
            let addr = a[4 + i];
            let proc = spawn_fake(&fake_bin, &label, s.name, s.env, addr, outbound, &logs)?;
            instances.push(Instance {
                label,
                service: s.name,
                addr,
                proc,
            });
        }
        write_endpoints(&cfg, &instances)?;
        let mut cmd = Command::new(&sluice_bin);
        cmd.arg("run")
            .arg("--config-dir")
            .arg(&cfg)
            .args(["--redirect", "none", "--no-access-log"])
            .args(["--outbound-addr", &outbound.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--ready-addr", &ready.to_string()]);
        let sluice = Proc::spawn("sluice", cmd, &logs)?;
        let (log_tx, log_rx) = mpsc::unbounded_channel();
        let mut lab = Lab {
            instances,
            sluice,
            fake_bin,
            sluice_bin,
            outbound,
            admin,
            metrics,
            ready,
            examples,
            log_rx,
            dir,
        };
        for i in 0..lab.instances.len() {
            let (addr, _) = (lab.instances[i].addr, ());
            wait_listening(&mut lab.instances[i].proc, addr).await?;
        }
        lab.wait_ready().await?;
        tokio::spawn(follow_access_log(admin, log_tx));
        let st = admin_json(admin, "/status").await?;
        println!(
            "sluice ready: outbound (HTTP proxy) {outbound}, admin {admin}, metrics {metrics}, generation {}, {} services",
            st["generation"], st["services"]
        );
        for i in &lab.instances {
            println!(
                "  {:<12} {}  (fake-service, {})",
                i.label, i.addr, i.service
            );
        }
        print_rejections(&st);
        Ok(lab)
    }

    fn cfg_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    async fn wait_ready(&mut self) -> Result<()> {
        for _ in 0..100 {
            if let Some(e) = self.sluice.exited() {
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
            "sluice not ready on {} after 10 s (log: {})",
            self.ready,
            self.sluice.log.display()
        )
    }

    /// Applies `files` (verbatim copies) after deleting the other policy files, then waits for
    /// Sluice to load a new generation and settle.
    async fn apply(
        &mut self,
        files: &[&str],
        extra_change: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<u64> {
        let cfg = self.cfg_dir();
        let g0 = generation(self.admin).await?;
        let mut removed = Vec::new();
        for e in fs::read_dir(&cfg)? {
            let name = e?.file_name().to_string_lossy().into_owned();
            let policy = ALL_STEPS
                .iter()
                .any(|s| s.policy_files().contains(&name.as_str()));
            if policy && !files.contains(&name.as_str()) {
                fs::remove_file(cfg.join(&name))?;
                removed.push(name);
            }
        }
        let mut added = Vec::new();
        for f in files {
            if !cfg.join(f).exists() {
                fs::copy(self.examples.join(f), cfg.join(f))
                    .with_context(|| format!("copying {f}"))?;
                added.push(*f);
            }
        }
        extra_change(self)?;
        if !removed.is_empty() {
            println!("deleted {} (as `kubectl delete -f` would: Istio keeps the OLDEST VirtualService per host if two stay)", removed.join(", "));
        }
        if !added.is_empty() {
            println!(
                "applied verbatim: {}",
                added
                    .iter()
                    .map(|f| format!("examples/tutorial/{f}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if removed.is_empty() && added.is_empty() && files.is_empty() {
            println!("no policy in force");
        }
        // New generation, then no further change for 3 reload intervals (bounded: 10 s).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = g0;
        let mut stable_since = Instant::now();
        loop {
            if let Some(e) = self.sluice.exited() {
                bail!("{e}");
            }
            let g = generation(self.admin).await?;
            if g != last {
                last = g;
                stable_since = Instant::now();
            }
            let changed = last != g0 || (removed.is_empty() && added.is_empty());
            if changed && stable_since.elapsed() >= Duration::from_millis(750) {
                break;
            }
            if Instant::now() > deadline {
                bail!("sluice did not load the change within 10 s (generation still {g0})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let st = admin_json(self.admin, "/status").await?;
        print_rejections(&st);
        Ok(last)
    }

    async fn scale_inventory(&mut self) -> Result<()> {
        if self
            .instances
            .iter()
            .any(|i| i.label == "inventory-failing")
        {
            return Ok(());
        }
        let logs = self.dir.path().join("logs");
        let addrs = free_addrs(3)?;
        let inv_env = SERVICES[3].env;
        let plan = [
            ("inventory-2", inv_env, addrs[0]),
            ("inventory-3", inv_env, addrs[1]),
            ("inventory-failing", FAILING_ENV, addrs[2]),
        ];
        for (label, env, addr) in plan {
            let mut proc = spawn_fake(
                &self.fake_bin,
                label,
                "inventory",
                env,
                addr,
                self.outbound,
                &logs,
            )?;
            wait_listening(&mut proc, addr).await?;
            self.instances.push(Instance {
                label: label.to_owned(),
                service: "inventory",
                addr,
                proc,
            });
        }
        println!("scaled inventory to 3 replicas (inventory-2, inventory-3) and started inventory-failing (failing-instance-config.yaml: ERROR_RATE 0.9)");
        Ok(())
    }

    async fn run_step(&mut self, step: Step, args: &TutorialArgs) -> Result<StepRun> {
        println!();
        println!("==== Step {}: {} ====", step.number(), step.title());
        if step == Step::OutlierDetection {
            self.scale_inventory().await?;
        }
        let scaled = step == Step::OutlierDetection;
        let generation = self
            .apply(step.policy_files(), |lab| {
                if scaled {
                    write_endpoints(&lab.cfg_dir(), &lab.instances)?;
                    println!(
                        "rewrote endpointslices.generated.yaml: inventory now has 4 endpoints"
                    );
                }
                Ok(())
            })
            .await?;
        println!("sluice generation {generation}");
        let before = parse_istio_requests(&get_text(self.metrics, "/stats/prometheus").await?);
        while self.log_rx.try_recv().is_ok() {}
        let started = Instant::now();
        let results = if step.high_traffic() {
            println!("high-traffic generator: 200 requests, 20 concurrent, --max-time 5 (high-traffic-generator.yaml)");
            high_traffic(self.outbound, 200, 20).await
        } else {
            let n = step.requests(args.fast);
            let sleep = if args.fast {
                Duration::ZERO
            } else {
                Duration::from_millis(500)
            };
            println!(
                "traffic generator: {n} sequential requests to http://frontend/, --max-time 5, sleep {:.1} s (traffic-generator.yaml{})",
                sleep.as_secs_f64(),
                if args.fast { ", --fast" } else { "" }
            );
            sequential(self.outbound, n, sleep).await
        };
        let elapsed = started.elapsed();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = parse_istio_requests(&get_text(self.metrics, "/stats/prometheus").await?);
        let mut log = Vec::new();
        while let Ok(e) = self.log_rx.try_recv() {
            log.push(e);
        }
        let clusters = admin_json(self.admin, "/clusters").await?;
        let queried = started.elapsed();
        let labels: BTreeMap<String, String> = self
            .instances
            .iter()
            .map(|i| (i.addr.to_string(), i.label.clone()))
            .collect();
        let ejections = ejections(&clusters, queried, &labels);
        let run = StepRun {
            results,
            diff: diff_counts(&before, &after),
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
        };
        print!("{}", format_results(&run.results, step.high_traffic()));
        print!("{}", run.sluice_saw());
        println!("tutorial says: {}", step.tutorial_says());
        println!("what happened: {}", run.what_happened(step));
        Ok(run)
    }

    fn print_keep(&self) {
        println!();
        println!("--keep: everything stays up until Ctrl-C");
        println!(
            "  proxy:   curl -x http://{} http://frontend/",
            self.outbound
        );
        println!("  metrics: curl http://{}/stats/prometheus", self.metrics);
        println!("  config:  {}", self.cfg_dir().display());
        for c in ["status", "clusters", "config", "policy inventory", "logs"] {
            println!("  {} {c} --admin {}", self.sluice_bin.display(), self.admin);
        }
        for i in &self.instances {
            println!("  {:<18} {} pid {}", i.label, i.addr, i.proc.child.id());
        }
    }
}

fn spawn_fake(
    bin: &Path,
    label: &str,
    name: &str,
    env: &[(&str, &str)],
    addr: SocketAddr,
    proxy: SocketAddr,
    logs: &Path,
) -> Result<Proc> {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("NAME", name)
        .env("LISTEN_ADDR", addr.to_string())
        .env("HTTP_PROXY", format!("http://{proxy}"))
        .envs(env.iter().copied());
    Proc::spawn(label, cmd, logs)
}

async fn wait_listening(proc: &mut Proc, addr: SocketAddr) -> Result<()> {
    for _ in 0..100 {
        if let Some(e) = proc.exited() {
            bail!("{e}");
        }
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!(
        "{} not listening on {addr} after 5 s (log: {})",
        proc.name,
        proc.log.display()
    )
}

/// One EndpointSlice per instance (a slice has one port list, the instances differ by port).
fn endpoints_yaml(instances: &[(String, String, u16)]) -> String {
    let mut y = String::from("# Generated by `cargo xtask tutorial`: the only non-verbatim file. Kubernetes derives\n# these from the Deployments' pods; here each pod is a fake-service on 127.0.0.1.\n");
    for (label, service, port) in instances {
        let _ = write!(
            y,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {label}\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nendpoints:\n- addresses: [\"127.0.0.1\"]\n  targetRef: {{kind: Pod, name: {label}}}\nports:\n- name: http\n  port: {port}\n"
        );
    }
    y
}

fn write_endpoints(cfg: &Path, instances: &[Instance]) -> Result<()> {
    let list: Vec<(String, String, u16)> = instances
        .iter()
        .map(|i| (i.label.clone(), i.service.to_owned(), i.addr.port()))
        .collect();
    // Write then rename, so the reloader never reads half a file.
    let tmp = cfg.join(".endpointslices.tmp");
    fs::write(&tmp, endpoints_yaml(&list))?;
    fs::rename(&tmp, cfg.join("endpointslices.generated.yaml"))?;
    Ok(())
}

fn print_rejections(st: &Value) {
    if let Some(r) = st["rejections"].as_array().filter(|r| !r.is_empty()) {
        println!("sluice REJECTED config: {}", Value::Array(r.clone()));
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// One GET over a fresh connection (as curl does); `uri` absolute for the proxy, origin-form for
/// admin. The whole exchange, body included, is bounded by `timeout`.
async fn get(addr: SocketAddr, uri: &str, host: &str, timeout: Duration) -> Result<(u16, Bytes)> {
    let fut = async {
        let stream = TcpStream::connect(addr).await?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let conn = tokio::spawn(conn);
        let req = http::Request::get(uri)
            .header(http::header::HOST, host)
            .header(http::header::USER_AGENT, "curl/8 (cargo xtask tutorial)")
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

async fn admin_json(admin: SocketAddr, path: &str) -> Result<Value> {
    Ok(serde_json::from_str(&get_text(admin, path).await?)?)
}

async fn generation(admin: SocketAddr) -> Result<u64> {
    admin_json(admin, "/status").await?["generation"]
        .as_u64()
        .context("/status has no generation")
}

/// Streams `/access_log` into `tx` until the channel or the connection closes.
async fn follow_access_log(admin: SocketAddr, tx: mpsc::UnboundedSender<(Instant, LogEntry)>) {
    let Ok(mut s) = TcpStream::connect(admin).await else {
        return;
    };
    if s.write_all(b"GET /access_log HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut lines = BufReader::new(s).lines();
    let mut in_body = false;
    while let Ok(Some(line)) = lines.next_line().await {
        if !in_body {
            in_body = line.trim().is_empty();
            continue;
        }
        if let Some(e) = parse_log_line(&line) {
            if tx.send((Instant::now(), e)).is_err() {
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

#[derive(Debug, Default, Clone)]
struct Results {
    total: usize,
    ok: usize,
    errors: usize,
    timeouts: usize,
    circuit_open: usize,
    total_time: Duration,
    slowest: Duration,
}

impl Results {
    fn add(&mut self, class: Class, took: Duration) {
        self.total += 1;
        self.slowest = self.slowest.max(took);
        match class {
            Class::Ok => self.ok += 1,
            Class::Timeout => self.timeouts += 1,
            Class::CircuitOpen => self.circuit_open += 1,
            Class::Err => self.errors += 1,
        }
    }
}

/// curl -s --max-time 5: code 000 on timeout or any transport failure.
async fn one(proxy: SocketAddr) -> (u16, String, Duration) {
    let t = Instant::now();
    match get(proxy, "http://frontend/", "frontend", CLIENT_TIMEOUT).await {
        Ok((code, body)) => (
            code,
            String::from_utf8_lossy(&body).into_owned(),
            t.elapsed(),
        ),
        Err(_) => (0, String::new(), t.elapsed()),
    }
}

async fn sequential(proxy: SocketAddr, n: usize, sleep: Duration) -> Results {
    let mut r = Results::default();
    let start = Instant::now();
    for _ in 0..n {
        let (code, _, took) = one(proxy).await;
        r.add(classify(code), took);
        tokio::time::sleep(sleep).await;
    }
    r.total_time = start.elapsed();
    r
}

async fn high_traffic(proxy: SocketAddr, total: usize, concurrency: usize) -> Results {
    let mut r = Results::default();
    let start = Instant::now();
    let mut set: tokio::task::JoinSet<(u16, String, Duration)> = tokio::task::JoinSet::new();
    for _ in 0..total {
        if set.len() >= concurrency {
            if let Some(Ok((code, body, took))) = set.join_next().await {
                r.add(classify_high(code, &body), took);
            }
        }
        set.spawn(one(proxy));
    }
    while let Some(res) = set.join_next().await {
        if let Ok((code, body, took)) = res {
            r.add(classify_high(code, &body), took);
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

// ---------------------------------------------------------------------------------------------
// What Sluice saw

/// (short service name, response code, response flags) -> count.
type Counts = BTreeMap<(String, String, String), f64>;

fn short(service: &str) -> String {
    service.split('.').next().unwrap_or(service).to_owned()
}

/// Parses `name{k="v",...} value` label sets (values may hold escaped quotes).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
        let mut val = String::new();
        let mut chars = rest[eq + 2..].char_indices();
        let mut end = rest.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = eq + 2 + i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(key, val);
        rest = &rest[end.min(rest.len())..];
    }
    out
}

fn parse_istio_requests(text: &str) -> Counts {
    let mut out = Counts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("istio_requests_total{") else {
            continue;
        };
        let Some(close) = rest.rfind('}') else {
            continue;
        };
        let labels = parse_labels(&rest[..close]);
        let Some(v) = rest[close + 1..]
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        *out.entry((
            short(&get("destination_service")),
            get("response_code"),
            get("response_flags"),
        ))
        .or_default() += v;
    }
    out
}

fn diff_counts(before: &Counts, after: &Counts) -> Counts {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (k.clone(), d))
        })
        .collect()
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

/// `[time] "GET / HTTP/1.1" 503 UO,URX attempts=N duration=Xms "authority" "upstream" cluster "request-id" service`
fn parse_log_line(line: &str) -> Option<LogEntry> {
    let rest = line.split_once("] \"")?.1;
    let rest = rest.split_once("\" ")?.1;
    let mut toks = Vec::new();
    let mut chars = rest.chars().peekable();
    while chars.peek().is_some() {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        let mut t = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            for c in chars.by_ref() {
                if c == '"' {
                    break;
                }
                t.push(c);
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ' ' {
                    break;
                }
                t.push(c);
                chars.next();
            }
        }
        toks.push(t);
    }
    if toks.len() < 9 {
        return None;
    }
    Some(LogEntry {
        status: toks[0].parse().ok()?,
        flags: toks[1].clone(),
        attempts: toks[2].strip_prefix("attempts=")?.parse().ok()?,
        duration_ms: toks[3]
            .strip_prefix("duration=")?
            .strip_suffix("ms")?
            .parse()
            .ok()?,
        authority: toks[4].clone(),
        upstream: toks[5].clone(),
        service: short(&toks[8]),
    })
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
    clusters: &Value,
    queried: Duration,
    labels: &BTreeMap<String, String>,
) -> Vec<Ejection> {
    let mut out = Vec::new();
    for c in clusters.as_array().into_iter().flatten() {
        for e in c["outlier_events"].as_array().into_iter().flatten() {
            let event = e["event"].as_str().unwrap_or("").to_owned();
            let ago = Duration::from_millis(e["ago_ms"].as_u64().unwrap_or(u64::MAX));
            let Some(at) = queried.checked_sub(ago) else {
                continue; // before this step
            };
            let host = e["host"].as_str().unwrap_or("?").to_owned();
            out.push(Ejection {
                event,
                label: labels.get(&host).cloned().unwrap_or_else(|| host.clone()),
                host,
                at,
                duration_ms: e["duration_ms"].as_u64().unwrap_or(0),
                reason: e["reason"].as_str().unwrap_or("").to_owned(),
            });
        }
    }
    out.sort_by_key(|e| e.at);
    out
}

struct StepRun {
    results: Results,
    diff: Counts,
    log: Vec<(Duration, LogEntry)>,
    ejections: Vec<Ejection>,
    failing_addr: Option<String>,
    elapsed: Duration,
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

    fn sluice_saw(&self) -> String {
        let mut s = format!(
            "Sluice saw (istio_requests_total diff over {:.1} s):\n",
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
            "  retries (access log attempts=N, N-1 each): {}",
            if retries.is_empty() {
                "no log lines".into()
            } else {
                retries.join(", ")
            }
        );
        let _ = writeln!(s, "  overflows (UO): {}", self.overflows() as u64);
        let seen = self.count(|svc, _, _| svc == "frontend") as usize;
        if seen < self.results.total {
            let _ = writeln!(
                s,
                "  not recorded: {} request(s) the client gave up on are in neither metrics nor access log (Sluice records nothing when the client hangs up; Envoy logs code 0, flag DC)",
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
                format!(
                    "{base}. inventory-failing (ERROR_RATE 0.9 = every int(1/0.9)=1st request, i.e. ALL of them, not 90%) ejected {ej} time(s); the regular replicas fail every 3rd call so they never reach 5 in a row. Spread over 4 endpoints (Istio's default LEAST_REQUEST picks among idle hosts at random) its 5 consecutive failures take ~20 inventory calls on average; as in Envoy the ejection happens at the 5th failure, not at the 10 s `interval` (the tutorial says errors are checked every 10 s), and un-ejection happens at an interval tick after 30 s. Frontend's success rate barely moves: pricing still fails every 2nd call (3 s, then 500) and product answers 500."
                )
            }
            Step::FaultInjection => format!(
                "{base}. DI x{} (inventory delayed 2 s), FI x{} (pricing aborted 500). No retry or timeout VirtualService is left (each step's files were deleted), so pricing's own 3 s slow calls are back and every abort reaches frontend as a 500 from product{}{}",
                self.count(|_, _, f| f.split(',').any(|x| x == "DI")) as u64,
                self.count(|_, _, f| f.split(',').any(|x| x == "FI")) as u64,
                if r.timeouts > 0 {
                    "; a 2 s injected delay on top of a 3 s slow pricing call adds up to curl's 5 s --max-time: those are the timeouts (000), and since the client hangs up while inventory's delay runs, Sluice does not record those DI requests at all"
                } else {
                    ""
                },
                if self.failing_addr.is_some() {
                    ". inventory-failing from step 7 is still deployed (as in the tutorial) and, with outlier-detection.yaml deleted, gets its 1/4 share of inventory calls again."
                } else {
                    "."
                },
            ),
        }
    }
}

/// Did the step's policy move things in the right direction?
fn check(step: Step, run: &StepRun, earlier: &BTreeMap<Step, StepRun>) -> Result<(), String> {
    let r = &run.results;
    match step {
        Step::None => Ok(()),
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
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
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
        r.add(Class::Ok, Duration::from_millis(100));
        r.add(Class::Err, Duration::from_millis(1500));
        r.add(Class::Timeout, Duration::from_secs(5));
        r.add(Class::CircuitOpen, Duration::from_millis(3));
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
    fn metrics_diff() {
        let before = "# TYPE istio_requests_total counter\n\
            istio_requests_total{reporter=\"source\",destination_service=\"pricing.default.svc.cluster.local\",response_code=\"200\",response_flags=\"-\"} 3\n\
            istio_requests_total{reporter=\"source\",destination_service=\"pricing.default.svc.cluster.local\",response_code=\"504\",response_flags=\"UT\"} 1\n";
        let after = "istio_requests_total{reporter=\"source\",destination_service=\"pricing.default.svc.cluster.local\",response_code=\"200\",response_flags=\"-\"} 26\n\
            istio_requests_total{reporter=\"source\",destination_service=\"pricing.default.svc.cluster.local\",response_code=\"504\",response_flags=\"UT\"} 13\n\
            istio_requests_total{destination_service=\"inventory.default.svc.cluster.local\",response_code=\"503\",response_flags=\"UO,URX\",x=\"a\\\"b\"} 2\n\
            istio_request_duration_milliseconds_sum{destination_service=\"x\"} 9\n";
        let d = diff_counts(&parse_istio_requests(before), &parse_istio_requests(after));
        assert_eq!(
            format_counts(&d),
            vec!["pricing: 200 x23, 504 UT x12", "inventory: 503 UO,URX x2"]
        );
        let labels = parse_labels("a=\"x\\\"y\",b=\"\"");
        assert_eq!(labels["a"], "x\"y");
        assert_eq!(labels["b"], "");
    }

    #[test]
    fn access_log_line() {
        let l = "[2026-11-23T13:40:00.123Z] \"GET / HTTP/1.1\" 503 UO,URX attempts=4 duration=12ms \"pricing\" \"127.0.0.1:9091\" outbound|80||pricing.default.svc.cluster.local \"abc-1\" pricing.default.svc.cluster.local";
        let e = parse_log_line(l).unwrap();
        assert_eq!(
            e,
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
        let dash =
            "[t] \"GET / HTTP/1.1\" 200 - attempts=1 duration=0ms \"frontend\" \"-\" - \"-\" -";
        assert_eq!(parse_log_line(dash).unwrap().attempts, 1);
        assert!(parse_log_line("garbage").is_none());
    }

    #[test]
    fn endpoint_slices_one_per_instance() {
        let y = endpoints_yaml(&[
            ("inventory-1".into(), "inventory".into(), 4001),
            ("inventory-failing".into(), "inventory".into(), 4002),
        ]);
        assert_eq!(y.matches("kind: EndpointSlice").count(), 2);
        assert!(y.contains("kubernetes.io/service-name: inventory"));
        assert!(y.contains("port: 4002"));
    }

    #[test]
    fn steps_and_ejections() {
        assert_eq!(Step::None.number(), 3);
        assert_eq!(Step::FaultInjection.number(), 8);
        let clusters = serde_json::json!([{"name": "inventory", "outlier_events": [
            {"host": "127.0.0.1:5", "event": "ejected", "ago_ms": 4000, "reason": "Consecutive5xx", "duration_ms": 30000},
            {"host": "127.0.0.1:5", "event": "unejected", "ago_ms": 1000},
            {"host": "127.0.0.1:6", "event": "ejected", "ago_ms": 99000, "duration_ms": 1}
        ]}]);
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
