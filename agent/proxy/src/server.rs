//! The outbound listener: accepts client connections, speaks HTTP/1.1 or h2c to each (detected from the
//! first bytes), and hands every request to the [`Handler`]. On shutdown it stops accepting and lets
//! requests under way finish, up to a drain deadline.

use crate::handler::{ConnInfo, Handler};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Recovers the destination a redirected connection was made to (eBPF mode); `None` in explicit mode.
pub trait OriginalDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> Option<SocketAddr>;
}

/// Serves `listener` until `shutdown` turns true, then drains for at most `drain`.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<Handler>,
    original_dst: Option<Arc<dyn OriginalDst>>,
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
        let _ = stream.set_nodelay(true);
        let conn = ConnInfo {
            peer,
            original_dst: original_dst.as_ref().and_then(|o| o.original_dst(&stream)),
        };
        let handler = handler.clone();
        let svc = service_fn(move |req| {
            let handler = handler.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handler.handle(req, &conn).await) }
        });
        let served = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let served = graceful.watch(served);
        tokio::spawn(async move {
            if let Err(err) = served.await {
                tracing::debug!(%peer, error = %err, "client connection ended with an error");
            }
        });
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
