//! Finding a pod's cgroup v2 directory from what its Pod object says (uid, QoS class, container
//! IDs), the way kubelet names it, under the node's cgroup v2 root.
//!
//! kubelet keeps every pod below one "kubepods" cgroup and names the levels below it after the
//! pod's QoS class: Guaranteed pods sit directly under it, Burstable and BestEffort pods under a
//! level of their own. Its two cgroup drivers spell the same tree differently:
//!
//! | driver | Burstable pod | Guaranteed pod |
//! | --- | --- | --- |
//! | cgroupfs | `kubepods/burstable/pod<uid>` | `kubepods/pod<uid>` |
//! | systemd | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | `kubepods.slice/kubepods-pod<uid_>.slice` |
//!
//! With systemd every level repeats its ancestors' names joined by `-`, and a `-` inside a name
//! (the uid's) becomes `_`. kubelet's `--cgroup-root` adds levels in front (kind runs kubelet with
//! `/kubelet`: `kubelet.slice/kubelet-kubepods.slice/...`), and a node that is itself a container
//! (kind) puts all of it under another slice (`system.slice/docker-<node>.scope/...`). So the
//! kubepods directories are found by a bounded walk from the root, not assumed at one place.
//!
//! The pod-level directory is what gets enrolled: the programs check a task's cgroup and its
//! ancestors, so every container of the pod is covered, including ones that start later.
//! Container directories (`cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`
//! with systemd; the bare id with cgroupfs) are used only to find a pod whose directory name did
//! not match, from its container IDs; [`ProcIndex`] finds it from running processes'
//! `/proc/<pid>/cgroup` as a last resort.

use std::{
    collections::BTreeMap,
    path::{Component, Path, PathBuf},
};

/// How far below the root kubepods directories are looked for (kind nests them 4-5 deep).
const MAX_DEPTH: usize = 8;
/// At most this many directories are read while looking (a node has a few hundred).
const MAX_VISITED: usize = 20_000;

/// `status.qosClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    /// Kubernetes' spelling (`Guaranteed`, `Burstable`, `BestEffort`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    /// kubelet's name for the class's level (none for Guaranteed).
    fn level(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// How a kubepods directory spells its children.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Driver {
    /// `kubepods/burstable/pod<uid>`.
    Cgroupfs,
    /// `<prefix>.slice/<prefix>-burstable.slice/<prefix>-burstable-pod<uid_>.slice`; `prefix`
    /// is `kubepods`, or `kubelet-kubepods` under kind's `--cgroup-root=/kubelet`.
    Systemd { prefix: String },
}

/// A directory kubelet's pod cgroups live under.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct KubepodsDir {
    pub path: PathBuf,
    pub driver: Driver,
}

impl KubepodsDir {
    /// The kubepods directory a directory name denotes, if any.
    fn from_name(path: PathBuf, name: &str) -> Option<Self> {
        if name == "kubepods" {
            return Some(KubepodsDir {
                path,
                driver: Driver::Cgroupfs,
            });
        }
        let prefix = name.strip_suffix(".slice")?;
        (prefix == "kubepods" || prefix.ends_with("-kubepods")).then(|| KubepodsDir {
            path,
            driver: Driver::Systemd {
                prefix: prefix.to_string(),
            },
        })
    }

    /// Where kubelet puts the pod-level cgroup of a pod of this uid and class.
    pub fn pod_dir(&self, uid: &str, qos: QosClass) -> PathBuf {
        match (&self.driver, qos.level()) {
            (Driver::Cgroupfs, None) => self.path.join(format!("pod{uid}")),
            (Driver::Cgroupfs, Some(level)) => self.path.join(level).join(format!("pod{uid}")),
            (Driver::Systemd { prefix }, None) => self
                .path
                .join(format!("{prefix}-pod{}.slice", systemd_escape(uid))),
            (Driver::Systemd { prefix }, Some(level)) => self
                .path
                .join(format!("{prefix}-{level}.slice"))
                .join(format!("{prefix}-{level}-pod{}.slice", systemd_escape(uid))),
        }
    }
}

/// systemd's unit names use `-` as the hierarchy separator, so kubelet writes a uid's dashes as
/// underscores.
fn systemd_escape(uid: &str) -> String {
    uid.replace('-', "_")
}

/// Whether a directory name is the pod-level cgroup of `uid` in either driver's spelling.
pub fn is_pod_dir_name(name: &str, uid: &str) -> bool {
    if uid.is_empty() {
        return false;
    }
    if name.strip_prefix("pod") == Some(uid) {
        return true;
    }
    name.strip_suffix(".slice")
        .and_then(|n| n.strip_suffix(&systemd_escape(uid)))
        .is_some_and(|n| n.ends_with("-pod") || n == "pod")
}

/// The directory names container runtimes give a container's cgroup (`id`: the part after
/// `containerd://`, `cri-o://` or `docker://` in `status.containerStatuses[].containerID`).
fn container_dir_names(id: &str) -> [String; 4] {
    [
        format!("cri-containerd-{id}.scope"),
        format!("crio-{id}.scope"),
        format!("docker-{id}.scope"),
        id.to_string(),
    ]
}

/// The runtime's id in a `containerID` (`containerd://0123...` -> `0123...`).
pub fn container_id(status_id: &str) -> Option<&str> {
    let id = status_id
        .split_once("://")
        .map_or(status_id, |(_, id)| id)
        .trim();
    // A bare id is hex; anything else (an empty string, a path) would match unrelated names.
    (id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Every kubepods directory under `root` (a bounded breadth-first walk; kubepods directories are
/// not descended into: pods are below them, not other kubepods trees).
pub fn find_kubepods_dirs(root: &Path) -> Vec<KubepodsDir> {
    let mut found = Vec::new();
    let mut level = vec![root.to_path_buf()];
    let mut visited = 0;
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in &level {
            for (path, name) in subdirs(dir) {
                visited += 1;
                if visited > MAX_VISITED {
                    return found;
                }
                match KubepodsDir::from_name(path.clone(), &name) {
                    Some(k) => found.push(k),
                    None => next.push(path),
                }
            }
        }
        if next.is_empty() {
            break;
        }
        level = next;
    }
    found.sort();
    found
}

/// Subdirectories of `dir` with their names (unreadable ones are skipped: cgroups come and go).
fn subdirs(dir: &Path) -> Vec<(PathBuf, String)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| Some((e.path(), e.file_name().into_string().ok()?)))
        .collect()
}

/// What a Pod says about where its cgroup is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodCgroupQuery {
    /// `metadata.uid`.
    pub uid: Option<String>,
    /// `status.qosClass`; unknown: all three levels are tried.
    pub qos: Option<QosClass>,
    /// The runtimes' container IDs (`containerd://...`), when the Pod's status has them.
    pub container_ids: Vec<String>,
    /// `sluice.io/cgroup`: an explicit directory (relative: under the root), which wins.
    pub explicit: Option<PathBuf>,
}

/// How a pod's cgroup was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// The `sluice.io/cgroup` annotation.
    Annotation,
    /// kubelet's name for it from the uid and QoS class.
    Kubelet,
    /// The parent of one of its containers' cgroups.
    ContainerId,
    /// A process of the pod (`/proc/<pid>/cgroup`).
    Proc,
}

impl Found {
    pub fn as_str(self) -> &'static str {
        match self {
            Found::Annotation => "annotation",
            Found::Kubelet => "kubelet-name",
            Found::ContainerId => "container-id",
            Found::Proc => "proc",
        }
    }
}

/// Where a pod's cgroup is, or where it is expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    Found {
        path: PathBuf,
        by: Found,
    },
    /// Not there (yet): the directories it may appear as, to watch.
    Missing {
        expected: Vec<PathBuf>,
        why: String,
    },
}

/// Resolves pods' cgroups under one root. The kubepods directories are found once and again when
/// a pod cannot be found (kubelet may start after the agent).
#[derive(Debug)]
pub struct Resolver {
    root: PathBuf,
    kubepods: Vec<KubepodsDir>,
}

impl Resolver {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let kubepods = find_kubepods_dirs(&root);
        Resolver { root, kubepods }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn kubepods_dirs(&self) -> &[KubepodsDir] {
        &self.kubepods
    }

    /// Looks for kubepods directories again.
    pub fn rescan(&mut self) {
        self.kubepods = find_kubepods_dirs(&self.root);
    }

    /// Where `pod`'s pod-level cgroup is, by every means but `/proc` (see
    /// [`Resolver::resolve_with`]).
    pub fn resolve(&self, pod: &PodCgroupQuery) -> Resolution {
        self.resolve_with(pod, Some(&self.container_index()))
    }

    /// Where `pod`'s pod-level cgroup is: the annotation, else kubelet's name for it (a few
    /// `stat`s), else, given `containers`, the parent of one of its containers' directories.
    /// Reads directories only (no rescan: see [`Resolver::rescan`]).
    pub fn resolve_with(
        &self,
        pod: &PodCgroupQuery,
        containers: Option<&ContainerIndex>,
    ) -> Resolution {
        if let Some(dir) = &pod.explicit {
            let path = if dir.is_relative() {
                self.root.join(dir)
            } else {
                dir.clone()
            };
            if path.is_dir() {
                return Resolution::Found {
                    path,
                    by: Found::Annotation,
                };
            }
            return Resolution::Missing {
                why: format!("sluice.io/cgroup {} does not exist", path.display()),
                expected: vec![path],
            };
        }
        let Some(uid) = pod.uid.as_deref().filter(|u| !u.is_empty()) else {
            return Resolution::Missing {
                expected: Vec::new(),
                why: "no metadata.uid and no sluice.io/cgroup annotation".into(),
            };
        };
        let expected = self.expected(uid, pod.qos);
        if let Some(path) = expected.iter().find(|p| p.is_dir()) {
            return Resolution::Found {
                path: path.clone(),
                by: Found::Kubelet,
            };
        }
        if let Some(path) = containers.and_then(|c| c.pod_of(&pod.container_ids)) {
            return Resolution::Found {
                path,
                by: Found::ContainerId,
            };
        }
        let why = if self.kubepods.is_empty() {
            format!(
                "no kubepods cgroup under {} (is --cgroup-root kubelet's cgroup v2 root?)",
                self.root.display()
            )
        } else {
            format!(
                "cgroup of pod uid {uid} not found (expected {})",
                expected
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
        };
        Resolution::Missing { expected, why }
    }

    /// kubelet's names for the pod under every kubepods directory.
    pub fn expected(&self, uid: &str, qos: Option<QosClass>) -> Vec<PathBuf> {
        let classes: &[QosClass] = match &qos {
            Some(q) => std::slice::from_ref(q),
            None => &QosClass::ALL,
        };
        self.kubepods
            .iter()
            .flat_map(|k| classes.iter().map(|q| k.pod_dir(uid, *q)))
            .collect()
    }

    /// Every directory down to the container level under each kubepods directory
    /// (kubepods/qos/pod/container), by name, with its parent: read once per pass for all the
    /// pods that kubelet's names did not find.
    pub fn container_index(&self) -> ContainerIndex {
        let mut parents = std::collections::HashMap::new();
        for k in &self.kubepods {
            let mut level = vec![k.path.clone()];
            for _ in 0..3 {
                let mut next = Vec::new();
                for dir in &level {
                    for (path, name) in subdirs(dir) {
                        parents.entry(name).or_insert_with(|| dir.clone());
                        next.push(path);
                    }
                }
                level = next;
            }
        }
        ContainerIndex { parents }
    }

    /// Maps a path from `/proc/<pid>/cgroup` (relative to the reader's cgroup namespace, maybe
    /// starting with `/..`) to a directory under the root, cut at the pod level. The part above
    /// the namespace's root is unknown, so the path is anchored at a kubepods directory it
    /// names, or else taken as relative to the root.
    pub fn locate_proc_path(&self, proc_path: &str, uid: &str) -> Option<PathBuf> {
        let parts: Vec<&str> = Path::new(proc_path)
            .components()
            .filter_map(|c| match c {
                Component::Normal(s) => s.to_str(),
                _ => None,
            })
            .collect();
        let pod_at = parts.iter().position(|p| is_pod_dir_name(p, uid))?;
        let parts = &parts[..=pod_at];
        let direct: PathBuf = parts.iter().fold(self.root.clone(), |p, c| p.join(c));
        if direct.is_dir() {
            return Some(direct);
        }
        for k in &self.kubepods {
            let name = k.path.file_name().and_then(|n| n.to_str());
            if let Some(at) = parts.iter().position(|p| Some(*p) == name) {
                let path = parts[at + 1..]
                    .iter()
                    .fold(k.path.clone(), |p, c| p.join(c));
                if path.is_dir() {
                    return Some(path);
                }
            }
        }
        None
    }
}

/// Directory names under the kubepods directories with their parents
/// ([`Resolver::container_index`]).
#[derive(Debug, Default)]
pub struct ContainerIndex {
    parents: std::collections::HashMap<String, PathBuf>,
}

impl ContainerIndex {
    /// The pod-level directory holding one of these containers (`containerd://<id>`, ...).
    pub fn pod_of(&self, container_ids: &[String]) -> Option<PathBuf> {
        container_ids
            .iter()
            .filter_map(|s| container_id(s))
            .flat_map(container_dir_names)
            .find_map(|name| self.parents.get(&name).cloned())
    }
}

/// The cgroup v2 path in a `/proc/<pid>/cgroup` (the `0::` line).
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Every process's cgroup v2 path (from `/proc/<pid>/cgroup`), read once, to find pods whose
/// cgroup directories are named in a way the resolver does not know.
#[derive(Debug, Default)]
pub struct ProcIndex {
    /// Distinct paths, each with one process in it.
    paths: BTreeMap<String, u32>,
}

impl ProcIndex {
    /// Reads `proc` (`/proc`); at most `limit` processes.
    pub fn read(proc: &Path, limit: usize) -> Self {
        let mut paths = BTreeMap::new();
        let Ok(entries) = std::fs::read_dir(proc) else {
            return ProcIndex::default();
        };
        for e in entries.flatten().take(limit) {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(text) = std::fs::read_to_string(e.path().join("cgroup")) {
                if let Some(p) = parse_proc_cgroup(&text) {
                    paths.entry(p.to_string()).or_insert(pid);
                }
            }
        }
        ProcIndex { paths }
    }

    /// The pod-level directory of `uid` from a process in it.
    pub fn find(&self, resolver: &Resolver, uid: &str) -> Option<PathBuf> {
        self.paths
            .keys()
            .filter(|p| p.split('/').any(|c| is_pod_dir_name(c, uid)))
            .find_map(|p| resolver.locate_proc_path(p, uid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3c2f8a4e-5b1d-4e8f-9a7b-0c1d2e3f4a5b";
    const UID_: &str = "3c2f8a4e_5b1d_4e8f_9a7b_0c1d2e3f4a5b";
    const CTR: &str = "4b825dc642cb6eb9a060e54bf8d69288fbee4904aabbccddeeff001122334455";

    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for d in dirs {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        t
    }

    fn query(qos: Option<QosClass>) -> PodCgroupQuery {
        PodCgroupQuery {
            uid: Some(UID.into()),
            qos,
            ..Default::default()
        }
    }

    fn found(r: &Resolver, q: &PodCgroupQuery) -> (String, Found) {
        match r.resolve(q) {
            Resolution::Found { path, by } => (
                path.strip_prefix(r.root()).unwrap().display().to_string(),
                by,
            ),
            other => panic!("not found: {other:?}"),
        }
    }

    #[test]
    fn systemd_driver_every_qos_class() {
        let t = tree(&[
            "system.slice/containerd.service",
            &format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CTR}.scope"),
            "kubepods.slice/kubepods-besteffort.slice",
        ]);
        let r = Resolver::new(t.path());
        assert_eq!(
            r.kubepods_dirs(),
            &[KubepodsDir {
                path: t.path().join("kubepods.slice"),
                driver: Driver::Systemd {
                    prefix: "kubepods".into()
                }
            }]
        );
        let want =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(
            found(&r, &query(Some(QosClass::Burstable))),
            (want.clone(), Found::Kubelet)
        );
        assert_eq!(found(&r, &query(None)), (want, Found::Kubelet));
        // The same uid as BestEffort or Guaranteed is elsewhere: not found.
        let Resolution::Missing { expected, why } = r.resolve(&query(Some(QosClass::BestEffort)))
        else {
            panic!("found under the wrong class")
        };
        assert_eq!(
            expected,
            vec![t.path().join(format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ))]
        );
        assert!(why.contains(UID), "{why}");
        std::fs::create_dir_all(
            t.path()
                .join(format!("kubepods.slice/kubepods-pod{UID_}.slice")),
        )
        .unwrap();
        assert_eq!(
            found(&r, &query(Some(QosClass::Guaranteed))).0,
            format!("kubepods.slice/kubepods-pod{UID_}.slice")
        );
    }

    #[test]
    fn cgroupfs_driver_every_qos_class() {
        let t = tree(&[
            &format!("kubepods/pod{UID}/{CTR}"),
            "kubepods/burstable",
            "kubepods/besteffort",
        ]);
        let r = Resolver::new(t.path());
        assert_eq!(r.kubepods_dirs()[0].driver, Driver::Cgroupfs);
        assert_eq!(
            found(&r, &query(Some(QosClass::Guaranteed))),
            (format!("kubepods/pod{UID}"), Found::Kubelet)
        );
        std::fs::create_dir_all(t.path().join(format!("kubepods/besteffort/pod{UID}"))).unwrap();
        assert_eq!(
            found(&r, &query(Some(QosClass::BestEffort))).0,
            format!("kubepods/besteffort/pod{UID}")
        );
        assert_eq!(
            r.expected(UID, Some(QosClass::Burstable)),
            vec![t.path().join(format!("kubepods/burstable/pod{UID}"))]
        );
    }

    #[test]
    fn nested_kind_layout_under_another_slice() {
        // kind: the node is a container (a docker scope) and its kubelet runs with
        // --cgroup-root=/kubelet and the systemd driver.
        let node = "system.slice/docker-0f1e2d3c4b5a.scope";
        let t = tree(&[
            &format!("{node}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CTR}.scope"),
            &format!("{node}/system.slice/containerd.service"),
            "user.slice/user-0.slice",
        ]);
        let r = Resolver::new(t.path());
        assert_eq!(r.kubepods_dirs().len(), 1);
        assert_eq!(
            r.kubepods_dirs()[0].driver,
            Driver::Systemd {
                prefix: "kubelet-kubepods".into()
            }
        );
        assert_eq!(
            found(&r, &query(Some(QosClass::BestEffort))).0,
            format!("{node}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice")
        );
    }

    #[test]
    fn nested_cgroupfs_layout() {
        let t = tree(&[&format!(
            "kubelet/kubepods/burstable/pod{UID}/crio-{CTR}.scope"
        )]);
        let r = Resolver::new(t.path());
        assert_eq!(
            found(&r, &query(Some(QosClass::Burstable))).0,
            format!("kubelet/kubepods/burstable/pod{UID}")
        );
    }

    #[test]
    fn container_ids_find_pods_of_unexpected_names() {
        // A pod directory named in a way kubelet's rules do not give (an older kubelet, a
        // different runtime), with containerd, CRI-O and docker container directories.
        for (runtime, dir) in [
            ("containerd", format!("cri-containerd-{CTR}.scope")),
            ("cri-o", format!("crio-{CTR}.scope")),
            ("docker", format!("docker-{CTR}.scope")),
            ("containerd", CTR.to_string()),
        ] {
            let t = tree(&[&format!("kubepods.slice/odd-pod.slice/{dir}")]);
            let r = Resolver::new(t.path());
            let q = PodCgroupQuery {
                container_ids: vec![format!("{runtime}://{CTR}")],
                ..query(Some(QosClass::Burstable))
            };
            assert_eq!(
                found(&r, &q),
                ("kubepods.slice/odd-pod.slice".into(), Found::ContainerId),
                "{runtime} {dir}"
            );
        }
        assert_eq!(container_id("containerd://"), None);
        assert_eq!(container_id("docker://../../etc"), None);
    }

    #[test]
    fn the_annotation_wins_and_relative_is_under_the_root() {
        let t = tree(&["pods/client", &format!("kubepods/pod{UID}")]);
        let r = Resolver::new(t.path());
        let q = PodCgroupQuery {
            explicit: Some("pods/client".into()),
            ..query(Some(QosClass::Guaranteed))
        };
        assert_eq!(found(&r, &q), ("pods/client".into(), Found::Annotation));
        let q = PodCgroupQuery {
            explicit: Some(t.path().join("pods/gone")),
            ..q
        };
        let Resolution::Missing { why, expected } = r.resolve(&q) else {
            panic!()
        };
        assert!(why.contains("sluice.io/cgroup"), "{why}");
        assert_eq!(expected, vec![t.path().join("pods/gone")]);
    }

    #[test]
    fn missing_pieces_say_what_is_missing() {
        let t = tree(&["system.slice"]);
        let r = Resolver::new(t.path());
        let Resolution::Missing { why, .. } = r.resolve(&query(None)) else {
            panic!()
        };
        assert!(why.contains("no kubepods cgroup"), "{why}");
        let Resolution::Missing { why, .. } = r.resolve(&PodCgroupQuery::default()) else {
            panic!()
        };
        assert!(why.contains("metadata.uid"), "{why}");
    }

    #[test]
    fn pod_dir_names_in_both_spellings() {
        assert!(is_pod_dir_name(&format!("pod{UID}"), UID));
        assert!(is_pod_dir_name(
            &format!("kubepods-burstable-pod{UID_}.slice"),
            UID
        ));
        assert!(is_pod_dir_name(&format!("kubepods-pod{UID_}.slice"), UID));
        assert!(!is_pod_dir_name(&format!("kubepods-pod{UID}.slice"), UID));
        assert!(!is_pod_dir_name("kubepods-burstable.slice", UID));
        assert!(!is_pod_dir_name("pod", ""));
    }

    #[test]
    fn proc_cgroup_paths_relative_to_a_cgroup_namespace() {
        let text = "12:memory:/kubepods/burstable\n0::/../../kubepods/burstable/pod3c2f8a4e-5b1d-4e8f-9a7b-0c1d2e3f4a5b/abc\n";
        let path = parse_proc_cgroup(text).unwrap();
        assert_eq!(
            path,
            format!("/../../kubepods/burstable/pod{UID}/abc").as_str()
        );
        // Anchored at the kubepods directory the path names, wherever it sits under the root.
        let t = tree(&[&format!(
            "system.slice/node.scope/kubepods/burstable/pod{UID}/abc"
        )]);
        let r = Resolver::new(t.path());
        assert_eq!(
            r.locate_proc_path(path, UID),
            Some(t.path().join(format!(
                "system.slice/node.scope/kubepods/burstable/pod{UID}"
            )))
        );
        // A path from the root's own namespace.
        let t = tree(&[&format!("kubepods.slice/kubepods-pod{UID_}.slice/x.scope")]);
        let r = Resolver::new(t.path());
        assert_eq!(
            r.locate_proc_path(
                &format!("/kubepods.slice/kubepods-pod{UID_}.slice/x.scope"),
                UID
            ),
            Some(
                t.path()
                    .join(format!("kubepods.slice/kubepods-pod{UID_}.slice"))
            )
        );
        assert_eq!(r.locate_proc_path("/user.slice/session-1.scope", UID), None);
    }

    #[test]
    fn proc_index_reads_real_proc() {
        // This process is in some cgroup; the index holds its path.
        let idx = ProcIndex::read(Path::new("/proc"), 100_000);
        let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        if let Some(p) = parse_proc_cgroup(&mine) {
            assert!(idx.paths.contains_key(p), "{p} not in the index");
        }
    }
}
