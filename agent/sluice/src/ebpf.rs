//! `sluice run --redirect ebpf`: installs (or reuses) the pinned eBPF redirect, points it at the
//! outbound listener, keeps its fail-open lease renewed while the proxy serves, keeps the enrolled
//! cgroups in step with the configuration's Pods, answers the proxy's original-destination
//! question, and reports all of it for `/status`.

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use serde_json::{json, Value};
use sluice_policy::Snapshot;
use sluice_proxy::server::OriginalDst;
use sluice_redirect::{Counter, InstallReport, Lease, Maps, Options, ProxyConfig, Redirect};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Flags of `sluice run` that apply with `--redirect ebpf`.
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "eBPF redirect (--redirect ebpf)")]
pub struct EbpfArgs {
    /// The eBPF object built by `cargo xtask build-ebpf` [default: target/bpf/sluice-ebpf.o of
    /// the workspace the binary was built in, or of the current directory].
    #[arg(long, env = "SLUICE_EBPF_OBJECT")]
    pub ebpf_object: Option<PathBuf>,
    /// cgroup v2 directory the programs attach to; only processes below it can be redirected
    /// [default: the cgroup v2 hierarchy's root].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pinned programs, links and maps (reused on restart).
    #[arg(long, default_value = sluice_redirect::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Address pods' connections are rewritten to: an address of the outbound listener that pods
    /// can reach (e.g. the host end of their veth). At most one IPv4 and one IPv6 (repeat or
    /// comma-separate). [default: --outbound-addr's IP, unless it is unspecified]
    #[arg(long, value_delimiter = ',')]
    pub proxy_ip: Vec<IpAddr>,
    /// Destination ports never redirected (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs never redirected (comma-separated, e.g. 10.0.0.0/8,fd00::/8).
    #[arg(long, value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<Cidr>,
    /// How long redirection outlives the agent's last renewal: a stopped or killed proxy fails
    /// open after at most this (renewed every quarter of it).
    #[arg(long, default_value = "1s", value_parser = crate::run::parse_duration)]
    pub lease: Duration,
    /// Log one line per redirected connect() from the programs (busy nodes: keep off).
    #[arg(long)]
    pub ebpf_debug_log: bool,
    /// No sk_msg fast path: redirected connections go pod -> proxy over TCP instead of socket to
    /// socket. Saves the two SOCKHASH inserts (about 3.5 us here) each redirected connect() makes;
    /// costs every request on the connection the TCP stack both ways (`cargo xtask
    /// bench-redirect` measures both).
    #[arg(long)]
    pub no_sockmap: bool,
}

impl EbpfArgs {
    /// Flags the operator set that only mean something with `--redirect ebpf`.
    pub fn ebpf_only_flags(&self) -> Vec<&'static str> {
        let mut set = Vec::new();
        if self.ebpf_object.is_some() {
            set.push("--ebpf-object");
        }
        if self.cgroup.is_some() {
            set.push("--cgroup");
        }
        if !self.proxy_ip.is_empty() {
            set.push("--proxy-ip");
        }
        if !self.exclude_ports.is_empty() {
            set.push("--exclude-ports");
        }
        if !self.exclude_cidrs.is_empty() {
            set.push("--exclude-cidrs");
        }
        if self.ebpf_debug_log {
            set.push("--ebpf-debug-log");
        }
        if self.no_sockmap {
            set.push("--no-sockmap");
        }
        set
    }
}

/// An address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub IpAddr, pub u8);

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip
        .trim()
        .parse()
        .map_err(|_| format!("{s:?}: not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        None => max,
    };
    Ok(Cidr(ip, len))
}

/// The object's default location: `target/bpf/sluice-ebpf.o` next to the binary's target
/// directory (`target/debug/sluice` -> `target/bpf/`), or under the current directory.
fn default_object() -> Result<PathBuf> {
    let name = Path::new(sluice_redirect::DEFAULT_OBJECT);
    let mut tried: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_owned))
    {
        for anc in dir.ancestors().take(4) {
            tried.push(anc.join("bpf").join(name.file_name().unwrap_or_default()));
            tried.push(anc.join(name));
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        tried.push(cwd.join(name));
    }
    tried.dedup();
    if let Some(found) = tried.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let list: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "--redirect ebpf: the eBPF object is not built (looked in {}): run `cargo xtask build-ebpf` in the Sluice workspace, or pass --ebpf-object PATH",
        list.join(", ")
    )
}

/// The addresses pods' connections are rewritten to, checked against the outbound listener.
fn proxy_addrs(
    outbound: SocketAddr,
    ips: &[IpAddr],
) -> Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let ips: Vec<IpAddr> = if ips.is_empty() {
        if outbound.ip().is_unspecified() {
            bail!(
                "--redirect ebpf: --outbound-addr {outbound} listens on every address, so Sluice cannot tell which one pods reach: pass --proxy-ip (an address of this node that pods can reach, e.g. the host end of their veth)"
            );
        }
        vec![outbound.ip()]
    } else {
        ips.to_vec()
    };
    let (mut v4, mut v6) = (None, None);
    for ip in ips {
        let slot = if ip.is_ipv4() { &mut v4 } else { &mut v6 };
        if slot.is_some() {
            bail!("--proxy-ip: at most one IPv4 and one IPv6 address");
        }
        if ip.is_unspecified() {
            bail!("--proxy-ip {ip}: connections need a concrete address to go to");
        }
        let reachable = match outbound.ip() {
            IpAddr::V4(a) if a.is_unspecified() => ip.is_ipv4(),
            // An IPv6 wildcard listener is dual-stack on Linux (bindv6only=0).
            IpAddr::V6(a) if a.is_unspecified() => true,
            a => a == ip,
        };
        if !reachable {
            bail!(
                "--proxy-ip {ip}: the outbound listener ({outbound}) does not accept connections to {ip}; pass --outbound-addr {} or a --proxy-ip the listener is bound to",
                if ip.is_ipv4() { format!("0.0.0.0:{}", outbound.port()) } else { format!("[::]:{}", outbound.port()) }
            );
        }
        if ip.is_loopback() {
            tracing::warn!(
                "redirect target {ip} is a loopback address: only enrolled processes in the host's network namespace can reach it, pods in their own network namespace cannot (pass --proxy-ip with an address they reach)"
            );
        }
        *slot = Some(SocketAddr::new(ip, outbound.port()));
    }
    Ok((v4, v6))
}

/// The installed redirect, shared by the lease task, the reload loop, the proxy and `/status`.
pub struct EbpfRedirect {
    maps: Arc<Maps>,
    /// Kept for the programs' aya-log lines.
    redirect: Mutex<Redirect>,
    object: PathBuf,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    report: InstallReport,
    lease: Duration,
    renew_every: Duration,
    enrollment: Mutex<Enrollment>,
    lookups: Arc<Lookups>,
}

/// Whether the outbound listener's accept loop makes progress, from its accept queue and the
/// count of accepted connections. A runtime that still runs timers while its accept loop is
/// stuck (a hung task, `accept()` failing with EMFILE) must fail open like a dead proxy.
pub struct AcceptWatch {
    /// A second descriptor of the listening socket.
    listener: socket2::Socket,
    accepted: Arc<AtomicU64>,
    /// The last check: (connections waiting, accepted so far).
    last: Option<(u32, u64)>,
}

/// What one [`AcceptWatch::check`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    Ok,
    /// Connections waited at the last check and still wait, and none was accepted since.
    Stalled {
        queued: u32,
    },
    /// The queue could not be read (renewal goes on: the runtime serves).
    Unknown,
}

impl AcceptWatch {
    pub fn new(listener: &tokio::net::TcpListener, accepted: Arc<AtomicU64>) -> Result<Self> {
        let listener = socket2::SockRef::from(listener)
            .try_clone()
            .context("duplicating the outbound listener's descriptor")?;
        Ok(AcceptWatch {
            listener,
            accepted,
            last: None,
        })
    }

    /// Called once per renewal period.
    pub fn check(&mut self) -> Progress {
        use std::os::fd::AsFd as _;
        let queued = match sluice_redirect::accept_queue_len(self.listener.as_fd()) {
            Ok(q) => q,
            Err(err) => {
                tracing::debug!(%err, "cannot read the outbound listener's accept queue");
                self.last = None;
                return Progress::Unknown;
            }
        };
        let now = (queued, self.accepted.load(Ordering::Relaxed));
        let progress = stalled(self.last, now);
        self.last = Some(now);
        progress
    }
}

/// Stalled: connections waited at the previous check and wait now, and the accepted count did
/// not move in between (a serving loop accepts within microseconds).
fn stalled(last: Option<(u32, u64)>, now: (u32, u64)) -> Progress {
    match last {
        Some((waited, accepted)) if waited > 0 && now.0 > 0 && now.1 == accepted => {
            Progress::Stalled { queued: now.0 }
        }
        _ => Progress::Ok,
    }
}

/// Pods as last applied to the enrollment map, and problems already warned about.
#[derive(Default)]
struct Enrollment {
    /// `namespace/name` -> (cgroup directory, cgroup id).
    pods: BTreeMap<String, (PathBuf, u64)>,
    /// `namespace/name` -> why an enrolled pod is not redirected.
    problems: BTreeMap<String, String>,
    /// The last map error, logged once.
    error: Option<String>,
}

/// How the proxy learned accepted connections' original destinations.
#[derive(Default)]
struct Lookups {
    map: AtomicU64,
    sockopt: AtomicU64,
    unknown: AtomicU64,
}

impl EbpfRedirect {
    /// Installs or reuses the pinned programs and maps and points them at the proxy. Redirection
    /// stays off (lease not yet renewed) until [`EbpfRedirect::keep_lease`] runs.
    pub fn install(args: &EbpfArgs, outbound: SocketAddr) -> Result<Arc<Self>> {
        let (v4, v6) = proxy_addrs(outbound, &args.proxy_ip)?;
        let object = match &args.ebpf_object {
            Some(p) if !p.is_file() => bail!(
                "--ebpf-object {}: no such file (build it with `cargo xtask build-ebpf`)",
                p.display()
            ),
            Some(p) => p.clone(),
            None => default_object()?,
        };
        let cgroup = match &args.cgroup {
            Some(c) => c.clone(),
            None => sluice_redirect::cgroup2_root()
                .context("--redirect ebpf needs a cgroup v2 hierarchy (or pass --cgroup DIR)")?,
        };
        if args.lease < Duration::from_millis(100) {
            bail!("--lease {:?}: at least 100ms", args.lease);
        }
        let opts = Options {
            object: object.clone(),
            cgroup: cgroup.clone(),
            pin_dir: args.pin_dir.clone(),
        };
        let redirect = sluice_redirect::install(&opts).with_context(|| {
            format!(
                "installing the eBPF redirect (object {}, cgroup {}, pins {}); it needs root",
                object.display(),
                cgroup.display(),
                args.pin_dir.display()
            )
        })?;
        let report = redirect.report().clone();
        if !report.replaced.is_empty() {
            tracing::warn!(
                "replaced pins of an older layout under {}: {}",
                args.pin_dir.display(),
                report.replaced.join("; ")
            );
        }
        tracing::info!(
            "eBPF redirect installed (cgroup {}, pins {}): attached [{}], reused [{}], upgraded in place [{}]",
            cgroup.display(),
            args.pin_dir.display(),
            report.attached.join(", "),
            report.reused.join(", "),
            report.upgraded.join(", "),
        );
        let maps = Arc::new(Maps::open(&args.pin_dir)?);
        maps.set_proxy(v4, v6, true)?;
        maps.set_debug_log(args.ebpf_debug_log)?;
        maps.set_sockmap(!args.no_sockmap)?;
        maps.set_excluded_ports(&args.exclude_ports)?;
        let cidrs: Vec<(IpAddr, u8)> = args.exclude_cidrs.iter().map(|c| (c.0, c.1)).collect();
        maps.set_excluded_cidrs(&cidrs)?;
        let show = |a: Option<SocketAddr>| a.map_or("none".to_string(), |a| a.to_string());
        let cidr_list: Vec<String> = args.exclude_cidrs.iter().map(Cidr::to_string).collect();
        tracing::info!(
            "redirect target: IPv4 {}, IPv6 {}; excluded ports [{}], excluded CIDRs [{}]",
            show(v4),
            show(v6),
            args.exclude_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            cidr_list.join(", "),
        );
        Ok(Arc::new(EbpfRedirect {
            maps,
            redirect: Mutex::new(redirect),
            object,
            cgroup,
            pin_dir: args.pin_dir.clone(),
            report,
            lease: args.lease,
            renew_every: args.lease / 4,
            enrollment: Mutex::new(Enrollment::default()),
            lookups: Arc::new(Lookups::default()),
        }))
    }

    /// The proxy's original-destination lookup.
    pub fn original_dst(&self) -> Arc<dyn OriginalDst> {
        Arc::new(OrigDst {
            maps: self.maps.clone(),
            lookups: self.lookups.clone(),
        })
    }

    /// Renews the lease every quarter of it until `shutdown` (run it on the proxy's runtime, once
    /// the outbound listener is bound): redirection lasts only while this task runs and the
    /// listener's accept loop makes progress (`watch`).
    pub async fn keep_lease(
        self: Arc<Self>,
        mut watch: AcceptWatch,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut state: Option<bool> = None; // last renewal's outcome
        let mut stalled = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            match watch.check() {
                Progress::Stalled { queued } => {
                    if !stalled {
                        tracing::warn!(
                            queued,
                            "the outbound listener accepted nothing for {:?} while connections waited: not renewing the redirect lease, so enrolled pods fail open",
                            self.renew_every
                        );
                        stalled = true;
                    }
                }
                Progress::Ok if stalled => {
                    tracing::info!(
                        "the outbound listener accepts again: renewing the redirect lease"
                    );
                    stalled = false;
                }
                Progress::Ok | Progress::Unknown => {}
            }
            let renewal = if stalled {
                None
            } else {
                Some(self.maps.renew_lease(self.lease))
            };
            match renewal {
                Some(Ok(())) if state != Some(true) => {
                    tracing::info!(
                        "redirect lease renewed every {:?} for {:?}: enrolled pods are redirected while the proxy serves",
                        self.renew_every,
                        self.lease
                    );
                    state = Some(true);
                }
                Some(Err(err)) if state != Some(false) => {
                    tracing::warn!(%err, "cannot renew the redirect lease: enrolled pods fail open until it is renewed");
                    state = Some(false);
                }
                _ => {}
            }
            self.redirect.lock().flush_logs();
        }
    }

    /// Graceful stop: turns redirection off first, so new connections go to their original
    /// destinations while the proxy drains.
    pub fn stop(&self) {
        match self
            .maps
            .set_enabled(false)
            .and_then(|()| self.maps.end_lease())
        {
            Ok(()) => tracing::info!(
                "redirection disabled: new connections from enrolled pods go to their original destination (fail open)"
            ),
            Err(err) => tracing::warn!(%err, "cannot disable redirection; it fails open when the lease runs out"),
        }
    }

    /// Brings the enrollment map in step with `snapshot`'s enrolled Pods that name a cgroup
    /// (`sluice.io/cgroup`): enrolls new ones, releases the rest, including cgroups a previous run
    /// left enrolled. Blocking (stat and bpf calls): run it off the proxy's thread. Cheap enough
    /// to run on every config poll, which also catches a pod's cgroup directory appearing late.
    pub fn sync_enrollment(&self, snapshot: &Snapshot) {
        let root = sluice_redirect::cgroup2_root().ok();
        let mut want: BTreeMap<String, (PathBuf, u64)> = BTreeMap::new();
        let mut problems: BTreeMap<String, String> = BTreeMap::new();
        for (key, w) in &snapshot.workloads {
            if !w.enrolled {
                continue;
            }
            let Some(dir) = &w.cgroup else {
                problems.insert(
                    key.clone(),
                    format!("no {} annotation", sluice_config::CGROUP_ANNOTATION),
                );
                continue;
            };
            // Relative paths are relative to the cgroup v2 mount.
            let dir = match (&root, dir.is_relative()) {
                (Some(root), true) => root.join(dir),
                _ => dir.clone(),
            };
            match sluice_redirect::cgroup_id(&dir) {
                Ok(id) if dir.is_dir() => {
                    want.insert(key.clone(), (dir, id));
                }
                _ => {
                    problems.insert(
                        key.clone(),
                        format!(
                            "{} {} does not exist",
                            sluice_config::CGROUP_ANNOTATION,
                            dir.display()
                        ),
                    );
                }
            }
        }

        let mut st = self.enrollment.lock();
        for (pod, why) in &problems {
            if st.problems.get(pod) != Some(why) {
                tracing::warn!(
                    "pod {pod} is enrolled but its connections are not redirected: {why}"
                );
            }
        }
        st.problems = problems;

        let in_map: BTreeSet<u64> = self.maps.enrolled_cgroups().into_iter().collect();
        let want_ids: BTreeSet<u64> = want.values().map(|(_, id)| *id).collect();
        let mut error = None;
        for id in in_map.difference(&want_ids) {
            let who = st
                .pods
                .iter()
                .find(|(_, (_, known))| known == id)
                .map(|(pod, (dir, _))| (pod.clone(), dir.clone()));
            match self.maps.release_cgroup_id(*id) {
                Ok(()) => match who {
                    Some((pod, dir)) => {
                        tracing::info!("released pod {pod}: cgroup {} (id {id})", dir.display())
                    }
                    None => {
                        tracing::info!("released cgroup id {id} left enrolled by a previous run")
                    }
                },
                Err(err) => error = Some(err.to_string()),
            }
        }
        for (pod, (dir, id)) in &want {
            if in_map.contains(id) {
                if !st.pods.contains_key(pod) {
                    tracing::info!(
                        "enrolled pod {pod}: cgroup {} (id {id}), already in the pinned map",
                        dir.display()
                    );
                }
                continue;
            }
            match self.maps.enroll_cgroup_id(*id) {
                Ok(()) => {
                    tracing::info!("enrolled pod {pod}: cgroup {} (id {id})", dir.display())
                }
                Err(err) => error = Some(err.to_string()),
            }
        }
        if let Some(err) = &error {
            if st.error.as_ref() != Some(err) {
                tracing::warn!("updating the enrollment map: {err} (retried on the next poll)");
            }
        }
        st.error = error;
        // What the map holds now, by pod (a failed update is retried next time).
        let now: BTreeSet<u64> = self.maps.enrolled_cgroups().into_iter().collect();
        st.pods = want
            .into_iter()
            .filter(|(_, (_, id))| now.contains(id))
            .collect();
    }

    /// `/status`'s `redirect` object.
    pub fn status(&self) -> Value {
        let cfg = self.maps.config().ok();
        let (v4, v6) = self.maps.proxy_addrs().unwrap_or((None, None));
        let lease = match self.maps.lease() {
            Ok(Lease::Valid(left)) => {
                json!({"state": "valid", "remaining_ms": left.as_millis() as u64})
            }
            Ok(Lease::Expired(ago)) => {
                json!({"state": "expired", "expired_ms_ago": ago.as_millis() as u64})
            }
            Ok(Lease::None) => json!({"state": "none"}),
            Err(e) => json!({"state": "unknown", "error": e.to_string()}),
        };
        let mut lease = lease;
        lease["duration_ms"] = json!(self.lease.as_millis() as u64);
        lease["renew_every_ms"] = json!(self.renew_every.as_millis() as u64);
        let st = self.enrollment.lock();
        let enrolled: Vec<Value> = st
            .pods
            .iter()
            .map(|(pod, (dir, id))| json!({"pod": pod, "cgroup": dir.display().to_string(), "cgroup_id": id}))
            .collect();
        let not_redirected: Vec<Value> = st
            .problems
            .iter()
            .map(|(pod, why)| json!({"pod": pod, "reason": why}))
            .collect();
        let map_error = st.error.clone();
        drop(st);
        let counters: serde_json::Map<String, Value> = match self.maps.counters() {
            Ok(list) => list
                .into_iter()
                .map(|(c, v): (Counter, u64)| (c.name().to_string(), json!(v)))
                .collect(),
            Err(_) => serde_json::Map::new(),
        };
        let cidrs: Vec<String> = self
            .maps
            .excluded_cidrs()
            .into_iter()
            .map(|(ip, len)| Cidr(ip, len).to_string())
            .collect();
        json!({
            "mode": "ebpf",
            "object": self.object.display().to_string(),
            "cgroup": self.cgroup.display().to_string(),
            "pin_dir": self.pin_dir.display().to_string(),
            "programs": {
                "attached": self.report.attached,
                "reused": self.report.reused,
                "upgraded": self.report.upgraded,
                "replaced_maps": self.report.replaced,
            },
            "proxy": {
                "ipv4": v4.map(|a| a.to_string()),
                "ipv6": v6.map(|a| a.to_string()),
            },
            "enabled": cfg.is_some_and(|c| c.enabled()),
            "sockmap": cfg.is_some_and(|c| c.flags & ProxyConfig::NO_SOCKMAP == 0),
            "lease": lease,
            "enrolled": enrolled,
            "not_redirected": not_redirected,
            "enrollment_error": map_error,
            "exclusions": {
                "ports": self.maps.excluded_ports(),
                "cidrs": cidrs,
            },
            "counters": counters,
            "original_dst": {
                "from_map": self.lookups.map.load(Ordering::Relaxed),
                "from_sockopt": self.lookups.sockopt.load(Ordering::Relaxed),
                "unknown": self.lookups.unknown.load(Ordering::Relaxed),
            },
        })
    }
}

/// The proxy's side of redirection: the 4-tuple map first (filled by `sock_ops` for redirected
/// pods; the `cgroup/getsockopt` program only answers processes inside the attached cgroup, which
/// the agent usually is not), then `getsockopt(SO_ORIGINAL_DST)` on the accepted socket, which also
/// covers iptables `REDIRECT`.
struct OrigDst {
    maps: Arc<Maps>,
    lookups: Arc<Lookups>,
}

impl OriginalDst for OrigDst {
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr> {
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
            return None;
        };
        if let Some(dst) = self.maps.original_dst(peer, local) {
            self.lookups.map.fetch_add(1, Ordering::Relaxed);
            return Some(dst);
        }
        let sock = socket2::SockRef::from(stream);
        let v4_conn = local.is_ipv4() || peer.ip().to_canonical().is_ipv4();
        let found = if v4_conn {
            sock.original_dst_v4().or_else(|_| sock.original_dst_v6())
        } else {
            sock.original_dst_v6()
        };
        let dst = found
            .ok()
            .and_then(|a| a.as_socket())
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            // Not NATed: conntrack reports the socket's own address.
            .filter(|a| {
                *a != local && *a != SocketAddr::new(local.ip().to_canonical(), local.port())
            });
        match dst {
            Some(_) => self.lookups.sockopt.fetch_add(1, Ordering::Relaxed),
            None => self.lookups.unknown.fetch_add(1, Ordering::Relaxed),
        };
        dst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real listener with a connection the kernel queued: stalled once it waits across two
    /// checks with nothing accepted; fine again once the loop accepts; a busy loop (queue never
    /// empty, count moving) is not stalled.
    #[tokio::test(flavor = "current_thread")]
    async fn accept_watch_sees_a_stuck_accept_loop_on_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let mut watch = AcceptWatch::new(&listener, accepted.clone()).unwrap();
        assert_eq!(watch.check(), Progress::Ok);
        assert_eq!(watch.check(), Progress::Ok, "nothing waiting");

        // Blocking connects on loopback complete at once: the kernel queues them unaccepted.
        let c1 = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(
            watch.check(),
            Progress::Ok,
            "first sight of a waiting connection"
        );
        assert_eq!(watch.check(), Progress::Stalled { queued: 1 });
        assert_eq!(watch.check(), Progress::Stalled { queued: 1 });

        // A busy loop: it accepts, but the queue is never empty at a check.
        let _c2 = std::net::TcpStream::connect(addr).unwrap();
        let (_s1, _) = listener.accept().await.unwrap();
        accepted.fetch_add(1, Ordering::Relaxed);
        assert_eq!(
            watch.check(),
            Progress::Ok,
            "accepted one since the last check"
        );

        let (_s2, _) = listener.accept().await.unwrap();
        accepted.fetch_add(1, Ordering::Relaxed);
        assert_eq!(watch.check(), Progress::Ok, "queue drained");
        assert_eq!(watch.check(), Progress::Ok);
        drop(c1);
    }

    #[test]
    fn accept_queue_of_a_connected_socket_is_an_error() {
        use std::os::fd::AsFd as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(sluice_redirect::accept_queue_len(c.as_fd()).is_err());
        assert_eq!(sluice_redirect::accept_queue_len(l.as_fd()).unwrap(), 1);
    }

    #[test]
    fn cidrs() {
        assert_eq!(
            parse_cidr("10.0.0.0/8"),
            Ok(Cidr("10.0.0.0".parse().unwrap(), 8))
        );
        assert_eq!(
            parse_cidr("fd00::1"),
            Ok(Cidr("fd00::1".parse().unwrap(), 128))
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("pricing/8").is_err());
        assert_eq!(
            parse_cidr("192.0.2.0/24").unwrap().to_string(),
            "192.0.2.0/24"
        );
    }

    #[test]
    fn proxy_address_comes_from_the_listener_or_must_match_it() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            proxy_addrs(a("10.0.0.1:15001"), &[]).unwrap(),
            (Some(a("10.0.0.1:15001")), None)
        );
        let err = proxy_addrs(a("0.0.0.0:15001"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--proxy-ip"), "{err}");
        assert_eq!(
            proxy_addrs(a("0.0.0.0:15001"), &[ip("10.0.0.1")]).unwrap(),
            (Some(a("10.0.0.1:15001")), None)
        );
        assert!(proxy_addrs(a("0.0.0.0:15001"), &[ip("fd00::1")]).is_err());
        assert_eq!(
            proxy_addrs(a("[::]:15001"), &[ip("10.0.0.1"), ip("fd00::1")]).unwrap(),
            (Some(a("10.0.0.1:15001")), Some(a("[fd00::1]:15001")))
        );
        let err = proxy_addrs(a("10.0.0.1:15001"), &[ip("10.0.0.2")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("0.0.0.0:15001"), "{err}");
        assert!(proxy_addrs(a("[::]:15001"), &[ip("10.0.0.1"), ip("10.0.0.2")]).is_err());
    }
}
