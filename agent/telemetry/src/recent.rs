//! The node's recent traffic for people debugging it: a bounded ring of the last finished requests
//! (what `sluice trace` reads) and a live feed of each record as it finishes (`sluice tap`). The
//! feed shares the records the telemetry made, and only with a tap that listens; the ring keeps
//! each as a [`Kept`]: what `sluice trace` shows of it, in the ring's slot (a long path or a
//! retried request also takes an allocation).

use crate::labels::{Interned, Peer, ServiceName};
use crate::live::{Listener, Live};
use crate::record::{Exchange, Record};
use http::{Method, Version};
use parking_lot::Mutex;
use sluice_core::{AttemptRecords, InfoSummary, ResponseFlags, Routed};
use smallvec::SmallVec;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Records kept by default: a few seconds of a busy node, minutes of a quiet one. What they cost:
/// a kept request stays in memory for as many requests as are kept, so each request writes memory
/// gone cold meanwhile, and evicts from the cache what the next requests need. Hence [`Kept`]:
/// 464 bytes, for most requests all in the ring's slot, where the record and what it points to
/// took about 1,400 in eight allocations (bytes that cycle through the cache once per request); at
/// saturation the default still costs about 1% of the throughput against none kept (`sluice run
/// --recent-requests 0`).
pub const DEFAULT_CAPACITY: usize = 4096;

/// A finished request (or L4 connection) as the ring keeps it: what `sluice trace` shows, in the
/// ring's slot when its text fits [`INLINE_TEXT`] bytes and it made one attempt (most requests;
/// an allocation per request and its cold memory cost some throughput at saturation). Made from
/// the [`Record`] while that is still warm; the record and its request info are freed at once (or
/// shared with a tap that listens).
#[derive(Clone, Debug)]
pub struct Kept {
    pub start: SystemTime,
    pub duration: Duration,
    pub peer: Option<SocketAddr>,
    pub source: Peer,
    pub service: Interned<ServiceName>,
    /// `None` for a connection proxied at L4.
    pub http: Option<(Method, Version)>,
    /// Path, then authority, then `x-request-id`, back to back (UTF-8).
    text: SmallVec<[u8; INLINE_TEXT]>,
    path_len: u32,
    authority_len: u32,
    pub status: u16,
    pub flags: ResponseFlags,
    pub details: Option<&'static str>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub attempt_count: u32,
    /// The endpoint of the last attempt.
    pub upstream: Option<SocketAddr>,
    /// The route and cluster the request was routed to, and their policy then.
    pub routed: Routed,
    pub attempts: AttemptRecords,
}

/// Bytes of a kept request's path, authority and `x-request-id` held in its slot: a UUID request
/// id (36) with a Service's full authority (about 40) and a path of about 40.
pub const INLINE_TEXT: usize = 120;

impl Kept {
    pub fn of(r: &Record) -> Self {
        Self::with_notes(r, r.info.summary())
    }

    /// [`Kept::of`] with the info's notes already read (and moved in, not copied again).
    pub fn with_notes(r: &Record, summary: InfoSummary) -> Self {
        let (http, text, path_len, authority_len) = match &r.exchange {
            Exchange::Http(h) => {
                let id = h.request_id.as_ref().and_then(|v| v.to_str().ok());
                let id = id.unwrap_or_default();
                let mut text = SmallVec::new();
                text.reserve_exact(h.path.len() + h.authority.len() + id.len());
                text.extend_from_slice(h.path.as_bytes());
                text.extend_from_slice(h.authority.as_bytes());
                text.extend_from_slice(id.as_bytes());
                let len = |s: &str| u32::try_from(s.len()).unwrap_or(u32::MAX);
                let (path, authority) = (len(&h.path), len(&h.authority));
                (Some((h.method.clone(), h.version)), text, path, authority)
            }
            Exchange::Tcp { .. } => (None, SmallVec::new(), 0, 0),
        };
        let info = &r.info;
        Self {
            start: r.start,
            duration: r.duration,
            peer: r.peer,
            source: r.source.clone(),
            service: r.service.clone(),
            http,
            text,
            path_len,
            authority_len,
            status: r.status,
            flags: info.flags(),
            details: summary.details,
            request_bytes: r.request_bytes(),
            response_bytes: r.response_bytes,
            attempt_count: info.attempts(),
            upstream: summary.upstream,
            routed: summary.routed,
            attempts: summary.attempts,
        }
    }

    /// `text[from..to]` (to the end without `to`) of an HTTP request; `None` for L4.
    fn part(&self, from: u32, to: Option<u32>) -> Option<&str> {
        self.http.as_ref()?;
        let from = from as usize;
        let bytes = match to {
            Some(to) => self.text.get(from..to as usize),
            None => self.text.get(from..),
        }?;
        // Valid: the parts were whole `str`s, put back to back.
        std::str::from_utf8(bytes).ok()
    }

    pub fn path(&self) -> Option<&str> {
        self.part(0, Some(self.path_len))
    }

    pub fn authority(&self) -> Option<&str> {
        self.part(self.path_len, Some(self.path_len + self.authority_len))
    }

    /// The `x-request-id` sent upstream.
    pub fn request_id(&self) -> Option<&str> {
        self.part(self.path_len + self.authority_len, None)
            .filter(|id| !id.is_empty())
    }
}

pub struct Recent {
    ring: Mutex<VecDeque<Kept>>,
    capacity: usize,
    live: Live<Arc<Record>>,
}

impl Default for Recent {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl Recent {
    /// Keeps the last `capacity` records; 0 keeps none (the live feed goes on).
    pub fn with_capacity(capacity: usize) -> Self {
        let live = Live::new(1024);
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

    pub(crate) fn push(&self, record: Record, notes: InfoSummary) {
        let kept = (self.capacity > 0).then(|| Kept::with_notes(&record, notes));
        // Shared only with a tap that listens; otherwise freed at once, still warm.
        if self.live.has_listeners() {
            self.live.send(Arc::new(record));
        } else {
            drop(record);
        }
        let Some(kept) = kept else { return };
        let evicted = {
            let mut ring = self.ring.lock();
            let evicted = if ring.len() == self.capacity {
                ring.pop_front()
            } else {
                None
            };
            ring.push_back(kept);
            evicted
        };
        // Freed outside the lock.
        drop(evicted);
    }

    /// The newest `limit` requests kept, oldest first (copies: the ring moves on).
    pub fn records(&self, limit: usize) -> Vec<Kept> {
        let ring = self.ring.lock();
        ring.range(ring.len().saturating_sub(limit)..)
            .cloned()
            .collect()
    }

    /// The newest kept request whose `x-request-id` is `id`.
    pub fn find(&self, id: &str) -> Option<Kept> {
        self.ring
            .lock()
            .iter()
            .rev()
            .find(|k| k.request_id() == Some(id))
            .cloned()
    }

    /// Every record from now on (a slow reader skips what it missed).
    pub fn subscribe(&self) -> Listener<Arc<Record>> {
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
        add(&self.conn.bytes_in, n);
    }

    pub fn written(&self, n: u64) {
        add(&self.conn.bytes_out, n);
    }
}

/// Adds to a byte counter that has one writer: the task that reads (or writes) the socket; an L4
/// relay's two directions each count their own. So a load and a store count without an atomic
/// read-modify-write (four per proxied request), and a reader sees a recent total.
fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
    use std::sync::atomic::Ordering::Relaxed;
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
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

    /// As the telemetry pushes: with the info's notes read once.
    fn push(recent: &Recent, record: Record) {
        let notes = record.info.summary();
        recent.push(record, notes);
    }

    #[test]
    fn keeps_the_last_records_or_none() {
        let two = Recent::with_capacity(2);
        let mut tap = two.subscribe();
        for id in ["a", "b", "c"] {
            push(&two, record_of(id));
        }
        let ids = |kept: Vec<Kept>| -> Vec<String> {
            kept.iter()
                .map(|k| k.request_id().unwrap_or_default().to_owned())
                .collect()
        };
        assert_eq!(ids(two.records(10)), ["b", "c"]);
        assert_eq!(ids(two.records(1)), ["c"]);
        assert!(two.find("a").is_none() && two.find("c").is_some());
        assert_eq!(request_id(&tap.try_recv().unwrap()), "a");

        // None kept: nothing to find, and a tap still sees every record.
        let none = Recent::with_capacity(0);
        push(&none, record_of("unseen"));
        let mut tap = none.subscribe();
        push(&none, record_of("d"));
        assert!(none.records(10).is_empty() && none.find("d").is_none());
        assert_eq!(request_id(&tap.try_recv().unwrap()), "d");
        assert!(tap.try_recv().is_err());
    }

    #[test]
    fn a_kept_request_holds_what_trace_shows() {
        use sluice_core::{AttemptRecord, ResponseFlags};
        let mut record = record_of("id-7");
        if let Exchange::Http(h) = &mut record.exchange {
            h.path = "/prices?sku=42".into();
        }
        let endpoint: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        record.info.set_cluster("outbound|80||pricing".into());
        record
            .info
            .add_flags(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        for attempt in 1..=2 {
            record.info.add_attempt();
            record.info.push_upstream(endpoint);
            record.info.push_attempt(AttemptRecord {
                attempt,
                endpoint,
                started: tokio::time::Instant::now().into_std(),
                duration: Duration::from_millis(5),
                reached: true,
                status: 503,
                flags: ResponseFlags::empty(),
                timeout: None,
                response_bytes: 3,
            });
        }
        let kept = Kept::of(&record);
        assert_eq!(kept.path(), Some("/prices?sku=42"));
        assert_eq!(kept.authority(), Some("pricing"));
        assert_eq!(kept.request_id(), Some("id-7"));
        assert_eq!(kept.http.as_ref().map(|h| h.0.clone()), Some(Method::GET));
        assert_eq!(kept.status, 200);
        assert_eq!(kept.flags, ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        assert_eq!((kept.attempt_count, kept.upstream), (2, Some(endpoint)));
        assert_eq!(kept.routed.cluster_name(), Some("outbound|80||pricing"));
        assert_eq!(&kept.attempts[..], &record.info.attempt_records()[..]);

        // A connection proxied at L4 has no request line.
        record.exchange = Exchange::Tcp {
            received: 5,
            sent: 7,
        };
        let kept = Kept::of(&record);
        assert!(kept.http.is_none() && kept.path().is_none() && kept.request_id().is_none());
        assert_eq!((kept.request_bytes, kept.authority()), (5, None));
    }

    #[test]
    fn a_usual_request_is_kept_in_its_slot() {
        use sluice_core::AttemptRecord;
        let uuid = "0b9cd3d0-5d4e-4f5a-9c61-2f1a6c1f0e7d";
        let mut record = record_of(uuid);
        if let Exchange::Http(h) = &mut record.exchange {
            h.path = "/api/v1/products/42?fields=price".into();
            h.authority = "reviews.bookinfo.svc.cluster.local:9080".into();
        }
        let endpoint: SocketAddr = "10.0.0.9:8080".parse().unwrap();
        record.info.push_attempt(AttemptRecord {
            attempt: 1,
            endpoint,
            started: tokio::time::Instant::now().into_std(),
            duration: Duration::from_millis(5),
            reached: true,
            status: 200,
            flags: ResponseFlags::empty(),
            timeout: None,
            response_bytes: 3,
        });
        let kept = Kept::of(&record);
        assert!(!kept.text.spilled() && !kept.attempts.spilled());
        assert_eq!(kept.request_id(), Some(uuid));
        assert_eq!(
            kept.authority(),
            Some("reviews.bookinfo.svc.cluster.local:9080")
        );
        println!("a kept request: {} bytes", std::mem::size_of::<Kept>());

        // A longer one spills to the heap and reads back the same.
        let long = format!("/{}", "x".repeat(200));
        if let Exchange::Http(h) = &mut record.exchange {
            h.path = long.clone();
        }
        let kept = Kept::of(&record);
        assert!(kept.text.spilled());
        assert_eq!(kept.path(), Some(long.as_str()));
        assert_eq!(kept.request_id(), Some(uuid));
    }

    fn request_id(r: &Record) -> String {
        match &r.exchange {
            Exchange::Http(h) => h.request_id.as_ref().unwrap().to_str().unwrap().to_owned(),
            Exchange::Tcp { .. } => String::new(),
        }
    }
}
