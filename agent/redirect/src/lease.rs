//! The fail-open lease: the programs redirect only while `SLUICE_CONFIG.lease_until_ns` is in the
//! future, and the agent renews it only while its outbound listener's accept loop makes
//! progress. [`AcceptWatch`] reads the listener's accept queue; [`LeaseKeeper`] decides, once per
//! renewal period, whether to renew and what to log; [`keep_lease`] is the task that runs it.

use std::{
    os::fd::AsFd as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::{sys, Maps};

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
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
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
    /// Watches `listener` (its descriptor is duplicated); `accepted` counts what its accept loop
    /// took.
    pub fn new(
        listener: &tokio::net::TcpListener,
        accepted: Arc<AtomicU64>,
    ) -> std::io::Result<Self> {
        let listener = socket2::SockRef::from(listener).try_clone()?;
        Ok(AcceptWatch {
            listener,
            accepted,
            last: None,
        })
    }

    /// Called once per renewal period.
    pub fn check(&mut self) -> Progress {
        let queued = match sys::accept_queue_len(self.listener.as_fd()) {
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

/// Whatever holds the lease (the pinned config map; a recorder in tests).
pub trait LeaseHolder {
    fn renew(&self, lease: Duration) -> crate::Result<()>;
}

impl LeaseHolder for Maps {
    fn renew(&self, lease: Duration) -> crate::Result<()> {
        self.renew_lease(lease)
    }
}

/// The lease's state machine: renews unless the accept loop is stalled, and logs each change of
/// state once (stalled / serving again / renewal failing / renewing).
#[derive(Debug)]
pub struct LeaseKeeper {
    pub lease: Duration,
    pub renew_every: Duration,
    stalled: bool,
    /// The last renewal's outcome.
    renewing: Option<bool>,
    renewals: u64,
}

impl LeaseKeeper {
    /// Renewed every quarter of `lease`.
    pub fn new(lease: Duration) -> Self {
        LeaseKeeper {
            lease,
            renew_every: lease / 4,
            stalled: false,
            renewing: None,
            renewals: 0,
        }
    }

    /// Successful renewals so far.
    pub fn renewals(&self) -> u64 {
        self.renewals
    }

    /// Whether the last period saw the accept loop stalled (lease not renewed).
    pub fn is_stalled(&self) -> bool {
        self.stalled
    }

    /// One renewal period: `progress` is what the accept watch saw.
    pub fn tick(&mut self, progress: Progress, holder: &dyn LeaseHolder) {
        match progress {
            Progress::Stalled { queued } => {
                if !self.stalled {
                    tracing::warn!(
                        queued,
                        "the outbound listener accepted nothing for {:?} while connections waited: not renewing the redirect lease, so enrolled pods fail open",
                        self.renew_every
                    );
                    self.stalled = true;
                }
            }
            Progress::Ok if self.stalled => {
                tracing::info!("the outbound listener accepts again: renewing the redirect lease");
                self.stalled = false;
            }
            Progress::Ok | Progress::Unknown => {}
        }
        if self.stalled {
            return;
        }
        match holder.renew(self.lease) {
            Ok(()) => {
                self.renewals += 1;
                if self.renewing != Some(true) {
                    tracing::info!(
                        "redirect lease renewed every {:?} for {:?}: enrolled pods are redirected while the proxy serves",
                        self.renew_every,
                        self.lease
                    );
                    self.renewing = Some(true);
                }
            }
            Err(err) => {
                if self.renewing != Some(false) {
                    tracing::warn!(%err, "cannot renew the redirect lease: enrolled pods fail open until it is renewed");
                    self.renewing = Some(false);
                }
            }
        }
    }
}

/// Renews the lease every quarter of it until `shutdown` changes. Run it on the proxy's runtime,
/// once the outbound listener is bound: redirection then lasts only while that runtime runs
/// this task and the listener's accept loop makes progress. `each_tick` runs after every period
/// (the agent flushes the programs' log lines there).
pub async fn keep_lease(
    holder: Arc<dyn LeaseHolder + Send + Sync>,
    lease: Duration,
    mut watch: AcceptWatch,
    mut shutdown: watch::Receiver<bool>,
    mut each_tick: impl FnMut() + Send,
) {
    let mut keeper = LeaseKeeper::new(lease);
    let mut tick = tokio::time::interval(keeper.renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        keeper.tick(watch.check(), holder.as_ref());
        each_tick();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// Records renewals with the (paused) tokio clock; fails while `failing`.
    #[derive(Default)]
    struct Recorder {
        at: Mutex<Vec<tokio::time::Instant>>,
        failing: Mutex<bool>,
    }

    impl LeaseHolder for Recorder {
        fn renew(&self, _lease: Duration) -> crate::Result<()> {
            if *self.failing.lock() {
                return Err(crate::Error::NoCgroup2);
            }
            self.at.lock().push(tokio::time::Instant::now());
            Ok(())
        }
    }

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
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(sys::accept_queue_len(c.as_fd()).is_err());
        assert_eq!(sys::accept_queue_len(l.as_fd()).unwrap(), 1);
    }

    #[test]
    fn a_stall_stops_renewal_until_the_loop_accepts_again() {
        let rec = Recorder::default();
        let mut k = LeaseKeeper::new(Duration::from_secs(1));
        assert_eq!(k.renew_every, Duration::from_millis(250));
        k.tick(Progress::Ok, &rec);
        k.tick(Progress::Unknown, &rec);
        assert_eq!(k.renewals(), 2, "an unreadable queue does not stop renewal");
        k.tick(Progress::Stalled { queued: 3 }, &rec);
        k.tick(Progress::Stalled { queued: 3 }, &rec);
        assert!(k.is_stalled());
        assert_eq!(k.renewals(), 2);
        k.tick(Progress::Ok, &rec);
        assert!(!k.is_stalled());
        assert_eq!(k.renewals(), 3);
        *rec.failing.lock() = true;
        k.tick(Progress::Ok, &rec);
        assert_eq!(k.renewals(), 3, "a failed renewal is not counted");
        *rec.failing.lock() = false;
        k.tick(Progress::Ok, &rec);
        assert_eq!(k.renewals(), 4);
    }

    /// On paused time: renewals every quarter of the lease, the first at once, and none after
    /// shutdown.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn the_task_renews_every_quarter_of_the_lease_until_shutdown() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let watch = AcceptWatch::new(&listener, Arc::new(AtomicU64::new(0))).unwrap();
        let rec = Arc::new(Recorder::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let ticks = Arc::new(AtomicU64::new(0));
        let t = ticks.clone();
        let start = tokio::time::Instant::now();
        let task = tokio::spawn(keep_lease(
            rec.clone(),
            Duration::from_secs(1),
            watch,
            stop_rx,
            move || {
                t.fetch_add(1, Ordering::Relaxed);
            },
        ));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let at: Vec<u128> = rec
            .at
            .lock()
            .iter()
            .map(|t| (*t - start).as_millis())
            .collect();
        assert_eq!(at, vec![0, 250, 500, 750, 1000]);
        assert_eq!(ticks.load(Ordering::Relaxed), 5);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(rec.at.lock().len(), 5, "renewed after shutdown");
    }
}
