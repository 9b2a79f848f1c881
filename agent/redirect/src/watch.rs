//! [`DirWatch`]: waits until a directory appears under one of a set of watched directories
//! (inotify `IN_CREATE`), or until another thread calls [`DirWatch::wake`], or a timeout. The
//! enroller watches the parents of pending pods' expected cgroups with it, so a pod is enrolled
//! as its cgroup is created rather than at the next poll.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::net::UnixStream,
    },
    path::PathBuf,
    time::Duration,
};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use parking_lot::Mutex;

pub struct DirWatch {
    inotify: Mutex<(Inotify, BTreeMap<PathBuf, WatchDescriptor>)>,
    inotify_fd: i32,
    /// A byte on `wake_tx` ends a [`DirWatch::wait`] early.
    wake_tx: UnixStream,
    wake_rx: UnixStream,
}

impl DirWatch {
    pub fn new() -> std::io::Result<Self> {
        let inotify = Inotify::init()?;
        let inotify_fd = inotify.as_fd().as_raw_fd();
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        Ok(DirWatch {
            inotify: Mutex::new((inotify, BTreeMap::new())),
            inotify_fd,
            wake_tx,
            wake_rx,
        })
    }

    /// Watches exactly `dirs` from now on (a directory that cannot be watched, e.g. gone
    /// already, is skipped: the caller's next pass sees it missing).
    pub fn set(&self, dirs: &BTreeSet<PathBuf>) {
        let mut guard = self.inotify.lock();
        let (inotify, watched) = &mut *guard;
        let old: Vec<PathBuf> = watched
            .keys()
            .filter(|d| !dirs.contains(*d))
            .cloned()
            .collect();
        for d in old {
            if let Some(wd) = watched.remove(&d) {
                // Fails when the directory went away (the kernel removed the watch).
                let _ = inotify.watches().remove(wd);
            }
        }
        let new: Vec<&PathBuf> = dirs.iter().filter(|d| !watched.contains_key(*d)).collect();
        for d in new {
            match inotify.watches().add(
                d,
                WatchMask::CREATE | WatchMask::MOVED_TO | WatchMask::ONLYDIR,
            ) {
                Ok(wd) => {
                    watched.insert(d.clone(), wd);
                }
                Err(e) => tracing::debug!(dir = %d.display(), "cannot watch: {e}"),
            }
        }
    }

    /// The directories watched now.
    pub fn watched(&self) -> BTreeSet<PathBuf> {
        self.inotify.lock().1.keys().cloned().collect()
    }

    /// Ends the current (or next) [`DirWatch::wait`].
    pub fn wake(&self) {
        let _ = (&self.wake_tx).write(&[1]);
    }

    /// Waits for a directory to be created in a watched directory, a [`DirWatch::wake`], or
    /// `timeout`. Returns whether something happened (events are consumed: the caller looks at
    /// the directories themselves).
    pub fn wait(&self, timeout: Duration) -> bool {
        let ready =
            crate::sys::poll_readable(&[self.inotify_fd, self.wake_rx.as_raw_fd()], timeout);
        if ready {
            let mut buf = [0u8; 4096];
            while (&self.wake_rx).read(&mut buf).is_ok_and(|n| n > 0) {}
            let mut guard = self.inotify.lock();
            let (inotify, watched) = &mut *guard;
            // A watched directory that went away takes its watch with it (IN_IGNORED): forget
            // it, so that the directory is watched again if it comes back.
            let mut gone = Vec::new();
            while let Ok(events) = inotify.read_events(&mut buf) {
                let mut any = false;
                for e in events {
                    any = true;
                    if e.mask.contains(EventMask::IGNORED) {
                        gone.push(e.wd.clone());
                    }
                }
                if !any {
                    break;
                }
            }
            watched.retain(|_, wd| !gone.contains(wd));
        }
        ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_directory_in_a_watched_one_ends_the_wait() {
        let t = tempfile::tempdir().unwrap();
        let w = DirWatch::new().unwrap();
        w.set(&[t.path().to_path_buf()].into());
        assert_eq!(w.watched().len(), 1);
        assert!(!w.wait(Duration::from_millis(10)), "nothing happened");
        std::fs::create_dir(t.path().join("pod1")).unwrap();
        assert!(w.wait(Duration::from_secs(5)));
        assert!(!w.wait(Duration::from_millis(10)), "events were consumed");
        w.wake();
        assert!(w.wait(Duration::from_secs(5)));
        // A watched directory removed and made again is watched again.
        let sub = t.path().join("pod1");
        w.set(&[sub.clone()].into());
        std::fs::remove_dir(&sub).unwrap();
        assert!(w.wait(Duration::from_secs(5)), "IN_IGNORED");
        assert!(w.watched().is_empty(), "the kernel dropped the watch");
        std::fs::create_dir(&sub).unwrap();
        w.set(&[sub.clone()].into());
        std::fs::create_dir(sub.join("c")).unwrap();
        assert!(w.wait(Duration::from_secs(5)));
        // Unwatched: a new directory no longer ends the wait.
        w.set(&BTreeSet::new());
        // Removing a watch queues IN_IGNORED.
        w.wait(Duration::from_millis(10));
        std::fs::create_dir(t.path().join("pod2")).unwrap();
        assert!(!w.wait(Duration::from_millis(10)));
        assert!(w.watched().is_empty());
    }
}
