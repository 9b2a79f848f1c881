//! Isolation between the pods that share the proxy, and shedding before the proxy runs out.
//!
//! Every enrolled pod of the node goes through this one proxy, so what one pod may hold is
//! bounded: its open connections to the proxy, its requests in flight, and the upstream
//! connections taken for it (an HTTP/1 attempt holds one to itself; so does an L4 connection). A
//! pod at one of its limits gets `503` with Envoy's overload flag `OM` and details naming the
//! limit (a connection over the limit is closed before a byte is read), and nobody else notices.
//! A client is known by its address, which in eBPF mode is its pod's (explicit-proxy clients on
//! loopback share one budget).
//!
//! The proxy as a whole watches its file descriptors (against `RLIMIT_NOFILE`) and its resident
//! memory (against `--max-memory`, by default the memory limit of the agent's own cgroup),
//! sampled every 100 ms. Past the soft mark (80% of descriptors, 90% of memory) new work is shed
//! only from pods holding at least their fair share (the mean over the pods present), so the pod
//! that floods is refused first and a pod sending a request now and then is still served; past
//! the hard mark (95%) all new work is shed, leaving room to finish what is under way. Short of
//! descriptors, new connections are closed unread and requests get `503`; near the memory limit,
//! requests get `503` (a connection costs little memory). Envoy's
//! overload manager has the same two kinds of action (`reject_incoming_connections`,
//! `stop_accepting_requests`) on global triggers; the fair-share rule is what a proxy shared by
//! tenants adds.
//!
//! Resident memory counts what the allocator has freed but kept (jemalloc returns freed pages
//! only by decay, on allocator activity): after a burst, an agent under light load would stay at
//! its peak and shed for memory nobody holds. So before memory pressure takes effect, the
//! allocator is asked to give its freed pages back (at most once a second) and memory is read
//! again, as Envoy's overload manager shrinks its heap.

use parking_lot::Mutex;
use serde::Serialize;
use sluice_core::{Overload, Quota, QuotaUnit, UpstreamQuota};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;

/// Gives the allocator's freed memory back to the kernel; `true` if it could. Set once by the
/// program that chose the allocator (see [`set_memory_release`]).
static RELEASE_MEMORY: OnceLock<fn() -> bool> = OnceLock::new();

/// The shortest time between two releases of freed memory under memory pressure (each costs a
/// pass over the allocator's free pages on the worker that samples).
const RELEASE_INTERVAL: Duration = Duration::from_secs(1);

/// Tells every proxy of this process how to give the allocator's freed memory back to the kernel,
/// which memory pressure tries before it sheds. The first call wins.
pub fn set_memory_release(release: fn() -> bool) {
    let _ = RELEASE_MEMORY.set(release);
}

/// What one pod may hold, and the proxy's own resource limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IsolationLimits {
    /// Connections one client pod may have open to the proxy at once (0: no limit).
    pub max_connections_per_pod: u32,
    /// Requests one client pod may have in flight at once, queued ones included (0: no limit).
    pub max_requests_per_pod: u32,
    /// Upstream connections held for one client pod at once: its HTTP/1 attempts and its L4
    /// connections (0: no limit).
    pub max_upstream_connections_per_pod: u32,
    /// File descriptors the proxy may use (`RLIMIT_NOFILE`); `None`: not watched.
    pub max_open_files: Option<u64>,
    /// Resident memory the proxy may use, in bytes; `None`: not watched.
    pub max_memory: Option<u64>,
}

impl Default for IsolationLimits {
    fn default() -> Self {
        Self {
            max_connections_per_pod: 10_000,
            max_requests_per_pod: 10_000,
            max_upstream_connections_per_pod: 5_000,
            max_open_files: None,
            max_memory: None,
        }
    }
}

/// Where a resource stands: below the soft mark, past it (shed the heaviest pods' new work), or
/// past the hard mark (shed all new work).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Pressure {
    None = 0,
    Soft = 1,
    Hard = 2,
}

impl Pressure {
    fn of(used: u64, limit: Option<u64>, soft_pct: u64, hard_pct: u64) -> Self {
        match limit {
            Some(limit) if limit > 0 && used * 100 >= limit * hard_pct => Self::Hard,
            Some(limit) if limit > 0 && used * 100 >= limit * soft_pct => Self::Soft,
            _ => Self::None,
        }
    }

    fn load(a: &AtomicU8) -> Self {
        match a.load(Ordering::Relaxed) {
            2 => Self::Hard,
            1 => Self::Soft,
            _ => Self::None,
        }
    }
}

/// One client (a pod, by address) and what it holds now.
pub struct Client {
    ip: IpAddr,
    connections: AtomicU32,
    requests: AtomicU32,
    upstream: AtomicU32,
    isolation: Arc<Isolation>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("ip", &self.ip)
            .field("connections", &self.connections.load(Ordering::Relaxed))
            .field("requests", &self.requests.load(Ordering::Relaxed))
            .field("upstream", &self.upstream.load(Ordering::Relaxed))
            .finish()
    }
}

/// The isolation state of one proxy: its clients, its resource pressure, and what it shed.
pub struct Isolation {
    limits: IsolationLimits,
    clients: Mutex<HashMap<IpAddr, Arc<Client>>>,
    /// Open client connections, over every client. (Requests in flight are counted per client
    /// only: a node-wide count would be one more shared counter for every request on every
    /// worker, and it is read only under pressure, where the clients are summed instead.)
    connections: AtomicU64,
    /// The last samples: open descriptors (and the connections open when it was taken, to
    /// estimate between samples), resident bytes.
    fds: AtomicU64,
    fds_at_connections: AtomicU64,
    rss: AtomicU64,
    memory: AtomicU8,
    /// When freed memory was last given back, and how many times it was.
    released_at: Mutex<Option<Instant>>,
    releases: AtomicU64,
    shed: [AtomicU64; Overload::ALL.len()],
    sampler: OnceLock<()>,
}

impl Isolation {
    pub fn new(limits: IsolationLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            clients: Mutex::default(),
            connections: AtomicU64::new(0),
            fds: AtomicU64::new(0),
            fds_at_connections: AtomicU64::new(0),
            rss: AtomicU64::new(0),
            memory: AtomicU8::new(0),
            released_at: Mutex::new(None),
            releases: AtomicU64::new(0),
            shed: Default::default(),
            sampler: OnceLock::new(),
        })
    }

    pub fn limits(&self) -> &IsolationLimits {
        &self.limits
    }

    /// Starts sampling descriptors and memory every 100 ms (once; on the calling runtime), if
    /// either is watched. Takes a first sample at once.
    pub(crate) fn start_sampling(self: &Arc<Self>) {
        if self.limits.max_open_files.is_none() && self.limits.max_memory.is_none() {
            return;
        }
        if self.sampler.set(()).is_err() {
            return;
        }
        self.sample();
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(this) = weak.upgrade() else { return };
                this.sample();
            }
        });
    }

    fn sample(&self) {
        if self.limits.max_open_files.is_some() {
            if let Some(fds) = open_fds() {
                self.fds_at_connections
                    .store(self.connections.load(Ordering::Relaxed), Ordering::Relaxed);
                self.fds.store(fds, Ordering::Relaxed);
            }
        }
        if self.limits.max_memory.is_some() {
            if let Some(mut rss) = resident_bytes() {
                let pressure = |rss| Pressure::of(rss, self.limits.max_memory, 90, 95);
                if pressure(rss) != Pressure::None && self.release_memory() {
                    rss = resident_bytes().unwrap_or(rss);
                }
                let p = pressure(rss);
                self.rss.store(rss, Ordering::Relaxed);
                let before = Pressure::load(&self.memory);
                self.memory.store(p as u8, Ordering::Relaxed);
                if p != before {
                    tracing::warn!(rss, limit = ?self.limits.max_memory, pressure = ?p, "memory pressure changed");
                }
            }
        }
    }

    /// Asks the allocator to give its freed memory back, unless it did less than
    /// [`RELEASE_INTERVAL`] ago; `true` if it did now.
    fn release_memory(&self) -> bool {
        let Some(release) = RELEASE_MEMORY.get() else {
            return false;
        };
        let now = Instant::now();
        {
            let mut at = self.released_at.lock();
            if at.is_some_and(|at| now.duration_since(at) < RELEASE_INTERVAL) {
                return false;
            }
            *at = Some(now);
        }
        let released = release();
        if released {
            self.releases.fetch_add(1, Ordering::Relaxed);
        }
        released
    }

    /// Descriptor pressure now: the last sample plus two per connection opened since (its own
    /// and, likely, an upstream one), so a burst between samples is seen at once.
    fn fd_pressure(&self) -> Pressure {
        if self.limits.max_open_files.is_none() {
            return Pressure::None;
        }
        let now = self.connections.load(Ordering::Relaxed);
        let then = self.fds_at_connections.load(Ordering::Relaxed);
        let estimate = self.fds.load(Ordering::Relaxed) + 2 * now.saturating_sub(then);
        Pressure::of(estimate, self.limits.max_open_files, 80, 95)
    }

    fn memory_pressure(&self) -> Pressure {
        Pressure::load(&self.memory)
    }

    /// The mean of what the clients present hold (`total`, or their requests in flight when
    /// `None`): a client at or over it is among the heavy ones. `less` is left out of the total
    /// (the connection or request being admitted, already counted).
    fn fair_share(&self, total: Option<u64>, less: u64) -> u64 {
        let clients = self.clients.lock();
        let total = total.unwrap_or_else(|| {
            // A pod whose connections have all closed is no longer here; a request of its that
            // is still in flight is not counted (none outlives its connection over HTTP).
            clients
                .values()
                .map(|c| u64::from(c.requests.load(Ordering::Relaxed)))
                .sum()
        });
        (total.saturating_sub(less) / clients.len().max(1) as u64).max(1)
    }

    fn shed(&self, why: Overload) -> Overload {
        self.shed[why as usize].fetch_add(1, Ordering::Relaxed);
        why
    }

    /// How often `why` shed work (tests, metrics).
    pub fn shed_count(&self, why: Overload) -> u64 {
        self.shed[why as usize].load(Ordering::Relaxed)
    }

    /// A new connection from `ip`: admitted with the slot it holds while open, or refused (the
    /// caller closes it unread).
    pub(crate) fn admit_connection(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, Overload> {
        // Memory is guarded per request (a `503` says why); a connection costs little of it
        // and much of the descriptors.
        let fd = self.fd_pressure();
        if fd == Pressure::Hard {
            return Err(self.shed(Overload::FileDescriptors));
        }
        let client = {
            let mut clients = self.clients.lock();
            let client = clients
                .entry(ip)
                .or_insert_with(|| {
                    Arc::new(Client {
                        ip,
                        connections: AtomicU32::new(0),
                        requests: AtomicU32::new(0),
                        upstream: AtomicU32::new(0),
                        isolation: self.clone(),
                    })
                })
                .clone();
            // Counted under the lock, so a slot being dropped cannot remove the entry between.
            client.connections.fetch_add(1, Ordering::Relaxed);
            client
        };
        self.connections.fetch_add(1, Ordering::Relaxed);
        let slot = ConnSlot(client);
        let held = u64::from(slot.0.connections.load(Ordering::Relaxed)) - 1;
        let max = self.limits.max_connections_per_pod;
        if max > 0 && held >= u64::from(max) {
            return Err(self.shed(Overload::PodConnections));
        }
        if fd == Pressure::Soft {
            let total = self.connections.load(Ordering::Relaxed);
            if held >= self.fair_share(Some(total), 1) {
                return Err(self.shed(Overload::FileDescriptors));
            }
        }
        Ok(slot)
    }

    /// Open client connections now, over all clients.
    pub fn open_connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// What the client at `ip` holds now: connections, requests, upstream connections.
    pub fn held_by(&self, ip: IpAddr) -> (u32, u32, u32) {
        self.clients.lock().get(&ip).map_or((0, 0, 0), |c| {
            (
                c.connections.load(Ordering::Relaxed),
                c.requests.load(Ordering::Relaxed),
                c.upstream.load(Ordering::Relaxed),
            )
        })
    }

    /// The counters and gauges in Prometheus' text format.
    pub(crate) fn encode(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP sluice_overload_shed_total Work the proxy shed (503 OM, or a connection closed unread), by reason."
        );
        let _ = writeln!(out, "# TYPE sluice_overload_shed_total counter");
        for why in Overload::ALL {
            let _ = writeln!(
                out,
                "sluice_overload_shed_total{{reason=\"{}\"}} {}",
                why.details(),
                self.shed_count(why)
            );
        }
        let _ = writeln!(out, "# TYPE sluice_downstream_clients gauge");
        let _ = writeln!(
            out,
            "sluice_downstream_clients {}",
            self.clients.lock().len()
        );
        if let Some(limit) = self.limits.max_open_files {
            let _ = writeln!(out, "# TYPE sluice_open_fds gauge");
            let _ = writeln!(out, "sluice_open_fds {}", self.fds.load(Ordering::Relaxed));
            let _ = writeln!(out, "# TYPE sluice_max_fds gauge");
            let _ = writeln!(out, "sluice_max_fds {limit}");
        }
        if let Some(limit) = self.limits.max_memory {
            let _ = writeln!(out, "# TYPE sluice_resident_memory_bytes gauge");
            let _ = writeln!(
                out,
                "sluice_resident_memory_bytes {}",
                self.rss.load(Ordering::Relaxed)
            );
            let _ = writeln!(out, "# TYPE sluice_max_memory_bytes gauge");
            let _ = writeln!(out, "sluice_max_memory_bytes {limit}");
            let _ = writeln!(out, "# TYPE sluice_memory_releases_total counter");
            let _ = writeln!(
                out,
                "sluice_memory_releases_total {}",
                self.releases.load(Ordering::Relaxed)
            );
        }
    }
}

impl crate::Handler {
    /// A connection shed at accept: counted already; logged (the first of each reason as a
    /// warning, the rest at debug level, so a pod that floods cannot flood the agent's log too).
    pub(crate) fn shed_connection(&self, conn: &crate::ConnInfo, why: Overload) {
        static WARNED: [std::sync::atomic::AtomicBool; Overload::ALL.len()] =
            [const { std::sync::atomic::AtomicBool::new(false) }; Overload::ALL.len()];
        if !WARNED[why as usize].swap(true, Ordering::Relaxed) {
            tracing::warn!(
                peer = %conn.peer,
                reason = why.details(),
                "closed a new client connection unread: {}; further ones are counted in \
                 sluice_overload_shed_total and logged at debug level",
                why.body()
            );
        } else {
            tracing::debug!(peer = %conn.peer, reason = why.details(), "closed a new client connection unread");
        }
    }
}

/// A client connection's place in its pod's budget, held while the connection is open.
pub struct ConnSlot(Arc<Client>);

impl std::fmt::Debug for ConnSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ConnSlot {
    /// A request on this connection: admitted with the slot it holds until its response ends,
    /// or shed.
    pub(crate) fn admit_request(&self) -> Result<RequestSlot, Overload> {
        let client = &self.0;
        let iso = &client.isolation;
        let held = u64::from(client.requests.fetch_add(1, Ordering::Relaxed));
        let slot = RequestSlot(client.clone());
        let max = iso.limits.max_requests_per_pod;
        if max > 0 && held >= u64::from(max) {
            return Err(iso.shed(Overload::PodRequests));
        }
        for (pressure, why) in [
            (iso.memory_pressure(), Overload::Memory),
            (iso.fd_pressure(), Overload::FileDescriptors),
        ] {
            match pressure {
                Pressure::Hard => return Err(iso.shed(why)),
                Pressure::Soft => {
                    if held >= iso.fair_share(None, 1) {
                        return Err(iso.shed(why));
                    }
                }
                Pressure::None => {}
            }
        }
        Ok(slot)
    }

    /// The pod's budget of upstream connections, for a request's extensions.
    pub(crate) fn upstream_quota(&self) -> UpstreamQuota {
        UpstreamQuota(self.0.clone())
    }

    /// One upstream connection for this pod (an L4 connection).
    pub(crate) fn take_upstream(&self) -> Result<QuotaUnit, Overload> {
        self.upstream_quota().take()
    }
}

/// A pod's upstream connections.
impl Quota for Client {
    fn try_take(&self) -> Result<(), Overload> {
        let held = self.upstream.fetch_add(1, Ordering::Relaxed);
        let max = self.isolation.limits.max_upstream_connections_per_pod;
        if max > 0 && held >= max {
            self.upstream.fetch_sub(1, Ordering::Relaxed);
            return Err(self.isolation.shed(Overload::PodUpstreamConnections));
        }
        Ok(())
    }

    fn release(&self) {
        self.upstream.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let iso = &self.0.isolation;
        iso.connections.fetch_sub(1, Ordering::Relaxed);
        let mut clients = iso.clients.lock();
        if self.0.connections.fetch_sub(1, Ordering::Relaxed) == 1 {
            // The pod's last connection: forget it (its requests and upstream connections ended
            // with its connections, or hold their own reference until they do).
            clients.remove(&self.0.ip);
        }
    }
}

/// A request's place in its pod's budget, held until its response ends.
pub(crate) struct RequestSlot(Arc<Client>);

impl Drop for RequestSlot {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Open file descriptors of this process: `/proc/self/fd`'s size is their count on Linux 6.2 and
/// later (one `stat`); earlier kernels report 0 there, and the directory is counted instead.
fn open_fds() -> Option<u64> {
    let size = std::fs::metadata("/proc/self/fd").ok()?.len();
    if size > 0 {
        return Some(size);
    }
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// Resident memory of this process (`VmRSS` of `/proc/self/status`).
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim();
    Some(kb.parse::<u64>().ok()? * 1024)
}

/// The memory limit of the cgroup this process runs in (cgroup v2 `memory.max`), if it has one.
pub fn cgroup_memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim())).ok()?;
    max.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn a_pod_at_its_limits_is_refused_and_others_are_not() {
        let iso = Isolation::new(IsolationLimits {
            max_connections_per_pod: 3,
            max_requests_per_pod: 2,
            max_upstream_connections_per_pod: 1,
            ..Default::default()
        });
        let held: Vec<_> = (0..3)
            .map(|_| iso.admit_connection(ip(2)).unwrap())
            .collect();
        assert_eq!(
            iso.admit_connection(ip(2)).unwrap_err(),
            Overload::PodConnections
        );
        let other = iso.admit_connection(ip(3)).unwrap();
        let r1 = held[0].admit_request().unwrap();
        let _r2 = held[1].admit_request().unwrap();
        assert_eq!(held[2].admit_request().err(), Some(Overload::PodRequests));
        let _r3 = other.admit_request().unwrap();
        drop(r1);
        let _r4 = held[2].admit_request().unwrap();
        let u = held[0].take_upstream().unwrap();
        assert_eq!(
            held[1].upstream_quota().take().err(),
            Some(Overload::PodUpstreamConnections)
        );
        assert!(other.take_upstream().is_ok());
        drop(u);
        assert!(held[1].upstream_quota().take().is_ok());
        assert_eq!(iso.shed_count(Overload::PodConnections), 1);
        assert_eq!(iso.shed_count(Overload::PodRequests), 1);
        assert_eq!(iso.shed_count(Overload::PodUpstreamConnections), 1);
        drop(held);
        assert_eq!(iso.held_by(ip(2)), (0, 0, 0));
        assert_eq!(iso.open_connections(), 1);
        assert_eq!(
            iso.clients.lock().len(),
            1,
            "a pod with no connection is forgotten"
        );
    }

    #[test]
    fn under_pressure_the_heaviest_pods_go_first() {
        let iso = Isolation::new(IsolationLimits {
            max_open_files: Some(1000),
            ..Default::default()
        });
        let greedy: Vec<_> = (0..90)
            .map(|_| iso.admit_connection(ip(2)).unwrap())
            .collect();
        let light = iso.admit_connection(ip(3)).unwrap();
        // 700 descriptors in use besides: past the soft mark (80%) with these connections.
        iso.fds.store(700, Ordering::Relaxed);
        iso.fds_at_connections.store(0, Ordering::Relaxed);
        assert_eq!(iso.fd_pressure(), Pressure::Soft);
        assert_eq!(
            iso.admit_connection(ip(2)).unwrap_err(),
            Overload::FileDescriptors
        );
        let light2 = iso.admit_connection(ip(3)).unwrap();
        let _new_pod = iso.admit_connection(ip(4)).unwrap();
        // Past the hard mark: nobody.
        iso.fds.store(900, Ordering::Relaxed);
        assert_eq!(iso.fd_pressure(), Pressure::Hard);
        assert_eq!(
            iso.admit_connection(ip(3)).unwrap_err(),
            Overload::FileDescriptors
        );
        // Memory: requests from the heavy pod are shed first.
        iso.fds.store(0, Ordering::Relaxed);
        iso.fds_at_connections
            .store(iso.open_connections(), Ordering::Relaxed);
        let _busy: Vec<_> = greedy[..10]
            .iter()
            .map(|c| c.admit_request().unwrap())
            .collect();
        let _light_busy: Vec<_> = (0..2).map(|_| light.admit_request().unwrap()).collect();
        iso.memory.store(Pressure::Soft as u8, Ordering::Relaxed);
        // The fair share: 12 requests in flight over 3 pods, 4. The heavy pod (10) is shed, the
        // light one (2) is not.
        assert_eq!(greedy[10].admit_request().err(), Some(Overload::Memory));
        assert!(light.admit_request().is_ok());
        iso.memory.store(Pressure::Hard as u8, Ordering::Relaxed);
        assert_eq!(light2.admit_request().err(), Some(Overload::Memory));
    }

    #[test]
    fn this_process_is_measured() {
        assert!(open_fds().unwrap() >= 3);
        assert!(resident_bytes().unwrap() > 1 << 20);
        assert_eq!(Pressure::of(79, Some(100), 80, 95), Pressure::None);
        assert_eq!(Pressure::of(80, Some(100), 80, 95), Pressure::Soft);
        assert_eq!(Pressure::of(95, Some(100), 80, 95), Pressure::Hard);
        assert_eq!(Pressure::of(95, None, 80, 95), Pressure::None);
    }
}
