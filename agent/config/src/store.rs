//! `ConfigDir`: the standalone-mode store. Each `reload` rescans the directory, reparses only files
//! whose size, mtime or content hash changed, and keeps the last good configuration per object: an
//! object with an error keeps its previous good version from the same file, a file that is not valid
//! YAML keeps all of its previous objects, a deleted file takes its objects with it. The generation
//! increases only when the effective configuration changes.

use crate::build::{build, check};
use crate::parse::{collect_files, parse_str, Object, ObjectId};
use crate::problem::Problem;
use crate::BuildOptions;
use sluice_policy::Snapshot;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

/// The result of one rescan.
#[derive(Clone, Debug)]
pub struct Reload {
    /// The snapshot changed: its configuration (then the generation went up) or the problems it
    /// reports (same generation), so a caller that publishes only on change still shows rejections.
    pub changed: bool,
    /// The current snapshot; its `rejections`/`warnings` are this scan's problems.
    pub snapshot: Arc<Snapshot>,
    /// Every problem found in this scan (errors and warnings).
    pub problems: Vec<Problem>,
}

#[derive(Debug)]
struct FileState {
    size: u64,
    mtime: Option<SystemTime>,
    hash: u64,
    /// Objects in force from this file (new good versions, or kept previous ones).
    objects: Vec<Object>,
    /// Parse problems, and the errors of objects that were rejected.
    problems: Vec<Problem>,
}

/// A directory of YAML files watched by polling `reload`.
#[derive(Debug)]
pub struct ConfigDir {
    dir: PathBuf,
    opts: BuildOptions,
    files: BTreeMap<PathBuf, FileState>,
    snapshot: Arc<Snapshot>,
    /// The effective configuration of `snapshot`, to tell real changes from rewrites.
    fingerprint: Option<String>,
    problems: Vec<Problem>,
}

impl ConfigDir {
    pub fn new(dir: PathBuf, opts: BuildOptions) -> Self {
        Self {
            dir,
            opts,
            files: BTreeMap::new(),
            snapshot: Arc::new(Snapshot::default()),
            fingerprint: None,
            problems: Vec::new(),
        }
    }

    pub fn dir(&self) -> &PathBuf {
        &self.dir
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.clone()
    }

    /// Rescans the directory; cheap when nothing changed.
    pub fn reload(&mut self) -> Reload {
        let (paths, dir_problems) = collect_files(&self.dir);
        let mut dirty = self.fingerprint.is_none();
        let present: BTreeSet<&PathBuf> = paths.iter().collect();
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        dirty |= self.files.len() != before;
        for path in &paths {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let mtime = meta.modified().ok();
            if let Some(state) = self.files.get(path) {
                if state.size == meta.len() && state.mtime == mtime {
                    continue;
                }
            }
            let Ok(bytes) = std::fs::read(path) else {
                continue;
            };
            let mut hasher = DefaultHasher::new();
            bytes.hash(&mut hasher);
            let hash = hasher.finish();
            if let Some(state) = self.files.get_mut(path) {
                state.size = meta.len();
                state.mtime = mtime;
                if state.hash == hash {
                    continue;
                }
            }
            dirty = true;
            let name = path
                .strip_prefix(&self.dir)
                .unwrap_or(path)
                .display()
                .to_string();
            let text = String::from_utf8_lossy(&bytes);
            let previous = self
                .files
                .remove(path)
                .map(|s| s.objects)
                .unwrap_or_default();
            let (objects, problems) = self.reconcile(&name, &text, previous);
            self.files.insert(
                path.clone(),
                FileState {
                    size: meta.len(),
                    mtime,
                    hash,
                    objects,
                    problems,
                },
            );
        }
        if !dirty {
            return Reload {
                changed: false,
                snapshot: self.snapshot.clone(),
                problems: self.problems.clone(),
            };
        }
        let objects: Vec<Object> = self
            .files
            .values()
            .flat_map(|s| s.objects.iter().cloned())
            .collect();
        let (mut snap, build_problems) = build(&objects, &self.opts);
        let mut problems = dir_problems;
        problems.extend(self.files.values().flat_map(|s| s.problems.iter().cloned()));
        problems.extend(build_problems);
        problems.sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
        let fingerprint = fingerprint(&snap);
        let config_changed = self.fingerprint.as_ref() != Some(&fingerprint);
        snap.generation = self.snapshot.generation + u64::from(config_changed);
        let changed = config_changed || problems != self.problems;
        snap.rejections = problems
            .iter()
            .filter(|p| p.is_error())
            .map(Problem::to_rejection)
            .collect();
        snap.warnings = problems
            .iter()
            .filter(|p| !p.is_error())
            .map(Problem::to_rejection)
            .collect();
        self.fingerprint = Some(fingerprint);
        self.snapshot = Arc::new(snap);
        self.problems = problems;
        if config_changed {
            tracing::info!(generation = self.snapshot.generation, dir = %self.dir.display(), "configuration changed");
        }
        Reload {
            changed,
            snapshot: self.snapshot.clone(),
            problems: self.problems.clone(),
        }
    }

    /// New objects of a changed file, with the previous good version kept for each rejected one.
    fn reconcile(
        &self,
        name: &str,
        text: &str,
        previous: Vec<Object>,
    ) -> (Vec<Object>, Vec<Problem>) {
        let parsed = parse_str(name, text);
        let mut problems = parsed.problems;
        if parsed.unreadable {
            if !previous.is_empty() {
                note_kept(
                    &mut problems,
                    "the previous version of this file stays in force",
                );
            }
            return (previous, problems);
        }
        let mut good = Vec::new();
        let mut rejected: Vec<Option<ObjectId>> = parsed.failed;
        for obj in parsed.objects {
            let (checked, found) = check(&obj, &self.opts);
            if checked.is_some() {
                // Warnings of accepted objects come from `build`.
                good.push(obj);
            } else {
                problems.extend(found);
                rejected.push(Some(obj.id()));
            }
        }
        let good_ids: BTreeSet<ObjectId> = good.iter().map(Object::id).collect();
        let unknown_failed = rejected.iter().any(Option::is_none);
        let mut kept = false;
        for old in previous {
            let id = old.id();
            if good_ids.contains(&id) {
                continue;
            }
            if unknown_failed || rejected.contains(&Some(id)) {
                good.push(old);
                kept = true;
            }
        }
        if kept {
            note_kept(&mut problems, "the last good version stays in force");
        }
        (good, problems)
    }
}

fn note_kept(problems: &mut [Problem], note: &str) {
    for p in problems.iter_mut().filter(|p| p.is_error()) {
        p.reason = format!("{}; {note}", p.reason);
    }
}

/// The effective configuration, without generation and problems.
fn fingerprint(snap: &Snapshot) -> String {
    let view = Snapshot {
        generation: 0,
        services: snap.services.clone(),
        virtual_hosts: snap.virtual_hosts.clone(),
        wildcard_hosts: snap.wildcard_hosts.clone(),
        clusters: snap.clusters.clone(),
        workloads: snap.workloads.clone(),
        rejections: Vec::new(),
        warnings: Vec::new(),
    };
    serde_json::to_string(&view).unwrap_or_default()
}
