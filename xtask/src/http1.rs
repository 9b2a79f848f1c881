//! Plain HTTP/1.1 on loopback for the tools' own peers (the bench's bare proxy, the profile
//! training's upstream and clients): one shape of server loop and client connection.

use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::Service;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves every connection `listener` accepts with a clone of `svc` (TCP_NODELAY, a task each);
/// returns when accepting fails.
pub(crate) async fn serve<S, B>(listener: tokio::net::TcpListener, svc: S)
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A keep-alive HTTP/1.1 client connection to `addr` (TCP_NODELAY), its connection task spawned.
pub(crate) async fn connect<B>(addr: SocketAddr) -> Option<SendRequest<B>>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(send)
}
