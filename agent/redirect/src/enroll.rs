//! Enrollment: which pods' cgroups are in `SLUICE_ENROLLED`, kept true against the kernel.
//!
//! [`Enrollment`] holds the pods the configuration wants redirected ([`DesiredPod`]), finds each
//! one's pod-level cgroup ([`crate::cgroup::Resolver`]) and enrolls its id. It never trusts its
//! own memory for long: [`Enrollment::reconcile`] re-reads the map and re-stats every cgroup, so
//! an entry someone removed, a cgroup deleted or recreated under a new id (a pod restarted in
//! place), or an id no pod owns any more is found and put right, counted and logged.
//! [`Enroller`] adds the installation's own checks ([`crate::Redirect::repair`]) and runs both on
//! a thread that also enrolls a pending pod as soon as its directory appears
//! ([`crate::watch::DirWatch`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use parking_lot::Mutex;
use serde::Serialize;

use crate::{
    cgroup::{Found, PodCgroupQuery, ProcIndex, QosClass, Resolution, Resolver},
    watch::DirWatch,
    Maps, Redirect,
};

/// A pod the configuration wants redirected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredPod {
    /// `namespace/name`.
    pub key: String,
    pub query: PodCgroupQuery,
    /// Why it must not be redirected although enrolled (hostNetwork, not running, no IP).
    pub blocked: Option<String>,
}

impl DesiredPod {
    /// The enrolled workloads of a snapshot (unenrolled ones are not wanted at all).
    pub fn from_snapshot(snapshot: &sluice_policy::Snapshot) -> Vec<DesiredPod> {
        snapshot
            .workloads
            .iter()
            .filter(|(_, w)| w.enrolled)
            .map(|(key, w)| DesiredPod {
                key: key.clone(),
                query: PodCgroupQuery {
                    uid: w.uid.clone(),
                    qos: w.qos_class.as_deref().and_then(QosClass::parse),
                    container_ids: w.container_ids.clone(),
                    explicit: w.cgroup.clone(),
                },
                blocked: w.not_redirectable().map(str::to_string),
            })
            .collect()
    }

    /// Of the pods `old` wanted, those `new` still wants in the same place, as `old` had them:
    /// what may stay enrolled while the proxy still serves `old`. Syncing this first releases
    /// the pods that leave, and enrolls none that join, before the proxy is given `new`.
    pub fn staying(old: Vec<DesiredPod>, new: &[DesiredPod]) -> Vec<DesiredPod> {
        let new: BTreeMap<&str, &DesiredPod> = new.iter().map(|d| (d.key.as_str(), d)).collect();
        old.into_iter()
            .filter(|o| {
                new.get(o.key.as_str())
                    .is_some_and(|n| *n == o || same_place(n, o))
            })
            .collect()
    }
}

/// Whether two versions of a Pod put its cgroup in the same place and both may be redirected
/// (they may differ in container IDs, which only help to find a pod not found yet).
fn same_place(a: &DesiredPod, b: &DesiredPod) -> bool {
    a.blocked == b.blocked
        && a.query.uid == b.query.uid
        && a.query.qos == b.query.qos
        && a.query.explicit == b.query.explicit
}

/// A pod's cgroup as enrolled.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Enrolled {
    path: PathBuf,
    id: u64,
    by: Found,
    since: SystemTime,
}

#[derive(Clone, Debug)]
struct PodEntry {
    want: DesiredPod,
    cgroup: Option<Enrolled>,
    verified: Option<SystemTime>,
    problem: Option<String>,
    /// From the directory's creation to its enrollment (when the agent saw it appear).
    delay: Option<Duration>,
    /// Expected directories while pending.
    expected: Vec<PathBuf>,
}

/// One pod in `/status`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PodStatus {
    pub pod: String,
    /// The resolved pod-level cgroup directory.
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    /// `annotation`, `kubelet-name`, `container-id` or `proc`.
    pub found_by: Option<&'static str>,
    pub enrolled_since_unix_ms: Option<u64>,
    pub last_verified_unix_ms: Option<u64>,
    /// From the cgroup directory's creation to its enrollment, when the agent watched it appear.
    pub enroll_delay_ms: Option<f64>,
    /// Why it is not redirected (now), if it is not.
    pub problem: Option<String>,
}

/// Enrollment in `/status`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EnrollmentStatus {
    pub cgroup_root: String,
    pub pods: Vec<PodStatus>,
    /// Repairs so far by kind (see [`Enrollment::reconcile`] and [`crate::Redirect::repair`]).
    pub repairs: BTreeMap<String, u64>,
    pub reconciliations: u64,
    pub last_reconcile_unix_ms: Option<u64>,
    /// Agent CPU time of the last reconciliation (thread time), microseconds.
    pub last_reconcile_cpu_us: Option<u64>,
    /// The last error from the map or the installation, if the last attempt failed.
    pub error: Option<String>,
}

/// The enrollment map's handle (the pinned map; tests may use another).
pub trait EnrollMap {
    fn ids(&self) -> crate::Result<Vec<u64>>;
    fn insert(&self, id: u64) -> crate::Result<()>;
    fn remove(&self, id: u64) -> crate::Result<()>;
}

impl EnrollMap for Maps {
    fn ids(&self) -> crate::Result<Vec<u64>> {
        Ok(self.enrolled_cgroups())
    }
    fn insert(&self, id: u64) -> crate::Result<()> {
        self.enroll_cgroup_id(id)
    }
    fn remove(&self, id: u64) -> crate::Result<()> {
        self.release_cgroup_id(id)
    }
}

/// The pods wanted and where their cgroups are.
pub struct Enrollment {
    map: Arc<dyn EnrollMap + Send + Sync>,
    resolver: Resolver,
    pods: BTreeMap<String, PodEntry>,
    repairs: BTreeMap<String, u64>,
    reconciliations: u64,
    last_reconcile: Option<(SystemTime, Duration)>,
    error: Option<String>,
    /// Ids a previous run left are released at the first sync, as a release, not a repair.
    first_sync: bool,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// A cgroup directory's inode (its cgroup id) and change time (its creation, for a directory
/// nothing was written to).
fn stat_cgroup(path: &Path) -> Option<(u64, SystemTime)> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_dir() {
        return None;
    }
    let ctime = UNIX_EPOCH
        + Duration::from_secs(meta.ctime().max(0) as u64)
        + Duration::from_nanos(meta.ctime_nsec().max(0) as u64);
    Some((meta.ino(), ctime))
}

impl Enrollment {
    pub fn new(map: Arc<dyn EnrollMap + Send + Sync>, cgroup_root: impl Into<PathBuf>) -> Self {
        Enrollment {
            map,
            resolver: Resolver::new(cgroup_root),
            pods: BTreeMap::new(),
            repairs: BTreeMap::new(),
            reconciliations: 0,
            last_reconcile: None,
            error: None,
            first_sync: true,
        }
    }

    fn count(&mut self, kind: &str, pod: &str, detail: &str) {
        *self.repairs.entry(kind.to_string()).or_default() += 1;
        tracing::warn!(repair = kind, pod, "enrollment repaired: {detail}");
    }

    /// Takes the configuration's enrolled pods: releases the cgroups of pods no longer wanted
    /// (or whose cgroup query changed), then enrolls what can be found now.
    pub fn sync(&mut self, desired: Vec<DesiredPod>) {
        let desired: BTreeMap<String, DesiredPod> =
            desired.into_iter().map(|d| (d.key.clone(), d)).collect();
        // A Pod whose container IDs changed (a container started or restarted) keeps its cgroup:
        // releasing it to look again would let its connect()s through for a moment.
        for (key, entry) in &mut self.pods {
            if let Some(want) = desired.get(key) {
                if want != &entry.want && same_place(want, &entry.want) {
                    entry.want = want.clone();
                }
            }
        }
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(k, e)| desired.get(*k) != Some(&e.want))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            let entry = self.pods.remove(&key).expect("listed");
            if let Some(c) = entry.cgroup {
                self.release(&key, &c, "no longer enrolled (or its Pod changed)");
            }
        }
        for (key, want) in desired {
            self.pods.entry(key).or_insert_with(|| PodEntry {
                want,
                cgroup: None,
                verified: None,
                problem: None,
                delay: None,
                expected: Vec::new(),
            });
        }
        if std::mem::take(&mut self.first_sync) {
            self.enroll_pending(true);
            let owned: BTreeSet<u64> = self.owned_ids();
            if let Ok(ids) = self.map.ids() {
                for id in ids.into_iter().filter(|id| !owned.contains(id)) {
                    if self.map.remove(id).is_ok() {
                        tracing::info!("released cgroup id {id} left enrolled by a previous run");
                    }
                }
            }
            return;
        }
        self.enroll_pending(false);
    }

    fn owned_ids(&self) -> BTreeSet<u64> {
        self.pods
            .values()
            .filter_map(|e| e.cgroup.as_ref().map(|c| c.id))
            .collect()
    }

    /// Releases `c` unless another wanted pod shares the id (two Pod objects naming one cgroup).
    fn release(&mut self, key: &str, c: &Enrolled, why: &str) {
        if self.owned_ids().contains(&c.id) {
            return;
        }
        match self.map.remove(c.id) {
            Ok(()) => tracing::info!(
                "released pod {key}: cgroup {} (id {}): {why}",
                c.path.display(),
                c.id
            ),
            Err(e) => self.error = Some(e.to_string()),
        }
    }

    /// Pods wanted, not blocked and not enrolled: resolves and enrolls each that can be found.
    /// Returns how many were enrolled. `deep` also looks for pods by their containers' IDs (a
    /// walk of the kubepods trees, once for all of them); otherwise only kubelet's names for them
    /// are tried (a few `stat`s per pod: what runs each time a watched directory changes).
    pub fn enroll_pending(&mut self, deep: bool) -> usize {
        if self.pending().next().is_none() {
            return 0;
        }
        if self.resolver.kubepods_dirs().is_empty() {
            self.resolver.rescan();
        }
        let containers = deep.then(|| self.resolver.container_index());
        let keys: Vec<String> = self.pending().map(str::to_string).collect();
        let mut enrolled = 0;
        for key in keys {
            let resolution = self
                .resolver
                .resolve_with(&self.pods[&key].want.query, containers.as_ref());
            enrolled += usize::from(self.apply_resolution(&key, resolution));
        }
        enrolled
    }

    fn pending(&self) -> impl Iterator<Item = &str> {
        self.pods
            .iter()
            .filter(|(_, e)| e.cgroup.is_none() && e.want.blocked.is_none())
            .map(|(k, _)| k.as_str())
    }

    /// Enrolls `key` at what the resolver said; records why not otherwise.
    fn apply_resolution(&mut self, key: &str, resolution: Resolution) -> bool {
        let now = SystemTime::now();
        let (path, by) = match resolution {
            Resolution::Found { path, by } => (path, by),
            Resolution::Missing { expected, why } => {
                let entry = self.pods.get_mut(key).expect("pending pod");
                if entry.problem.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        "pod {key} is enrolled but its connections are not redirected yet: {why}"
                    );
                }
                entry.problem = Some(why);
                entry.expected = expected;
                return false;
            }
        };
        let Some((id, created)) = stat_cgroup(&path) else {
            return false;
        };
        if let Err(e) = self.map.insert(id) {
            let msg = format!("updating the enrollment map: {e}");
            if self.error.as_deref() != Some(msg.as_str()) {
                tracing::warn!("{msg} (retried)");
            }
            self.error = Some(msg);
            return false;
        }
        self.error = None;
        let entry = self.pods.get_mut(key).expect("pending pod");
        // Only a directory that appeared while the pod was waiting has a meaningful delay.
        let delay = (!entry.expected.is_empty())
            .then(|| now.duration_since(created).ok())
            .flatten();
        tracing::info!(
            delay_ms = delay.map(|d| d.as_secs_f64() * 1e3),
            "enrolled pod {key}: cgroup {} (id {id}, found by {})",
            path.display(),
            by.as_str()
        );
        entry.cgroup = Some(Enrolled {
            path,
            id,
            by,
            since: now,
        });
        entry.delay = delay;
        entry.verified = Some(now);
        entry.problem = None;
        entry.expected.clear();
        true
    }

    /// Directories to watch for pending pods' cgroups to appear: each expected directory's
    /// nearest existing ancestor under the root (its parent, once the QoS level exists).
    pub fn watch_dirs(&self) -> BTreeSet<PathBuf> {
        let root = self.resolver.root();
        let mut dirs = BTreeSet::new();
        for e in self.pods.values().filter(|e| e.cgroup.is_none()) {
            for p in &e.expected {
                let mut dir = p.parent();
                while let Some(d) = dir {
                    if d.is_dir() {
                        dirs.insert(d.to_path_buf());
                        break;
                    }
                    if d == root || !d.starts_with(root) {
                        break;
                    }
                    dir = d.parent();
                }
            }
        }
        if self.resolver.kubepods_dirs().is_empty() && self.pending().next().is_some() {
            // Until kubelet has made its tree: the root, to notice it.
            dirs.insert(root.to_path_buf());
        }
        dirs
    }

    /// Compares what the kernel holds with what is wanted and repairs the difference:
    /// - an enrolled pod's cgroup directory is gone: its id is released (`cgroup_deleted`) and
    ///   the pod is looked for again;
    /// - the directory is there under another id (deleted and recreated: `cgroup_recreated`):
    ///   the new id is enrolled, the old one released;
    /// - its id is missing from the map (`map_entry_missing`): put back;
    /// - an id in the map that no wanted pod owns (`stale_map_entry`): released.
    ///
    /// Pending pods are looked for again, by name, container id and, for those with a uid, in
    /// the processes' cgroups (`/proc`). Returns the number of repairs.
    pub fn reconcile(&mut self) -> usize {
        if self.first_sync {
            // Nothing is wanted yet: every id would look stale.
            return 0;
        }
        let started = thread_cpu_time();
        let before: u64 = self.repairs.values().sum();
        self.resolver.rescan();
        let in_map: BTreeSet<u64> = match self.map.ids() {
            Ok(ids) => ids.into_iter().collect(),
            Err(e) => {
                self.error = Some(format!("reading the enrollment map: {e}"));
                return 0;
            }
        };
        let now = SystemTime::now();
        let keys: Vec<String> = self.pods.keys().cloned().collect();
        for key in &keys {
            let Some(c) = self.pods[key].cgroup.clone() else {
                continue;
            };
            match stat_cgroup(&c.path) {
                None => {
                    self.pods.get_mut(key).expect("listed").cgroup = None;
                    self.release(key, &c, "its cgroup directory is gone");
                    self.count(
                        "cgroup_deleted",
                        key,
                        &format!(
                            "cgroup {} (id {}) is gone: released, looking for it again",
                            c.path.display(),
                            c.id
                        ),
                    );
                }
                Some((id, _)) if id != c.id => {
                    let entry = self.pods.get_mut(key).expect("listed");
                    entry.cgroup = None;
                    self.release(key, &c, "its cgroup was recreated");
                    self.count(
                        "cgroup_recreated",
                        key,
                        &format!(
                            "cgroup {} was recreated (id {} -> {id})",
                            c.path.display(),
                            c.id
                        ),
                    );
                }
                Some(_) if !in_map.contains(&c.id) => {
                    match self.map.insert(c.id) {
                        Ok(()) => self.count(
                            "map_entry_missing",
                            key,
                            &format!(
                                "cgroup id {} of {} was missing from the map: enrolled again",
                                c.id,
                                c.path.display()
                            ),
                        ),
                        Err(e) => self.error = Some(e.to_string()),
                    }
                    self.pods.get_mut(key).expect("listed").verified = Some(now);
                }
                Some(_) => self.pods.get_mut(key).expect("listed").verified = Some(now),
            }
        }
        let owned = self.owned_ids();
        // Read again: the loop above released what it found deleted or recreated.
        let in_map: BTreeSet<u64> = self
            .map
            .ids()
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
        for id in in_map.difference(&owned) {
            match self.map.remove(*id) {
                Ok(()) => self.count(
                    "stale_map_entry",
                    "-",
                    &format!("cgroup id {id} was enrolled but no enrolled pod owns it: released"),
                ),
                Err(e) => self.error = Some(e.to_string()),
            }
        }
        self.enroll_pending(true);
        self.proc_fallback();
        self.reconciliations += 1;
        let cpu = thread_cpu_time().saturating_sub(started);
        self.last_reconcile = Some((now, cpu));
        (self.repairs.values().sum::<u64>() - before) as usize
    }

    /// Pending pods with a uid, from the cgroups of running processes.
    fn proc_fallback(&mut self) {
        let wanted: Vec<(String, String)> = self
            .pending()
            .filter_map(|k| {
                let e = &self.pods[k];
                (e.want.query.explicit.is_none())
                    .then(|| e.want.query.uid.clone())
                    .flatten()
                    .map(|u| (k.to_string(), u))
            })
            .collect();
        if wanted.is_empty() {
            return;
        }
        let index = ProcIndex::read(Path::new("/proc"), 100_000);
        for (key, uid) in wanted {
            if let Some(path) = index.find(&self.resolver, &uid) {
                self.apply_resolution(
                    &key,
                    Resolution::Found {
                        path,
                        by: Found::Proc,
                    },
                );
            }
        }
    }

    /// Adds repairs found elsewhere (the installation's own).
    pub fn record_install_repairs(&mut self, repairs: &[crate::Repair]) {
        for r in repairs {
            *self.repairs.entry(r.kind.to_string()).or_default() += 1;
            tracing::warn!(
                repair = r.kind,
                program_or_map = r.what,
                "eBPF installation repaired: {}",
                r.detail
            );
        }
    }

    /// The CPU time of the whole last pass (the caller's checks included).
    pub fn set_last_reconcile_cpu(&mut self, cpu: Duration) {
        if let Some((_, d)) = &mut self.last_reconcile {
            *d = cpu;
        }
    }

    pub fn status(&self) -> EnrollmentStatus {
        let pods = self
            .pods
            .iter()
            .map(|(key, e)| PodStatus {
                pod: key.clone(),
                cgroup: e.cgroup.as_ref().map(|c| c.path.display().to_string()),
                cgroup_id: e.cgroup.as_ref().map(|c| c.id),
                found_by: e.cgroup.as_ref().map(|c| c.by.as_str()),
                enrolled_since_unix_ms: e.cgroup.as_ref().map(|c| unix_ms(c.since)),
                last_verified_unix_ms: e.verified.filter(|_| e.cgroup.is_some()).map(unix_ms),
                enroll_delay_ms: e.delay.map(|d| d.as_secs_f64() * 1e3),
                problem: e
                    .want
                    .blocked
                    .clone()
                    .or_else(|| e.problem.clone())
                    .filter(|_| e.cgroup.is_none()),
            })
            .collect();
        EnrollmentStatus {
            cgroup_root: self.resolver.root().display().to_string(),
            pods,
            repairs: self.repairs.clone(),
            reconciliations: self.reconciliations,
            last_reconcile_unix_ms: self.last_reconcile.map(|(t, _)| unix_ms(t)),
            last_reconcile_cpu_us: self.last_reconcile.map(|(_, d)| d.as_micros() as u64),
            error: self.error.clone(),
        }
    }
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
pub fn thread_cpu_time() -> Duration {
    Duration::from_nanos(crate::sys::thread_cpu_ns())
}

/// Enrollment and the installation's health, kept by one thread: it enrolls pending pods as
/// soon as their directories appear (inotify on their expected parents), and reconciles every
/// `every`.
pub struct Enroller {
    redirect: Mutex<Redirect>,
    state: Mutex<Enrollment>,
    /// The last failure of the installation's check, until one succeeds.
    install_error: Mutex<Option<String>>,
    every: Duration,
    wake: DirWatch,
}

impl Enroller {
    pub fn new(
        redirect: Redirect,
        maps: Arc<Maps>,
        cgroup_root: PathBuf,
        every: Duration,
    ) -> crate::Result<Arc<Self>> {
        let wake = DirWatch::new().map_err(|source| crate::Error::Io {
            what: "inotify_init for",
            path: cgroup_root.clone(),
            source,
        })?;
        Ok(Arc::new(Enroller {
            redirect: Mutex::new(redirect),
            state: Mutex::new(Enrollment::new(maps, cgroup_root)),
            install_error: Mutex::new(None),
            every,
            wake,
        }))
    }

    /// The configuration's pods (blocking: stat and bpf calls).
    pub fn sync(&self, desired: Vec<DesiredPod>) {
        self.state.lock().sync(desired);
        self.wake.wake();
    }

    /// One reconciliation of the installation and the enrollment; returns the repairs.
    pub fn reconcile(&self) -> usize {
        let started = thread_cpu_time();
        let install = self.redirect.lock().repair();
        let mut install_error = self.install_error.lock();
        let mut st = self.state.lock();
        let n = match install {
            Ok(r) => {
                st.record_install_repairs(&r);
                *install_error = None;
                r.len()
            }
            Err(e) => {
                let msg = format!("checking the eBPF installation: {e}");
                if install_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("{msg} (checked again every {:?})", self.every);
                }
                *install_error = Some(msg);
                0
            }
        };
        let n = n + st.reconcile();
        // The whole pass, the installation's checks included.
        st.set_last_reconcile_cpu(thread_cpu_time().saturating_sub(started));
        n
    }

    pub fn status(&self) -> EnrollmentStatus {
        let mut status = self.state.lock().status();
        if let Some(e) = self.install_error.lock().clone() {
            status.error = Some(e);
        }
        status
    }

    /// Forwards the programs' log lines.
    pub fn flush_logs(&self) {
        self.redirect.lock().flush_logs();
    }

    /// Runs until `stop`: waits for a watched directory to change (or a sync, or the next
    /// reconciliation), enrolls what appeared, reconciles when due.
    pub fn run(self: Arc<Self>, stop: Arc<AtomicBool>) {
        let mut next = tokio::time::Instant::now() + self.every;
        while !stop.load(Ordering::Relaxed) {
            let dirs = self.state.lock().watch_dirs();
            // Against what is watched now: the kernel drops the watch of a removed directory.
            if dirs != self.wake.watched() {
                self.wake.set(&dirs);
            }
            // Whatever appeared before the watches were in place.
            self.state.lock().enroll_pending(false);
            let now = tokio::time::Instant::now();
            if now >= next {
                self.reconcile();
                next = now + self.every;
                continue;
            }
            // Bounded so that `stop` is seen within a second.
            let wait = (next - now).min(Duration::from_secs(1));
            self.wake.wait(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The enrollment map as a set (the root tests use the pinned map), and the ids removed.
    #[derive(Default)]
    struct SetMap(Mutex<BTreeSet<u64>>, Mutex<Vec<u64>>);

    impl EnrollMap for SetMap {
        fn ids(&self) -> crate::Result<Vec<u64>> {
            Ok(self.0.lock().iter().copied().collect())
        }
        fn insert(&self, id: u64) -> crate::Result<()> {
            self.0.lock().insert(id);
            Ok(())
        }
        fn remove(&self, id: u64) -> crate::Result<()> {
            self.0.lock().remove(&id);
            self.1.lock().push(id);
            Ok(())
        }
    }

    fn uid(n: usize) -> String {
        format!("00000000-0000-4000-8000-{n:012}")
    }

    fn pod_dir(root: &Path, n: usize) -> PathBuf {
        root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid(n).replace('-', "_")
        ))
    }

    fn want(n: usize) -> DesiredPod {
        DesiredPod {
            key: format!("default/p{n}"),
            query: PodCgroupQuery {
                uid: Some(uid(n)),
                qos: Some(QosClass::BestEffort),
                ..Default::default()
            },
            blocked: None,
        }
    }

    fn ino(p: &Path) -> u64 {
        std::fs::metadata(p).unwrap().ino()
    }

    /// A cgroup tree with the directories of pods 1 to `n`, and an enrollment over it.
    fn pods_present(n: usize) -> (tempfile::TempDir, Arc<SetMap>, Enrollment) {
        let t = tempfile::tempdir().unwrap();
        for n in 1..=n {
            std::fs::create_dir_all(pod_dir(t.path(), n)).unwrap();
        }
        let map = Arc::new(SetMap::default());
        let e = Enrollment::new(map.clone(), t.path());
        (t, map, e)
    }

    /// The first half of a move between two configurations releases the pods that leave (or
    /// become blocked) and enrolls none that join; a pod whose containers changed stays put.
    #[test]
    fn staying_releases_the_leavers_and_enrolls_no_joiner() {
        let (t, map, mut e) = pods_present(4);
        let old = vec![want(1), want(2), want(3)];
        e.sync(old.clone());
        let restarted = DesiredPod {
            query: PodCgroupQuery {
                container_ids: vec!["containerd://abc".into()],
                ..want(2).query
            },
            ..want(2)
        };
        let stopped = DesiredPod {
            blocked: Some("not running".into()),
            ..want(3)
        };
        let new = vec![restarted.clone(), stopped, want(4)];
        let staying = DesiredPod::staying(old, &new);
        assert_eq!(staying, vec![want(2)]);
        e.sync(staying);
        assert_eq!(map.ids().unwrap(), vec![ino(&pod_dir(t.path(), 2))]);
        e.sync(new);
        let mut ids = map.ids().unwrap();
        ids.sort();
        let mut want_ids = vec![ino(&pod_dir(t.path(), 2)), ino(&pod_dir(t.path(), 4))];
        want_ids.sort();
        assert_eq!(ids, want_ids);
        let released = map.1.lock().clone();
        assert_eq!(
            released,
            vec![ino(&pod_dir(t.path(), 1)), ino(&pod_dir(t.path(), 3))],
            "released other than the leavers, or more than once"
        );
    }

    #[test]
    fn enrolls_found_pods_and_waits_for_the_others() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(pod_dir(t.path(), 1)).unwrap();
        let map = Arc::new(SetMap::default());
        map.insert(999).unwrap(); // left by a previous run
        let mut e = Enrollment::new(map.clone(), t.path());
        let blocked = DesiredPod {
            blocked: Some("hostNetwork pod".into()),
            ..want(3)
        };
        std::fs::create_dir_all(pod_dir(t.path(), 3)).unwrap();
        e.sync(vec![want(1), want(2), blocked]);
        assert_eq!(map.ids().unwrap(), vec![ino(&pod_dir(t.path(), 1))]);
        let st = e.status();
        assert_eq!(st.pods[0].found_by, Some("kubelet-name"));
        assert!(st.pods[1].problem.as_deref().unwrap().contains(&uid(2)));
        assert_eq!(st.pods[2].problem.as_deref(), Some("hostNetwork pod"));
        assert!(st.repairs.is_empty(), "a previous run's id is not a repair");
        // The pending pod's QoS level is watched; its directory appears and is enrolled.
        assert_eq!(
            e.watch_dirs(),
            [t.path().join("kubepods.slice/kubepods-besteffort.slice")].into()
        );
        std::fs::create_dir_all(pod_dir(t.path(), 2)).unwrap();
        assert_eq!(e.enroll_pending(false), 1);
        assert!(e.status().pods[1].enroll_delay_ms.is_some());
        assert!(e.watch_dirs().is_empty());
        // Unenrolled: released.
        e.sync(vec![want(2)]);
        assert_eq!(map.ids().unwrap(), vec![ino(&pod_dir(t.path(), 2))]);
    }

    /// A container restart changes the Pod's container IDs: the enrolled cgroup stays in the map
    /// throughout (the map is never without it), while a changed uid moves the pod.
    #[test]
    fn a_pod_update_that_keeps_its_cgroup_keeps_it_enrolled() {
        /// Fails the test if the id is ever removed.
        struct NoRemove(SetMap, u64);
        impl EnrollMap for NoRemove {
            fn ids(&self) -> crate::Result<Vec<u64>> {
                self.0.ids()
            }
            fn insert(&self, id: u64) -> crate::Result<()> {
                self.0.insert(id)
            }
            fn remove(&self, id: u64) -> crate::Result<()> {
                assert_ne!(id, self.1, "the pod's cgroup was released");
                self.0.remove(id)
            }
        }
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(pod_dir(t.path(), 1)).unwrap();
        std::fs::create_dir_all(pod_dir(t.path(), 2)).unwrap();
        let map = Arc::new(NoRemove(SetMap::default(), ino(&pod_dir(t.path(), 1))));
        let mut e = Enrollment::new(map.clone(), t.path());
        e.sync(vec![want(1)]);
        let mut restarted = want(1);
        restarted.query.container_ids = vec![format!("containerd://{:064x}", 7)];
        e.sync(vec![restarted.clone()]);
        assert_eq!(map.0.ids().unwrap(), vec![map.1]);
        assert_eq!(e.status().pods[0].cgroup_id, Some(map.1));
        // A different uid is another place: the pod moves to pod 2's cgroup.
        let moved = DesiredPod {
            query: PodCgroupQuery {
                uid: Some(uid(2)),
                ..restarted.query
            },
            ..restarted
        };
        let map = Arc::new(SetMap::default());
        let mut e = Enrollment::new(map.clone(), t.path());
        e.sync(vec![want(1)]);
        e.sync(vec![moved]);
        assert_eq!(map.ids().unwrap(), vec![ino(&pod_dir(t.path(), 2))]);
    }

    #[test]
    fn reconciliation_repairs_what_drifted_and_counts_it() {
        let (t, map, mut e) = pods_present(3);
        e.sync(vec![want(1), want(2), want(3)]);
        assert_eq!(e.reconcile(), 0, "nothing drifted");

        let old1 = ino(&pod_dir(t.path(), 1));
        // The old directory moves out of the way rather than going: while it exists its inode
        // number cannot be handed to the recreated one (a freed number can be, at once).
        std::fs::rename(pod_dir(t.path(), 1), t.path().join("gone-1")).unwrap();
        std::fs::create_dir(pod_dir(t.path(), 1)).unwrap();
        let new1 = ino(&pod_dir(t.path(), 1));
        assert_ne!(old1, new1);
        std::fs::remove_dir(pod_dir(t.path(), 2)).unwrap();
        let id3 = ino(&pod_dir(t.path(), 3));
        map.remove(id3).unwrap();
        map.insert(4242).unwrap();

        assert_eq!(e.reconcile(), 4);
        let ids: BTreeSet<u64> = map.ids().unwrap().into_iter().collect();
        assert_eq!(ids, [new1, id3].into());
        let st = e.status();
        let count = |k: &str| st.repairs.get(k).copied().unwrap_or(0);
        assert_eq!(count("cgroup_recreated"), 1);
        assert_eq!(count("cgroup_deleted"), 1);
        assert_eq!(count("map_entry_missing"), 1);
        assert_eq!(count("stale_map_entry"), 1);
        assert_eq!(st.pods[0].cgroup_id, Some(new1));
        assert!(st.pods[1].cgroup_id.is_none() && st.pods[1].problem.is_some());
        assert_eq!(st.reconciliations, 2);
        // The deleted pod's directory comes back: enrolled again, not a repair.
        std::fs::create_dir(pod_dir(t.path(), 2)).unwrap();
        assert_eq!(e.reconcile(), 0);
        assert_eq!(map.ids().unwrap().len(), 3);
    }

    /// 500 enrolled pods on a kubelet-shaped tree: one reconciliation's CPU time (the root test
    /// measures it with the pinned map; this one shows the agent's own part).
    #[test]
    fn reconciling_500_pods_takes_little_cpu() {
        let t = tempfile::tempdir().unwrap();
        let wants: Vec<DesiredPod> = (0..500).map(want).collect();
        for n in 0..500 {
            std::fs::create_dir_all(pod_dir(t.path(), n)).unwrap();
        }
        let map = Arc::new(SetMap::default());
        let mut e = Enrollment::new(map.clone(), t.path());
        e.sync(wants);
        assert_eq!(map.ids().unwrap().len(), 500);
        let mut cpu = Vec::new();
        for _ in 0..5 {
            assert_eq!(e.reconcile(), 0);
            cpu.push(e.status().last_reconcile_cpu_us.unwrap());
        }
        cpu.sort_unstable();
        println!(
            "reconciliation of 500 pods (in-memory map): median {} us CPU, runs {cpu:?}",
            cpu[2]
        );
        assert!(cpu[2] < 50_000, "{cpu:?} us");
    }
}
