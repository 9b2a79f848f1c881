//! Throwaway "pods" on this machine, for end-to-end tests, benchmarks and the demo.
//!
//! A [`Topology`] is one Linux bridge in the host network namespace (the node), holding the host's
//! address `10.A.B.1/24`, and one cgroup v2 directory, `<cgroup2 root>/sluice-<id>`, under which every
//! pod gets its own cgroup: attach Sluice's cgroup programs to [`Topology::cgroup`] and only this
//! topology's pods are affected, so topologies of tests running in parallel do not meet. A [`Pod`] is
//! a network namespace with a veth pair to the bridge (`eth0`, `10.A.B.n/24`, loopback up) and its
//! cgroup. [`Topology::create_dual_stack`] adds IPv6: a ULA `/64` per topology, `fd00:5c:A:B::/64`
//! (derived from the IPv4 subnet), with the host at `::1` on the bridge and each pod at `::n` on its
//! `eth0` ([`Pod::ip6`], [`Topology::host_ip6`]), added without duplicate address detection so the
//! addresses are usable at once. [`Topology::command`] builds a [`Command`] that runs inside a pod: the child joins the
//! pod's cgroup, then its network namespace, and (when [`Topology::set_hosts`] was called) sees the
//! topology's own `/etc/hosts` in a private mount namespace, so `curl http://product/` resolves as in
//! a cluster.
//!
//! [`Topology::add_kubelet_pod`] lays a pod's cgroups out as kubelet does (a BestEffort pod, either
//! cgroup driver, its process in a container cgroup below the pod-level one) under the topology's
//! cgroup, and gives it a `metadata.uid`, so the agent can find it from a Pod object without the
//! `sluice.io/cgroup` annotation (`--cgroup-root` the topology's cgroup).
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
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
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

/// Whether a test that needs what `reason` says is missing should return early: `false` when
/// nothing is missing; under `CI` it panics instead (such tests must run there); elsewhere it
/// prints why and says skip.
pub fn skip_because(reason: Option<String>) -> bool {
    match reason {
        None => false,
        Some(why) if std::env::var_os("CI").is_some() => panic!("cannot run under CI: {why}"),
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
    }
}

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

/// `Some(reason)` when [`Topology::create_dual_stack`] cannot work here: [`cannot_run`]'s reasons,
/// or IPv6 is not available (no IPv6 in the kernel, or `net.ipv6.conf.all.disable_ipv6=1`).
pub fn cannot_run_ipv6() -> Option<String> {
    if let Some(why) = cannot_run() {
        return Some(why);
    }
    match fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6") {
        Err(_) => Some("this kernel has no IPv6 (/proc/sys/net/ipv6 is missing)".into()),
        Ok(v) if v.trim() != "0" => {
            Some("IPv6 is disabled on this host (net.ipv6.conf.all.disable_ipv6=1)".into())
        }
        Ok(_) => None,
    }
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
    /// The pod's cgroup v2 directory, where its processes run (what the `sluice.io/cgroup`
    /// annotation names); for a kubelet-shaped pod its container's cgroup.
    pub cgroup: PathBuf,
    /// A kubelet-shaped pod's `metadata.uid` ([`Topology::add_kubelet_pod`]).
    pub uid: Option<String>,
    /// The pod's address on the bridge.
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address on the bridge (`fd00:5c:A:B::n/64`) in a dual-stack topology
    /// ([`Topology::create_dual_stack`]); `None` otherwise.
    pub ip6: Option<Ipv6Addr>,
    /// The host end of the pod's veth.
    host_link: String,
}

/// kubelet's cgroup driver: how [`Topology::add_kubelet_pod`] names a pod's cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

/// A bridge, a parent cgroup and the pods on them. See the crate documentation.
pub struct Topology {
    id: String,
    bridge: Option<String>,
    subnet: (u8, u8),
    ipv6: bool,
    cgroup: Option<PathBuf>,
    pods: Vec<Pod>,
    children: Vec<Child>,
    hosts: Option<PathBuf>,
    node_cgroup: Option<PathBuf>,
}

impl Topology {
    /// Creates the bridge (with the host's address) and the parent cgroup. IPv4 only.
    pub fn create() -> Result<Self> {
        Self::build(false)
    }

    /// As [`Topology::create`], plus IPv6: the bridge also holds [`Topology::host_ip6`] and every
    /// pod also gets [`Pod::ip6`] (see the crate documentation).
    pub fn create_dual_stack() -> Result<Self> {
        Self::build(true)
    }

    fn build(ipv6: bool) -> Result<Self> {
        let unavailable = if ipv6 {
            cannot_run_ipv6()
        } else {
            cannot_run()
        };
        if let Some(why) = unavailable {
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
            ipv6,
            cgroup: None,
            pods: Vec::new(),
            children: Vec::new(),
            hosts: None,
            node_cgroup: None,
        };
        let bridge = topo.link_name("b");
        // A bridge without an address of its own takes the lowest MAC among its ports, so adding
        // a pod can change it; pods that cached the old one (recent traffic keeps the entry
        // REACHABLE for up to 45 s) then send to a MAC the host drops as not its own, and their
        // connections to the node stall until ARP re-resolves (seen as a demo request hanging
        // for 5 s right after new pods were added). A fixed address keeps it stable, as CNI
        // bridge plugins set one for the same reason.
        let mac = topo.bridge_mac();
        ip(&["link", "add", &bridge, "address", &mac, "type", "bridge"])?;
        topo.bridge = Some(bridge.clone());
        ip(&[
            "addr",
            "add",
            &format!("{}/24", topo.host_ip()),
            "dev",
            &bridge,
        ])?;
        if let Some(host6) = topo.host_ip6() {
            // nodad: usable at once (nothing else on this bridge can hold the address).
            ip(&[
                "addr",
                "add",
                &format!("{host6}/64"),
                "dev",
                &bridge,
                "nodad",
            ])?;
        }
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

    /// The bridge's MAC address, fixed for the topology's life: `02:5c:A:B:00:01` (locally
    /// administered, from the subnet).
    pub fn bridge_mac(&self) -> String {
        format!("02:5c:{:02x}:{:02x}:00:01", self.subnet.0, self.subnet.1)
    }

    /// The node's address on the bridge (`10.A.B.1`): where pods reach host listeners.
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, 1)
    }

    /// The node's IPv6 address on the bridge (`fd00:5c:A:B::1`) in a dual-stack topology: where
    /// pods reach host listeners over IPv6. `None` for [`Topology::create`].
    pub fn host_ip6(&self) -> Option<Ipv6Addr> {
        self.ipv6.then(|| self.ip6(1))
    }

    /// `fd00:5c:A:B::n` for the IPv4 subnet `10.A.B.0/24`.
    fn ip6(&self, n: u16) -> Ipv6Addr {
        ip6_in(self.subnet, n)
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
        let ip6 = self.ipv6.then(|| self.ip6(index as u16));
        let cgroup = self.cgroup().join(name);

        ip(&["netns", "add", &netns])?;
        // Recorded at once so that Drop removes it whatever fails next.
        self.pods.push(Pod {
            name: name.into(),
            netns: netns.clone(),
            netns_path: Path::new("/run/netns").join(&netns),
            cgroup: cgroup.clone(),
            uid: None,
            ip: ip_addr,
            ip6,
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
        if let Some(ip6) = ip6 {
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        fs::create_dir(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        Ok(self.pods.last().expect("pushed").clone())
    }

    /// Adds a pod as [`Topology::add_pod`] does, with its cgroups where kubelet puts a BestEffort
    /// pod's under the topology's cgroup (the node's cgroup root in this picture), with `driver`'s
    /// names: systemd `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid
    /// with _>.slice/cri-containerd-<id>.scope`, cgroupfs `kubepods/besteffort/pod<uid>/<id>`.
    /// Its processes run in the container cgroup ([`Pod::cgroup`]); [`Pod::uid`] is the uid to
    /// put in its Pod object (with `status.qosClass: BestEffort`).
    pub fn add_kubelet_pod(&mut self, name: &str, driver: CgroupDriver) -> Result<Pod> {
        static UIDS: AtomicU32 = AtomicU32::new(0);
        let n = UIDS.fetch_add(1, Ordering::Relaxed);
        let uid = format!("{:08x}-5c1c-4e00-8000-{n:012x}", std::process::id());
        let container = format!("{:032x}{n:032x}", std::process::id());
        let rel = match driver {
            CgroupDriver::Systemd => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container}.scope",
                uid.replace('-', "_")
            ),
            CgroupDriver::Cgroupfs => format!("kubepods/besteffort/pod{uid}/{container}"),
        };
        let mut pod = self.add_pod(name)?;
        // The flat cgroup add_pod made is not used.
        remove_cgroup(&pod.cgroup);
        pod.cgroup = self.cgroup().join(rel);
        pod.uid = Some(uid);
        *self.pods.last_mut().expect("added") = pod.clone();
        fs::create_dir_all(&pod.cgroup)
            .with_context(|| format!("mkdir {}", pod.cgroup.display()))?;
        Ok(pod)
    }

    /// Adds `addr` to `pod`'s `eth0` as one more address of its own (`/32` or `/128`, no duplicate
    /// address detection), e.g. a Service's cluster IP the pod answers for directly, standing in for
    /// kube-proxy. Other pods reach it when it lies in the topology's subnet (on-link). It goes with
    /// the pod's network namespace.
    pub fn add_address(&self, pod: &Pod, addr: IpAddr) -> Result<()> {
        let mut args = vec!["-n", &pod.netns, "addr", "add"];
        let with_len = match addr {
            IpAddr::V4(a) => format!("{a}/32"),
            IpAddr::V6(a) => format!("{a}/128"),
        };
        args.extend([with_len.as_str(), "dev", "eth0"]);
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ip(&args)
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
    /// their cluster IPs (IPv4, IPv6 or both: `Ipv4Addr`, `Ipv6Addr` or `IpAddr`). Applies to
    /// commands built afterwards.
    pub fn set_hosts<A: Copy + Into<IpAddr>>(
        &mut self,
        entries: &[(A, Vec<String>)],
    ) -> Result<()> {
        let path = std::env::temp_dir().join(format!("{PREFIX}{}-hosts", self.id));
        let mut file = fs::File::create(&path)?;
        writeln!(file, "127.0.0.1 localhost")?;
        writeln!(file, "::1 localhost")?;
        for (ip, names) in entries {
            let ip: IpAddr = (*ip).into();
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
        // kubelet-shaped pods' levels (and anything a test made below them).
        if let Some(cgroup) = &self.cgroup {
            for tree in ["kubepods.slice", "kubepods"] {
                remove_cgroup_tree(&cgroup.join(tree));
            }
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
        self.listen_on(IpAddr::V4(self.ip), port)
    }

    /// A listener on `ip` (one of this pod's addresses, e.g. [`Pod::ip6`], or `::` for all of
    /// them, IPv4 included), inside the pod's network namespace, as [`Pod::listen`].
    pub fn listen_on(&self, ip: IpAddr, port: u16) -> io::Result<std::net::TcpListener> {
        let netns = self.netns_path.clone();
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
                    remove_cgroup_tree(&entry.path());
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

/// `fd00:5c:A:B::n`: the IPv6 twin of `10.A.B.n`.
fn ip6_in(subnet: (u8, u8), n: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x5c, subnet.0.into(), subnet.1.into(), 0, 0, 0, n)
}

/// Picks `10.A.B.0/24` (A in 200..=249) that no interface of the host uses, nor its IPv6 twin
/// `fd00:5c:A:B::/64`.
fn free_subnet(id: &str) -> Result<(u8, u8)> {
    let used = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .context("ip addr show")?;
    let used = String::from_utf8_lossy(&used.stdout).into_owned();
    let seed = id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
    for i in 0..2500u32 {
        let k = seed.wrapping_add(i.wrapping_mul(7919)) % 12_500;
        let (a, b) = (200 + (k / 250) as u8, 1 + (k % 250) as u8);
        let prefix6 = ip6_in((a, b), 0).to_string(); // `fd00:5c:A:B::`
        if !used.contains(&format!(" 10.{a}.{b}.")) && !used.contains(&format!(" {prefix6}")) {
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
/// Removes a cgroup and everything below it, deepest first.
fn remove_cgroup_tree(cgroup: &Path) {
    if let Ok(children) = fs::read_dir(cgroup) {
        for child in children.flatten().filter(|c| c.path().is_dir()) {
            remove_cgroup_tree(&child.path());
        }
    }
    remove_cgroup(cgroup);
}

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
