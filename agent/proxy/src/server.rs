//! The outbound listener: accepts client connections, speaks HTTP/1.1 or h2c to each (detected from the
//! first bytes), and hands every request to the [`Handler`]. On shutdown it drains, as Envoy's
//! HTTP connection manager does, up to a drain deadline:
//!
//! - The listener keeps accepting until its accept queue has been quiet for [`BACKLOG_QUIET`]
//!   (at most [`BACKLOG_MAX`]): in eBPF mode the redirect lease has ended by then, but
//!   connections the programs redirected just before are still queued, and closing the listener
//!   would reset them. The listener is closed only then, which also frees the address for the
//!   next agent (no `SO_REUSEPORT`: a second listener's queue would be reset when the old one
//!   closes, and the kernel picks which listener a connection lands on).
//! - HTTP/1 responses written during the drain carry `Connection: close`, so a client on a
//!   keep-alive connection learns of the drain from its next response instead of racing a close;
//!   connections that stay idle are closed after the drain grace (half the drain). HTTP/2
//!   connections get a GOAWAY at once (the client knows which streams were taken).
//!
//! Every client connection is held to the handler's [`DownstreamLimits`](crate::DownstreamLimits)
//! (see [`crate::downstream`]): hyper is configured with the header limits (Envoy's accounting on
//! HTTP/1) and the HTTP/2 stream and reset limits; the connection's task closes it when idle, when
//! Envoy's premature-reset rule fires, or (gracefully) on shutdown, and counts what the `h2`
//! crate's own defences closed.
//!
//! A redirected connection (one with an original destination) first has its protocol decided
//! ([`crate::detect`]: the Service port's declared protocol, else the first bytes, else TCP after the
//! detection timeout); HTTP goes to the handler as above, anything else to the L4 proxy. A connection
//! whose original destination is this listener itself would loop and is refused. The drain waits for
//! L4 connections as for HTTP ones, up to its deadline (Envoy also lets TCP proxy connections run
//! until the drain ends).
//!
//! A redirecting listener (eBPF mode) serves a connection only when its original destination is
//! known and its client is an enrolled pod of this node; any other is closed unread, so the proxy
//! is no open relay (see `relay`).

use crate::detect::{self, Prefixed, Protocol};
use crate::downstream::{Conn, Guarded, Rejected};
use crate::handler::{ConnInfo, Handler};
use crate::limits::{DownstreamLimits, Fired};
use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use sluice_core::{ConnTimer, ResponseFlags, SideWake};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Recovers the destination a redirected connection was made to (eBPF mode); `None` in explicit mode.
pub trait OriginalDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr>;
}

type Builder = Arc<auto::Builder<TokioExecutor>>;

/// hyper's default read buffer limit (`DEFAULT_MAX_BUFFER_SIZE`).
const HYPER_DEFAULT_BUF: usize = 8192 + 4096 * 100;

/// hyper configured with `limits`.
fn builder(limits: &DownstreamLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let header_bytes = limits.max_header_bytes();
    {
        let mut h1 = builder.http1();
        h1.keep_alive(true)
            .timer(TokioTimer::new())
            // Envoy times a request head from its first byte; hyper's timer also runs while a
            // keep-alive connection is idle (and sends nothing). `Guarded` times heads instead.
            .header_read_timeout(None)
            // `Guarded` holds heads to the size limit as they arrive; hyper's read buffer (a
            // loose limit: a read may overshoot it) stays above it for heads it does not follow.
            .max_buf_size(header_bytes.saturating_mul(2).max(HYPER_DEFAULT_BUF));
        // Also a backstop: the same count as `Guarded`'s (above 100, hyper allocates its header
        // array per request; 100 is its inline default).
        if limits.max_request_headers_count != 100 {
            h1.max_headers(limits.max_request_headers_count as usize);
        }
    }
    // The HTTP/2 header limits are the service's (Envoy's accounting, pseudo-headers included);
    // h2 refuses on its own only far above them (its size counts 32 bytes more per header).
    let h2_list = header_bytes
        .saturating_mul(2)
        .saturating_add(32 * (limits.max_request_headers_count as usize + 8));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.http2_max_local_error_reset_streams)
        .max_header_list_size(u32::try_from(h2_list).unwrap_or(u32::MAX));
    builder
}

/// A request the proxy ends by resetting its stream (HTTP/2), for `fired`. A concrete type (not
/// `BoxError`): hyper's bound on the service error must hold for every lifetime.
#[derive(Debug, thiserror::Error)]
#[error("stream reset by the proxy: {}", .0.details())]
struct StreamReset(Fired);

/// What a connection holds while it is served: the drain waits for every one, and each hears
/// the shutdown.
#[derive(Clone)]
struct Draining {
    _live: mpsc::Sender<()>,
    shutdown: watch::Receiver<bool>,
    /// How long an HTTP/1 connection may stay open after the shutdown for its client to send a
    /// last request (answered with `Connection: close`); Envoy's `drain_timeout`.
    grace: Duration,
}

/// After the shutdown, the listener closes once nothing was accepted for this long.
pub const BACKLOG_QUIET: Duration = Duration::from_millis(100);
/// After the shutdown, the listener closes after this at the latest (or the drain, if shorter).
pub const BACKLOG_MAX: Duration = Duration::from_secs(1);

/// Serves `listener` until `shutdown` turns true, then drains for at most `drain` (see the module
/// comment: the listener stays open until its queue is quiet). Counts each accepted connection
/// in `accepted` (the redirect lease is renewed only while this loop makes progress).
pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    original_dst: Option<Arc<dyn OriginalDst>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let builder = Arc::new(builder(&handler.limits));
    handler.isolation.start_sampling();
    // Each connection holds a sender; the drain ends when the last is dropped.
    let (live, mut all_done) = mpsc::channel::<()>(1);
    let listen_addr = listener.local_addr().ok();
    // Once shut down: (the listener is quiet at, it closes at the latest at).
    let mut closing: Option<(Instant, Instant)> = None;
    let mut after_shutdown = 0u64;

    loop {
        let closes_at = closing.map(|(quiet, last)| quiet.min(last));
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(err) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Also when the sender is gone: shut down as on SIGTERM.
            _ = shutdown.changed(), if closing.is_none() => {
                let now = Instant::now();
                closing = Some((now + BACKLOG_QUIET, now + BACKLOG_MAX.min(drain)));
                tracing::info!("shutting down: the outbound listener takes what is queued until quiet");
                continue;
            }
            () = tokio::time::sleep_until(closes_at.unwrap_or_else(Instant::now)), if closes_at.is_some() => break,
        };
        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some((quiet, _)) = &mut closing {
            *quiet = Instant::now() + BACKLOG_QUIET;
            after_shutdown += 1;
        }
        let _ = stream.set_nodelay(true);
        // A listener on `[::]` sees IPv4 clients as IPv4-mapped IPv6 addresses; Pods, logs and
        // metrics know them by their IPv4 address.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let mut conn = ConnInfo {
            peer,
            original_dst: original_dst.as_ref().and_then(|o| o.original_dst(&stream)),
            slot: None,
            timer: None,
        };
        if original_dst.is_some() && !handler.admit_redirected(&conn) {
            // Refused (no open relay): closed before a byte is read.
            continue;
        }
        match handler.isolation.admit_connection(peer.ip()) {
            Ok(slot) => conn.slot = Some(Arc::new(slot)),
            Err(why) => {
                // Closed before a byte is read: the pod over its budget (or the proxy short of
                // descriptors or memory) costs the others nothing more.
                handler.shed_connection(&conn, why);
                continue;
            }
        }
        let handler = handler.clone();
        let builder = builder.clone();
        let watcher = Draining {
            _live: live.clone(),
            shutdown: shutdown.clone(),
            grace: drain / 2,
        };
        match conn.original_dst {
            None => {
                tokio::spawn(serve_http(builder, watcher, stream, handler, conn, false));
            }
            Some(dst) => {
                let is_loop = listen_addr.is_some_and(|l| loops(dst, l));
                tokio::spawn(serve_redirected(
                    builder, watcher, stream, handler, conn, dst, is_loop,
                ));
            }
        }
    }

    drop(listener);
    tracing::info!(
        ?drain,
        accepted_after_shutdown = after_shutdown,
        "outbound listener closed; draining requests under way"
    );
    drop(live);
    if tokio::time::timeout(drain, all_done.recv()).await.is_err() {
        tracing::warn!("drain deadline passed with requests still under way");
    }
}

/// Decides the protocol of a redirected connection and proxies it at L7 or L4.
async fn serve_redirected(
    builder: Builder,
    watcher: Draining,
    mut stream: TcpStream,
    handler: Arc<Handler>,
    conn: ConnInfo,
    dst: SocketAddr,
    is_loop: bool,
) {
    let start = tokio::time::Instant::now();
    let declared = if is_loop {
        None
    } else {
        handler.declared_protocol(dst)
    };
    let (protocol, prefix) = match declared {
        Some(p) => (p, Bytes::new()),
        None => {
            let timeout = handler.redirect.protocol_detection_timeout;
            match detect::detect(&mut stream, timeout).await {
                Ok(found) => found,
                Err(err) => {
                    tracing::debug!(peer = %conn.peer, %err, "client connection failed before its protocol was known");
                    return;
                }
            }
        }
    };
    let stream = Prefixed::new(prefix, stream);
    match protocol {
        Protocol::Http => serve_http(builder, watcher, stream, handler, conn, is_loop).await,
        Protocol::Tcp if is_loop => handler.refuse_loop_tcp(&conn, start),
        Protocol::Tcp => {
            // Held to the end of the connection: the drain waits for it (up to its deadline).
            let _draining = watcher;
            handler.proxy_tcp(stream, &conn, dst, start).await;
        }
    }
}

/// Serves HTTP/1.1 or h2c on one client connection, under the handler's limits.
async fn serve_http<IO>(
    builder: Builder,
    mut draining: Draining,
    io: IO,
    handler: Arc<Handler>,
    mut conn: ConnInfo,
    is_loop: bool,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    // The connection itself, in Istio's TCP families (client pod -> the Service it addressed).
    let io = {
        let state = handler.state();
        let service = conn
            .original_dst
            .and_then(|dst| state.service_by_vip(dst.ip(), dst.port()))
            .and_then(|svc| handler.labels_of(&state, Some(svc)).cloned())
            .unwrap_or_else(sluice_telemetry::ServiceName::unknown);
        let source = state.source_identity(peer.ip());
        let pod = state
            .snapshot
            .workload_by_ip(peer.ip())
            .map(|w| format!("{}/{}", w.namespace, w.name));
        crate::conns::Downstream::new(io, &handler.telemetry, Some((peer, pod)), &source, &service)
    };
    let client = Conn::new(handler.clone(), peer);
    let io = Guarded::new(io, client.clone());
    // The connection's side futures (shutdown, timers, abort) wake it through `side`.
    let side = SideWake::new();
    let side_waker = Waker::from(side.clone());
    // The route timeouts of its HTTP/1 requests, which this task polls, run on one timer of its
    // own (`route_timer` below).
    let conn_timer = Arc::new(ConnTimer::new(
        side_waker.clone(),
        Instant::now().into_std(),
    ));
    conn.timer = Some(conn_timer.clone());
    // Whether the client speaks HTTP/2 (known from its first request): on shutdown it gets a
    // GOAWAY at once, where an HTTP/1 client gets `Connection: close` on its next response.
    let is_h2 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let svc = {
        // What every request of the connection needs, behind one reference count.
        let mut shutdown = draining.shutdown.clone();
        let draining_from_start = *shutdown.borrow_and_update();
        let shared = Arc::new(PerConn {
            handler,
            conn,
            client: client.clone(),
            shutdown,
            draining_from_start,
        });
        let is_h2 = is_h2.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let h1 = req.version() < http::Version::HTTP_2;
            if !h1 {
                is_h2.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            let (req, request) = shared.client.request_started(req);
            let started = request.started();
            // Boxed where created: rustc cannot otherwise prove the future `Send` for every
            // lifetime in `BoxError` when hyper spawns it.
            let fut: futures_util::future::BoxFuture<'static, Result<_, StreamReset>> =
                Box::pin(async move {
                    let PerConn {
                        handler,
                        conn,
                        client,
                        ..
                    } = &*shared;
                    if req.version() == http::Version::HTTP_2 {
                        if let Some(fired) = client.check_h2_headers(&req) {
                            // Envoy's codec resets the stream (hyper sends RST_STREAM
                            // INTERNAL_ERROR when the service fails) and logs `DR`.
                            let now = (SystemTime::now(), Instant::now());
                            client.reject(Rejected {
                                fired,
                                version: http::Version::HTTP_2,
                                status: 0,
                                flags: ResponseFlags::DOWNSTREAM_REMOTE_RESET,
                                started: now,
                                head_bytes: sluice_telemetry::header_bytes(req.headers()),
                                response_bytes: 0,
                            });
                            request.local_reset();
                            return Err(StreamReset(fired));
                        }
                    }
                    let mut rsp = if is_loop {
                        handler.refuse_loop(&req, conn, started)
                    } else {
                        handler.handle(req, conn, started).await
                    };
                    if h1
                        && shared.draining()
                        && rsp.status() != http::StatusCode::SWITCHING_PROTOCOLS
                    {
                        // Draining: this is the connection's last response (hyper closes
                        // after writing it), and the client knows before it writes again. An
                        // upgrade's 101 keeps its `Connection: upgrade`.
                        rsp.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok(request.respond(rsp))
                });
            fut
        })
    };
    let served = builder.serve_connection(TokioIo::new(io), svc).into_owned();
    let mut served = std::pin::pin!(served);
    let stats = client.stats();
    // Closing: a graceful shutdown was asked of hyper (idle, or the proxy's shutdown).
    let mut closing = false;
    // The proxy's shutdown was seen: an HTTP/1 connection closes at this deadline (or after its
    // next response).
    let mut grace_ends: Option<Instant> = None;
    // The idle timer is armed once and set again only when it fires. It never runs later than
    // the connection's idle deadline (while requests are under way it is set a whole timeout
    // from now, and the deadline is at least that far once they end), so requests coming and
    // going cost no timer and no turn of this loop; when it fires early it is set again.
    let mut idle_timer = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
    let mut idle_armed = false;
    // Set lazily too (see `ConnTimer`, which knows whether it is set): once per route timeout,
    // not once per request.
    let mut route_timer = std::pin::pin!(tokio::time::sleep_until(Instant::now()));
    let result = loop {
        if client.aborted() {
            // Envoy aborts such a connection: nothing more is read or written.
            tracing::debug!(%peer, "client connection aborted (too many premature resets)");
            return;
        }
        if !closing && grace_ends.is_none() && *draining.shutdown.borrow() {
            if is_h2.load(std::sync::atomic::Ordering::Relaxed) {
                closing = true;
                served.as_mut().graceful_shutdown();
            } else {
                grace_ends = Some(Instant::now() + draining.grace);
            }
        }
        if !closing && !idle_armed {
            if let Some(timeout) = client.idle_timeout() {
                let at = client
                    .idle_deadline()
                    .unwrap_or_else(|| Instant::now() + timeout);
                idle_timer.as_mut().reset(at);
                idle_armed = true;
            }
        }
        let watch_shutdown = !closing && grace_ends.is_none();
        let watch_grace = grace_ends.is_some() && !closing;
        let watch_idle = idle_armed && !closing;
        let mut shutdown = std::pin::pin!(draining.shutdown.changed());
        let mut grace = std::pin::pin!(tokio::time::sleep_until(
            grace_ends.unwrap_or_else(Instant::now)
        ));
        let mut abort = std::pin::pin!(client.changed());
        side.poll_next();
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(res) = served.as_mut().poll(cx) {
                return Poll::Ready(Event::Served(res));
            }
            // The other futures are polled once, then only when one of them woke the task:
            // the connection's own reads and writes wake it several times per request.
            if !side.due(cx) {
                return Poll::Pending;
            }
            let mut cx = Context::from_waker(&side_waker);
            // Route deadlines first: they are watched while draining too.
            if let Some(at) = conn_timer.reset_to() {
                route_timer.as_mut().reset(Instant::from_std(at));
            }
            if conn_timer.is_set() && route_timer.as_mut().poll(&mut cx).is_ready() {
                // Either the request's deadline passed (`served`, polled first at the next turn,
                // polls the request) or the timer fired early for a later deadline (set again
                // at the next turn).
                conn_timer.fired(Instant::now().into_std());
                return Poll::Ready(Event::RouteTimer);
            }
            if watch_shutdown {
                if let Poll::Ready(changed) = shutdown.as_mut().poll(&mut cx) {
                    return Poll::Ready(Event::Shutdown {
                        sender_gone: changed.is_err(),
                    });
                }
            }
            if watch_grace && grace.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Event::GraceOver);
            }
            if watch_idle && idle_timer.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Event::IdleTimer);
            }
            if abort.as_mut().poll(&mut cx).is_ready() {
                return Poll::Ready(Event::Abort);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Served(res) => break res,
            Event::Shutdown { sender_gone } => {
                if sender_gone {
                    // The listener is gone without a word: shut down as on SIGTERM.
                    closing = true;
                    served.as_mut().graceful_shutdown();
                }
            }
            Event::GraceOver => {
                // Envoy's `drain_timeout`: what is still open now is closed (after its
                // response, if one is under way).
                closing = true;
                served.as_mut().graceful_shutdown();
            }
            Event::IdleTimer => {
                idle_armed = false;
                if client.idle_deadline().is_some_and(|d| d <= Instant::now()) {
                    tracing::debug!(%peer, "closing an idle client connection");
                    stats.fired(Fired::IdleTimeout);
                    closing = true;
                    served.as_mut().graceful_shutdown();
                }
            }
            // Checked at the top of the loop; the request is polled at the next turn.
            Event::Abort | Event::RouteTimer => {}
        }
    };
    if let Err(err) = result {
        // The `h2` crate's GOAWAYs were counted as they were written (`Guarded`).
        tracing::debug!(%peer, error = %err, "client connection ended with an error");
    }
}

/// A client connection's own, shared by its requests.
struct PerConn {
    handler: Arc<Handler>,
    conn: ConnInfo,
    client: Arc<Conn>,
    /// Marked seen when the connection began, with what it said then: every response asks.
    shutdown: watch::Receiver<bool>,
    draining_from_start: bool,
}

impl PerConn {
    /// Whether the proxy is shutting down. Asked once per response: the value is read (under
    /// the channel's lock) only once it changed; until then, a plain load of its version.
    fn draining(&self) -> bool {
        self.draining_from_start
            || (self.shutdown.has_changed().unwrap_or(true) && *self.shutdown.borrow())
    }
}

/// What ended a turn of a connection's loop.
enum Event<R> {
    Served(R),
    Shutdown { sender_gone: bool },
    GraceOver,
    IdleTimer,
    RouteTimer,
    Abort,
}

/// Whether sending to `dst` would come back to the listener at `listen`: the same address, or the
/// listener's port on any local address when it listens on all of them.
fn loops(dst: SocketAddr, listen: SocketAddr) -> bool {
    dst == listen
        || (listen.ip().is_unspecified() && dst.port() == listen.port() && is_local(dst.ip()))
}

/// An address of this host: binding to it succeeds only then (a cheap syscall; only asked when the
/// port already matches the listener's).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_guard() {
        let listen: SocketAddr = "127.0.0.1:15001".parse().unwrap();
        assert!(loops(listen, listen));
        assert!(!loops("127.0.0.1:80".parse().unwrap(), listen));
        assert!(!loops("10.96.0.10:15001".parse().unwrap(), listen));
        let any: SocketAddr = "0.0.0.0:15001".parse().unwrap();
        assert!(loops("127.0.0.1:15001".parse().unwrap(), any));
        assert!(loops("127.0.0.2:15001".parse().unwrap(), any));
        assert!(!loops("127.0.0.1:15002".parse().unwrap(), any));
        // TEST-NET-1 is never a local address.
        assert!(!loops("192.0.2.1:15001".parse().unwrap(), any));
    }
}
