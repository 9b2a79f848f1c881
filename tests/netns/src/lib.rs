//! Throwaway "pods" on this machine, for end-to-end tests, benchmarks and the demo.
//!
//! A [`Topology`] is one Linux bridge in the host network namespace (the node), holding the host's
//! address `10.A.B.1/24`, and one cgroup v2 directory, `<cgroup2 root>/sluice-<id>`, under which every
//! pod gets its own cgroup: attach Sluice's cgroup programs to [`Topology::cgroup`] and only this
//! topology's pods are affected, so topologies of tests running in parallel do not meet. A [`Pod`] is
//! a network namespace with a veth pair to the bridge (`eth0`, `10.A.B.n/24`, loopback up) and its
//! cgroup. [`Topology::command`] builds a [`Command`] that runs inside a pod: the child joins the
//! pod's cgroup, then its network namespace, and (when [`Topology::set_hosts`] was called) sees the
//! topology's own `/etc/hosts` in a private mount namespace, so `curl http://product/` resolves as in
//! a cluster.
//!
//! Dropping the topology ends the processes it started (by PID) and anything else left in its
//! cgroups, then removes the veths, network namespaces, bridge and cgroups, also when the holder
//! panicked. Names carry the creating process's PID and a counter; [`sweep_stale`] removes what a
//! killed run (SIGKILL, no unwinding) left behind.
//!
//! Needs root and iproute2; [`cannot_run`] says why not when they are missing.

use std::{
    ffi::{CString, OsStr},
    fs,
    io::{self, Write as _},
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// Prefix of every name a topology creates (netns, links, cgroups, files).
pub const PREFIX: &str = "sluice-";
/// Prefix of link names, which the kernel limits to 15 bytes.
const LINK_PREFIX: &str = "slc";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `Some(reason)` when topologies cannot be built here (not root, no iproute2, no cgroup v2).
pub fn cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, veths, cgroups)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("`ip` (iproute2) is not installed".into());
    }
    if let Err(e) = sluice_redirect::cgroup2_root() {
        return Some(e.to_string());
    }
    None
}

/// One pod: a network namespace on the topology's bridge, and a cgroup.
#[derive(Clone, Debug)]
pub struct Pod {
    /// The name given to [`Topology::add_pod`].
    pub name: String,
    /// The network namespace's name (`ip netns`), e.g. `sluice-1a2b0-frontend`.
    pub netns: String,
    /// `/run/netns/<netns>`, what the `sluice.io/netns` annotation names.
    pub netns_path: PathBuf,
    /// The pod's cgroup v2 directory, what the `sluice.io/cgroup` annotation names.
    pub cgroup: PathBuf,
    /// The pod's address on the bridge.
    pub ip: Ipv4Addr,
    /// The host end of the pod's veth.
    host_link: String,
}

/// A bridge, a parent cgroup and the pods on them. See the crate documentation.
pub struct Topology {
    id: String,
    bridge: Option<String>,
    subnet: (u8, u8),
    cgroup: Option<PathBuf>,
    pods: Vec<Pod>,
    children: Vec<Child>,
    hosts: Option<PathBuf>,
    node_cgroup: Option<PathBuf>,
}

impl Topology {
    /// Creates the bridge (with the host's address) and the parent cgroup.
    pub fn create() -> Result<Self> {
        if let Some(why) = cannot_run() {
            bail!("cannot build a pod topology: {why}");
        }
        // `<pid>x<n>` in hex: link names stay within 15 bytes (pid_max is 2^22, n wraps at 256).
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 256;
        let id = format!("{:x}x{:x}", std::process::id(), n);
        let subnet = free_subnet(&id)?;
        let mut topo = Topology {
            id,
            bridge: None,
            subnet,
            cgroup: None,
            pods: Vec::new(),
            children: Vec::new(),
            hosts: None,
            node_cgroup: None,
        };
        let bridge = topo.link_name("b");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        topo.bridge = Some(bridge.clone());
        ip(&[
            "addr",
            "add",
            &format!("{}/24", topo.host_ip()),
            "dev",
            &bridge,
        ])?;
        ip(&["link", "set", &bridge, "up"])?;

        let cgroup = sluice_redirect::cgroup2_root()?.join(format!("{PREFIX}{}", topo.id));
        fs::create_dir(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        topo.cgroup = Some(cgroup);
        Ok(topo)
    }

    /// The unique part of every name this topology creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's address on the bridge (`10.A.B.1`): where pods reach host listeners.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, 1)
    }

    /// The parent cgroup of every pod: attach the cgroup programs here.
    pub fn cgroup(&self) -> &Path {
        self.cgroup.as_deref().expect("created in create()")
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// Adds a pod: network namespace, veth to the bridge, address, loopback, cgroup.
    pub fn add_pod(&mut self, name: &str) -> Result<Pod> {
        let index = self.pods.len() + 2;
        if index > 99 {
            bail!("a topology holds at most 98 pods");
        }
        let netns = format!("{PREFIX}{}-{name}", self.id);
        let host_link = self.link_name(&format!("h{index}"));
        let pod_link = self.link_name(&format!("p{index}"));
        let ip_addr = Ipv4Addr::new(10, self.subnet.0, self.subnet.1, index as u8);
        let cgroup = self.cgroup().join(name);

        ip(&["netns", "add", &netns])?;
        // Recorded at once so that Drop removes it whatever fails next.
        self.pods.push(Pod {
            name: name.into(),
            netns: netns.clone(),
            netns_path: Path::new("/run/netns").join(&netns),
            cgroup: cgroup.clone(),
            ip: ip_addr,
            host_link: host_link.clone(),
        });
        ip(&[
            "link", "add", &host_link, "type", "veth", "peer", "name", &pod_link,
        ])?;
        ip(&["link", "set", &pod_link, "netns", &netns])?;
        ip(&[
            "link",
            "set",
            &host_link,
            "master",
            self.bridge.as_deref().expect("created"),
            "up",
        ])?;
        ip(&["-n", &netns, "link", "set", &pod_link, "name", "eth0"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        fs::create_dir(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        Ok(self.pods.last().expect("pushed").clone())
    }

    /// A cgroup under [`Topology::cgroup`] for processes of the node itself (host network
    /// namespace), such as the agent: programs attached to the topology's cgroup then see their
    /// sockets too, as they see every process on a node where they attach to the root. Made on
    /// first use, removed with the topology.
    pub fn node_cgroup(&mut self) -> Result<PathBuf> {
        if let Some(dir) = &self.node_cgroup {
            return Ok(dir.clone());
        }
        let dir = self.cgroup().join("node");
        fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        self.node_cgroup = Some(dir.clone());
        Ok(dir)
    }

    /// Gives every pod's processes this `/etc/hosts` (lines `IP name...`), e.g. Service names to
    /// their cluster IPs. Applies to commands built afterwards.
    pub fn set_hosts(&mut self, entries: &[(Ipv4Addr, Vec<String>)]) -> Result<()> {
        let path = std::env::temp_dir().join(format!("{PREFIX}{}-hosts", self.id));
        let mut file = fs::File::create(&path)?;
        writeln!(file, "127.0.0.1 localhost")?;
        writeln!(file, "::1 localhost")?;
        for (ip, names) in entries {
            writeln!(file, "{ip} {}", names.join(" "))?;
        }
        self.hosts = Some(path);
        Ok(())
    }

    /// A command that runs `program` inside `pod`: its cgroup, its network namespace and, after
    /// [`Topology::set_hosts`], the topology's `/etc/hosts`. Start it with [`Topology::spawn`] so
    /// that the topology ends it; `output()`/`status()` are fine for commands that end by themselves.
    pub fn command(&self, pod: &Pod, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        join_cgroup(&mut cmd, &pod.cgroup)?;
        let netns = fs::File::open(&pod.netns_path)
            .with_context(|| format!("open {}", pod.netns_path.display()))?;
        let hosts = match &self.hosts {
            Some(p) => Some(CString::new(p.as_os_str().as_encoded_bytes())?),
            None => None,
        };
        // SAFETY: the closure only makes system calls (setns, unshare, mount) on descriptors and
        // strings prepared before fork, which is async-signal-safe. It runs after the cgroup join.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(hosts) = &hosts {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    let root = c"/";
                    if libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::mount(
                        hosts.as_ptr(),
                        c"/etc/hosts".as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Spawns `cmd` (from [`Topology::command`]), typically a server, and keeps it: dropping the
    /// topology ends and reaps it. Returns its PID. Commands that end by themselves can use
    /// `spawn()`/`output()` on the [`Command`] directly.
    pub fn spawn(&mut self, cmd: &mut Command) -> Result<u32> {
        let child = cmd.spawn().context("spawning a command in a pod")?;
        let pid = child.id();
        self.children.push(child);
        Ok(pid)
    }

    /// Ends the process `pid` started by [`Topology::spawn`] (SIGKILL) and reaps it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut child = self.children.swap_remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process `pid` started by [`Topology::spawn`] is still running.
    pub fn running(&mut self, pid: u32) -> bool {
        self.children
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs `program args...` in `pod` to completion and returns its output.
    pub fn exec(&self, pod: &Pod, program: &str, args: &[&str]) -> Result<Output> {
        self.command(pod, program)?
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("{program} in pod {}", pod.name))
    }

    fn link_name(&self, suffix: &str) -> String {
        let name = format!("{LINK_PREFIX}{}{suffix}", self.id);
        debug_assert!(name.len() <= 15, "link name {name} too long");
        name
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for mut child in self.children.drain(..) {
            // Only processes this topology started, by PID.
            let _ = child.kill();
            let _ = child.wait();
        }
        for pod in self.pods.drain(..).rev() {
            let _ = ip(&["link", "del", &pod.host_link]);
            let _ = ip(&["netns", "del", &pod.netns]);
            remove_cgroup(&pod.cgroup);
        }
        if let Some(node) = self.node_cgroup.take() {
            remove_cgroup(&node);
        }
        if let Some(bridge) = self.bridge.take() {
            let _ = ip(&["link", "del", &bridge]);
        }
        if let Some(cgroup) = self.cgroup.take() {
            remove_cgroup(&cgroup);
        }
        if let Some(hosts) = self.hosts.take() {
            let _ = fs::remove_file(hosts);
        }
    }
}

impl Pod {
    /// A listener on this pod's address, inside its network namespace (the socket belongs to the
    /// namespace it is created in: a short-lived thread joins the namespace to create it).
    pub fn listen(&self, port: u16) -> io::Result<std::net::TcpListener> {
        let netns = self.netns_path.clone();
        let ip = self.ip;
        std::thread::spawn(move || {
            let ns = fs::File::open(&netns)?;
            // SAFETY: setns with a valid namespace descriptor changes this thread's network
            // namespace only; the thread ends after creating the socket.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            std::net::TcpListener::bind((ip, port))
        })
        .join()
        .map_err(|_| io::Error::other("listener thread panicked"))?
    }
}

/// Makes `cmd`'s process join `cgroup` (v2) before it runs the program, so that every socket it
/// creates belongs to that cgroup.
pub fn join_cgroup(cmd: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
    // SAFETY: the closure only writes to a descriptor opened before fork (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            // "0": the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Removes what topologies of processes that no longer exist left behind (a run killed with
/// SIGKILL cannot unwind). Returns what it removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    // Ids are `<pid hex>x<counter hex>`: stale when that PID is gone.
    let stale = |id: &str| -> bool {
        id.split_once('x')
            .and_then(|(pid, _)| u32::from_str_radix(pid, 16).ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if let Some(rest) = name.strip_prefix(PREFIX) {
                if stale(rest.split('-').next().unwrap_or(""))
                    && ip(&["netns", "del", name]).is_ok()
                {
                    removed.push(format!("netns {name}"));
                }
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(name) = line.split(": ").nth(1) else {
                continue;
            };
            let name = name.split('@').next().unwrap_or(name);
            if let Some(rest) = name.strip_prefix(LINK_PREFIX) {
                if stale(rest) && ip(&["link", "del", name]).is_ok() {
                    removed.push(format!("link {name}"));
                }
            }
        }
    }
    if let Ok(root) = sluice_redirect::cgroup2_root() {
        if let Ok(dir) = fs::read_dir(&root) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.strip_prefix(PREFIX).is_some_and(stale) {
                    if let Ok(pods) = fs::read_dir(entry.path()) {
                        for pod in pods.flatten().filter(|p| p.path().is_dir()) {
                            remove_cgroup(&pod.path());
                        }
                    }
                    remove_cgroup(&entry.path());
                    if !entry.path().exists() {
                        removed.push(format!("cgroup {}", entry.path().display()));
                    }
                }
            }
        }
    }
    for entry in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_suffix("-hosts"))
        {
            if stale(rest) && fs::remove_file(entry.path()).is_ok() {
                removed.push(format!("file {}", entry.path().display()));
            }
        }
    }
    removed
}

/// Picks `10.A.B.0/24` (A in 200..=249) that no interface of the host uses.
fn free_subnet(id: &str) -> Result<(u8, u8)> {
    let used = Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .context("ip -4 addr show")?;
    let used = String::from_utf8_lossy(&used.stdout).into_owned();
    let seed = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    for i in 0..2500u32 {
        let k = seed.wrapping_add(i.wrapping_mul(7919)) % 12_500;
        let (a, b) = (200 + (k / 250) as u8, 1 + (k % 250) as u8);
        if !used.contains(&format!(" 10.{a}.{b}.")) {
            return Ok((a, b));
        }
    }
    bail!("no free 10.200-249.x.0/24 subnet on this host")
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Ends whatever is still in `cgroup` (only a topology's own cgroups are passed here) and removes
/// it, waiting a bounded time for the processes to go.
#[allow(clippy::disallowed_methods)] // plain std code without a runtime: a bounded blocking wait
fn remove_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    // cgroup.kill (Linux 5.14+) ends every process in the cgroup.
    let _ = fs::write(cgroup.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("sluice-netns: could not remove {}", cgroup.display());
}
