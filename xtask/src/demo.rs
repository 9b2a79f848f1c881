//! `cargo xtask demo`: the seed tutorial (steps 3-8) and the blog's three experiments end to end on
//! this machine. As root: every service is a pod (network namespace + cgroup, [`sluice_netns`])
//! running fake-service on 0.0.0.0:9090 as its container would, a client pod runs the traffic
//! generators, Service names resolve to cluster IPs through the pods' `/etc/hosts`, and one
//! `sluice run --redirect ebpf` on the host receives every enrolled pod's connections through eBPF.
//! Without root (or `--explicit`), the same steps in explicit-proxy mode.
//!
//! The steps, tables, checks and reports are [`crate::tutorial`]'s; this module adds the pods
//! ([`PodNet`]), the in-pod traffic generator (`xtask demo-client`, hidden) and the clean-up on
//! Ctrl-C / SIGTERM.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sluice_netns::{Pod, Topology};

use crate::tutorial::{
    self, controlled_pod_yaml, deployment_of, generate, Controller, Instance, Lab, Load, Net,
    Results, Step, Target, Traffic, TutorialArgs, BLOG_STEPS, CONTAINER_PORT, TUTORIAL_STEPS,
};

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    common: TutorialArgs,
    /// Pods and clients send to the proxy explicitly (HTTP proxy), no eBPF redirection. Without root
    /// the demo runs on loopback in this mode anyway.
    #[arg(long)]
    explicit: bool,
    /// Skip the blog's experiments.
    #[arg(long)]
    no_blog: bool,
}

/// The port the proxy's outbound listener uses on the node's bridge address.
const OUTBOUND_PORT: u16 = 15001;

pub fn run(args: DemoArgs) -> Result<ExitCode> {
    let root = tutorial::workspace_root();
    let steps: Vec<Step> = match args.common.step {
        Some(s) => vec![s],
        None if args.no_blog => TUTORIAL_STEPS.to_vec(),
        None => TUTORIAL_STEPS.iter().chain(&BLOG_STEPS).copied().collect(),
    };
    let pods = match sluice_netns::cannot_run() {
        Some(why) => {
            println!("==== NOT ROOT-CAPABLE ({why}): running the same steps in EXPLICIT-PROXY mode on loopback (no pods, no eBPF); run as root for the real demo ====");
            None
        }
        None => Some(PodMode {
            ebpf: !args.explicit,
        }),
    };
    run_lab_with(args.common, steps, pods, &root)
}

/// How the pods reach the proxy.
#[derive(Debug, Clone, Copy)]
pub struct PodMode {
    ebpf: bool,
}

/// `cargo xtask tutorial` (loopback; `pods` None) and `cargo xtask demo` share this.
pub fn run_lab(args: TutorialArgs, steps: Vec<Step>, pods: Option<PodMode>) -> Result<ExitCode> {
    let root = tutorial::workspace_root();
    if pods.is_none() {
        println!("explicit-proxy mode: clients send traffic to Sluice as an HTTP proxy on loopback (`sudo cargo xtask demo` runs pods with eBPF redirection)");
    }
    run_lab_with(args, steps, pods, &root)
}

fn run_lab_with(
    args: TutorialArgs,
    steps: Vec<Step>,
    mut pods: Option<PodMode>,
    root: &Path,
) -> Result<ExitCode> {
    if !args.no_build {
        tutorial::build_release(root)?;
    }
    if let Some(m) = &mut pods {
        if m.ebpf {
            if let Some(why) = ebpf_unavailable(root, args.no_build)? {
                println!("==== eBPF redirection unavailable ({why}): pods send to the proxy EXPLICITLY (HTTP_PROXY / absolute URIs) ====");
                m.ebpf = false;
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let root = root.to_path_buf();
    rt.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = main_async(args, steps, pods, root) => r,
            _ = tokio::signal::ctrl_c() => {
                // Dropping main_async's future drops the lab: sluice, the pods, cgroups and pins.
                eprintln!("\ninterrupted: removing the processes, namespaces, cgroups and pins this task created");
                Ok(ExitCode::from(130))
            }
            _ = term.recv() => {
                eprintln!("\nterminated: removing the processes, namespaces, cgroups and pins this task created");
                Ok(ExitCode::from(143))
            }
        }
    })
}

/// Why `sluice run --redirect ebpf` cannot run here, if it cannot (builds the object first).
fn ebpf_unavailable(root: &Path, no_build: bool) -> Result<Option<String>> {
    let sluice = crate::tutorial::release_dir(root).join("sluice");
    let help = Command::new(&sluice)
        .args(["run", "--help"])
        .output()
        .with_context(|| format!("{} run --help", sluice.display()))?;
    if !String::from_utf8_lossy(&help.stdout).contains("--pin-dir") {
        return Ok(Some(
            "this sluice has no `run --redirect ebpf --pin-dir` yet".into(),
        ));
    }
    let object = crate::ebpf::object_path(root);
    if !no_build {
        println!("building the eBPF object: cargo xtask build-ebpf --install");
        let status = Command::new(std::env::current_exe()?)
            .args(["build-ebpf", "--install"])
            .status()
            .context("xtask build-ebpf")?;
        if !status.success() {
            return Ok(Some(format!(
                "cargo xtask build-ebpf --install failed ({status})"
            )));
        }
    }
    if !object.exists() {
        return Ok(Some(format!("{} missing", object.display())));
    }
    Ok(None)
}

async fn main_async(
    args: TutorialArgs,
    steps: Vec<Step>,
    pods: Option<PodMode>,
    root: PathBuf,
) -> Result<ExitCode> {
    let net = match pods {
        None => Net::Loopback,
        Some(m) => Net::Pods(Box::new(PodNet::create(m, &root)?)),
    };
    let mut lab = Lab::start(&root, net).await.context("setup failed")?;
    let started = tokio::time::Instant::now();
    let failed = tutorial::run_steps(&mut lab, &steps, &args).await?;
    println!(
        "demo steps took {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        lab.mode_name()
    );
    if args.keep {
        lab.print_keep();
        lab.stop_log();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        println!("removing everything");
    }
    drop(lab);
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

// ---------------------------------------------------------------------------------------------
// Pods

/// The demo's pods: a [`Topology`] (bridge, host address, parent cgroup), the client pod, and how
/// the pods reach the proxy.
pub struct PodNet {
    // The topology goes last (after the uninstall in teardown).
    mode: PodMode,
    client: Pod,
    pin_dir: PathBuf,
    object: PathBuf,
    xtask: PathBuf,
    /// The agent's cgroup, under the topology's: the programs see the proxy's sockets too, so the
    /// sk_msg fast path works on both ends, as on a node where they attach to the root cgroup.
    node_cgroup: PathBuf,
    topo: Topology,
}

impl PodNet {
    fn create(mode: PodMode, root: &Path) -> Result<PodNet> {
        for r in sluice_netns::sweep_stale() {
            println!("removed what an earlier killed run left: {r}");
        }
        sweep_stale_pins(&crate::tutorial::release_dir(root).join("sluice"));
        let mut topo = Topology::create()?;
        let client = topo.add_pod("client")?;
        let node_cgroup = topo.node_cgroup()?;
        Ok(PodNet {
            mode,
            client,
            node_cgroup,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/sluice-demo-{}", topo.id())),
            object: crate::ebpf::object_path(root),
            xtask: std::env::current_exe()?,
            topo,
        })
    }

    pub fn mode_name(&self) -> &'static str {
        if self.mode.ebpf {
            "pods, eBPF redirection"
        } else {
            "pods, explicit proxy"
        }
    }

    /// The proxy's listener on the node's bridge address.
    pub fn outbound(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.topo.host_ip()), OUTBOUND_PORT)
    }

    pub fn sluice_args(&self, cmd: &mut Command) -> Result<()> {
        cmd.args(["--outbound-addr", &self.outbound().to_string()]);
        if self.mode.ebpf {
            sluice_netns::join_cgroup(cmd, &self.node_cgroup)?;
            cmd.args(["--redirect", "ebpf"])
                .arg("--cgroup")
                .arg(self.topo.cgroup())
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .args(["--proxy-ip", &self.topo.host_ip().to_string()])
                .arg("--ebpf-object")
                .arg(&self.object);
        } else {
            cmd.args(["--redirect", "none"]);
        }
        Ok(())
    }

    pub fn set_hosts(&mut self, entries: &[(Ipv4Addr, Vec<String>)]) -> Result<()> {
        // `ip netns exec NS` bind-mounts /etc/netns/NS/hosts over /etc/hosts: a person poking the
        // client pod by hand resolves Service names as the generators do.
        let dir = Path::new("/etc/netns").join(&self.client.netns);
        std::fs::create_dir_all(&dir)?;
        let mut hosts = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (ip, names) in entries {
            hosts.push_str(&format!("{ip} {}\n", names.join(" ")));
        }
        std::fs::write(dir.join("hosts"), hosts)?;
        self.topo.set_hosts(entries)
    }

    /// A new pod `label` running fake-service on 0.0.0.0:9090 with `env`; waits until it listens.
    pub async fn start_fake(
        &mut self,
        label: &str,
        bin: &Path,
        env: &[(&str, &str)],
        logs: &Path,
    ) -> Result<(Ipv4Addr, u32, String)> {
        let pod = self.topo.add_pod(label)?;
        let log = logs.join(format!("{label}.log"));
        let out = std::fs::File::create(&log)?;
        let mut cmd = self.topo.command(&pod, bin)?;
        cmd.env_clear()
            .env("LISTEN_ADDR", format!("0.0.0.0:{CONTAINER_PORT}"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if !self.mode.ebpf {
            cmd.env("HTTP_PROXY", format!("http://{}", self.outbound()));
        }
        let pid = self.topo.spawn(&mut cmd)?;
        let addr = SocketAddr::new(IpAddr::V4(pod.ip), CONTAINER_PORT);
        for _ in 0..100 {
            if !self.topo.running(pid) {
                bail!(
                    "{label} (fake-service in pod {}) exited:\n{}",
                    pod.netns,
                    tutorial::log_tail(&log)
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok((pod.ip, pid, pod.netns))
    }

    pub fn kill(&mut self, pid: u32) {
        self.topo.kill(pid);
    }

    /// The Pod objects Kubernetes would hold: one per instance, as its Deployment's ReplicaSet
    /// makes it, plus the client (the traffic generator Job's pod), all enrolled.
    pub fn pods_yaml(&self, instances: &[Instance]) -> String {
        let mut y = String::from("# Generated by cargo xtask demo: the pods of this machine's topology, as Kubernetes would list them.\n");
        let annotations = |pod: &Pod| {
            vec![
                (NETNS_ANNOTATION, pod.netns_path.display().to_string()),
                (CGROUP_ANNOTATION, pod.cgroup.display().to_string()),
            ]
        };
        // traffic-generator.yaml's Job: its template has an `app` label only.
        y.push_str(&controlled_pod_yaml(
            "traffic-generator",
            "traffic-generator",
            None,
            IpAddr::V4(self.client.ip),
            &annotations(&self.client),
            true,
            Controller::Job("traffic-generator"),
        ));
        for i in instances {
            let Some(pod) = self.topo.pod(&i.label) else {
                continue;
            };
            y.push_str(&controlled_pod_yaml(
                &i.label,
                i.service,
                Some(i.version),
                i.addr.ip(),
                &annotations(pod),
                true,
                Controller::Deployment(deployment_of(&i.label)),
            ));
        }
        y
    }

    pub fn describe(&self) {
        println!(
            "  node {} (bridge), outbound {}, pods' cgroups under {}{}",
            self.topo.host_ip(),
            self.outbound(),
            self.topo.cgroup().display(),
            if self.mode.ebpf {
                format!(", pins in {}", self.pin_dir.display())
            } else {
                String::new()
            }
        );
        println!(
            "  client       {}  (netns {}: runs the traffic generators)",
            self.client.ip, self.client.netns
        );
    }

    /// Runs one load from the client pod (this binary's hidden `demo-client`), so that its
    /// connections are the pod's.
    pub async fn generate(&self, step: Step, t: Traffic) -> Result<Results> {
        let (host, port, path) = step.url();
        let host_header = if port == 80 {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        let (connect, uri) = if self.mode.ebpf {
            (format!("{host}:{port}"), path.to_owned())
        } else {
            (
                self.outbound().to_string(),
                format!("http://{host_header}{path}"),
            )
        };
        let cmd = self.topo.command(&self.client, &self.xtask)?;
        let mut cmd = tokio::process::Command::from(cmd);
        cmd.arg("demo-client")
            .args(["--connect", &connect, "--uri", &uri, "--host", &host_header])
            .args(["--load", load_name(t.load)])
            .args(["--requests", &t.requests.to_string()])
            .args(["--concurrency", &t.concurrency.to_string()])
            .args(["--sleep-ms", &t.sleep.as_millis().to_string()])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = cmd
            .output()
            .await
            .context("demo-client in the client pod")?;
        if !out.status.success() {
            bail!(
                "demo-client in the client pod failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "demo-client output: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn print_keep(&self) {
        let c = &self.client.netns;
        if self.mode.ebpf {
            println!("  from the client pod (its cgroup, so eBPF redirects it; its netns, /etc/hosts maps Service names to cluster IPs):");
            println!(
                "    sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {c} curl -s http://frontend/'",
                self.client.cgroup.display()
            );
        } else {
            println!(
                "  from the client pod: ip netns exec {c} curl -s -x http://{} http://frontend/",
                self.outbound()
            );
        }
        println!("  pods: ip netns list | grep {}", self.topo.id());
    }

    /// Removes the pins (after sluice has been stopped) and then the pods, bridge and cgroups.
    pub fn teardown(self, sluice_bin: &Path) {
        if self.mode.ebpf {
            match Command::new(sluice_bin)
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .output()
            {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "sluice uninstall --pin-dir {}: {}",
                    self.pin_dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("sluice uninstall: {e}"),
            }
        }
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(&self.client.netns));
        drop(self.topo);
    }
}

/// Uninstalls the pins of demo runs whose process is gone (SIGKILL cannot unwind), and their
/// /etc/netns entries.
fn sweep_stale_pins(sluice_bin: &Path) {
    let stale = |id: &str| {
        id.split_once('x')
            .and_then(|(pid, _)| u32::from_str_radix(pid, 16).ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for e in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.strip_prefix("sluice-demo-").is_some_and(stale) && sluice_bin.exists() {
            let ok = Command::new(sluice_bin)
                .arg("uninstall")
                .arg("--pin-dir")
                .arg(e.path())
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                let _ = std::fs::remove_dir(e.path());
                println!(
                    "removed what an earlier killed run left: pins {}",
                    e.path().display()
                );
            }
        }
    }
    for e in std::fs::read_dir("/etc/netns")
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let id = name
            .strip_prefix(sluice_netns::PREFIX)
            .and_then(|r| r.split('-').next())
            .unwrap_or("");
        if stale(id) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// The standalone-mode annotations naming a pod's network namespace and cgroup (sluice-config).
const NETNS_ANNOTATION: &str = "sluice.io/netns";
const CGROUP_ANNOTATION: &str = "sluice.io/cgroup";

fn load_name(l: Load) -> &'static str {
    match l {
        Load::Sequential => "sequential",
        Load::High => "high",
        Load::Clients => "clients",
    }
}

// ---------------------------------------------------------------------------------------------
// The traffic generator inside the client pod

#[derive(clap::Args, Debug)]
pub struct ClientArgs {
    /// `host:port` to connect to (resolved through this process's /etc/hosts).
    #[arg(long)]
    connect: String,
    #[arg(long)]
    uri: String,
    #[arg(long)]
    host: String,
    #[arg(long, value_enum)]
    load: Load,
    #[arg(long)]
    requests: usize,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 0)]
    sleep_ms: u64,
}

/// `xtask demo-client`: runs one load and prints its [`Results`] as JSON.
pub fn client(args: ClientArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let target = Target {
        connect: args.connect,
        uri: args.uri,
        host: args.host,
    };
    let r = rt.block_on(generate(
        &target,
        args.load,
        args.requests,
        args.concurrency,
        Duration::from_millis(args.sleep_ms),
    ));
    println!("{}", serde_json::to_string(&r)?);
    Ok(ExitCode::SUCCESS)
}
