//! Connection pools: the upstream connections of every host of a cluster, the cluster-wide
//! `maxConnections` limit and the FIFO queue of requests waiting for a connection
//! (`http1MaxPendingRequests`), with the semantics of Envoy's `conn_pool_base.cc`:
//!
//! - HTTP/1.1 carries one request per connection at a time; idle keep-alive connections are reused
//!   most-recent first, and a connection goes back to idle only once its response body was read to
//!   the end. H2c multiplexes streams on one connection per host, opening another past 100 streams.
//! - A request that finds no free connection opens one if the cluster is under `maxConnections`, or
//!   if its host has no connection at all (Envoy's escape hatch, so a host never starves behind the
//!   connections of others); otherwise it waits. Waiting and connecting both count as pending, and
//!   a request that would exceed `http1MaxPendingRequests` overflows at once.
//! - A freed connection or connection slot is handed straight to the oldest waiter that can use it,
//!   so newcomers cannot overtake the queue. A waiter whose future is dropped leaves the queue and
//!   gives back anything it was handed.
//! - `maxRequestsPerConnection` drains a connection after that many requests; `idleTimeout` closes
//!   connections idle that long (checked by the connection's own task, not by a per-request timer);
//!   `maxConnectionDuration` drains a connection that long after it was made.
//!
//! One mutex guards the whole cluster's pool; it is never held across an await.

use crate::cluster::{Inner, UpstreamProtocol};
use crate::observe::Metered;
use crate::stats::{inc, Stats};
use foldhash::{HashMap, HashMapExt};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_core::{Body, Cause, ConnectError, ProxyError, SideWake};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tracing::debug;

/// Streams opened on one h2 connection before another is opened. hyper's `SendRequest` does not
/// expose the server's `SETTINGS_MAX_CONCURRENT_STREAMS`; 100 is the floor RFC 9113 recommends
/// servers allow, so below it streams are never queued inside hyper.
const H2_STREAMS_PER_CONNECTION: u32 = 100;

/// A sender for one request on an upstream connection.
pub(crate) enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

/// A connection (h1) or a stream slot on one (h2) that a request holds. It carries no `Drop`: the
/// holder gives it back with [`release`], which is how it stays usable under the pool lock.
pub(crate) struct Leased {
    pub(crate) host: SocketAddr,
    id: u64,
    pub(crate) sender: Sender,
}

/// The limits the pool enforces, copied from the cluster's `connectionPool`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) max_connections: u32,
    pub(crate) max_pending: u32,
    /// 0 = unlimited.
    pub(crate) max_requests_per_connection: u32,
}

struct Conn {
    id: u64,
    /// The h1 sender while the connection is idle; `None` while a request holds it.
    h1: Option<http1::SendRequest<Body>>,
    /// The h2 sender, cloned for each stream; `None` once the connection is closing.
    h2: Option<http2::SendRequest<Body>>,
    streams: u32,
    served: u32,
    /// No new requests (max requests per connection reached, the host was removed, or the
    /// connection outlived `maxConnectionDuration`).
    draining: bool,
    /// Outlived `maxConnectionDuration`: closes once its requests are done.
    expired: bool,
    idle_since: Option<Instant>,
    /// Tells the connection's task to close it.
    close: Arc<Notify>,
}

impl Conn {
    fn shut(&mut self) {
        self.draining = true;
        self.h1 = None;
        self.h2 = None;
        self.close.notify_one();
    }
}

#[derive(Default)]
struct HostConns {
    /// Most recently used last. Boxed: a released connection moves to the back, and at 32
    /// connections moving the entries themselves cost about 200 instructions per request.
    #[allow(clippy::vec_box)]
    conns: Vec<Box<Conn>>,
    connecting: u32,
    /// Plain TCP connections the L4 proxy holds (see [`crate::tcp`]); never pooled or reused.
    tcp: u32,
    /// The host left the cluster: close connections as they free up.
    retired: bool,
}

impl HostConns {
    fn total(&self) -> usize {
        self.conns.len() + self.connecting as usize + self.tcp as usize
    }
}

/// What a waiter is handed.
enum Grant {
    Conn(Leased),
    /// A connection slot reserved for the waiter's host: the waiter opens the connection itself.
    Slot(SocketAddr),
}

struct Waiter {
    id: u64,
    host: SocketAddr,
    tx: oneshot::Sender<Grant>,
}

pub(crate) struct PoolState {
    protocol: UpstreamProtocol,
    limits: Limits,
    hosts: HashMap<SocketAddr, HostConns>,
    /// Connections open or connecting, cluster-wide (`upstream_cx_active`).
    cx: u32,
    /// Requests waiting for or opening a connection (`upstream_rq_pending_active`).
    pending: u32,
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

/// Occupancy of one host's pool, for the admin API.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HostOccupancy {
    pub(crate) total: u32,
    pub(crate) idle: u32,
}

impl PoolState {
    pub(crate) fn new(protocol: UpstreamProtocol, limits: Limits) -> Self {
        Self {
            protocol,
            limits,
            hosts: HashMap::new(),
            cx: 0,
            pending: 0,
            waiters: VecDeque::new(),
            next_id: 0,
        }
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) fn cx_active(&self) -> u32 {
        self.cx
    }

    pub(crate) fn pending(&self) -> u32 {
        self.pending
    }

    pub(crate) fn occupancy(&self, host: SocketAddr) -> HostOccupancy {
        self.hosts
            .get(&host)
            .map_or_else(HostOccupancy::default, |hc| HostOccupancy {
                total: hc.total() as u32,
                idle: hc
                    .conns
                    .iter()
                    .filter(|c| c.streams == 0 && !c.draining)
                    .count() as u32,
            })
    }

    /// Takes a free connection (h1) or stream slot (h2) of `host`.
    fn take(&mut self, host: SocketAddr) -> Option<Leased> {
        let max = self.limits.max_requests_per_connection;
        let hc = self.hosts.get_mut(&host)?;
        let conn = match self.protocol {
            UpstreamProtocol::Http1 => hc
                .conns
                .iter_mut()
                .rev()
                .find(|c| !c.draining && c.h1.as_ref().is_some_and(|s| !s.is_closed()))?,
            UpstreamProtocol::H2c => hc.conns.iter_mut().rev().find(|c| {
                !c.draining
                    && c.streams < H2_STREAMS_PER_CONNECTION
                    && c.h2.as_ref().is_some_and(|s| !s.is_closed())
            })?,
        };
        let sender = match self.protocol {
            UpstreamProtocol::Http1 => Sender::H1(conn.h1.take()?),
            UpstreamProtocol::H2c => Sender::H2(conn.h2.clone()?),
        };
        conn.streams += 1;
        conn.served += 1;
        conn.idle_since = None;
        if max > 0 && conn.served >= max {
            conn.draining = true;
        }
        Some(Leased {
            host,
            id: conn.id,
            sender,
        })
    }

    /// Whether a request for `host` may open a connection now, and whether `maxConnections` is
    /// what stops it.
    fn may_connect(&self, host: SocketAddr) -> (bool, bool) {
        let hc = self.hosts.get(&host);
        if self.protocol == UpstreamProtocol::H2c && hc.is_some_and(|hc| hc.connecting > 0) {
            // One h2 connection per host: wait for the one being set up.
            return (false, false);
        }
        let under_limit = self.cx < self.limits.max_connections;
        (
            under_limit || hc.is_none_or(|hc| hc.total() == 0),
            !under_limit,
        )
    }

    fn reserve(&mut self, host: SocketAddr) {
        let hc = self.hosts.entry(host).or_default();
        hc.connecting += 1;
        hc.retired = false;
        self.cx += 1;
    }

    fn unreserve(&mut self, host: SocketAddr) {
        if let Some(hc) = self.hosts.get_mut(&host) {
            hc.connecting = hc.connecting.saturating_sub(1);
        }
        self.cx = self.cx.saturating_sub(1);
        self.forget_if_empty(host);
    }

    fn forget_if_empty(&mut self, host: SocketAddr) {
        if self
            .hosts
            .get(&host)
            .is_some_and(|hc| hc.retired && hc.total() == 0)
        {
            self.hosts.remove(&host);
        }
    }

    /// Hands whatever became free to the oldest waiters that can use it.
    fn dispatch(&mut self) {
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].tx.is_closed() {
                self.waiters.remove(i);
                continue;
            }
            let host = self.waiters[i].host;
            let grant = if let Some(leased) = self.take(host) {
                Grant::Conn(leased)
            } else if self.may_connect(host).0 {
                self.reserve(host);
                Grant::Slot(host)
            } else {
                i += 1;
                continue;
            };
            let waiter = self.waiters.remove(i).expect("index in bounds");
            if let Err(grant) = waiter.tx.send(grant) {
                self.give_back(grant);
            }
        }
    }

    /// Undoes a grant nobody used.
    fn give_back(&mut self, grant: Grant) {
        match grant {
            Grant::Slot(host) => self.unreserve(host),
            Grant::Conn(leased) => {
                let max = self.limits.max_requests_per_connection;
                let retired = self.hosts.get(&leased.host).is_some_and(|hc| hc.retired);
                if let Some(conn) = self.conn_mut(leased.host, leased.id) {
                    conn.streams -= 1;
                    conn.served -= 1;
                    // Undo only the drain that this grant's request caused.
                    conn.draining = conn.expired || retired || (max > 0 && conn.served >= max);
                    if let Sender::H1(s) = leased.sender {
                        conn.h1 = Some(s);
                    }
                    if conn.streams == 0 {
                        conn.idle_since = Some(Instant::now());
                    }
                }
            }
        }
    }

    fn conn_mut(&mut self, host: SocketAddr, id: u64) -> Option<&mut Conn> {
        self.hosts
            .get_mut(&host)?
            .conns
            .iter_mut()
            .find(|c| c.id == id)
            .map(|c| &mut **c)
    }

    /// Gives a leased connection or stream back after its exchange ended.
    fn release(&mut self, leased: Leased, reusable: bool) {
        let Some(hc) = self.hosts.get_mut(&leased.host) else {
            return;
        };
        let retired = hc.retired;
        let Some(pos) = hc.conns.iter().position(|c| c.id == leased.id) else {
            return;
        };
        let conn = &mut hc.conns[pos];
        conn.streams = conn.streams.saturating_sub(1);
        match leased.sender {
            Sender::H1(s) => {
                if reusable && !conn.draining && !retired && !s.is_closed() {
                    conn.h1 = Some(s);
                    conn.idle_since = Some(Instant::now());
                    // Most recently used last: `take` scans from the end (LIFO).
                    let conn = hc.conns.remove(pos);
                    hc.conns.push(conn);
                } else {
                    conn.shut();
                }
            }
            Sender::H2(_) => {
                if conn.streams == 0 {
                    if conn.draining || retired {
                        conn.shut();
                    } else {
                        conn.idle_since = Some(Instant::now());
                    }
                }
            }
        }
        self.dispatch();
    }

    /// A connection's task ended: the connection is gone and its slot is free.
    fn closed(&mut self, host: SocketAddr, id: u64) {
        if let Some(hc) = self.hosts.get_mut(&host) {
            if let Some(pos) = hc.conns.iter().position(|c| c.id == id) {
                hc.conns.remove(pos);
                self.cx = self.cx.saturating_sub(1);
            }
        }
        self.forget_if_empty(host);
        self.dispatch();
    }

    /// The connection reached `maxConnectionDuration`: no new requests; closed now if idle, else
    /// when its last request is done (Envoy drains it the same way).
    fn expire(&mut self, host: SocketAddr, id: u64) {
        let Some(conn) = self.conn_mut(host, id) else {
            return;
        };
        conn.expired = true;
        conn.draining = true;
        if conn.streams == 0 {
            conn.shut();
        }
    }

    /// When the connection's idle deadline is; `Err` when it expired and was taken out of use.
    fn idle_deadline(
        &mut self,
        host: SocketAddr,
        id: u64,
        timeout: Option<Duration>,
    ) -> Result<Option<Instant>, ()> {
        let now = Instant::now();
        let Some(conn) = self.conn_mut(host, id) else {
            return Err(());
        };
        let Some(timeout) = timeout else {
            return Ok(None);
        };
        match conn.idle_since {
            Some(since) if conn.streams == 0 => {
                let expiry = since + timeout;
                if expiry <= now {
                    conn.shut();
                    Err(())
                } else {
                    Ok(Some(expiry))
                }
            }
            // Busy: it cannot expire before it has been idle a full timeout from now.
            _ => Ok(Some(now + timeout)),
        }
    }

    /// Reserves a connection slot for a plain TCP connection to `host`, or says `maxConnections`
    /// is reached. No waiting and no per-host escape hatch: Envoy's TCP proxy "checks with the
    /// cluster's resource manager if it can create a connection ... if it can't, the TCP proxy will
    /// not make the connection".
    pub(crate) fn try_reserve_tcp(&mut self, host: SocketAddr) -> bool {
        if self.cx >= self.limits.max_connections {
            return false;
        }
        self.reserve(host);
        true
    }

    /// A reserved TCP slot failed to connect or was abandoned.
    pub(crate) fn tcp_connect_failed(&mut self, host: SocketAddr) {
        self.unreserve(host);
        self.dispatch();
    }

    /// A reserved TCP slot connected: it stays counted until [`Self::tcp_closed`].
    pub(crate) fn tcp_connected(&mut self, host: SocketAddr) {
        let hc = self.hosts.entry(host).or_default();
        hc.connecting = hc.connecting.saturating_sub(1);
        hc.tcp += 1;
        // An h2 waiter may have been waiting for this host's "connection being set up".
        self.dispatch();
    }

    /// A TCP connection ended: its slot is free for HTTP waiters too.
    pub(crate) fn tcp_closed(&mut self, host: SocketAddr) {
        if let Some(hc) = self.hosts.get_mut(&host) {
            hc.tcp = hc.tcp.saturating_sub(1);
        }
        self.cx = self.cx.saturating_sub(1);
        self.forget_if_empty(host);
        self.dispatch();
    }

    /// New limits apply to new admissions; waiters may now fit.
    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.dispatch();
    }

    /// An update removed `host`: close its idle connections now, the others once they free up.
    pub(crate) fn retire(&mut self, host: SocketAddr) {
        if let Some(hc) = self.hosts.get_mut(&host) {
            hc.retired = true;
            for conn in &mut hc.conns {
                conn.draining = true;
                if conn.streams == 0 {
                    conn.shut();
                }
            }
        }
    }
}

/// Gets a connection (h1) or stream (h2) to `host`, opening a connection, waiting for one, or
/// overflowing as the limits say.
pub(crate) async fn acquire(
    inner: &Arc<Inner>,
    host: SocketAddr,
    opts: &ConnectOptions,
) -> Result<Leased, ProxyError> {
    let waiting = {
        let mut st = inner.pool.lock();
        if let Some(leased) = st.take(host) {
            return Ok(leased);
        }
        if st.pending >= st.limits.max_pending {
            inc(&inner.stats.rq_pending_overflow);
            return Err(ProxyError::Overflow(sluice_core::OverflowKind::Pending));
        }
        st.pending += 1;
        inc(&inner.stats.rq_pending_total);
        let (may, limited) = st.may_connect(host);
        if limited {
            inc(&inner.stats.cx_overflow);
        }
        if may {
            st.reserve(host);
            None
        } else {
            let (tx, rx) = oneshot::channel();
            let id = st.next_id();
            st.waiters.push_back(Waiter { id, host, tx });
            Some((id, rx))
        }
    };
    let _pending = PendingGuard(inner);
    if let Some((id, rx)) = waiting {
        let mut wait = WaitGuard {
            inner,
            id,
            rx: Some(rx),
        };
        let grant = wait.rx.as_mut().expect("set above").await;
        wait.rx = None;
        match grant {
            Ok(Grant::Conn(leased)) => return Ok(leased),
            Ok(Grant::Slot(_)) => {}
            Err(_) => return Err(ProxyError::ConnectionTermination(Cause::new(PoolClosed))),
        }
    }
    connect_reserved(inner, host, opts).await
}

/// How new connections are made (`connectionPool.tcp`).
pub(crate) struct ConnectOptions {
    pub(crate) timeout: Duration,
    pub(crate) keepalive: Option<socket2::TcpKeepalive>,
}

impl ConnectOptions {
    pub(crate) fn of(cp: &sluice_policy::ConnectionPool) -> Self {
        // Unset `tcpKeepalive` fields keep the OS defaults, as Envoy does.
        let keepalive = cp.tcp_keepalive.as_ref().map(|ka| {
            let mut params = socket2::TcpKeepalive::new();
            if let Some(time) = ka.time {
                params = params.with_time(time);
            }
            if let Some(interval) = ka.interval {
                params = params.with_interval(interval);
            }
            if let Some(probes) = ka.probes {
                params = params.with_retries(probes);
            }
            params
        });
        Self {
            timeout: cp.connect_timeout,
            keepalive,
        }
    }
}

/// Opens a connection on a slot already reserved for `host`.
async fn connect_reserved(
    inner: &Arc<Inner>,
    host: SocketAddr,
    opts: &ConnectOptions,
) -> Result<Leased, ProxyError> {
    let mut slot = SlotGuard {
        inner,
        host,
        armed: true,
    };
    inc(&inner.stats.cx_total);
    let sender = match connect(inner, host, inner.protocol, opts).await {
        Ok(sender) => sender,
        Err(err) => {
            inc(&inner.stats.cx_connect_fail);
            return Err(ProxyError::ConnectFailure(err));
        }
    };
    let (sender, driver) = sender;
    slot.armed = false;
    let close = Arc::new(Notify::new());
    let leased = {
        let mut st = inner.pool.lock();
        let id = st.next_id();
        let max = st.limits.max_requests_per_connection;
        let hc = st.hosts.entry(host).or_default();
        hc.connecting = hc.connecting.saturating_sub(1);
        let (h2, sender) = match sender {
            Sender::H2(s) => (Some(s.clone()), Sender::H2(s)),
            s @ Sender::H1(_) => (None, s),
        };
        hc.conns.push(Box::new(Conn {
            id,
            h1: None,
            h2,
            streams: 1,
            served: 1,
            draining: max == 1,
            idle_since: None,
            expired: false,
            close: close.clone(),
        }));
        // Other waiters for this host may share a new h2 connection.
        st.dispatch();
        Leased { host, id, sender }
    };
    driver.spawn(Arc::downgrade(inner), host, leased.id, close);
    Ok(leased)
}

/// The connection's I/O future, to be driven by its own task.
// Moved once into its task right after the handshake, never stored: boxing would only cost.
#[allow(clippy::large_enum_variant)]
enum Driver {
    H1(http1::Connection<TokioIo<Metered<TcpStream>>, Body>),
    H2(http2::Connection<TokioIo<Metered<TcpStream>>, Body, TokioExecutor>),
}

impl Driver {
    fn spawn(self, inner: Weak<Inner>, host: SocketAddr, id: u64, close: Arc<Notify>) {
        match self {
            Self::H1(conn) => drive(conn, inner, host, id, close),
            Self::H2(conn) => drive(conn, inner, host, id, close),
        }
    }
}

/// Opens a TCP connection to `host` within `connectTimeout`, with the cluster's socket options:
/// the one connect of both the HTTP pools and the L4 proxy. Counts `upstream_cx_connect_timeout`;
/// the caller counts the failure (`upstream_cx_connect_fail`) once, whatever step failed.
pub(crate) async fn connect_tcp(
    stats: &Stats,
    host: SocketAddr,
    opts: &ConnectOptions,
) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(opts.timeout, TcpStream::connect(host)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return Err(ConnectError::io(host, err)),
        Err(_) => {
            inc(&stats.cx_connect_timeout);
            return Err(ConnectError::TimedOut {
                host,
                after: opts.timeout,
            });
        }
    };
    // Latency over throughput for request/response traffic, as Envoy does.
    let _ = stream.set_nodelay(true);
    if let Some(keepalive) = &opts.keepalive {
        if let Err(err) = socket2::SockRef::from(&stream).set_tcp_keepalive(keepalive) {
            debug!(%host, %err, "could not set TCP keepalive");
        }
    }
    Ok(stream)
}

/// A TCP connection, then the HTTP handshake (which does no I/O of its own: hyper sends the h2
/// preface from the connection's task).
async fn connect(
    inner: &Inner,
    host: SocketAddr,
    protocol: UpstreamProtocol,
    opts: &ConnectOptions,
) -> Result<(Sender, Driver), ConnectError> {
    let stream = connect_tcp(&inner.stats, host, opts).await?;
    let io = TokioIo::new(Metered::new(stream, inner.meter(host)));
    let handshake_err = |e: hyper::Error| ConnectError::Handshake {
        host,
        source: Cause::new(e),
    };
    Ok(match protocol {
        UpstreamProtocol::Http1 => {
            let (s, c) = http1::handshake(io).await.map_err(handshake_err)?;
            (Sender::H1(s), Driver::H1(c))
        }
        UpstreamProtocol::H2c => {
            let (s, c) = http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(handshake_err)?;
            (Sender::H2(s), Driver::H2(c))
        }
    })
}

/// Runs one connection until it closes, is told to close, or idles past `idleTimeout`; then frees
/// its slot. At `maxConnectionDuration` it drains.
fn drive<F>(conn: F, inner: Weak<Inner>, host: SocketAddr, id: u64, close: Arc<Notify>)
where
    F: Future<Output = Result<(), hyper::Error>> + Send + 'static,
{
    let first_deadline = inner
        .upgrade()
        .and_then(|i| i.idle_timeout())
        .map(|t| Instant::now() + t);
    let mut max_age = inner
        .upgrade()
        .and_then(|i| i.max_connection_duration())
        .map(|t| Instant::now() + t);
    tokio::spawn(async move {
        {
            tokio::pin!(conn);
            let mut deadline = first_deadline;
            // The connection wakes this task a few times per request; its timers and the close
            // signal are polled only when one of them woke it (see `SideWake`).
            let side = SideWake::new();
            let side_waker = Waker::from(side.clone());
            let mut close = std::pin::pin!(close.notified());
            let mut idle = std::pin::pin!(tokio::time::sleep_until(
                deadline.unwrap_or_else(Instant::now)
            ));
            let mut age = std::pin::pin!(tokio::time::sleep_until(
                max_age.unwrap_or_else(Instant::now)
            ));
            loop {
                // Each turn polls the side futures once: a timer set again must be registered.
                side.poll_next();
                let event = std::future::poll_fn(|cx| {
                    if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                        return Poll::Ready(Event::Ended(res));
                    }
                    if !side.due(cx) {
                        return Poll::Pending;
                    }
                    let mut cx = Context::from_waker(&side_waker);
                    if close.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::Close);
                    }
                    if max_age.is_some() && age.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::MaxAge);
                    }
                    if deadline.is_some() && idle.as_mut().poll(&mut cx).is_ready() {
                        return Poll::Ready(Event::Idle);
                    }
                    Poll::Pending
                })
                .await;
                match event {
                    Event::Ended(res) => {
                        if let Err(err) = res {
                            debug!(%host, %err, "upstream connection ended");
                        }
                        break;
                    }
                    Event::Close => break,
                    Event::MaxAge => {
                        max_age = None;
                        let Some(inner) = inner.upgrade() else { break };
                        // Closes it now if idle (`close` is notified), else when its requests end.
                        inner.pool.lock().expire(host, id);
                    }
                    Event::Idle => {
                        let Some(inner) = inner.upgrade() else { break };
                        let timeout = inner.idle_timeout();
                        let next = inner.pool.lock().idle_deadline(host, id, timeout);
                        match next {
                            Ok(next) => deadline = next,
                            Err(()) => break,
                        }
                        if let Some(next) = deadline {
                            idle.as_mut().reset(next);
                        }
                    }
                }
            }
        }
        if let Some(inner) = inner.upgrade() {
            inner.pool.lock().closed(host, id);
        }
    });
}

/// What ended a turn of a pooled connection's task.
enum Event {
    Ended(Result<(), hyper::Error>),
    Close,
    MaxAge,
    Idle,
}

/// Gives a lease back: to idle (or the next waiter) when `reusable`, else the connection closes
/// (h1) or just the stream ends (h2).
pub(crate) fn release(inner: &Inner, leased: Leased, reusable: bool) {
    inner.pool.lock().release(leased, reusable);
}

/// The cluster went away while a request waited for a connection.
#[derive(Debug, thiserror::Error)]
#[error("connection pool closed while waiting for a connection")]
struct PoolClosed;

struct PendingGuard<'a>(&'a Inner);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.pool.lock();
        st.pending = st.pending.saturating_sub(1);
    }
}

/// Leaves the wait queue if the waiting future is dropped, giving back anything already granted.
struct WaitGuard<'a> {
    inner: &'a Inner,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        rx.close();
        let granted = rx.try_recv().ok();
        let mut st = self.inner.pool.lock();
        if let Some(pos) = st.waiters.iter().position(|w| w.id == self.id) {
            st.waiters.remove(pos);
        }
        if let Some(grant) = granted {
            st.give_back(grant);
            st.dispatch();
        }
    }
}

/// Frees a reserved connection slot if connecting fails or is abandoned.
struct SlotGuard<'a> {
    inner: &'a Inner,
    host: SocketAddr,
    armed: bool,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.inner.pool.lock();
            st.unreserve(self.host);
            st.dispatch();
        }
    }
}

/// The pool's state machine on paused time, with real loopback sockets: a listener that never
/// accepts still completes connects (the kernel's backlog does), which is all a pool needs to lease
/// h1 connections without any request being sent.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cluster, ClusterHandle};
    use futures_util::FutureExt;
    use sluice_policy::{ClusterKey, Endpoint};

    async fn backlog_listener() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    fn cluster(
        addr: SocketAddr,
        edit: impl FnOnce(&mut sluice_policy::ConnectionPool),
    ) -> ClusterHandle {
        let mut spec = sluice_policy::Cluster {
            key: ClusterKey {
                host: "pool.default.svc.cluster.local".into(),
                port: 80,
                subset: None,
            },
            endpoints: vec![Endpoint {
                addr,
                pod: None,
                labels: Default::default(),
                identity: None,
            }],
            policy: Default::default(),
            destination_rule: None,
            subset_labels: Default::default(),
        };
        edit(&mut spec.policy.connection_pool);
        Cluster::new(Arc::new(spec), UpstreamProtocol::Http1)
    }

    fn opts(c: &ClusterHandle) -> ConnectOptions {
        ConnectOptions::of(&c.inner.config().spec.policy.connection_pool)
    }

    /// Pending requests and connections, cluster-wide.
    fn counts(c: &ClusterHandle) -> (u32, u32, usize) {
        let st = c.inner.pool.lock();
        (st.pending, st.cx, st.waiters.len())
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn waiters_are_served_in_order_and_overflow_past_the_limit() {
        let (_listener, addr) = backlog_listener().await;
        let c = cluster(addr, |cp| {
            cp.max_connections = 1;
            cp.max_pending_requests = 2;
        });
        let o = opts(&c);
        let first = acquire(&c.inner, addr, &o).await.expect("a connection");
        let mut second = Box::pin(acquire(&c.inner, addr, &o));
        let mut third = Box::pin(acquire(&c.inner, addr, &o));
        assert!(second.as_mut().now_or_never().is_none());
        assert!(third.as_mut().now_or_never().is_none());
        assert_eq!(counts(&c), (2, 1, 2));
        // A fourth would be the third pending request: overflow at once, nothing queued.
        let fourth = acquire(&c.inner, addr, &o).now_or_never().expect("at once");
        assert!(matches!(
            fourth,
            Err(ProxyError::Overflow(sluice_core::OverflowKind::Pending))
        ));
        assert_eq!(c.stats().upstream_rq_pending_overflow, 1);

        // The freed connection goes to the oldest waiter, not to the newest.
        let id = first.id;
        release(&c.inner, first, true);
        assert!(third.as_mut().now_or_never().is_none());
        let second = second.now_or_never().expect("granted").expect("leased");
        assert_eq!(second.id, id, "the same keep-alive connection");
        assert_eq!(counts(&c), (1, 1, 1));

        // The last waiter gives up (its client left): it leaves the queue and its pending place.
        drop(third);
        assert_eq!(counts(&c), (0, 1, 0));
        release(&c.inner, second, false);
        tokio::task::yield_now().await;
        assert_eq!(c.stats().upstream_rq_pending_active, 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_waiter_dropped_after_its_grant_gives_the_connection_back() {
        let (_listener, addr) = backlog_listener().await;
        let c = cluster(addr, |cp| cp.max_connections = 1);
        let o = opts(&c);
        let first = acquire(&c.inner, addr, &o).await.expect("a connection");
        let mut waiter = Box::pin(acquire(&c.inner, addr, &o));
        assert!(waiter.as_mut().now_or_never().is_none());
        // The connection is handed to the waiter, which goes away before it looks.
        release(&c.inner, first, true);
        drop(waiter);
        assert_eq!(counts(&c), (0, 1, 0));
        let occupancy = c.inner.pool.lock().occupancy(addr);
        assert_eq!((occupancy.total, occupancy.idle), (1, 1));
        // The next request reuses it: no new connection.
        let again = acquire(&c.inner, addr, &o).now_or_never().expect("at once");
        assert!(again.is_ok());
        assert_eq!(c.stats().upstream_cx_total, 1);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_request_dropped_while_connecting_frees_its_slot() {
        let (_listener, addr) = backlog_listener().await;
        let c = cluster(addr, |cp| cp.max_connections = 1);
        let o = opts(&c);
        // Polled once: the slot is reserved and the connect under way.
        let mut connecting = Box::pin(acquire(&c.inner, addr, &o));
        let _ = connecting.as_mut().now_or_never();
        assert_eq!(counts(&c), (1, 1, 0));
        drop(connecting);
        assert_eq!(counts(&c), (0, 0, 0));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_connections_close_after_the_idle_timeout_and_not_before() {
        let (_listener, addr) = backlog_listener().await;
        let c = cluster(addr, |cp| cp.idle_timeout = Some(Duration::from_secs(60)));
        let o = opts(&c);
        let leased = acquire(&c.inner, addr, &o).await.expect("a connection");
        // Busy for longer than the idle timeout: busy time does not count.
        tokio::time::sleep(Duration::from_secs(90)).await;
        assert_eq!(counts(&c).1, 1);
        release(&c.inner, leased, true);
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert_eq!(counts(&c).1, 1, "idle 59 s of 60");
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The connection's task saw its deadline and closed it.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(counts(&c).1, 0);
        assert_eq!(c.inner.pool.lock().occupancy(addr).total, 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn connect_timeout_is_the_same_for_http_and_tcp() {
        let (_listener, _fillers, addr) = crate::tests::full_backlog_listener();
        let c = cluster(addr, |cp| cp.connect_timeout = Duration::from_millis(200));
        let o = opts(&c);
        let started = Instant::now();
        let Err(http) = acquire(&c.inner, addr, &o).await else {
            panic!("connected through a full backlog");
        };
        let tcp = connect_tcp(&c.inner.stats, addr, &o)
            .await
            .expect_err("timed out");
        assert_eq!(started.elapsed(), Duration::from_millis(400));
        assert!(matches!(
            http,
            ProxyError::ConnectFailure(ConnectError::TimedOut { after, .. }) if after == Duration::from_millis(200)
        ));
        assert!(matches!(tcp, ConnectError::TimedOut { host, .. } if host == addr));
        let stats = c.stats();
        assert_eq!(stats.upstream_cx_connect_timeout, 2);
        assert_eq!(counts(&c), (0, 0, 0));
    }
}
