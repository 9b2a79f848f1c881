//! What the layers of one request learn about it, collected for the access log and metrics.
//! Shared through the request's extensions as `Arc<RequestInfo>`; each field is set by the one layer
//! that owns it, so the lock is never contended and never held across an await. One lock for all
//! the notes and the attempt records, so that what is set or read together costs one acquire and
//! one release (each an atomic read-modify-write): what the router decides at once, and
//! everything the telemetry reads of a finished request at once ([`RequestInfo::summary`]).

use crate::{Deadline, ResponseFlags};
use parking_lot::Mutex;
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One upstream attempt of a request, as the endpoint's side of a sidecar mesh would report it
/// (Istio's `reporter="destination"`) and as its trace span shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttemptRecord {
    /// Which attempt of the request (1 for the first), as `x-envoy-attempt-count` says.
    pub attempt: u32,
    pub endpoint: SocketAddr,
    /// When the attempt picked its endpoint.
    pub started: Instant,
    /// From `started` to the end of the response body, or to the failure.
    pub duration: Duration,
    /// The request went out on a connection to the endpoint (the endpoint saw it).
    pub reached: bool,
    /// The response status; 0 when no response headers came.
    pub status: u16,
    /// What ended it short of a complete response, as a response flag (`UF`, `UC`, `UO`, `UT`
    /// for the proxy's timers, `DC` when the client went away); empty when it completed.
    pub flags: ResponseFlags,
    /// The proxy's timer that ended it, if one did.
    pub timeout: Option<Deadline>,
    /// Response body bytes received from the endpoint.
    pub response_bytes: u64,
}

/// What the configuration in force said about a request when it was routed: the proxy's own
/// description of a route or a cluster, made once per configuration generation and shared by every
/// request it applies to (so a trace shows the policy a request ran under, not today's). Opaque
/// here; the admin API reads it back with [`PolicyNote::get`].
#[derive(Clone)]
pub struct PolicyNote(Arc<dyn std::any::Any + Send + Sync>);

impl PolicyNote {
    pub fn new<T: std::any::Any + Send + Sync>(note: Arc<T>) -> Self {
        Self(note)
    }

    /// The note, if it is a `T`.
    pub fn get<T: std::any::Any>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

/// A destination cluster as a request's record names it: Envoy's name for it and, for a cluster a
/// route chose, its policy as the configuration in force described it. Made once per configuration
/// generation and shared by every request sent to the cluster, so recording where a request went
/// raises one reference count, not one per part.
#[derive(Clone, Debug)]
pub struct ClusterNote {
    /// `outbound|80|v1|pricing.default.svc.cluster.local`.
    pub name: Arc<str>,
    pub policy: Option<PolicyNote>,
}

impl ClusterNote {
    pub fn new(name: Arc<str>, policy: Option<PolicyNote>) -> Self {
        Self { name, policy }
    }
}

/// Where a request went, as the configuration in force when it was routed described it.
#[derive(Clone, Debug, Default)]
pub struct Routed {
    /// The policy of the route (and `match` entry) that took the request (its name among it).
    pub route: Option<PolicyNote>,
    pub cluster: Option<Arc<ClusterNote>>,
}

impl Routed {
    /// The destination cluster's name.
    pub fn cluster_name(&self) -> Option<&str> {
        self.cluster.as_ref().map(|c| &*c.name)
    }

    /// The route's and the cluster's policy, if a route took the request.
    pub fn policy(&self) -> Option<(&PolicyNote, Option<&PolicyNote>)> {
        let route = self.route.as_ref()?;
        Some((route, self.cluster.as_ref().and_then(|c| c.policy.as_ref())))
    }
}

impl std::fmt::Debug for PolicyNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PolicyNote")
    }
}

#[derive(Debug, Default)]
pub struct RequestInfo {
    flags: AtomicU32,
    attempts: AtomicU32,
    /// Request body bytes received from the client.
    request_bytes: AtomicU64,
    /// Whether an attempt has picked an endpoint: the balancer asks before every attempt, and
    /// the first (most requests' only) then needs no lock. Written under the notes' lock.
    has_upstream: AtomicBool,
    notes: Mutex<Notes>,
}

/// A request's attempt records: most requests make one attempt, kept in place (no allocation of
/// its own, per request and in the ring of recent requests).
pub type AttemptRecords = SmallVec<[AttemptRecord; 1]>;

#[derive(Debug, Default)]
struct Notes {
    /// Endpoints of the attempts so far, in order; the last is the current one.
    upstreams: SmallVec<[SocketAddr; 1]>,
    routed: Routed,
    /// Envoy's `%RESPONSE_CODE_DETAILS%` (or, for a connection, its termination details) when the
    /// proxy itself decided the outcome in a way flags do not say (`direct_response`).
    details: Option<&'static str>,
    /// Every attempt that picked an endpoint, in order, once it ended.
    attempts: AttemptRecords,
    /// When the router had the whole request, if that was later than its start: the end of an
    /// injected delay or of the request's body.
    completed: Option<Instant>,
}

/// What a finished request's info says beyond its flags and counts, read at once
/// ([`RequestInfo::summary`]).
#[derive(Clone, Debug)]
pub struct InfoSummary {
    pub details: Option<&'static str>,
    /// The endpoint of the latest attempt.
    pub upstream: Option<SocketAddr>,
    pub routed: Routed,
    pub attempts: AttemptRecords,
}

impl RequestInfo {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_flags(&self, flags: ResponseFlags) {
        self.flags.fetch_or(flags.bits(), Ordering::Relaxed);
    }

    pub fn flags(&self) -> ResponseFlags {
        ResponseFlags::from_bits(self.flags.load(Ordering::Relaxed))
    }

    /// Counts one more attempt (the first attempt included) and returns the count so far.
    pub fn add_attempt(&self) -> u32 {
        self.attempts.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn attempts(&self) -> u32 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Records the endpoint an attempt was sent to (called once per attempt by the balancer).
    pub fn push_upstream(&self, addr: SocketAddr) {
        push_one(&mut self.notes.lock().upstreams, addr);
        self.has_upstream.store(true, Ordering::Relaxed);
    }

    /// Whether an attempt has picked an endpoint yet (a plain load, no lock).
    pub fn has_upstream(&self) -> bool {
        self.has_upstream.load(Ordering::Relaxed)
    }

    /// The endpoint of the latest attempt.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.notes.lock().upstreams.last().copied()
    }

    /// Whether an earlier attempt of this request already went to `addr` (for retry host selection).
    pub fn tried(&self, addr: &SocketAddr) -> bool {
        self.notes.lock().upstreams.contains(addr)
    }

    /// Every endpoint tried so far, in order.
    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.notes.lock().upstreams.to_vec()
    }

    /// Records the Envoy-style cluster name (`outbound|80|v1|pricing.default.svc.cluster.local`)
    /// of a cluster no route chose (an L4 connection's, the black hole): no policy with it.
    pub fn set_cluster(&self, name: Arc<str>) {
        self.notes.lock().routed.cluster = Some(Arc::new(ClusterNote::new(name, None)));
    }

    pub fn cluster(&self) -> Option<Arc<str>> {
        let notes = self.notes.lock();
        notes.routed.cluster.as_ref().map(|c| c.name.clone())
    }

    /// What the router decided, at once: the route's policy and, when the request goes to a
    /// cluster, that cluster (each shared with every request routed the same way).
    pub fn set_routed(&self, route: PolicyNote, cluster: Option<Arc<ClusterNote>>) {
        self.notes.lock().routed = Routed {
            route: Some(route),
            cluster,
        };
    }

    /// The route's and the cluster's policy the request was routed under, if it was routed.
    pub fn policy(&self) -> Option<(PolicyNote, Option<PolicyNote>)> {
        let notes = self.notes.lock();
        let (route, cluster) = notes.routed.policy()?;
        Some((route.clone(), cluster.cloned()))
    }

    /// Records why the proxy answered as it did (`direct_response`, `tcp_session_idle_timeout`).
    pub fn set_details(&self, details: &'static str) {
        self.notes.lock().details = Some(details);
    }

    pub fn details(&self) -> Option<&'static str> {
        self.notes.lock().details
    }

    /// The router had the whole request at `at` (an injected delay or the request's body ended;
    /// the later counts). The upstream's time starts there, as Envoy's router counts it from the
    /// request's completion (`x-envoy-upstream-service-time` leaves a delay and an upload out).
    pub fn completed_at(&self, at: Instant) {
        let mut notes = self.notes.lock();
        notes.completed = Some(notes.completed.map_or(at, |before| before.max(at)));
    }

    /// When the router had the whole request, if a delay or a body ended after its start.
    pub fn completed(&self) -> Option<Instant> {
        self.notes.lock().completed
    }

    /// Records an attempt that has ended (called once per attempt by the cluster).
    pub fn push_attempt(&self, record: AttemptRecord) {
        push_one(&mut self.notes.lock().attempts, record);
    }

    /// The attempts that have ended so far, in the order they ended.
    pub fn attempt_records(&self) -> Vec<AttemptRecord> {
        self.notes.lock().attempts.to_vec()
    }

    /// Details, latest endpoint, where it was routed and the attempts, read under one lock.
    pub fn summary(&self) -> InfoSummary {
        let notes = self.notes.lock();
        InfoSummary {
            details: notes.details,
            upstream: notes.upstreams.last().copied(),
            routed: notes.routed.clone(),
            attempts: notes.attempts.clone(),
        }
    }

    /// Counts request body bytes received from the client.
    pub fn add_request_bytes(&self, n: u64) {
        self.request_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub fn request_bytes(&self) -> u64 {
        self.request_bytes.load(Ordering::Relaxed)
    }
}

/// Appends growing by exactly one element past the first, kept in place. A request's info can stay
/// in memory with its record for `sluice trace` (the last 4,096 by default): a `Vec`'s first
/// growth would make room for four, 352 bytes for one attempt record.
fn push_one<A: smallvec::Array>(v: &mut SmallVec<A>, item: A::Item) {
    v.reserve_exact(1);
    v.push(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_set_at_once_reads_as_if_set_field_by_field() {
        let info = RequestInfo::new();
        let cluster = Arc::new(ClusterNote::new(
            Arc::from("outbound|80||reviews"),
            Some(PolicyNote::new(Arc::new(7u32))),
        ));
        info.set_routed(PolicyNote::new(Arc::new("route")), Some(cluster.clone()));
        info.push_upstream("10.0.0.1:80".parse().unwrap());
        info.push_upstream("10.0.0.2:80".parse().unwrap());
        info.set_details("direct_response");
        // Any instant will do: it is only compared with itself (no timer runs here).
        #[allow(clippy::disallowed_methods)]
        let started = Instant::now();
        info.push_attempt(AttemptRecord {
            attempt: 1,
            endpoint: "10.0.0.2:80".parse().unwrap(),
            started,
            duration: Duration::ZERO,
            reached: true,
            status: 200,
            flags: ResponseFlags::empty(),
            timeout: None,
            response_bytes: 0,
        });
        let s = info.summary();
        assert_eq!(s.routed.cluster_name(), Some("outbound|80||reviews"));
        assert!(Arc::ptr_eq(s.routed.cluster.as_ref().unwrap(), &cluster));
        assert_eq!(info.cluster().as_deref(), Some("outbound|80||reviews"));
        assert_eq!(s.upstream, Some("10.0.0.2:80".parse().unwrap()));
        assert_eq!(s.details, Some("direct_response"));
        let (route, cluster) = s.routed.policy().expect("routed");
        assert_eq!(route.get::<&str>(), Some(&"route"));
        assert_eq!(cluster.and_then(|c| c.get::<u32>().copied()), Some(7));
        assert_eq!(s.attempts.len(), 1);
        assert_eq!(info.attempt_records(), s.attempts.to_vec());
        assert!(info.has_upstream() && info.tried(&"10.0.0.1:80".parse().unwrap()));
        assert!(!RequestInfo::new().has_upstream());

        // A direct response has no cluster: none is recorded, nor a cluster policy.
        let direct = RequestInfo::new();
        direct.set_routed(PolicyNote::new(Arc::new(())), None);
        let s = direct.summary();
        assert_eq!(s.routed.cluster_name(), None);
        assert!(s.routed.policy().is_some_and(|(_, c)| c.is_none()));

        // A cluster named without a route (an L4 connection's): no policy.
        let l4 = RequestInfo::new();
        l4.set_cluster(Arc::from("outbound|5432||db"));
        let s = l4.summary();
        assert_eq!(s.routed.cluster_name(), Some("outbound|5432||db"));
        assert!(s.routed.policy().is_none() && l4.policy().is_none());
    }
}
