//! The runtime of one upstream cluster: [`ClusterHandle`] is the tower service an attempt calls.
//! One call is one attempt: circuit-breaker admission (`http2MaxRequests`), host selection, a
//! connection from the host's pool, the exchange, and the outcome reported to the outlier detector.
//! Config reloads go through [`ClusterHandle::update`], which keeps per-host state (counters,
//! ejections, idle connections) for every endpoint whose address is unchanged.

use crate::balance::{Balancer, Candidate};
use crate::body::UpstreamBody;
use crate::outcome::{self, Event, Outcome, Phase};
use crate::outlier::{self, Detector, HostOutlier, OutlierEvent};
use crate::pool::{self, ConnectOptions, Leased, Limits, PoolState, Sender};
use crate::stats::{inc, ClusterStats, Stats};
use arc_swap::ArcSwap;
use futures_util::future::{BoxFuture, Either};
use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use parking_lot::Mutex;
use serde::Serialize;
use sluice_core::{
    AttemptRecord, Body, BoxError, Cause, Deadline, Expiry, OverflowKind, ProxyError, RequestCtx,
    RequestInfo, ResponseFlags, StaleConnections,
};
use sluice_policy::Endpoint;
use std::collections::{HashMap, HashSet};
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Connections found closed when about to send, before an attempt gives up.
const MAX_STALE_CONNECTIONS: u32 = 3;

/// The protocol spoken to the cluster's endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 over cleartext, prior knowledge.
    H2c,
}

/// Builds cluster runtimes; the type the proxy names (`sluice_upstream::Cluster::new`).
pub struct Cluster;

impl Cluster {
    /// Starts the runtime of `spec`. The outlier detector's interval task starts with it (or with
    /// the first request, when created outside a tokio runtime) and ends when the last handle drops.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(spec: Arc<sluice_policy::Cluster>, protocol: UpstreamProtocol) -> ClusterHandle {
        let hosts = spec.endpoints.iter().map(Host::new).map(Arc::new).collect();
        let limits = limits_of(&spec);
        let inner = Arc::new(Inner {
            protocol,
            config: ArcSwap::from_pointee(Config::new(spec, hosts)),
            pool: Mutex::new(PoolState::new(protocol, limits)),
            stats: Stats::default(),
            detector: Detector::default(),
            balancer: Balancer::default(),
            ticker_started: AtomicBool::new(false),
            ticker_wake: Arc::new(Notify::new()),
            observer: std::sync::OnceLock::new(),
        });
        ensure_ticker(&inner);
        ClusterHandle { inner }
    }
}

/// A live cluster; cheap to clone, all clones share pools, counters and outlier state.
#[derive(Clone)]
pub struct ClusterHandle {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cfg = self.inner.config.load();
        f.debug_struct("ClusterHandle")
            .field("name", &cfg.name)
            .field("protocol", &self.inner.protocol)
            .field("hosts", &cfg.hosts.len())
            .finish()
    }
}

/// One endpoint's state, for the admin API (`sluice endpoints`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostStatus {
    pub addr: SocketAddr,
    pub pod: Option<String>,
    pub ejected: bool,
    /// Time left of the current ejection; the host returns at the first interval tick after it.
    pub ejected_for: Option<Duration>,
    /// Times this host was ejected.
    pub ejections: u32,
    /// The current ejection-time multiplier.
    pub multiplier: u32,
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local: u32,
    pub active_requests: u32,
    pub connections: u32,
    pub idle_connections: u32,
    pub total_requests: u64,
}

pub(crate) struct Inner {
    pub(crate) protocol: UpstreamProtocol,
    config: ArcSwap<Config>,
    pub(crate) pool: Mutex<PoolState>,
    pub(crate) stats: Stats,
    detector: Detector,
    pub(crate) balancer: Balancer,
    ticker_started: AtomicBool,
    ticker_wake: Arc<Notify>,
    /// Hears of every HTTP connection opened (set once).
    observer: std::sync::OnceLock<Arc<dyn crate::ConnectionObserver>>,
}

impl Inner {
    /// The meter for a new HTTP connection to `host`, if the cluster is observed.
    pub(crate) fn meter(&self, host: SocketAddr) -> Option<Box<dyn crate::ConnectionMeter>> {
        let observer = self.observer.get()?;
        let cfg = self.config.load();
        let endpoint = cfg.spec.endpoints.iter().find(|e| e.addr == host);
        match endpoint {
            Some(ep) => Some(observer.opened(ep)),
            None => Some(observer.opened(&Endpoint {
                addr: host,
                pod: None,
                labels: Default::default(),
                identity: None,
            })),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the interval task see that the cluster is gone.
        self.ticker_wake.notify_one();
    }
}

pub(crate) struct Config {
    pub(crate) spec: Arc<sluice_policy::Cluster>,
    name: String,
    pub(crate) hosts: Vec<Arc<Host>>,
}

impl Config {
    fn new(spec: Arc<sluice_policy::Cluster>, hosts: Vec<Arc<Host>>) -> Self {
        Self {
            name: spec.key.to_string(),
            spec,
            hosts,
        }
    }

    pub(crate) fn outlier(&self) -> Option<&sluice_policy::OutlierDetection> {
        self.spec.policy.outlier_detection.as_ref()
    }
}

pub(crate) struct Host {
    pub(crate) addr: SocketAddr,
    pod: Mutex<Option<String>>,
    outlier: HostOutlier,
    pub(crate) active: AtomicU32,
    pub(crate) total: AtomicU64,
    /// When the host joined the cluster (Envoy's `creationTime`, what `warmup` counts from).
    added: tokio::time::Instant,
}

impl Host {
    fn new(ep: &Endpoint) -> Self {
        Self {
            added: tokio::time::Instant::now(),
            addr: ep.addr,
            pod: Mutex::new(ep.pod.clone()),
            outlier: HostOutlier::default(),
            active: AtomicU32::new(0),
            total: AtomicU64::new(0),
        }
    }
}

impl Candidate for Arc<Host> {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn ejected(&self) -> bool {
        self.outlier.is_ejected()
    }
    fn active_requests(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }
    fn age(&self) -> Duration {
        self.added.elapsed()
    }
}

fn limits_of(spec: &sluice_policy::Cluster) -> Limits {
    let cp = &spec.policy.connection_pool;
    Limits {
        max_connections: cp.max_connections,
        max_pending: cp.max_pending_requests,
        max_requests_per_connection: cp.max_requests_per_connection,
    }
}

impl Inner {
    pub(crate) fn idle_timeout(&self) -> Option<Duration> {
        self.config.load().spec.policy.connection_pool.idle_timeout
    }

    pub(crate) fn max_connection_duration(&self) -> Option<Duration> {
        self.config
            .load()
            .spec
            .policy
            .connection_pool
            .max_connection_duration
    }

    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The host for one attempt (HTTP or TCP): the cluster's load balancer over `cfg`'s hosts,
    /// skipping ejected ones (all of them below outlier detection's `minHealthPercent`: panic
    /// mode) and the ones in `tried` while another is left. `UH` when there is none.
    pub(crate) fn pick_host(
        &self,
        cfg: &Config,
        tried: &[SocketAddr],
    ) -> Result<Arc<Host>, ProxyError> {
        let panic_threshold = cfg.outlier().map_or(0, |od| od.min_health_percent);
        self.balancer
            .pick_warming(
                &cfg.hosts,
                cfg.spec.policy.load_balancer,
                panic_threshold,
                tried,
                cfg.spec.policy.warmup.as_ref(),
            )
            .cloned()
            .ok_or_else(|| ProxyError::NoHealthyUpstream)
    }

    /// The detector's one entry point: `outcome` of an attempt on `host` (see [`crate::outcome`]).
    pub(crate) fn report(&self, host: &Host, outcome: Outcome) {
        match outcome {
            Outcome::Timeout(Deadline::PerTry) => inc(&self.stats.rq_per_try_timeout),
            Outcome::Timeout(Deadline::Route) => inc(&self.stats.rq_timeout),
            Outcome::Cancelled => inc(&self.stats.rq_cancelled),
            _ => {}
        }
        if !outcome.reported() {
            return;
        }
        let cfg = self.config.load();
        if let Some(od) = cfg.outlier() {
            let scope = outlier::Scope {
                cfg: od,
                cluster: &cfg.name,
                hosts: cfg.hosts.len(),
                stats: &self.stats,
            };
            let host = outlier::HostRef {
                addr: host.addr,
                outlier: &host.outlier,
            };
            self.detector.report(&scope, host, outcome);
        }
    }

    fn tick(&self, now: Instant) {
        let cfg = self.config.load();
        if let Some(od) = cfg.outlier() {
            let hosts = cfg.hosts.iter().map(|h| (h.addr, &h.outlier));
            self.detector.tick(od, &cfg.name, hosts, now);
        }
    }
}

/// Starts the outlier interval task once a runtime is available. It holds only a `Weak`, so it
/// ends with the cluster.
pub(crate) fn ensure_ticker(inner: &Arc<Inner>) {
    if inner.ticker_started.load(Ordering::Relaxed) {
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if inner.ticker_started.swap(true, Ordering::Relaxed) {
        return;
    }
    let weak = Arc::downgrade(inner);
    let wake = inner.ticker_wake.clone();
    rt.spawn(async move {
        loop {
            let interval = match weak.upgrade() {
                Some(inner) => inner
                    .config
                    .load()
                    .outlier()
                    .map(|od| od.interval.max(Duration::from_millis(1))),
                None => return,
            };
            let Some(interval) = interval else {
                wake.notified().await;
                continue;
            };
            tokio::select! {
                () = tokio::time::sleep(interval) => {
                    let Some(inner) = weak.upgrade() else { return };
                    inner.tick(Instant::now());
                }
                // The interval changed, or the cluster was dropped.
                () = wake.notified() => {}
            }
        }
    });
}

impl ClusterHandle {
    /// Applies a new spec: endpoints with an unchanged address keep their outlier state and idle
    /// connections; removed endpoints lose their idle connections at once and their busy ones as
    /// they free up; new limits apply to new admissions.
    pub fn update(&self, spec: Arc<sluice_policy::Cluster>) {
        let inner = &self.inner;
        let old = inner.config.load_full();
        let by_addr: HashMap<SocketAddr, &Arc<Host>> =
            old.hosts.iter().map(|h| (h.addr, h)).collect();
        let mut hosts: Vec<Arc<Host>> = Vec::with_capacity(spec.endpoints.len());
        let mut kept = HashSet::with_capacity(spec.endpoints.len());
        for ep in &spec.endpoints {
            if !kept.insert(ep.addr) {
                continue;
            }
            match by_addr.get(&ep.addr) {
                Some(h) => {
                    ep.pod.clone_into(&mut h.pod.lock());
                    hosts.push(Arc::clone(h));
                }
                None => hosts.push(Arc::new(Host::new(ep))),
            }
        }
        let removed: Vec<&Arc<Host>> = old
            .hosts
            .iter()
            .filter(|h| !kept.contains(&h.addr))
            .collect();
        for host in &removed {
            inner.detector.remove(&host.outlier);
        }
        let old_interval = old.outlier().map(|od| od.interval);
        let new = Config::new(spec, hosts);
        let new_interval = new.outlier().map(|od| od.interval);
        if new.outlier().is_none() {
            inner
                .detector
                .uneject_all(&new.name, new.hosts.iter().map(|h| (h.addr, &h.outlier)));
        }
        let limits = limits_of(&new.spec);
        inner.config.store(Arc::new(new));
        {
            let mut pool = inner.pool.lock();
            for host in &removed {
                pool.retire(host.addr);
            }
            pool.set_limits(limits);
        }
        if old_interval != new_interval {
            inner.ticker_wake.notify_one();
        }
    }

    /// Every endpoint's state, in the spec's order.
    pub fn hosts(&self) -> Vec<HostStatus> {
        let cfg = self.inner.config.load();
        let now = Instant::now();
        let occupancy: Vec<_> = {
            let pool = self.inner.pool.lock();
            cfg.hosts.iter().map(|h| pool.occupancy(h.addr)).collect()
        };
        cfg.hosts
            .iter()
            .zip(occupancy)
            .map(|(h, occ)| {
                let m = h.outlier.monitor.lock();
                let ejected = h.outlier.is_ejected();
                HostStatus {
                    addr: h.addr,
                    pod: h.pod.lock().clone(),
                    ejected,
                    ejected_for: ejected.then(|| outlier::remaining(cfg.outlier(), &m, now)),
                    ejections: m.num_ejections,
                    multiplier: m.multiplier,
                    consecutive_5xx: m.consecutive_5xx,
                    consecutive_gateway: m.consecutive_gateway,
                    consecutive_local: m.consecutive_local,
                    active_requests: h.active.load(Ordering::Relaxed),
                    connections: occ.total,
                    idle_connections: occ.idle,
                    total_requests: h.total.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// The cluster's counters and gauges, under Envoy's names.
    pub fn stats(&self) -> ClusterStats {
        let mut stats = self.inner.stats.snapshot();
        {
            let pool = self.inner.pool.lock();
            stats.upstream_cx_active = u64::from(pool.cx_active());
            stats.upstream_rq_pending_active = u64::from(pool.pending());
        }
        let cfg = self.inner.config.load();
        stats.membership_total = cfg.hosts.len() as u64;
        stats.membership_healthy = cfg.hosts.iter().filter(|h| !h.ejected()).count() as u64;
        stats.outlier_detection_ejections_active =
            u64::from(self.inner.detector.ejections_active());
        stats
    }

    /// Requests on a connection plus requests waiting for one: what Envoy's retry budget is a
    /// share of.
    pub fn requests_active_and_pending(&self) -> u64 {
        let pending = u64::from(self.inner.pool.lock().pending());
        self.inner.stats.rq_active.load(Ordering::Relaxed) + pending
    }

    /// The last 64 ejections and un-ejections, oldest first.
    pub fn outlier_events(&self) -> Vec<OutlierEvent> {
        self.inner.detector.events()
    }

    /// Has `make`'s observer told of every HTTP connection this cluster opens from now on, unless
    /// one was set already (a cluster reused across generations keeps its first).
    pub fn observe(&self, make: impl FnOnce() -> Arc<dyn crate::ConnectionObserver>) {
        let _ = self.inner.observer.get_or_init(make);
    }

    /// The protocol this cluster speaks upstream.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.inner.protocol
    }
}

impl tower_service::Service<Request<Body>> for ClusterHandle {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Admission happens in `call`: an overflow must answer at once, not wait here.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        Box::pin(attempt(self.inner.clone(), req))
    }
}

/// One attempt. Every event of its life goes through its [`Attempt`] guard, which alone decides
/// what the outlier detector hears (see [`crate::outcome`]).
async fn attempt(inner: Arc<Inner>, mut req: Request<Body>) -> Result<Response<Body>, BoxError> {
    ensure_ticker(&inner);
    // Read before the attempt's first wait and let go: a guard, not a reference count of its own.
    let cfg = inner.config.load();
    let cp = &cfg.spec.policy.connection_pool;
    // What the layers above handed down (nothing when the cluster is called on its own).
    let ctx = req
        .extensions_mut()
        .remove::<RequestCtx>()
        .unwrap_or_default();
    // The per-try timer waits for the connection this attempt gets, as Envoy's does.
    let connection_ready = ctx.connection_ready;
    if let Some(ready) = &connection_ready {
        ready.claim();
    }

    inc(&inner.stats.rq_total);
    let mut attempt = Attempt {
        inner: inner.clone(),
        host: None,
        leased: None,
        phase: Phase::Connecting,
        expiry: ctx.expiry,
        released: false,
        active: false,
        record: None,
        quota: None,
    };

    // The client pod's budget of upstream connections, before anything is done for it: an
    // HTTP/1 attempt holds a connection of its own while it lasts.
    if inner.protocol == UpstreamProtocol::Http1 {
        if let Some(quota) = &ctx.quota {
            match quota.take() {
                Ok(unit) => attempt.quota = Some(unit),
                Err(why) => {
                    let err = ProxyError::Overload(why);
                    return Err(attempt.ended(err, |e| Event::NoConnection(e)).into());
                }
            }
        }
    }

    // Host selection.
    let info = ctx.info;
    let any_host = ctx.any_host;
    let tried = match &info {
        Some(info) if info.has_upstream() && !any_host => info.upstreams(),
        _ => Vec::new(),
    };
    let host = inner.pick_host(&cfg, &tried)?;
    // The retry layer counted this attempt already (1 without one).
    let number = info.as_ref().map_or(1, |i| i.attempts().max(1));
    if let Some(info) = info {
        info.push_upstream(host.addr);
        attempt.record = Some(Box::new(Record::new(info, host.addr, number)));
    }
    // This attempt's own span, child of the request's, as the endpoint will see it; the record
    // carries the same number, so the exported span has the same id.
    if let Some(trace) = &ctx.trace {
        trace.inject(number, req.headers_mut());
    }
    host.active.fetch_add(1, Ordering::Relaxed);
    host.total.fetch_add(1, Ordering::Relaxed);
    attempt.host = Some(host.clone());

    // A connection (h1) or stream (h2). A reused h1 connection may have been closed by the server
    // while idle; that costs another pick from the pool (a few at most), not the attempt.
    let opts = ConnectOptions::of(cp);
    let max_requests = u64::from(cp.max_requests);
    drop(cfg);
    let mut stale = 0;
    loop {
        let leased = match pool::acquire(&inner, host.addr, &opts).await {
            Ok(leased) => leased,
            Err(err) => return Err(attempt.ended(err, |e| Event::NoConnection(e)).into()),
        };
        let leased = attempt.leased.insert(leased);
        let ready = match &mut leased.sender {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => !s.is_closed(),
        };
        if ready {
            break;
        }
        attempt.abandon_lease();
        stale += 1;
        if stale == MAX_STALE_CONNECTIONS {
            let err = ProxyError::ConnectionTermination(Cause::new(StaleConnections {
                host: host.addr,
                connections: stale,
            }));
            return Err(attempt.ended(err, |e| Event::Failed(e)).into());
        }
    }
    // Circuit breaker on requests on a connection (`http2MaxRequests`): checked, as Envoy's
    // `attachStreamToClient` does, when the attempt has its connection; while it waited for one it
    // counted against `http1MaxPendingRequests` only. An overflow here gives the unused connection
    // back to the pool.
    let active = inner.stats.rq_active.fetch_add(1, Ordering::Relaxed);
    if active >= max_requests {
        inner.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
        // Envoy counts this overflow under the pending-overflow counter too.
        inc(&inner.stats.rq_pending_overflow);
        if let Some(leased) = attempt.leased.take() {
            pool::release(&inner, leased, true);
        }
        let err = ProxyError::Overflow(OverflowKind::Requests);
        return Err(attempt.ended(err, |e| Event::NoConnection(e)).into());
    }
    attempt.active = true;
    attempt.event(Event::Connected);
    if let Some(ready) = &connection_ready {
        ready.fire();
    }

    prepare(&mut req, inner.protocol, host.addr);
    let sent = match &mut attempt.leased.as_mut().expect("leased above").sender {
        Sender::H1(s) => Either::Left(s.send_request(req)),
        Sender::H2(s) => Either::Right(s.send_request(req)),
    };
    match sent.await {
        Ok(rsp) => {
            attempt.event(Event::Headers(rsp.status().as_u16()));
            let (parts, body) = rsp.into_parts();
            let body = sluice_core::boxed(UpstreamBody::new(body, attempt));
            Ok(Response::from_parts(parts, body))
        }
        Err(err) => {
            let err = classify(err);
            Err(attempt.ended(err, |e| Event::Failed(e)).into())
        }
    }
}

/// Rewrites the request for the upstream protocol: origin-form for HTTP/1.1 (the `Host` header
/// carries the authority), scheme and authority for h2.
fn prepare(req: &mut Request<Body>, protocol: UpstreamProtocol, addr: SocketAddr) {
    let uri = req.uri();
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    match protocol {
        UpstreamProtocol::Http1 => {
            if !req.headers().contains_key(HOST) {
                let authority = uri.authority().map(|a| a.as_str().to_owned());
                let value = authority.unwrap_or_else(|| addr.to_string());
                if let Ok(value) = HeaderValue::try_from(value) {
                    req.headers_mut().insert(HOST, value);
                }
            }
            *req.uri_mut() = Uri::from(pq);
            *req.version_mut() = Version::HTTP_11;
        }
        UpstreamProtocol::H2c => {
            let authority = match uri.authority() {
                Some(a) => a.clone(),
                None => req
                    .headers()
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.parse().ok())
                    .unwrap_or_else(|| {
                        addr.to_string()
                            .parse()
                            .expect("socket address is an authority")
                    }),
            };
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(authority);
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            // `:authority` replaces `Host` in h2.
            req.headers_mut().remove(HOST);
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

/// Maps a failed exchange to the reset reason Envoy would give it, keeping the error as the cause.
/// A failure of the request body is the client's (it went away mid-upload), not the upstream's.
/// A response that is not valid HTTP is a protocol error, as Envoy's codec reports it (`UPE`, 502):
/// a bad status line, header or `content-length` (hyper's parse errors), a body that ends before
/// its declared length, or an h2 frame the client library rejected. An upstream that closes with
/// nothing sent is a connection termination (`UC`, 503), as in Envoy.
pub(crate) fn classify(err: hyper::Error) -> ProxyError {
    if err.is_user() {
        return ProxyError::DownstreamTermination(Cause::new(err));
    }
    if err.is_parse() {
        return ProxyError::ProtocolError(Cause::new(err));
    }
    let mut reason = None;
    let mut reset = false;
    let mut cause = err.source();
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return ProxyError::RefusedStream;
            }
            // h2 itself found the upstream's frames malformed (not the peer's RST_STREAM).
            if h2.is_library() && h2.reason() == Some(h2::Reason::PROTOCOL_ERROR) {
                return ProxyError::ProtocolError(Cause::new(err));
            }
            if h2.is_reset() {
                reason = h2.reason();
                reset = true;
                break;
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionReset {
                reset = true;
                break;
            }
            // hyper's body decoder: the connection ended before `content-length` (or the last
            // chunk) was read.
            if io.kind() == std::io::ErrorKind::UnexpectedEof {
                return ProxyError::ProtocolError(Cause::new(err));
            }
        }
        cause = e.source();
    }
    if reset {
        ProxyError::RemoteReset {
            reason,
            source: Cause::new(err),
        }
    } else {
        ProxyError::ConnectionTermination(Cause::new(err))
    }
}

/// One admitted attempt: what it holds until its response ends (its place in
/// `upstream_rq_active`, its host's active count, its connection) and where it is. Every event
/// goes through [`Attempt::event`]; dropping it is the last event, which tells a proxy timer (the
/// attempt's [`Expiry`] was raised) from the client going away (it was not).
pub(crate) struct Attempt {
    inner: Arc<Inner>,
    host: Option<Arc<Host>>,
    leased: Option<Leased>,
    phase: Phase,
    expiry: Option<Expiry>,
    released: bool,
    /// Counted in `upstream_rq_active` (from the moment it had a connection).
    active: bool,
    /// What the request's record learns of this attempt (when the request has one).
    record: Option<Box<Record>>,
    /// The client pod's share of upstream connections this attempt holds (HTTP/1: the
    /// connection is the attempt's alone while it lasts).
    quota: Option<sluice_core::QuotaUnit>,
}

/// One attempt as it will be written into its request's [`RequestInfo`] when it ends.
struct Record {
    info: Arc<RequestInfo>,
    attempt: AttemptRecord,
}

impl Record {
    fn new(info: Arc<RequestInfo>, endpoint: SocketAddr, number: u32) -> Self {
        Self {
            info,
            attempt: AttemptRecord {
                attempt: number,
                endpoint,
                started: Instant::now().into_std(),
                duration: Duration::ZERO,
                reached: false,
                status: 0,
                flags: ResponseFlags::empty(),
                timeout: None,
                response_bytes: 0,
            },
        }
    }

    fn learn(&mut self, event: &Event<'_>) {
        let a = &mut self.attempt;
        match event {
            Event::Connected => a.reached = true,
            Event::Headers(code) => a.status = *code,
            Event::NoConnection(err) | Event::Failed(err) => {
                a.flags.insert(err.flag());
                a.timeout = match err {
                    ProxyError::PerTryTimeout(_) => Some(Deadline::PerTry),
                    ProxyError::RequestTimeout(_) => Some(Deadline::Route),
                    _ => None,
                };
            }
            Event::Dropped { expired, phase } => {
                a.timeout = *expired;
                match (expired, phase) {
                    (Some(_), _) => a.flags.insert(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT),
                    // A response dropped once its headers were in is most often a retry
                    // discarding a `503` (the endpoint answered it whole, as its own sidecar
                    // would record it); a client that leaves mid-body is the request's `DC`.
                    (None, Phase::Streaming | Phase::Done) => {}
                    (None, _) => a
                        .flags
                        .insert(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION),
                }
            }
        }
    }
}

impl Attempt {
    /// Reports `event` for the attempt's host, as [`outcome::decide`] says, and moves on.
    fn event(&mut self, event: Event<'_>) {
        let next = match &event {
            Event::Connected => Phase::AwaitingHeaders,
            Event::Headers(_) => Phase::Streaming,
            Event::NoConnection(_) | Event::Failed(_) | Event::Dropped { .. } => Phase::Done,
        };
        if let Some(record) = &mut self.record {
            record.learn(&event);
        }
        if let Some(host) = &self.host {
            self.inner.report(host, outcome::decide(event));
        }
        if self.phase != Phase::Done {
            self.phase = next;
        }
    }

    /// The attempt ended in the event `how` makes of `err`: reported, resources given back, and
    /// `err` handed on.
    pub(crate) fn ended(
        &mut self,
        err: ProxyError,
        how: fn(&ProxyError) -> Event<'_>,
    ) -> ProxyError {
        self.event(how(&err));
        self.end(false);
        err
    }

    /// The response ended cleanly: the connection may be reused.
    pub(crate) fn finish(&mut self) {
        self.end(true);
    }

    fn abandon_lease(&mut self) {
        if let Some(leased) = self.leased.take() {
            pool::release(&self.inner, leased, false);
        }
    }

    /// Counts response body bytes received for the attempt.
    pub(crate) fn add_response_bytes(&mut self, n: usize) {
        if let Some(record) = &mut self.record {
            record.attempt.response_bytes += n as u64;
        }
    }

    /// Gives back everything the attempt holds, once, and writes its record.
    fn end(&mut self, reusable: bool) {
        if std::mem::replace(&mut self.released, true) {
            return;
        }
        if let Some(mut record) = self.record.take() {
            record.attempt.duration = Instant::now().into_std() - record.attempt.started;
            record.info.push_attempt(record.attempt);
        }
        if let Some(leased) = self.leased.take() {
            pool::release(&self.inner, leased, reusable);
        }
        if let Some(host) = &self.host {
            host.active.fetch_sub(1, Ordering::Relaxed);
        }
        if self.active {
            self.inner.stats.rq_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if self.phase != Phase::Done {
            let expired = self.expiry.as_ref().and_then(Expiry::fired);
            let phase = self.phase;
            self.event(Event::Dropped { phase, expired });
        }
        self.end(false);
    }
}

#[cfg(test)]
impl ClusterHandle {
    pub(crate) fn report_for_test(&self, addr: SocketAddr, outcome: Outcome) {
        let cfg = self.inner.config.load();
        let host = cfg
            .hosts
            .iter()
            .find(|h| h.addr == addr)
            .expect("known host");
        self.inner.report(host, outcome);
    }

    pub(crate) fn detector(&self) -> &Detector {
        &self.inner.detector
    }
}
