//! The directory source (standalone mode): each [`DirSource::scan`] rescans the directory, reparses
//! only files whose size, mtime or content hash changed, and turns the difference into store
//! [`Event`]s. A file that is not valid YAML (or has a document whose identity cannot be read)
//! keeps its previous objects; a deleted file takes its objects with it; when two files define the
//! same object (or one file twice), the first by path and then document wins, parsed or not; the
//! others are ignored with a warning, and their own errors are still reported.
//! [`ConfigDir`] is this source with its own [`Store`].

use crate::parse::{collect_files, parse_str, ObjectId};
use crate::problem::{ignored_duplicate, Problem};
use crate::store::{Event, Reload, Store, Update};
use crate::BuildOptions;
use sluice_policy::Snapshot;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Debug)]
struct FileState {
    size: u64,
    mtime: Option<SystemTime>,
    hash: u64,
    /// The objects of the file's current text (parsed or failed with a known identity).
    updates: Vec<Update>,
    /// Objects of earlier versions kept in force because this version cannot be fully read.
    keep: BTreeSet<ObjectId>,
    /// Problems of the file that belong to no object.
    problems: Vec<Problem>,
}

impl FileState {
    fn ids(&self) -> impl Iterator<Item = &ObjectId> {
        self.updates.iter().map(|u| &u.id).chain(&self.keep)
    }
}

/// A directory of YAML files, as a source of store events.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// Which file each object in the store came from.
    sent: BTreeMap<ObjectId, PathBuf>,
    scanned: bool,
}

impl DirSource {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            files: BTreeMap::new(),
            sent: BTreeMap::new(),
            scanned: false,
        }
    }

    pub fn dir(&self) -> &PathBuf {
        &self.dir
    }

    /// Rescans the directory: the events that bring a store up to date (none when nothing
    /// changed; cheap then).
    pub fn scan(&mut self) -> Vec<Event> {
        let (paths, dir_problems) = collect_files(&self.dir);
        let mut events = Vec::new();
        if !self.scanned {
            self.scanned = true;
            events.push(Event::Problems {
                key: self.dir.display().to_string(),
                problems: dir_problems,
            });
        }
        let present: BTreeSet<&PathBuf> = paths.iter().collect();
        let mut changed: BTreeSet<PathBuf> = self
            .files
            .keys()
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        self.files.retain(|p, _| present.contains(p));
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
            let name = path
                .strip_prefix(&self.dir)
                .unwrap_or(path)
                .display()
                .to_string();
            let previous: BTreeSet<ObjectId> = self
                .files
                .remove(path)
                .map(|s| s.ids().cloned().collect())
                .unwrap_or_default();
            let parsed = parse_str(&name, &String::from_utf8_lossy(&bytes));
            let unreadable = parsed.unreadable;
            let unknown_failed = parsed.failed.iter().any(|(_, id)| id.is_none());
            let (updates, mut problems) = if unreadable {
                (Vec::new(), parsed.problems)
            } else {
                Update::from_parsed(parsed)
            };
            let keep: BTreeSet<ObjectId> = if unreadable || unknown_failed {
                let new: BTreeSet<&ObjectId> = updates.iter().map(|u| &u.id).collect();
                previous
                    .into_iter()
                    .filter(|id| !new.contains(id))
                    .collect()
            } else {
                BTreeSet::new()
            };
            if !keep.is_empty() {
                let note = if unreadable {
                    "the previous version of this file stays in force"
                } else {
                    "the last good version stays in force"
                };
                for p in problems.iter_mut().filter(|p| p.is_error()) {
                    p.reason = format!("{}; {note}", p.reason);
                }
            }
            changed.insert(path.clone());
            self.files.insert(
                path.clone(),
                FileState {
                    size: meta.len(),
                    mtime,
                    hash,
                    updates,
                    keep,
                    problems,
                },
            );
        }
        if changed.is_empty() {
            return events;
        }

        // The first definition of each object (by path) wins; later ones are warned about.
        let mut owner: BTreeMap<&ObjectId, (&PathBuf, Option<&Update>)> = BTreeMap::new();
        let mut file_problems: BTreeMap<&PathBuf, Vec<Problem>> = BTreeMap::new();
        for (path, state) in &self.files {
            let problems = file_problems
                .entry(path)
                .or_insert_with(|| state.problems.clone());
            for u in &state.updates {
                match owner.get(&u.id) {
                    None => {
                        owner.insert(&u.id, (path, Some(u)));
                    }
                    Some((first_path, first)) => {
                        let first = first.map_or_else(
                            || {
                                let path = first_path.strip_prefix(&self.dir).unwrap_or(first_path);
                                path.display().to_string()
                            },
                            |f| f.origin.to_string(),
                        );
                        problems.push(ignored_duplicate(&u.origin, &u.id, &first));
                        // Not applied, yet still a document of the configuration: what is
                        // wrong with it is reported, as `sluice validate` reports it.
                        problems.extend(u.problems.iter().cloned());
                    }
                }
            }
            for id in &state.keep {
                owner.entry(id).or_insert((path, None));
            }
        }
        for (id, path) in &self.sent {
            if !owner.contains_key(id) {
                events.push(Event::Delete(id.clone()));
            } else if owner[id].0 != path {
                // Re-sent below from its new owner.
                changed.insert(owner[id].0.clone());
            }
        }
        for (id, (path, update)) in &owner {
            let moved = self.sent.get(*id) != Some(*path);
            if let Some(u) = update.filter(|_| moved || changed.contains(*path)) {
                events.push(Event::Upsert(u.clone()));
            }
        }
        for path in &changed {
            if !self.files.contains_key(path) {
                events.push(Event::Problems {
                    key: path.display().to_string(),
                    problems: Vec::new(),
                });
            }
        }
        for (path, problems) in file_problems {
            events.push(Event::Problems {
                key: path.display().to_string(),
                problems,
            });
        }
        self.sent = owner
            .into_iter()
            .map(|(id, (path, _))| (id.clone(), path.clone()))
            .collect();
        events
    }
}

/// A directory of YAML files with its own store, polled with [`ConfigDir::reload`].
#[derive(Debug)]
pub struct ConfigDir {
    source: DirSource,
    store: Store,
}

impl ConfigDir {
    pub fn new(dir: PathBuf, opts: BuildOptions) -> Self {
        Self {
            source: DirSource::new(dir),
            store: Store::new(opts),
        }
    }

    pub fn dir(&self) -> &PathBuf {
        self.source.dir()
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.store.snapshot()
    }

    /// Rescans the directory and publishes what changed; cheap when nothing did.
    pub fn reload(&mut self) -> Reload {
        for event in self.source.scan() {
            self.store.apply(event);
        }
        self.store.commit()
    }
}
