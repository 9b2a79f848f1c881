//! The outbound listener: accepts client connections, speaks HTTP/1.1 or h2c to each (detected from the
//! first bytes), and hands every request to the [`Handler`]. On shutdown it stops accepting and lets
//! requests under way finish, up to a drain deadline.
//!
//! A redirected connection (one with an original destination) first has its protocol decided
//! ([`crate::detect`]: the Service port's declared protocol, else the first bytes, else TCP after the
//! detection timeout); HTTP goes to the handler as above, anything else to the L4 proxy. A connection
//! whose original destination is this listener itself would loop and is refused. The drain waits for
//! L4 connections as for HTTP ones, up to its deadline (Envoy also lets TCP proxy connections run
//! until the drain ends).

use crate::detect::{self, Prefixed, Protocol};
use crate::handler::{ConnInfo, Handler};
use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Recovers the destination a redirected connection was made to (eBPF mode); `None` in explicit mode.
pub trait OriginalDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr>;
}

type Builder = Arc<auto::Builder<TokioExecutor>>;

/// Serves `listener` until `shutdown` turns true, then drains for at most `drain`. Counts each
/// accepted connection in `accepted` (the redirect lease is renewed only while this loop makes
/// progress).
pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    original_dst: Option<Arc<dyn OriginalDst>>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new());
    builder.http2().timer(hyper_util::rt::TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let listen_addr = listener.local_addr().ok();

    loop {
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
            _ = shutdown.changed() => break,
        };
        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        // A listener on `[::]` sees IPv4 clients as IPv4-mapped IPv6 addresses; Pods, logs and
        // metrics know them by their IPv4 address.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let conn = ConnInfo {
            peer,
            original_dst: original_dst.as_ref().and_then(|o| o.original_dst(&stream)),
        };
        let handler = handler.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
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

    tracing::info!(
        ?drain,
        "outbound listener closed; draining requests under way"
    );
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed with requests still under way");
    }
}

/// Decides the protocol of a redirected connection and proxies it at L7 or L4.
async fn serve_redirected(
    builder: Builder,
    watcher: Watcher,
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

/// Serves HTTP/1.1 or h2c on one client connection.
async fn serve_http<IO>(
    builder: Builder,
    watcher: Watcher,
    io: IO,
    handler: Arc<Handler>,
    conn: ConnInfo,
    is_loop: bool,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let peer = conn.peer;
    let svc = service_fn(move |req| {
        let handler = handler.clone();
        let conn = conn.clone();
        async move {
            if is_loop {
                return Ok::<_, Infallible>(handler.refuse_loop(&req, &conn));
            }
            Ok::<_, Infallible>(handler.handle(req, &conn).await)
        }
    });
    let served = builder.serve_connection(TokioIo::new(io), svc).into_owned();
    if let Err(err) = watcher.watch(served).await {
        tracing::debug!(%peer, error = %err, "client connection ended with an error");
    }
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
