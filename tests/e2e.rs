//! Root-only end-to-end tests in real network namespaces.
//!
//! Each test builds its own [`Topology`] (a bridge on the host, pods as network namespaces with a
//! veth and their own cgroup), writes a config directory with Kubernetes `Service`s and `Pod`s (the
//! pods' netns and cgroup in the `sluice.io/*` annotations; kubelet-shaped pods, whose cgroups are
//! where kubelet puts them under the topology's cgroup, by `metadata.uid` and `status.qosClass`
//! alone, the agent's `--cgroup-root` being the topology's cgroup) and Istio `VirtualService`s, and runs
//! the real `sluice run --redirect ebpf` as a child process attached to the topology's cgroup with
//! its own pin directory, so tests run in parallel without meeting. Pods run the real
//! `fake-service`; clients are plain `curl` inside a pod resolving Service names to their cluster
//! IPs through the pod's `/etc/hosts`.
//!
//! The agent runs in a cgroup of its own under the topology's cgroup (not enrolled, in the host's
//! network namespace), as it would under the root cgroup on a node: the programs see its sockets
//! (that is what inserts the proxy's accepted sockets into the SOCKHASH for the sk_msg fast path,
//! and what makes "the agent's own connections are not redirected" a real check).
//!
//! The IPv6 tests run inside [`e2e_dual_stack`]: the topology's bridge and pods also carry IPv6
//! (`fd00:5c:A:B::/64`), the agent listens on `[::]` and is given the host's IPv4 and IPv6 bridge
//! addresses as `--proxy-ip`, so `connect4` and `connect6` each rewrite to the proxy in their family.
//!
//! Every test runs inside [`e2e`] (or [`e2e_dual_stack`]), which drops the agent (SIGKILL), uninstalls the pins, removes the
//! topology and then asserts that no namespace, link, cgroup or pin is left, also when the test
//! body panicked.
//!
//! The `sluice` and `fake-service` binaries are built once per run with this test's profile
//! (`cargo build -p sluice -p fake-service`, a no-op after `cargo test --workspace`); pins go under
//! `/sys/fs/bpf/sluice-test-<topology id>`; the first test sweeps what runs killed with SIGKILL left.
//!
//! Without root, curl, or `target/bpf/sluice-ebpf.o` the tests say why and return, except under
//! `CI`, where they fail. Run: `sudo -E cargo test -p sluice-tests --test e2e`.

use sluice_admin_api as api;
use std::{
    ffi::OsString,
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    panic::{catch_unwind, resume_unwind, AssertUnwindSafe},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, OnceLock,
    },
    thread::JoinHandle,
    time::Duration,
};

use serde_json::Value;
use sluice_netns::{skip_because, CgroupDriver, Pod, Topology};
use sluice_tests::listen::Listen;
use sluice_tests::LogLine;

// ---------------------------------------------------------------------------------------------
// Plain std code without a runtime: blocking waits and the wall clock are what we want here.

#[allow(clippy::disallowed_methods)] // a plain std test without a runtime: bounded blocking wait
fn pause(d: Duration) {
    std::thread::sleep(d);
}

#[allow(clippy::disallowed_methods)] // a plain std test without a runtime: wall-clock measurement
fn now() -> std::time::Instant {
    std::time::Instant::now()
}

// ---------------------------------------------------------------------------------------------
// What the tests need from the machine, and the binaries under test.

/// `target/bpf/sluice-ebpf.o`, built by `cargo xtask build-ebpf`.
fn ebpf_object() -> PathBuf {
    let target = sluice_tests::bins::profile_dir()
        .parent()
        .expect("target dir")
        .to_path_buf();
    let beside = target.join("bpf/sluice-ebpf.o");
    if beside.is_file() {
        return beside;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bpf/sluice-ebpf.o")
}

/// `Some(reason)` when the tests cannot run on this machine.
fn cannot_run() -> Option<String> {
    if let Some(why) = sluice_netns::cannot_run() {
        return Some(why);
    }
    if Command::new("curl").arg("--version").output().is_err() {
        return Some("`curl` is not installed (.ci/run installs it)".into());
    }
    if !ebpf_object().is_file() {
        return Some(format!(
            "{} is missing: run `cargo xtask build-ebpf`",
            ebpf_object().display()
        ));
    }
    None
}

fn skip() -> bool {
    skip_because(cannot_run())
}

/// As [`skip`], for the dual-stack tests: IPv6 must be available too.
fn skip_ipv6() -> bool {
    skip_because(cannot_run().or_else(sluice_netns::cannot_run_ipv6))
}

/// Removes what earlier runs killed with SIGKILL (no unwinding, no guards) left: their topologies
/// and their pin directories (`sluice-test-<pid>x<n>` of a process that no longer exists). Once.
fn sweep_stale_runs() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        for what in sluice_netns::sweep_stale() {
            eprintln!("e2e: removed stale {what}");
        }
        for entry in fs::read_dir("/sys/fs/bpf").into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let dead = name
                .strip_prefix("sluice-test-")
                .and_then(|id| id.split_once('x'))
                .and_then(|(pid, _)| u32::from_str_radix(pid, 16).ok())
                .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
            if dead {
                drop(PinGuard(entry.path()));
                eprintln!("e2e: removed stale pins {}", entry.path().display());
            }
        }
    });
}

/// A port nothing listens on at `ip` right now (bound, then released).
fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

// ---------------------------------------------------------------------------------------------
// Guards, dropped in this order by `Env`: agent, its cgroup, pins, topology.

/// The agent's cgroup under the topology's: removed before the topology removes its own.
struct CgroupGuard(PathBuf);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if !self.0.exists() {
            return;
        }
        // Only this test's agent is in it; it was killed already, this catches stragglers.
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            pause(Duration::from_millis(20));
        }
        eprintln!("e2e: could not remove {}", self.0.display());
    }
}

/// The test's pin directory: `sluice uninstall --pin-dir` on drop, then whatever is left removed.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if !self.0.exists() {
            return;
        }
        match Command::new(&sluice_tests::bins::bins().sluice)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.0)
            .stdin(Stdio::null())
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "e2e: sluice uninstall --pin-dir {}: {}",
                self.0.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("e2e: sluice uninstall: {e}"),
        }
        if self.0.exists() {
            // Unlinking pins on bpffs drops the kernel objects once nothing else holds them.
            if let Err(e) = fs::remove_dir_all(&self.0) {
                eprintln!("e2e: removing {}: {e}", self.0.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent.

/// `sluice run --redirect ebpf` as a child this test owns (killed by PID on drop).
struct Agent {
    child: Option<Child>,
    args: Vec<OsString>,
    cgroup_procs: PathBuf,
    log_dir: PathBuf,
    starts: usize,
    /// The outbound listener (on the host's bridge address, or `[::]` when dual-stack).
    outbound: SocketAddr,
    admin: SocketAddr,
    ready: SocketAddr,
    metrics: SocketAddr,
}

impl Agent {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    fn stdout_path(&self, start: usize) -> PathBuf {
        self.log_dir.join(format!("agent-{start}.out"))
    }

    fn stderr_path(&self, start: usize) -> PathBuf {
        self.log_dir.join(format!("agent-{start}.err"))
    }

    /// Starts (or restarts) the agent with the same arguments and waits until it is ready.
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let out = fs::File::create(self.stdout_path(self.starts)).unwrap();
        let err = fs::File::create(self.stderr_path(self.starts)).unwrap();
        // Into the agent's cgroup before exec, so that every socket it makes is in it.
        // Each start binds its own loopback ports and says which in its own file.
        let listen = Listen::new(&self.log_dir, &format!("addresses-{}.json", self.starts));
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(&self.cgroup_procs)
            .arg(&sluice_tests::bins::bins().sluice)
            .args(&self.args)
            .args(listen.local_args())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe and touches only the child being made. If the test
        // process is killed (no unwinding, no guards), the agent goes with it instead of renewing
        // its lease forever; the next run sweeps the rest.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn sluice run");
        self.child = Some(child);
        self.wait_ready(&listen);
    }

    fn wait_ready(&mut self, listen: &Listen) {
        let started = now();
        let mut bound = false;
        for _ in 0..200 {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "sluice run exited with {status}:\n{}",
                    self.stderr(self.starts)
                );
            }
            if !bound {
                let Some(b) = listen.try_read() else {
                    pause(Duration::from_millis(50));
                    continue;
                };
                (self.admin, self.ready, self.metrics) = (b.admin, b.ready, b.metrics);
                bound = true;
            }
            if http_get(self.ready, "/healthz/ready").is_some_and(|(code, _)| code == 200) {
                return;
            }
            pause(Duration::from_millis(50));
        }
        panic!(
            "sluice run not ready after {:?}:\n{}",
            started.elapsed(),
            self.stderr(self.starts)
        );
    }

    /// SIGKILL, by PID; reaped.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, by PID: the agent stops redirecting, drains and exits; reaped.
    fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        // SAFETY: kill has no memory preconditions; the PID is our own child's, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("reap sluice run")
    }

    /// The agent's log (stderr) of its `start`-th run.
    fn stderr(&self, start: usize) -> String {
        fs::read_to_string(self.stderr_path(start)).unwrap_or_default()
    }

    /// Every access-log line (stdout) of every run so far, waiting briefly for the writer thread.
    fn access_log(&self) -> Vec<String> {
        pause(Duration::from_millis(100));
        (1..=self.starts)
            .flat_map(|n| {
                fs::read_to_string(self.stdout_path(n))
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// `sluice <what> -o json --admin ADDR`, as an operator would run it.
    fn cli_json(&self, what: &str) -> Value {
        let out = Command::new(&sluice_tests::bins::bins().sluice)
            .args([what, "-o", "json", "--admin", &self.admin.to_string()])
            .stdin(Stdio::null())
            .output()
            .expect("sluice CLI");
        assert!(
            out.status.success(),
            "sluice {what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("sluice -o json prints JSON")
    }

    /// `sluice services -o json`, decoded.
    fn services(&self) -> Vec<api::Service> {
        serde_json::from_value(self.cli_json("services")).expect("sluice services -o json decodes")
    }

    /// `sluice status -o json`, decoded with the admin API's types.
    fn status(&self) -> api::Status {
        serde_json::from_value(self.cli_json("status")).expect("sluice status -o json decodes")
    }

    /// The redirect counters from `sluice status -o json`.
    fn counters(&self) -> Counters {
        Counters::from_status(&self.status())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The eBPF redirect's part of `sluice status -o json`.
fn ebpf(status: &api::Status) -> &api::EbpfStatus {
    match &status.redirect {
        api::RedirectStatus::Ebpf(e) => e,
        api::RedirectStatus::None => panic!("no eBPF redirect in `sluice status -o json`"),
    }
}

/// eBPF counters as `sluice status -o json` reports them.
#[derive(Clone, Debug)]
struct Counters(std::collections::BTreeMap<String, u64>);

impl Counters {
    fn from_status(status: &api::Status) -> Self {
        Counters(ebpf(status).counters.clone())
    }

    fn get(&self, name: &str) -> u64 {
        self.0
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no counter {name} in {:?}", self.0))
    }

    /// `self - before` for one counter.
    fn since(&self, before: &Counters, name: &str) -> u64 {
        self.get(name) - before.get(name)
    }
}

// ---------------------------------------------------------------------------------------------
// One test's world.

struct Env {
    // Field order is drop order: agent first, then its cgroup, pins, the topology.
    agent: Option<Agent>,
    agent_cgroup: CgroupGuard,
    pins: PinGuard,
    topo: Topology,
    dir: tempfile::TempDir,
}

/// What a test created, to check that it is gone afterwards.
struct Footprint {
    id: String,
    cgroup: PathBuf,
    pins: PathBuf,
    agent_pids: Vec<u32>,
}

impl Footprint {
    /// Whatever of it still exists.
    fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
        for line in String::from_utf8_lossy(&netns.stdout).lines() {
            if line.starts_with(&format!("{}{}-", sluice_netns::PREFIX, self.id)) {
                left.push(format!("netns {line}"));
            }
        }
        let links = Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            if let Some(name) = line.split(": ").nth(1) {
                let name = name.split('@').next().unwrap_or(name);
                // This topology's links are exactly `slc<id>b`, `slc<id>h<n>` and `slc<id>p<n>`
                // (another topology's id may extend this one's).
                let ours = name
                    .strip_prefix(&format!("slc{}", self.id))
                    .is_some_and(|rest| {
                        rest == "b"
                            || rest.len() > 1
                                && rest.starts_with(['h', 'p'])
                                && rest[1..].bytes().all(|b| b.is_ascii_digit())
                    });
                if ours {
                    left.push(format!("link {name}"));
                }
            }
        }
        for (what, path) in [("cgroup", &self.cgroup), ("pins", &self.pins)] {
            if path.exists() {
                left.push(format!("{what} {}", path.display()));
            }
        }
        for pid in &self.agent_pids {
            if Path::new(&format!("/proc/{pid}")).exists() {
                left.push(format!("agent process {pid}"));
            }
        }
        left
    }
}

/// Runs `body` in a fresh [`Env`], tears everything down, and asserts nothing is left, also when
/// `body` panicked (then the panic is re-raised after the check is reported).
fn e2e(body: impl FnOnce(&mut Env)) {
    e2e_in(false, body)
}

/// As [`e2e`], on a dual-stack topology (pods and host also have IPv6 addresses on the bridge);
/// the agent listens on `[::]` and is given the host's IPv4 and IPv6 addresses as `--proxy-ip`.
fn e2e_dual_stack(body: impl FnOnce(&mut Env)) {
    e2e_in(true, body)
}

fn e2e_in(dual_stack: bool, body: impl FnOnce(&mut Env)) {
    let _ = sluice_tests::bins::bins();
    sweep_stale_runs();
    let mut env = Env::new(dual_stack);
    let mut footprint = Footprint {
        id: env.topo.id().to_owned(),
        cgroup: env.topo.cgroup().to_path_buf(),
        pins: env.pins.0.clone(),
        agent_pids: Vec::new(),
    };
    let result = catch_unwind(AssertUnwindSafe(|| body(&mut env)));
    if result.is_err() {
        if let Some(agent) = &env.agent {
            for n in 1..=agent.starts {
                eprintln!("--- agent run {n} log:\n{}", agent.stderr(n));
            }
        }
    }
    if let Some(agent) = &env.agent {
        footprint
            .agent_pids
            .extend(agent.child.as_ref().map(Child::id));
    }
    drop(env);
    let left = footprint.leftovers();
    match result {
        Ok(()) => assert!(left.is_empty(), "left behind: {left:?}"),
        Err(panic) => {
            if !left.is_empty() {
                eprintln!("left behind after a failed test: {left:?}");
            }
            resume_unwind(panic)
        }
    }
}

impl Env {
    fn new(dual_stack: bool) -> Env {
        let topo = if dual_stack {
            Topology::create_dual_stack().expect("dual-stack topology")
        } else {
            Topology::create().expect("topology")
        };
        let pins = PinGuard(PathBuf::from(format!(
            "/sys/fs/bpf/sluice-test-{}",
            topo.id()
        )));
        let agent_cgroup = topo.cgroup().join("agent");
        fs::create_dir(&agent_cgroup).expect("agent cgroup");
        Env {
            agent: None,
            agent_cgroup: CgroupGuard(agent_cgroup),
            pins,
            topo,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// Writes one file of the config directory (the agent reloads it within its interval).
    fn write_config(&self, file: &str, yaml: &str) {
        fs::create_dir_all(self.config_dir()).unwrap();
        // Write then rename: the agent never reads half a file.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        fs::write(&tmp, yaml).unwrap();
        fs::rename(&tmp, self.config_dir().join(file)).unwrap();
    }

    fn add_pod(&mut self, name: &str) -> Pod {
        self.topo.add_pod(name).expect("add pod")
    }

    /// A pod whose cgroups kubelet would have made ([`Topology::add_kubelet_pod`]): its Pod
    /// object carries no `sluice.io/cgroup`, the agent finds it from the uid.
    fn add_kubelet_pod(&mut self, name: &str, driver: CgroupDriver) -> Pod {
        self.topo
            .add_kubelet_pod(name, driver)
            .expect("add kubelet pod")
    }

    /// Runs `fake-service` (NAME=`name`) in `pod` on port 9090 and waits until it accepts.
    fn fake_service(&mut self, pod: &Pod, name: &str, env: &[(&str, &str)]) {
        let mut cmd = self
            .topo
            .command(pod, &sluice_tests::bins::bins().fake_service)
            .unwrap();
        cmd.env("NAME", name)
            .env("LISTEN_ADDR", "0.0.0.0:9090")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let pid = self.topo.spawn(&mut cmd).unwrap();
        let addr = SocketAddr::from((pod.ip, 9090));
        for _ in 0..100 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            assert!(self.topo.running(pid), "fake-service {name} exited");
            pause(Duration::from_millis(20));
        }
        panic!("fake-service {name} does not accept on {addr}");
    }

    /// Starts `sluice run --redirect ebpf` on the config directory, attached to the topology's
    /// cgroup, pinned under this test's pin directory, listening on the host's bridge address
    /// (`--proxy-ip` that address). On a dual-stack topology it listens on `[::]` (IPv4 too) and
    /// `--proxy-ip` is the host's IPv4 and IPv6 bridge addresses, one per family.
    fn start_agent(&mut self) -> &mut Agent {
        fs::create_dir_all(self.config_dir()).unwrap();
        let host = IpAddr::V4(self.topo.host_ip());
        let (listen_ip, proxy_ips) = match self.topo.host_ip6() {
            None => (host, host.to_string()),
            Some(host6) => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), format!("{host},{host6}")),
        };
        let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let listen = SocketAddr::new(listen_ip, free_port(listen_ip));
        // Known once the agent has bound them (port 0: the kernel chooses).
        let unbound = SocketAddr::new(local, 0);
        let args: Vec<OsString> = vec![
            "run".into(),
            "--redirect".into(),
            "ebpf".into(),
            "--config-dir".into(),
            self.config_dir().into(),
            "--reload-interval".into(),
            "100ms".into(),
            "--outbound-addr".into(),
            listen.to_string().into(),
            // Several agents may run at once: none takes the node's default admin socket.
            "--admin-socket".into(),
            "none".into(),
            "--cgroup".into(),
            self.topo.cgroup().into(),
            "--cgroup-root".into(),
            self.topo.cgroup().into(),
            "--pin-dir".into(),
            self.pins.0.clone().into(),
            "--proxy-ip".into(),
            proxy_ips.into(),
            "--ebpf-object".into(),
            ebpf_object().into(),
        ];
        let mut agent = Agent {
            child: None,
            args,
            cgroup_procs: self.agent_cgroup.0.join("cgroup.procs"),
            log_dir: self.dir.path().to_path_buf(),
            starts: 0,
            outbound: listen,
            admin: unbound,
            ready: unbound,
            metrics: unbound,
        };
        agent.spawn();
        self.agent.insert(agent)
    }

    fn agent(&mut self) -> &mut Agent {
        self.agent.as_mut().expect("agent started")
    }

    /// The cluster IP the agent allocated to Service `name` (namespace default), from
    /// `sluice services -o json`.
    fn cluster_ip(&mut self, name: &str) -> Ipv4Addr {
        let host = format!("{name}.default.svc.cluster.local");
        self.agent()
            .services()
            .into_iter()
            .find(|s| s.hostname == host)
            .and_then(|s| s.cluster_ips.first().cloned())
            .unwrap_or_else(|| panic!("no cluster IP for {host}"))
            .parse()
            .expect("an IPv4 cluster IP")
    }

    /// Makes every pod resolve each Service name (short, namespaced, FQDN) to its cluster IP.
    fn resolve_services(&mut self, names: &[&str]) {
        let entries: Vec<(Ipv4Addr, Vec<String>)> = names
            .iter()
            .map(|n| {
                (
                    self.cluster_ip(n),
                    vec![
                        n.to_string(),
                        format!("{n}.default"),
                        format!("{n}.default.svc.cluster.local"),
                    ],
                )
            })
            .collect();
        self.topo.set_hosts(&entries).unwrap();
    }

    /// Plain `curl URL` inside `pod`.
    fn curl(&self, pod: &Pod, url: &str, max_time: f64) -> Reply {
        let mut cmd = self.topo.command(pod, "curl").unwrap();
        Reply::run(&mut cmd, url, max_time)
    }

    /// Plain `curl URL` on the host (host network namespace, not in the topology's cgroup).
    fn host_curl(&self, url: &str, max_time: f64) -> Reply {
        Reply::run(&mut Command::new("curl"), url, max_time)
    }
}

/// What `curl` got.
#[derive(Debug)]
struct Reply {
    /// HTTP status; 0 when no response came (curl's `000`).
    code: u16,
    body: String,
    /// curl's `time_total`.
    secs: f64,
    /// curl's exit code (0 ok, 7 connection refused, 28 timeout...).
    exit: i32,
    stderr: String,
}

impl Reply {
    fn run(cmd: &mut Command, url: &str, max_time: f64) -> Reply {
        const MARK: &str = "\n@@curl@@ ";
        let out = cmd
            .args(["-sS", "--max-time", &max_time.to_string()])
            .args(["-w", &format!("{MARK}%{{http_code}} %{{time_total}}")])
            .arg(url)
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, tail) = stdout
            .rsplit_once(MARK)
            .unwrap_or_else(|| panic!("curl printed no status: {out:?}"));
        let mut tail = tail.split_whitespace();
        Reply {
            code: tail.next().and_then(|c| c.parse().ok()).unwrap_or(0),
            secs: tail.next().and_then(|s| s.parse().ok()).unwrap_or(0.0),
            body: body.to_owned(),
            exit: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// HTTP/1.0 GET to a host listener (admin, readiness): status and body, `None` if unreachable.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Config documents.

/// A Service `name` (port 80 -> 9090) selecting pods labelled `app: name`.
fn service_yaml(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  selector:\n    app: {name}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 9090\n---\n"
    )
}

/// A Pod object for a topology pod: its IP(s), netns and cgroup, `app` label, enrollment label. A
/// kubelet-shaped pod's says where its cgroup is as the API server would: `metadata.uid` and
/// `status.qosClass`, no `sluice.io/cgroup`.
fn pod_yaml(pod: &Pod, app: Option<&str>, enrolled: bool) -> String {
    // A dual-stack pod lists both addresses, IPv4 first (its `podIP`), as the kubelet does.
    let pod_ips = match pod.ip6 {
        Some(ip6) => format!("  podIPs:\n  - ip: {}\n  - ip: {ip6}\n", pod.ip),
        None => String::new(),
    };
    let mut labels = String::new();
    if let Some(app) = app {
        labels.push_str(&format!("    app: {app}\n"));
    }
    labels.push_str(&format!(
        "    istio.io/dataplane-mode: {}\n",
        if enrolled { "ambient" } else { "none" }
    ));
    let (uid, cgroup, status) = match &pod.uid {
        Some(uid) => (
            format!("  uid: {uid}\n"),
            String::new(),
            "  phase: Running\n  qosClass: BestEffort\n",
        ),
        None => (
            String::new(),
            format!("    sluice.io/cgroup: {}\n", pod.cgroup.display()),
            "",
        ),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n{uid}  labels:\n{labels}  annotations:\n    sluice.io/netns: {netns}\n{cgroup}status:\n{status}  podIP: {ip}\n{pod_ips}---\n",
        name = pod.name,
        netns = pod.netns_path.display(),
        ip = pod.ip,
    )
}

/// A VirtualService for `host` whose one route carries `policy` (YAML at the route's indentation).
fn virtual_service_yaml(host: &str, policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  hosts: [{host}]\n  http:\n  - route:\n    - destination:\n        host: {host}\n{policy}---\n"
    )
}

/// A Service `name` with one IPv6 cluster IP `vip` (`ipFamilies: [IPv6]`, port 80 named `http`)
/// and no selector, and its EndpointSlice (`addressType: IPv6`) naming `pod`'s IPv6 address, port
/// 80.
fn service6_yaml(name: &str, vip: Ipv6Addr, pod: &Pod) -> String {
    let ep = pod.ip6.expect("a dual-stack pod");
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {vip}\n  clusterIPs: [{vip}]\n  ipFamilies: [IPv6]\n  ipFamilyPolicy: SingleStack\n  ports:\n  - name: http\n    port: 80\n    targetPort: 80\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-v6\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {name}\naddressType: IPv6\nendpoints:\n- addresses: [\"{ep}\"]\n  conditions:\n    ready: true\n  targetRef:\n    kind: Pod\n    name: {pod_name}\n    namespace: default\nports:\n- name: http\n  port: 80\n  protocol: TCP\n---\n",
        pod_name = pod.name,
    )
}

/// A VirtualService for `host`: requests with `x-fault: abort` get a 503 fault abort, the rest go
/// to `host` unchanged.
fn header_fault_vs_yaml(host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  hosts: [{host}]\n  http:\n  - match:\n    - headers:\n        x-fault:\n          exact: abort\n    fault:\n      abort:\n        httpStatus: 503\n        percentage:\n          value: 100\n    route:\n    - destination:\n        host: {host}\n  - route:\n    - destination:\n        host: {host}\n---\n"
    )
}

// ---------------------------------------------------------------------------------------------
// A listener inside a pod that answers every HTTP request with the peer address it saw.

/// `peer=<ip>` per request; the addresses seen are also sent on `peers`.
struct PeerServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    peers: mpsc::Receiver<IpAddr>,
}

impl PeerServer {
    /// Listens on `pod`'s address, port `port`, inside its network namespace.
    fn start(pod: &Pod, port: u16) -> PeerServer {
        PeerServer::start_on(pod, IpAddr::V4(pod.ip), port)
    }

    /// Listens on `ip` (`::`: every address of the pod, IPv4 too), port `port`, inside `pod`'s
    /// network namespace.
    fn start_on(pod: &Pod, ip: IpAddr, port: u16) -> PeerServer {
        let listener = pod.listen_on(ip, port).expect("listen inside the pod");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, peers) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || serve_peers(listener, &stop, &tx))
        };
        PeerServer {
            addr,
            stop,
            thread: Some(thread),
            peers,
        }
    }

    /// Peers seen since the last call.
    fn seen(&self) -> Vec<IpAddr> {
        self.peers.try_iter().collect()
    }
}

fn serve_peers(listener: TcpListener, stop: &AtomicBool, peers: &mpsc::Sender<IpAddr>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, peer)) => {
                // A listener on `::` sees IPv4 peers as IPv4-mapped addresses.
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let _ = peers.send(peer.ip());
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                // Read the request head, then answer and close.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("peer={}\n", peer.ip());
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                pause(Duration::from_millis(5));
            }
            Err(_) => pause(Duration::from_millis(5)),
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Access-log lines (parsed) whose authority or upstream mentions `needle`.
fn log_lines_for(lines: &[String], needle: &str) -> Vec<LogLine> {
    lines
        .iter()
        .filter(|l| l.contains(needle))
        .filter_map(|l| LogLine::parse(l))
        .collect()
}

/// `curl ARGS... URL` inside `pod`.
fn curl_with(env: &Env, pod: &Pod, args: &[&str], url: &str) -> Reply {
    let mut cmd = env.topo.command(pod, "curl").unwrap();
    cmd.args(args);
    Reply::run(&mut cmd, url, 5.0)
}

/// Whether `samples` has one from Pod `default/client` to Service `service` with this response
/// code and flags.
fn sample_from_client(samples: &[String], service: &str, code: u16, flags: &str) -> bool {
    samples.iter().any(|l| {
        l.contains("source_workload=\"client\",source_workload_namespace=\"default\"")
            && l.contains(&format!("destination_service_name=\"{service}\""))
            && l.contains(&format!("response_code=\"{code}\""))
            && l.contains(&format!("response_flags=\"{flags}\""))
    })
}

/// `sluice status`'s original-destination lookups: (from the map, by `SO_ORIGINAL_DST`, unknown).
fn original_dst_lookups(status: &api::Status) -> (u64, u64, u64) {
    let o = ebpf(status).original_dst;
    (o.from_map, o.from_sockopt, o.unknown)
}

/// `istio_requests_total` samples from the agent's Prometheus endpoint.
fn request_samples(env: &mut Env) -> Vec<String> {
    let (code, text) = http_get(env.agent().metrics, "/stats/prometheus").expect("metrics");
    assert_eq!(code, 200);
    text.lines()
        .filter(|l| l.starts_with("istio_requests_total{"))
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// An enrolled pod's plain `curl http://<service>/` (the name resolves to the Service's cluster IP,
/// which nothing on this machine serves) reaches the node proxy and gets the service's
/// VirtualService applied: a fault abort, a retry that saves requests, a route timeout. The client
/// is a kubelet-shaped pod (systemd driver) whose Pod object has no `sluice.io/cgroup`.
#[test]
fn enrolled_pod_plain_curl_gets_fault_retry_and_timeout() {
    if skip() {
        return;
    }
    e2e(|env| {
        let client = env.add_kubelet_pod("client", CgroupDriver::Systemd);
        let aborted = env.add_pod("aborted-0");
        let flaky = env.add_pod("flaky-0");
        let slow = env.add_pod("slow-0");
        env.fake_service(&aborted, "aborted", &[]);
        // fake-service's schedule is deterministic: rate 0.5 fails every 2nd request.
        env.fake_service(
            &flaky,
            "flaky",
            &[
                ("ERROR_RATE", "0.5"),
                ("ERROR_TYPE", "http_error"),
                ("ERROR_CODE", "503"),
            ],
        );
        env.fake_service(
            &slow,
            "slow",
            &[
                ("ERROR_RATE", "1"),
                ("ERROR_TYPE", "delay"),
                ("ERROR_DELAY", "3s"),
            ],
        );
        let mut yaml = pod_yaml(&client, None, true);
        for (pod, name) in [(&aborted, "aborted"), (&flaky, "flaky"), (&slow, "slow")] {
            yaml.push_str(&service_yaml(name));
            yaml.push_str(&pod_yaml(pod, Some(name), false));
        }
        env.write_config("workloads.yaml", &yaml);
        env.write_config(
            "policy.yaml",
            &[
                virtual_service_yaml(
                    "aborted",
                    "    fault:\n      abort:\n        httpStatus: 503\n        percentage:\n          value: 100\n",
                ),
                virtual_service_yaml(
                    "flaky",
                    "    retries:\n      attempts: 2\n      retryOn: 5xx\n",
                ),
                virtual_service_yaml("slow", "    timeout: 0.5s\n"),
            ]
            .concat(),
        );
        env.start_agent();
        env.resolve_services(&["aborted", "flaky", "slow"]);

        // The upstream really fails every 2nd call (asked directly from the host, not redirected).
        let direct: Vec<u16> = (0..2)
            .map(|_| {
                env.host_curl(&format!("http://{}:9090/", flaky.ip), 5.0)
                    .code
            })
            .collect();
        assert!(direct.contains(&503), "flaky upstream directly: {direct:?}");

        // Fault abort: 503 with Envoy's body, flag FI.
        let r = env.curl(&client, "http://aborted/", 5.0);
        assert_eq!(r.code, 503, "{r:?}");
        assert_eq!(r.body, "fault filter abort", "{r:?}");
        // The metrics know who asked: the enrolled pod, by its address.
        let (code, text) = http_get(env.agent().metrics, "/stats/prometheus").expect("metrics");
        assert_eq!(code, 200);
        assert!(
            text.lines().any(|l| l.starts_with("istio_requests_total{")
                && l.contains("source_workload=\"client\",source_workload_namespace=\"default\"")
                && l.contains("destination_service_name=\"aborted\"")
                && l.contains("response_flags=\"FI\"")),
            "no istio_requests_total sample from the client pod to aborted with FI:\n{text}"
        );
        // By cluster IP with a Host that names no service: the original destination decides.
        let vip = env.cluster_ip("aborted");
        let mut cmd = env.topo.command(&client, "curl").unwrap();
        cmd.args(["-H", "Host: nothing.example"]);
        let r = Reply::run(&mut cmd, &format!("http://{vip}/"), 5.0);
        assert_eq!(
            (r.code, r.body.as_str()),
            (503, "fault filter abort"),
            "{r:?}"
        );

        // Retry: every request succeeds although every 2nd upstream call fails.
        let codes: Vec<u16> = (0..6)
            .map(|_| env.curl(&client, "http://flaky/", 5.0).code)
            .collect();
        assert_eq!(codes, vec![200; 6], "flaky with retries");

        // Timeout: 504 after about 0.5 s although the upstream takes 3 s.
        let r = env.curl(&client, "http://slow/", 5.0);
        assert_eq!(r.code, 504, "{r:?}");
        assert!(
            (0.4..2.0).contains(&r.secs),
            "504 after {:.3}s, expected about 0.5s",
            r.secs
        );
        eprintln!("timeout: 504 after {:.3}s", r.secs);

        // What the agent logged for each: every entry written, in batches (never more writes
        // than entries).
        let log = env.agent().access_log();
        let (code, metrics) = http_get(env.agent().metrics, "/stats/prometheus").expect("metrics");
        assert_eq!(code, 200);
        let counter = |name: &str| -> u64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in the metrics"))
        };
        assert_eq!(counter("sluice_access_log_dropped_total"), 0);
        let writes = counter("sluice_access_log_writes_total");
        assert!(
            (1..=log.len() as u64).contains(&writes),
            "{writes} writes for {} entries",
            log.len()
        );
        let aborted_lines = log_lines_for(&log, "aborted");
        assert!(
            aborted_lines
                .iter()
                .any(|l| l.status == 503 && l.has_flag("FI")),
            "no FI line for aborted in {log:#?}"
        );
        let flaky_lines = log_lines_for(&log, "flaky");
        assert_eq!(flaky_lines.len(), 6, "{log:#?}");
        assert!(
            flaky_lines.iter().all(|l| l.status == 200),
            "{flaky_lines:#?}"
        );
        let retried = flaky_lines.iter().filter(|l| l.attempts > 1).count();
        assert!(retried >= 1, "no request needed a retry: {flaky_lines:#?}");
        eprintln!(
            "retries: 6/6 answered 200, {retried} of them after attempts=2 (upstream directly: {direct:?})"
        );
        let slow_lines = log_lines_for(&log, "slow");
        assert!(
            slow_lines
                .iter()
                .any(|l| l.status == 504 && l.has_flag("UT")),
            "no UT line for slow in {log:#?}"
        );
    });
}

/// An unenrolled pod and the host reach a pod IP directly: the upstream sees their own address,
/// the agent neither counts a redirect nor logs them. The same request from an enrolled pod goes
/// through the proxy (the upstream sees the node's address) and is logged. Both pods are
/// kubelet-shaped (cgroupfs and systemd drivers), found by their uid.
#[test]
fn unenrolled_pod_and_host_are_not_redirected() {
    if skip() {
        return;
    }
    e2e(|env| {
        let enrolled = env.add_kubelet_pod("enrolled", CgroupDriver::Cgroupfs);
        let outsider = env.add_kubelet_pod("outsider", CgroupDriver::Systemd);
        let target = env.add_pod("target");
        let server = PeerServer::start(&target, 8080);
        env.write_config(
            "pods.yaml",
            &[
                pod_yaml(&enrolled, None, true),
                pod_yaml(&outsider, None, false),
                pod_yaml(&target, Some("target"), false),
            ]
            .concat(),
        );
        env.start_agent();
        let url = format!("http://{}/", server.addr);
        let before = env.agent().counters();
        let log_before = env.agent().access_log().len();

        // The unenrolled pod: direct, from its own address.
        let r = env.curl(&outsider, &url, 5.0);
        assert_eq!(r.code, 200, "{r:?}");
        assert_eq!(r.body.trim(), format!("peer={}", outsider.ip), "{r:?}");
        // The host (not in the topology's cgroup at all): direct too.
        let r = env.host_curl(&url, 5.0);
        assert_eq!(r.code, 200, "{r:?}");
        assert_eq!(
            r.body.trim(),
            format!("peer={}", env.topo.host_ip()),
            "{r:?}"
        );
        assert_eq!(
            server.seen(),
            vec![IpAddr::V4(outsider.ip), IpAddr::V4(env.topo.host_ip())]
        );

        let after = env.agent().counters();
        assert_eq!(
            after.since(&before, "connect_redirected"),
            0,
            "unenrolled/host connects redirected: {after:?}"
        );
        // The unenrolled pod's connect was seen (it is under the attached cgroup) and left alone.
        assert!(after.since(&before, "connect_seen") >= 1, "{after:?}");
        let log = env.agent().access_log();
        assert_eq!(
            log.len(),
            log_before,
            "the agent logged direct traffic: {:?}",
            &log[log_before..]
        );

        // The enrolled pod, same URL: through the proxy (passthrough to the original
        // destination), which connects from the node's address on the bridge.
        let r = env.curl(&enrolled, &url, 5.0);
        assert_eq!(r.code, 200, "{r:?}");
        assert_eq!(
            r.body.trim(),
            format!("peer={}", env.topo.host_ip()),
            "{r:?}"
        );
        let enrolled_after = env.agent().counters();
        assert_eq!(
            enrolled_after.since(&after, "connect_redirected"),
            1,
            "{enrolled_after:?}"
        );
        let log = env.agent().access_log();
        assert!(
            log[log_before..]
                .iter()
                .any(|l| l.contains(&server.addr.to_string())),
            "the enrolled pod's request is not in the access log: {log:#?}"
        );
        eprintln!(
            "peers seen by the upstream: outsider {} and host {} direct; enrolled via the proxy from {}",
            outsider.ip,
            env.topo.host_ip(),
            env.topo.host_ip()
        );

        // Labelling the outsider's Pod ambient enrolls it live: the next config poll (100 ms)
        // puts its cgroup in the map and its connections go through the proxy.
        env.write_config(
            "pods.yaml",
            &[
                pod_yaml(&enrolled, None, true),
                pod_yaml(&outsider, None, true),
                pod_yaml(&target, Some("target"), false),
            ]
            .concat(),
        );
        let relabelled = now();
        let mut via_proxy = None;
        for _ in 0..30 {
            let r = env.curl(&outsider, &url, 2.0);
            if r.body.trim() == format!("peer={}", env.topo.host_ip()) {
                via_proxy = Some(relabelled.elapsed());
                break;
            }
            assert_eq!(r.body.trim(), format!("peer={}", outsider.ip), "{r:?}");
            pause(Duration::from_millis(100));
        }
        let via_proxy = via_proxy.expect("the relabelled pod is not redirected within ~3 s");
        eprintln!("live enrollment: redirected {via_proxy:?} after the label changed");
        let status = env.agent().status();
        let enrolled_pods: Vec<&str> = ebpf(&status)
            .enrolled
            .iter()
            .map(|p| p.pod.as_str())
            .collect();
        assert!(
            enrolled_pods.contains(&"default/outsider"),
            "status does not list the relabelled pod: {enrolled_pods:?}"
        );
    });
}

/// The proxy's own upstream connections (the agent runs under the attached cgroup, so the connect
/// programs see them) are not redirected back to the proxy: as many connects are redirected as the
/// client made, no more. And the pod-to-proxy bytes took the sk_msg fast path.
#[test]
fn proxy_connections_not_looped_and_sk_msg_fast_path_taken() {
    if skip() {
        return;
    }
    e2e(|env| {
        let client = env.add_pod("client");
        let web = env.add_pod("web-0");
        env.fake_service(&web, "web", &[]);
        env.write_config(
            "all.yaml",
            &[
                pod_yaml(&client, None, true),
                service_yaml("web"),
                pod_yaml(&web, Some("web"), false),
            ]
            .concat(),
        );
        env.start_agent();
        env.resolve_services(&["web"]);
        let before = env.agent().counters();

        const N: u64 = 5;
        for i in 0..N {
            let r = env.curl(&client, "http://web/", 5.0);
            assert_eq!(r.code, 200, "request {i}: {r:?}");
            assert!(r.body.contains("\"name\": \"web\""), "{r:?}");
        }
        let after = env.agent().counters();
        let redirected = after.since(&before, "connect_redirected");
        let seen = after.since(&before, "connect_seen");
        let sk_msg = after.since(&before, "sk_msg_redirected");
        eprintln!(
            "{N} curls: connect_seen +{seen}, connect_redirected +{redirected}, sk_msg_redirected +{sk_msg}, counters {after:?}"
        );
        // One connect per curl redirected; the agent's own connects to web-0 were seen (it is
        // under the attached cgroup) but not redirected (or the requests would loop and fail).
        assert_eq!(redirected, N, "{after:?}");
        assert!(
            seen > redirected,
            "the agent's upstream connects were not seen at all: {after:?}"
        );
        let log = env.agent().access_log();
        let lines = log_lines_for(&log, "web");
        assert_eq!(lines.len() as u64, N, "{log:#?}");
        assert!(
            lines.iter().all(|l| l.status == 200 && l.attempts == 1),
            "{lines:#?}"
        );
        // The fast path: the pod's bytes went to the proxy's socket by sk_msg redirect.
        assert!(sk_msg > 0, "sk_msg fast path not taken: {after:?}");
        // The proxy learned each redirected connection's original destination.
        let status = env.agent().status();
        let (map, sockopt, unknown) = original_dst_lookups(&status);
        eprintln!(
            "original destinations: from_map {map}, from_sockopt {sockopt}, unknown {unknown}"
        );
        assert_eq!((map + sockopt, unknown), (N, 0), "{:#?}", status.redirect);
    });
}

/// SIGKILL of the agent fails open: within the 1 s lease plus a margin, an enrolled pod's new
/// connection reaches its destination directly. A restart on the same pins reuses them and
/// redirection (and policy) resumes.
#[test]
fn sigkill_fails_open_and_restart_reuses_pins() {
    if skip() {
        return;
    }
    e2e(|env| {
        let client = env.add_pod("client");
        let target = env.add_pod("target-0");
        let server = PeerServer::start(&target, 9090);
        env.write_config(
            "all.yaml",
            &[
                pod_yaml(&client, None, true),
                service_yaml("target"),
                pod_yaml(&target, Some("target"), false),
                virtual_service_yaml(
                    "target",
                    "    fault:\n      abort:\n        httpStatus: 503\n        percentage:\n          value: 100\n",
                ),
            ]
            .concat(),
        );
        env.start_agent();
        env.resolve_services(&["target"]);
        let direct_url = format!("http://{}/", server.addr);
        let first = env.agent().status();
        assert!(
            !ebpf(&first).programs.attached.is_empty(),
            "the first run attached nothing: {first:#?}"
        );

        // Redirected: the policy applies by name, and the pod IP is reached through the proxy.
        let r = env.curl(&client, "http://target/", 5.0);
        assert_eq!(
            (r.code, r.body.as_str()),
            (503, "fault filter abort"),
            "{r:?}"
        );
        let r = env.curl(&client, &direct_url, 5.0);
        assert_eq!(
            r.body.trim(),
            format!("peer={}", env.topo.host_ip()),
            "{r:?}"
        );

        // kill -9. There is no kube-proxy here, so a cluster IP leads nowhere without the proxy:
        // fail-open is shown on a pod IP, which works without any translation.
        let killed = now();
        env.agent().kill9();
        let mut tries = Vec::new();
        let mut open_after = None;
        let mut last_error = String::new();
        for _ in 0..40 {
            let r = env.curl(&client, &direct_url, 0.5);
            tries.push(r.exit);
            last_error = r.stderr.trim().to_owned();
            if r.code == 200 {
                assert_eq!(r.body.trim(), format!("peer={}", client.ip), "{r:?}");
                open_after = Some(killed.elapsed());
                break;
            }
            if killed.elapsed() > Duration::from_secs(4) {
                break;
            }
            pause(Duration::from_millis(50));
        }
        let open_after = open_after.unwrap_or_else(|| {
            panic!(
                "no direct connection within {:?} after SIGKILL (curl exit codes {tries:?}, last: {last_error})",
                killed.elapsed()
            )
        });
        eprintln!(
            "fail-open: direct connection {open_after:?} after SIGKILL ({} tries, curl exits {tries:?})",
            tries.len()
        );
        assert!(
            open_after <= Duration::from_secs(2),
            "fail-open took {open_after:?}"
        );

        // Restart on the same pins: reused, and redirection resumes.
        let agent = env.agent();
        agent.spawn();
        let status = agent.status();
        let programs = &ebpf(&status).programs;
        let (reused, attached) = (programs.reused.clone(), programs.attached.clone());
        assert!(
            !reused.is_empty() && attached.is_empty(),
            "the restart did not reuse the pins: reused {reused:?}, attached {attached:?}"
        );
        let log = agent.stderr(agent.starts);
        assert!(
            log.contains(&format!("reused [{}]", reused.join(", "))),
            "the restarted agent's log does not say it reused the pins:\n{log}"
        );
        eprintln!("status after restart: {:?}", status.redirect);
        let counters = Counters::from_status(&status);
        assert!(
            counters.get("connect_fail_open") >= 1,
            "fail-open connects not counted: {counters:?}"
        );
        let mut resumed = None;
        for _ in 0..20 {
            let r = env.curl(&client, "http://target/", 2.0);
            if r.code == 503 && r.body == "fault filter abort" {
                resumed = Some(r);
                break;
            }
            pause(Duration::from_millis(100));
        }
        assert!(
            resumed.is_some(),
            "policy does not apply again after the restart"
        );
        let r = env.curl(&client, &direct_url, 5.0);
        assert_eq!(
            r.body.trim(),
            format!("peer={}", env.topo.host_ip()),
            "{r:?}"
        );
    });
}

/// A line echo server inside a pod: every line a client sends comes back, on the same connection,
/// for as long as the client keeps it open (bounded: 20 s of silence ends it).
struct EchoServer {
    addr: SocketAddr,
    peers: mpsc::Receiver<IpAddr>,
}

impl EchoServer {
    fn start(pod: &Pod, port: u16) -> EchoServer {
        let listener = pod.listen(port).expect("listen inside the pod");
        let addr = listener.local_addr().unwrap();
        let (tx, peers) = mpsc::channel();
        // One connection is all the test makes; the thread ends with it (or with the test).
        std::thread::spawn(move || {
            if let Ok((mut stream, peer)) = listener.accept() {
                let _ = tx.send(peer.ip());
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                let mut buf = [0u8; 256];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        });
        EchoServer { addr, peers }
    }
}

/// A client in a pod holding one TCP connection open: each line written to its stdin is sent and
/// the echoed line printed.
struct HeldConnection {
    child: Child,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl HeldConnection {
    fn open(env: &Env, pod: &Pod, dst: SocketAddr) -> HeldConnection {
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} || exit 1; while read -r line; do echo \"$line\" >&3; \
             read -r -t 5 back <&3 || exit 2; echo \"$back\"; done",
            dst.ip(),
            dst.port()
        );
        let mut child = env
            .topo
            .command(pod, "bash")
            .unwrap()
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the held connection");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        HeldConnection { child, stdout }
    }

    /// Sends `line` and returns what came back (empty if the connection is gone).
    fn round_trip(&mut self, line: &str) -> String {
        use std::io::BufRead as _;
        let stdin = self.child.stdin.as_mut().unwrap();
        if writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .is_err()
        {
            return String::new();
        }
        let mut back = String::new();
        let _ = self.stdout.read_line(&mut back);
        back.trim().to_owned()
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 3 point 5, the restart half: a graceful stop (SIGTERM) lets a request under way in the
/// proxy finish, stops redirecting at once, and a connection made directly while the agent was
/// away is not cut when it comes back on the same pins and redirects again.
#[test]
fn restart_keeps_requests_under_way_and_established_connections() {
    if skip() {
        return;
    }
    e2e(|env| {
        let client = env.add_pod("client");
        let target = env.add_pod("target-0");
        let server = PeerServer::start(&target, 9090);
        let echo = EchoServer::start(&target, 7070);
        env.write_config(
            "all.yaml",
            &[
                pod_yaml(&client, None, true),
                service_yaml("target"),
                pod_yaml(&target, Some("target"), false),
                virtual_service_yaml(
                    "target",
                    "    fault:\n      delay:\n        fixedDelay: 1.5s\n        percentage:\n          value: 100\n",
                ),
            ]
            .concat(),
        );
        env.start_agent();
        env.resolve_services(&["target"]);

        // A request held 1.5 s in the proxy by the fault delay; SIGTERM arrives under way.
        let mut slow = env.topo.command(&client, "curl").unwrap();
        let in_flight = std::thread::spawn(move || Reply::run(&mut slow, "http://target/", 10.0));
        pause(Duration::from_millis(400));
        let status = env.agent().sigterm();
        let r = in_flight.join().expect("curl thread");
        assert!(status.success(), "sluice run exited with {status}");
        assert_eq!(
            (r.code, r.body.trim()),
            (200, format!("peer={}", env.topo.host_ip()).as_str()),
            "the request under way did not finish through the proxy: {r:?}"
        );
        assert!(r.secs >= 1.4, "the fault delay did not apply: {r:?}");

        // Stopped: redirection is off at once (graceful stop ends the lease), so this connection
        // goes straight to the pod.
        let mut held = HeldConnection::open(env, &client, echo.addr);
        assert_eq!(held.round_trip("before"), "before");
        let peer = echo.peers.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(
            peer,
            IpAddr::V4(client.ip),
            "the held connection went through the proxy"
        );

        // Back on the same pins: new connections are redirected again...
        let agent = env.agent();
        agent.spawn();
        let mut resumed = None;
        for _ in 0..20 {
            let r = env.curl(&client, &format!("http://{}/", server.addr), 3.0);
            if r.body.trim() == format!("peer={}", env.topo.host_ip()) {
                resumed = Some(r);
                break;
            }
            pause(Duration::from_millis(100));
        }
        assert!(
            resumed.is_some(),
            "redirection did not resume after the restart"
        );
        // ...and the connection established while the agent was away still carries data.
        assert_eq!(
            held.round_trip("after"),
            "after",
            "the restart cut an established connection"
        );
    });
}

/// IPv6 end to end: a Service with an IPv6 cluster IP (`ipFamilies: [IPv6]`, an IPv6
/// EndpointSlice). The upstream pod also owns the cluster IP (standing in for kube-proxy, which
/// this machine does not run), so a request that is not redirected still reaches it. An unenrolled
/// pod's `curl -g -H 'x-fault: abort' http://[<cluster IP>]/` reaches the upstream directly from its
/// own IPv6 address, untouched: 200, no redirect counted, nothing logged. The enrolled pod's
/// identical request is redirected by `connect6` to the agent's IPv6 address and gets the
/// VirtualService's fault abort (503 `FI`, logged and counted with the client pod as
/// `source_workload`); without the header the proxy forwards it over IPv6 to the endpoint from the
/// node's IPv6 address, by cluster IP and by Service name. The pod-to-proxy bytes take the sk_msg
/// fast path, and every redirected connection's original (IPv6) destination is recovered.
#[test]
fn ipv6_service_policy_for_enrolled_pod_unenrolled_pod_untouched() {
    if skip_ipv6() {
        return;
    }
    e2e_dual_stack(|env| {
        let client = env.add_pod("client");
        let outsider = env.add_pod("outsider");
        let target = env.add_pod("web6-0");
        let host6 = env.topo.host_ip6().expect("dual stack");
        let (client6, outsider6, target6) = (
            client.ip6.unwrap(),
            outsider.ip6.unwrap(),
            target.ip6.unwrap(),
        );
        // The cluster IP, in the topology's /64 so that pods reach its owner on-link.
        let p = host6.segments();
        let vip = Ipv6Addr::new(p[0], p[1], p[2], p[3], 0, 0, 0x96, 0x10);
        env.topo
            .add_address(&target, IpAddr::V6(vip))
            .expect("cluster IP on the upstream pod");
        let server = PeerServer::start_on(&target, IpAddr::V6(Ipv6Addr::UNSPECIFIED), 80);
        env.write_config(
            "all.yaml",
            &[
                pod_yaml(&client, None, true),
                pod_yaml(&outsider, None, false),
                pod_yaml(&target, Some("web6"), false),
                service6_yaml("web6", vip, &target),
                header_fault_vs_yaml("web6"),
            ]
            .concat(),
        );
        env.start_agent();
        let status = env.agent().status();
        // One redirect target per family, on the one `[::]` listener's port.
        let proxy = |family: &str, addr: &Option<String>| {
            addr.as_deref()
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .unwrap_or_else(|| panic!("no {family} proxy address: {:#?}", status.redirect))
        };
        let addrs = &ebpf(&status).proxy;
        let (proxy4, proxy6) = (proxy("ipv4", &addrs.ipv4), proxy("ipv6", &addrs.ipv6));
        assert_eq!(
            (proxy4.ip(), proxy6.ip(), proxy4.port()),
            (
                IpAddr::V4(env.topo.host_ip()),
                IpAddr::V6(host6),
                proxy6.port()
            )
        );
        let services = env.agent().services();
        assert_eq!(
            services
                .iter()
                .find(|s| s.hostname == "web6.default.svc.cluster.local")
                .and_then(|s| s.cluster_ips.first())
                .map(String::as_str),
            Some(vip.to_string().as_str()),
            "{services:#?}"
        );
        env.topo
            .set_hosts(&[(
                vip,
                vec![
                    "web6".to_string(),
                    "web6.default".to_string(),
                    "web6.default.svc.cluster.local".to_string(),
                ],
            )])
            .unwrap();
        let url = format!("http://[{vip}]/");
        let abort = ["-g", "-H", "x-fault: abort"];
        let before = env.agent().counters();
        let log_before = env.agent().access_log().len();

        // Unenrolled: straight to the upstream (which owns the cluster IP), from its own address.
        let r = curl_with(env, &outsider, &abort, &url);
        assert_eq!(
            (r.code, r.body.trim()),
            (200, format!("peer={outsider6}").as_str()),
            "the unenrolled pod's request was touched: {r:?}"
        );
        assert_eq!(server.seen(), vec![IpAddr::V6(outsider6)]);
        let after_outsider = env.agent().counters();
        assert_eq!(
            after_outsider.since(&before, "connect_redirected"),
            0,
            "the unenrolled pod's connect was redirected: {after_outsider:?}"
        );
        assert!(
            after_outsider.since(&before, "connect_seen") >= 1,
            "connect6 did not see the unenrolled pod's connect: {after_outsider:?}"
        );
        assert_eq!(
            env.agent().access_log().len(),
            log_before,
            "the agent logged the unenrolled pod's request"
        );

        // Enrolled, the identical request: the proxy applies the fault abort.
        let r = curl_with(env, &client, &abort, &url);
        assert_eq!(
            (r.code, r.body.as_str()),
            (503, "fault filter abort"),
            "{r:?}"
        );
        assert!(
            server.seen().is_empty(),
            "the aborted request reached the upstream"
        );
        // Without the header: forwarded over IPv6 from the node's IPv6 address, by cluster IP
        // and by Service name.
        let r = curl_with(env, &client, &["-g"], &url);
        assert_eq!(
            (r.code, r.body.trim()),
            (200, format!("peer={host6}").as_str()),
            "{r:?}"
        );
        let r = curl_with(env, &client, &[], "http://web6/");
        assert_eq!(
            (r.code, r.body.trim()),
            (200, format!("peer={host6}").as_str()),
            "{r:?}"
        );
        assert_eq!(server.seen(), vec![IpAddr::V6(host6); 2]);

        let after = env.agent().counters();
        let redirected = after.since(&after_outsider, "connect_redirected");
        let sk_msg = after.since(&after_outsider, "sk_msg_redirected");
        let status = env.agent().status();
        eprintln!(
            "IPv6: 3 enrolled curls: connect_redirected +{redirected}, sk_msg_redirected +{sk_msg}, connect_seen +{}; original_dst {:?}; counters {after:?}",
            after.since(&after_outsider, "connect_seen"),
            ebpf(&status).original_dst
        );
        assert_eq!(redirected, 3, "{after:?}");
        assert!(
            sk_msg > 0,
            "sk_msg fast path not taken over IPv6: {after:?}"
        );
        let (map, sockopt, unknown) = original_dst_lookups(&status);
        assert_eq!((map + sockopt, unknown), (3, 0), "{:#?}", status.redirect);

        // The access log: the abort with FI, the two forwarded ones to the IPv6 endpoint.
        let log = env.agent().access_log();
        let lines: Vec<LogLine> = log[log_before..]
            .iter()
            .filter_map(|l| LogLine::parse(l))
            .collect();
        eprintln!("IPv6 access log:\n{}", log[log_before..].join("\n"));
        assert_eq!(lines.len(), 3, "{log:#?}");
        assert!(
            lines
                .iter()
                .all(|l| l.service == "web6.default.svc.cluster.local"),
            "{lines:#?}"
        );
        assert!(
            lines.iter().any(|l| l.status == 503 && l.has_flag("FI")),
            "no FI line: {lines:#?}"
        );
        let upstream = SocketAddr::from((target6, 80)).to_string();
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.status == 200 && l.upstream == upstream)
                .count(),
            2,
            "no 200 lines to {upstream}: {lines:#?}"
        );
        // The metrics know the client by its IPv6 address.
        let samples = request_samples(env);
        assert!(
            sample_from_client(&samples, "web6", 503, "FI")
                && sample_from_client(&samples, "web6", 200, "-"),
            "no istio_requests_total samples from the client pod (IPv6 {client6}) to web6 with 503 FI and 200:\n{}",
            samples.join("\n")
        );
    });
}

/// The same dual-stack agent (one listener on `[::]`, a `--proxy-ip` per family) serves IPv4 as
/// before: an enrolled pod's requests to an IPv4 Service (a selector over dual-stack pods) are
/// redirected by `connect4`, get the policy, reach the IPv4 endpoint only (a Service without
/// `ipFamilies` is single-stack IPv4, as in Kubernetes), and are attributed to the client pod
/// although the listener sees them as IPv4-mapped IPv6 addresses.
#[test]
fn dual_stack_agent_serves_ipv4_services_as_before() {
    if skip_ipv6() {
        return;
    }
    e2e_dual_stack(|env| {
        let client = env.add_pod("client");
        let target = env.add_pod("web-0");
        let server = PeerServer::start_on(&target, IpAddr::V6(Ipv6Addr::UNSPECIFIED), 9090);
        env.write_config(
            "all.yaml",
            &[
                pod_yaml(&client, None, true),
                service_yaml("web"),
                pod_yaml(&target, Some("web"), false),
                header_fault_vs_yaml("web"),
            ]
            .concat(),
        );
        env.start_agent();
        env.resolve_services(&["web"]);
        let before = env.agent().counters();
        let r = curl_with(env, &client, &["-H", "x-fault: abort"], "http://web/");
        assert_eq!(
            (r.code, r.body.as_str()),
            (503, "fault filter abort"),
            "{r:?}"
        );
        const N: usize = 4;
        for _ in 0..N {
            let r = curl_with(env, &client, &[], "http://web/");
            assert_eq!(r.code, 200, "{r:?}");
        }
        let seen = server.seen();
        assert_eq!(
            seen,
            vec![IpAddr::V4(env.topo.host_ip()); N],
            "the IPv4 Service's requests went elsewhere than its IPv4 endpoint"
        );
        let after = env.agent().counters();
        assert_eq!(
            after.since(&before, "connect_redirected"),
            N as u64 + 1,
            "{after:?}"
        );
        assert!(after.since(&before, "sk_msg_redirected") > 0, "{after:?}");
        let log = env.agent().access_log();
        let upstream = SocketAddr::from((target.ip, 9090)).to_string();
        let lines = log_lines_for(&log, "web");
        assert!(
            lines
                .iter()
                .filter(|l| l.status == 200)
                .all(|l| l.upstream == upstream),
            "{lines:#?}"
        );
        // The listener saw IPv4-mapped addresses; the original destinations still come from the
        // map `sock_ops` keyed by the IPv4 4-tuple.
        let status = env.agent().status();
        eprintln!(
            "IPv4 via the dual-stack listener: original_dst {:?}",
            ebpf(&status).original_dst
        );
        let (map, _, unknown) = original_dst_lookups(&status);
        assert_eq!((map, unknown), (N as u64 + 1, 0), "{:#?}", status.redirect);
        let samples = request_samples(env);
        assert!(
            sample_from_client(&samples, "web", 503, "FI")
                && sample_from_client(&samples, "web", 200, "-"),
            "the IPv4 client behind the dual-stack listener is not attributed:\n{}",
            samples.join("\n")
        );
    });
}

/// No open relay: the agent's outbound listener is on the bridge, where every pod and the node
/// reach it, but only connections the programs redirected from enrolled pods are served. A
/// process in an unenrolled pod's network namespace, and one on the host, that connect straight
/// to it and ask it to fetch another pod's address (as an explicit proxy client would) get their
/// connection closed unanswered, and the other pod never hears from the proxy; each refusal is
/// counted and logged. The enrolled pod's own redirected request to that pod still works.
#[test]
fn non_enrolled_clients_cannot_use_the_proxy_as_a_relay() {
    if skip() {
        return;
    }
    e2e(|env| {
        let client = env.add_pod("client");
        let outsider = env.add_pod("outsider");
        let target = env.add_pod("target");
        let server = PeerServer::start(&target, 8080);
        env.write_config(
            "pods.yaml",
            &[
                pod_yaml(&client, None, true),
                pod_yaml(&outsider, None, false),
                pod_yaml(&target, Some("target"), false),
            ]
            .concat(),
        );
        env.start_agent();
        let proxy = format!("http://{}", env.agent().outbound);
        let url = format!("http://{}/", server.addr);
        let log_before = env.agent().access_log().len();

        // Straight to the listener from the unenrolled pod and from the host: refused.
        let r = curl_with(env, &outsider, &["-x", &proxy], &url);
        assert_eq!(r.code, 0, "the unenrolled pod used the proxy: {r:?}");
        let mut host = Command::new("curl");
        host.args(["-x", &proxy]);
        let r = Reply::run(&mut host, &url, 5.0);
        assert_eq!(r.code, 0, "the host used the proxy: {r:?}");
        assert_eq!(
            server.seen(),
            Vec::<IpAddr>::new(),
            "a refused client reached the other pod"
        );

        // The enrolled pod's ordinary request is redirected and served (from the node's address).
        let r = env.curl(&client, &url, 5.0);
        assert_eq!(r.code, 200, "{r:?}");
        assert_eq!(r.body.trim(), format!("peer={}", env.topo.host_ip()));
        assert_eq!(server.seen(), vec![IpAddr::V4(env.topo.host_ip())]);

        let (code, metrics) = http_get(env.agent().metrics, "/stats/prometheus").expect("metrics");
        assert_eq!(code, 200);
        assert!(
            metrics.contains(
                "sluice_outbound_refused_connections_total{reason=\"no_original_destination\"} 2"
            ),
            "{}",
            metrics
                .lines()
                .filter(|l| l.contains("refused"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        let log = env.agent().access_log();
        let refusals = log[log_before..]
            .iter()
            .filter(|l| l.contains(" NR ") && l.contains("details=no_original_destination"))
            .count();
        assert_eq!(refusals, 2, "{:#?}", &log[log_before..]);
        assert!(
            env.agent()
                .stderr(1)
                .contains("refused a connection made straight to the outbound listener"),
            "{}",
            env.agent().stderr(1)
        );
    });
}

/// A test that fails with the agent running and pods serving still leaves nothing behind.
#[test]
fn a_failing_test_leaves_nothing_behind() {
    if skip() {
        return;
    }
    let mut seen = None;
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        e2e(|env| {
            let client = env.add_pod("client");
            let web = env.add_pod("web-0");
            env.fake_service(&web, "web", &[]);
            env.write_config(
                "all.yaml",
                &[
                    pod_yaml(&client, None, true),
                    service_yaml("web"),
                    pod_yaml(&web, Some("web"), false),
                ]
                .concat(),
            );
            env.start_agent();
            seen = Some(Footprint {
                id: env.topo.id().to_owned(),
                cgroup: env.topo.cgroup().to_path_buf(),
                pins: env.pins.0.clone(),
                agent_pids: vec![env.agent().pid()],
            });
            // The check sees everything while it exists (so an empty list afterwards means
            // something).
            let live = seen.as_ref().expect("set").leftovers();
            for what in ["netns ", "link ", "cgroup ", "pins ", "agent process "] {
                assert!(
                    live.iter().any(|l| l.starts_with(what)),
                    "{what}missing from {live:?}"
                );
            }
            panic!("deliberate failure with everything running (expected: this test checks the cleanup)");
        })
    }));
    assert!(outcome.is_err(), "the body's panic is re-raised");
    let footprint = seen.expect("the body ran");
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind after a failed test: {left:?}");
}
