//! `sluice run --redirect ebpf`: installs (or reuses) the pinned eBPF redirect, points it at the
//! outbound listener, keeps its fail-open lease renewed while the proxy serves, keeps the enrolled
//! cgroups in step with the configuration's Pods, answers the proxy's original-destination
//! question, and reports all of it for `/status`.

use anyhow::{bail, Context, Result};
use sluice_admin_api as api;
use sluice_policy::Snapshot;
use sluice_proxy::server::OriginalDst;
use sluice_redirect::enroll::{DesiredPod, Enroller};
use sluice_redirect::origdst::OriginalDstLookup;
use sluice_redirect::{Counter, InstallReport, Lease, Maps, Options, ProxyConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
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
    /// cgroup v2 directory under which enrolled pods' cgroups are looked for (kubelet's
    /// `kubepods` tree, found at any depth; relative `sluice.io/cgroup` annotations are under it)
    /// [default: the cgroup v2 hierarchy's root].
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// How often enrollment and the installation are checked against the kernel (pinned maps
    /// and links, program tags, cgroup ids) and repaired.
    #[arg(long, default_value = "5s", value_parser = crate::run::parse_duration)]
    pub reconcile_interval: Duration,
    /// bpffs directory for pinned programs, links and maps (reused on restart).
    #[arg(long, default_value = sluice_redirect::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// Address pods' connections are rewritten to: an address of the outbound listener that pods
    /// can reach (e.g. the host end of their veth). At most one IPv4 and one IPv6 (repeat or
    /// comma-separate). [default: --outbound-addr's IP, unless it is unspecified]
    #[arg(long, value_delimiter = ',')]
    pub proxy_ip: Vec<IpAddr>,
    /// Destination ports never redirected (comma-separated).
    #[arg(long, env = "SLUICE_EXCLUDE_PORTS", value_delimiter = ',')]
    pub exclude_ports: Vec<u16>,
    /// Destination CIDRs never redirected (comma-separated, e.g. 10.0.0.0/8,fd00::/8).
    #[arg(long, env = "SLUICE_EXCLUDE_CIDRS", value_delimiter = ',', value_parser = parse_cidr)]
    pub exclude_cidrs: Vec<Cidr>,
    /// How long redirection outlives the agent's last renewal: a stopped or killed proxy fails
    /// open after at most this (renewed every quarter of it).
    #[arg(long, env = "SLUICE_LEASE", default_value = "1s", value_parser = crate::run::parse_duration)]
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
        if self.cgroup_root.is_some() {
            set.push("--cgroup-root");
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

pub use sluice_redirect::lease::AcceptWatch;

/// The installed redirect, shared by the lease task, the reload loop, the proxy and `/status`.
pub struct EbpfRedirect {
    maps: Arc<Maps>,
    enroller: Arc<Enroller>,
    /// Ends the enroller's thread.
    enroller_stop: Arc<AtomicBool>,
    object: PathBuf,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    report: InstallReport,
    lease: Duration,
    lookup: OriginalDstLookup,
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
        let cgroup_root = match &args.cgroup_root {
            Some(c) if !c.is_dir() => bail!("--cgroup-root {}: not a directory", c.display()),
            Some(c) => c.clone(),
            None => sluice_redirect::cgroup2_root().context(
                "--redirect ebpf needs a cgroup v2 hierarchy (or pass --cgroup-root DIR)",
            )?,
        };
        if args.reconcile_interval < Duration::from_millis(100) {
            bail!(
                "--reconcile-interval {:?}: at least 100ms",
                args.reconcile_interval
            );
        }
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
        let enroller = Enroller::new(
            redirect,
            maps.clone(),
            cgroup_root.clone(),
            args.reconcile_interval,
        )?;
        let enroller_stop = Arc::new(AtomicBool::new(false));
        let (e, stop) = (enroller.clone(), enroller_stop.clone());
        std::thread::Builder::new()
            .name("sluice-enroll".into())
            .spawn(move || e.run(stop))
            .context("starting the enrollment thread")?;
        tracing::info!(
            "enrolled pods' cgroups are looked for under {} (reconciled every {:?})",
            cgroup_root.display(),
            args.reconcile_interval
        );
        Ok(Arc::new(EbpfRedirect {
            lookup: OriginalDstLookup::new(maps.clone()),
            maps,
            enroller,
            enroller_stop,
            object,
            cgroup,
            pin_dir: args.pin_dir.clone(),
            report,
            lease: args.lease,
        }))
    }

    /// The proxy's original-destination lookup.
    pub fn original_dst(&self) -> Arc<dyn OriginalDst> {
        Arc::new(OrigDst(self.lookup.clone()))
    }

    /// Renews the lease every quarter of it until `shutdown` (run it on the proxy's runtime, once
    /// the outbound listener is bound): redirection lasts only while this task runs and the
    /// listener's accept loop makes progress (`watch`).
    pub async fn keep_lease(self: Arc<Self>, watch: AcceptWatch, shutdown: watch::Receiver<bool>) {
        let enroller = self.enroller.clone();
        sluice_redirect::lease::keep_lease(
            self.maps.clone(),
            self.lease,
            watch,
            shutdown,
            move || enroller.flush_logs(),
        )
        .await
    }

    /// Registers the bound outbound listener with the programs: while it is open they may
    /// redirect; once it closes (a SIGKILL included) the kernel drops it and they fail open at
    /// once. Without it (a kernel that refuses a listening socket in a SOCKMAP) only the lease
    /// bounds how long a dead agent's port refuses connections.
    pub fn register_listener(&self, listener: &tokio::net::TcpListener) {
        match self.maps.set_listener(listener) {
            Ok(()) => tracing::info!(
                "outbound listener registered with the programs: if it closes, enrolled pods fail open at once"
            ),
            Err(err) => tracing::warn!(
                %err,
                "cannot register the outbound listener with the programs: if the agent dies, connections are refused until the lease runs out"
            ),
        }
    }

    /// Graceful stop: turns redirection off first, so new connections go to their original
    /// destinations while the proxy drains.
    pub fn stop(&self) {
        self.enroller_stop
            .store(true, std::sync::atomic::Ordering::Relaxed);
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

    /// Hands the snapshot's enrolled Pods to the enroller (blocking: stat and bpf calls; run it
    /// off the proxy's thread). Pods whose cgroup is not there yet are enrolled by the enroller's
    /// thread as soon as it appears.
    pub fn sync_enrollment(&self, snapshot: &Snapshot) {
        self.enroller.sync(DesiredPod::from_snapshot(snapshot));
    }

    /// Moves the enrollment from `old` to `new` around `apply`, which gives the proxy `new`.
    /// The proxy refuses connections from pods its snapshot does not enroll, so pods that leave
    /// are released before it forgets them, and pods that join are enrolled only once it knows
    /// them: no redirected connection meets a refusal (blocking, as [`Self::sync_enrollment`]).
    pub fn sync_enrollment_around(&self, old: &Snapshot, new: &Snapshot, apply: impl FnOnce()) {
        let new = DesiredPod::from_snapshot(new);
        self.enroller
            .sync(DesiredPod::staying(DesiredPod::from_snapshot(old), &new));
        apply();
        self.enroller.sync(new);
    }

    /// `/status`'s `redirect` object.
    pub fn status(&self) -> api::EbpfStatus {
        let cfg = self.maps.config().ok();
        let (v4, v6) = self.maps.proxy_addrs().unwrap_or((None, None));
        let state = match self.maps.lease() {
            Ok(Lease::Valid(left)) => api::LeaseState::Valid {
                remaining_ms: left.as_millis() as u64,
            },
            Ok(Lease::Expired(ago)) => api::LeaseState::Expired {
                expired_ms_ago: ago.as_millis() as u64,
            },
            Ok(Lease::None) => api::LeaseState::None,
            Err(e) => api::LeaseState::Unknown {
                error: e.to_string(),
            },
        };
        let st = self.enroller.status();
        let enrolled = st
            .pods
            .iter()
            .filter(|p| p.cgroup_id.is_some())
            .map(|p| api::EnrolledPod {
                pod: p.pod.clone(),
                cgroup: p.cgroup.clone(),
                cgroup_id: p.cgroup_id,
                found_by: p.found_by.map(str::to_owned),
                enrolled_since_unix_ms: p.enrolled_since_unix_ms,
                last_verified_unix_ms: p.last_verified_unix_ms,
                enroll_delay_ms: p.enroll_delay_ms,
                problem: p.problem.clone(),
            })
            .collect();
        let not_redirected = st
            .pods
            .iter()
            .filter(|p| p.cgroup_id.is_none())
            .map(|p| api::NotRedirected {
                pod: p.pod.clone(),
                reason: p.problem.clone(),
            })
            .collect();
        let counters = match self.maps.counters() {
            Ok(list) => list
                .into_iter()
                .map(|(c, v): (Counter, u64)| (c.name().to_string(), v))
                .collect(),
            Err(_) => Default::default(),
        };
        let cidrs = self
            .maps
            .excluded_cidrs()
            .into_iter()
            .map(|(ip, len)| Cidr(ip, len).to_string())
            .collect();
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        let counts = self.lookup.counts();
        api::EbpfStatus {
            object: self.object.display().to_string(),
            cgroup: self.cgroup.display().to_string(),
            pin_dir: self.pin_dir.display().to_string(),
            programs: api::Programs {
                attached: names(&self.report.attached),
                reused: names(&self.report.reused),
                upgraded: names(&self.report.upgraded),
                replaced_maps: self.report.replaced.clone(),
            },
            proxy: api::ProxyAddrs {
                ipv4: v4.map(|a| a.to_string()),
                ipv6: v6.map(|a| a.to_string()),
            },
            enabled: cfg.is_some_and(|c| c.enabled()),
            sockmap: cfg.is_some_and(|c| c.flags & ProxyConfig::NO_SOCKMAP == 0),
            // The programs redirect only while the outbound listener is open (fail-open at once
            // when the agent dies) rather than until the lease runs out.
            listener_registered: cfg.is_some_and(|c| c.flags & ProxyConfig::LISTENER != 0),
            lease: api::Lease {
                state,
                duration_ms: self.lease.as_millis() as u64,
                renew_every_ms: (self.lease / 4).as_millis() as u64,
            },
            enrolled,
            not_redirected,
            enrollment_error: st.error,
            enrollment: api::Enrollment {
                cgroup_root: st.cgroup_root,
                repairs: st.repairs,
                reconciliations: st.reconciliations,
                last_reconcile_unix_ms: st.last_reconcile_unix_ms,
                last_reconcile_cpu_us: st.last_reconcile_cpu_us,
            },
            exclusions: api::Exclusions {
                ports: self.maps.excluded_ports(),
                cidrs,
            },
            counters,
            original_dst: api::OriginalDstCounts {
                from_map: counts.from_map,
                from_sockopt: counts.from_sockopt,
                unknown: counts.unknown,
            },
        }
    }
}

/// The library's lookup as the proxy's [`OriginalDst`].
struct OrigDst(OriginalDstLookup);

impl OriginalDst for OrigDst {
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr> {
        self.0.lookup(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
