//! The node's recent traffic for people debugging it: a bounded ring of the last finished records
//! (what `sluice trace` and `sluice top` read) and a live feed of each one as it finishes (`sluice
//! tap`). Both hold `Arc`s of the records the telemetry already made; nothing is kept when nobody
//! looks beyond the ring's fixed size.

use crate::record::{Exchange, Record};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::broadcast;

/// Records kept by default: a few seconds of a busy node, minutes of a quiet one. What they cost:
/// a kept record (and what it points to) stays in memory for as many requests as are kept, so each
/// request's allocations come from memory gone cold meanwhile rather than from what the previous
/// request just freed; at saturation the default costs about 8% of the throughput (`sluice
/// run --recent-requests`).
pub const DEFAULT_CAPACITY: usize = 4096;

pub struct Recent {
    ring: Mutex<VecDeque<Arc<Record>>>,
    capacity: usize,
    live: broadcast::Sender<Arc<Record>>,
}

impl Default for Recent {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Recent {
    /// Keeps the last `capacity` records; 0 keeps none (the live feed goes on).
    pub fn with_capacity(capacity: usize) -> Self {
        let (live, _) = broadcast::channel(1024);
        Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            capacity,
            live,
        }
    }

    /// How many records are kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn push(&self, record: Record) {
        if self.capacity == 0 {
            // Shared only with a tap that listens; otherwise freed at once, still warm.
            if self.live.receiver_count() > 0 {
                let _ = self.live.send(Arc::new(record));
            }
            return;
        }
        let record = Arc::new(record);
        {
            let mut ring = self.ring.lock();
            if ring.len() == self.capacity {
                ring.pop_front();
            }
            ring.push_back(record.clone());
        }
        // Nobody tapping is the common case: no error worth a word.
        let _ = self.live.send(record);
    }

    /// The records kept, oldest first.
    pub fn records(&self) -> Vec<Arc<Record>> {
        self.ring.lock().iter().cloned().collect()
    }

    /// The newest kept request whose `x-request-id` is `id`.
    pub fn find(&self, id: &str) -> Option<Arc<Record>> {
        self.ring
            .lock()
            .iter()
            .rev()
            .find(|r| match &r.exchange {
                Exchange::Http(h) => h
                    .request_id
                    .as_ref()
                    .is_some_and(|v| v.as_bytes() == id.as_bytes()),
                Exchange::Tcp { .. } => false,
            })
            .cloned()
    }

    /// Every record from now on (a slow reader skips what it missed).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.live.subscribe()
    }
}

/// Which side of the proxy a connection is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// A client's connection to the proxy.
    Downstream,
    /// The proxy's (pooled) connection to an endpoint.
    Upstream,
}

/// One open connection, as `sluice connections` shows it.
#[derive(Debug)]
pub struct OpenConnection {
    pub side: Side,
    /// The client (downstream) or the endpoint (upstream).
    pub peer: Option<std::net::SocketAddr>,
    /// The pod at the other end (`namespace/name`), when known.
    pub pod: Option<String>,
    /// The client's workload (downstream) or the endpoint's (upstream).
    pub workload: crate::Peer,
    /// The Service the connection is for (`unknown` for a client's connection to the explicit
    /// proxy, which may carry requests to any).
    pub service: crate::Interned<crate::ServiceName>,
    /// `Http` for a connection that carries HTTP, `Tcp` for one proxied at L4.
    pub protocol: crate::Protocol,
    pub opened: std::time::SystemTime,
    /// Bytes read from the peer and written to it.
    pub bytes_in: std::sync::atomic::AtomicU64,
    pub bytes_out: std::sync::atomic::AtomicU64,
}

/// The open connections, each registered while it lives.
#[derive(Debug, Default)]
pub struct Connections {
    next: std::sync::atomic::AtomicU64,
    open: Mutex<std::collections::BTreeMap<u64, Arc<OpenConnection>>>,
}

impl Connections {
    /// Registers `conn` until the returned guard is dropped.
    pub fn open(self: &Arc<Self>, conn: OpenConnection) -> ConnectionGuard {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = Arc::new(conn);
        self.open.lock().insert(id, conn.clone());
        ConnectionGuard {
            registry: self.clone(),
            id,
            conn,
        }
    }

    /// Every open connection, oldest first.
    pub fn list(&self) -> Vec<Arc<OpenConnection>> {
        self.open.lock().values().cloned().collect()
    }
}

/// A registered connection; counts its bytes, and leaves the registry when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    registry: Arc<Connections>,
    id: u64,
    conn: Arc<OpenConnection>,
}

impl ConnectionGuard {
    pub fn read(&self, n: u64) {
        self.conn
            .bytes_in
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn written(&self, n: u64) {
        self.conn
            .bytes_out
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.registry.open.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::tests::record_of;

    #[test]
    fn keeps_the_last_records_or_none() {
        let two = Recent::with_capacity(2);
        let mut tap = two.subscribe();
        for id in ["a", "b", "c"] {
            two.push(record_of(id));
        }
        let kept: Vec<_> = two.records().iter().map(|r| request_id(r)).collect();
        assert_eq!(kept, ["b", "c"]);
        assert!(two.find("a").is_none() && two.find("c").is_some());
        assert_eq!(request_id(&tap.try_recv().unwrap()), "a");

        // None kept: nothing to find, and a tap still sees every record.
        let none = Recent::with_capacity(0);
        none.push(record_of("unseen"));
        let mut tap = none.subscribe();
        none.push(record_of("d"));
        assert!(none.records().is_empty() && none.find("d").is_none());
        assert_eq!(request_id(&tap.try_recv().unwrap()), "d");
        assert!(tap.try_recv().is_err());
    }

    fn request_id(r: &Record) -> String {
        match &r.exchange {
            Exchange::Http(h) => h.request_id.as_ref().unwrap().to_str().unwrap().to_owned(),
            Exchange::Tcp { .. } => String::new(),
        }
    }
}
