//! The L4 proxy for redirected connections that are not HTTP: the original destination's cluster
//! (a Service cluster IP and port) or the passthrough cluster (any other address), an upstream
//! connection under the cluster's `connectTimeout`, `maxConnections` and outlier detection (see
//! `sluice_upstream::ClusterHandle::connect_tcp`), then bytes copied both ways, half-closes
//! included, until both sides are done. VirtualService `tcp` routes are not applied: the service
//! port's own cluster is used.
//!
//! Each connection ends in one access-log line in Envoy's TCP style and Istio's `istio_tcp_*`
//! metrics.

use crate::access_log::TcpSummary;
use crate::handler::{ConnInfo, Handler};
use sluice_core::{ProxyError, RequestInfo, ResponseFlags};
use sluice_policy::ClusterKey;
use sluice_upstream::UpstreamProtocol;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

impl Handler {
    /// Proxies `client` at L4 to `dst`'s cluster until both directions end. `start` is when the
    /// connection was accepted (the logged duration includes protocol detection, as Envoy's does).
    pub(crate) async fn proxy_tcp<IO>(
        &self,
        client: IO,
        conn: &ConnInfo,
        dst: SocketAddr,
        start: Instant,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let state = self.state();
        let info = RequestInfo::new();
        let (upstream, service) = match state.service_by_vip(dst.ip(), dst.port()) {
            Some(svc) => {
                let key = ClusterKey {
                    host: svc.hostname.clone(),
                    port: dst.port(),
                    subset: None,
                };
                (state.upstreams.get(&key).cloned(), Some(svc.clone()))
            }
            None => (
                Some(self.passthrough.upstream(dst, UpstreamProtocol::Http1)),
                None,
            ),
        };
        let labels = self.labels_of(&state, service.as_deref());
        let source = state.source(conn.peer.ip());
        self.metrics.tcp_open(source, labels);

        let mut client = Counted::new(client);
        match upstream {
            None => info.add_flags(ResponseFlags::NO_CLUSTER_FOUND),
            Some(upstream) => {
                info.set_cluster(upstream.name.clone());
                let max_attempts = self.redirect.tcp_max_connect_attempts.max(1);
                let connected = loop {
                    let attempt = info.add_attempt();
                    match upstream.handle.connect_tcp(&info).await {
                        Ok(connected) => break Some(connected),
                        Err(ProxyError::ConnectFailure(why)) if attempt < max_attempts => {
                            tracing::debug!(peer = %conn.peer, %dst, %why, "TCP connect failed; trying another host");
                        }
                        Err(err) => {
                            tracing::debug!(peer = %conn.peer, %dst, error = %err, "TCP connection refused by the proxy");
                            info.add_flags(err.flag());
                            break None;
                        }
                    }
                };
                if let Some(mut upstream) = connected {
                    if let Err(err) =
                        tokio::io::copy_bidirectional(&mut client, &mut upstream.stream).await
                    {
                        tracing::debug!(peer = %conn.peer, %dst, %err, "TCP connection ended with an error");
                    }
                }
            }
        }

        let summary = TcpSummary {
            elapsed: start.elapsed(),
            received: client.read,
            sent: client.written,
        };
        self.metrics
            .tcp_close(source, labels, info.flags(), summary.received, summary.sent);
        self.access_log.log_tcp(
            &summary,
            &info,
            service.as_deref().map(|s| s.hostname.as_str()),
        );
    }

    /// Refuses a non-HTTP connection whose original destination is this proxy's own listener.
    pub(crate) fn refuse_loop_tcp(&self, conn: &ConnInfo, start: Instant) {
        tracing::warn!(
            peer = %conn.peer,
            original_dst = ?conn.original_dst,
            "refused a redirected connection addressed to the proxy's own listener (it would loop); \
             exclude this address or port from redirection"
        );
        let info = RequestInfo::new();
        info.set_cluster(Arc::from(crate::BLACK_HOLE_CLUSTER));
        let state = self.state();
        let source = state.source(conn.peer.ip());
        self.metrics.tcp_open(source, None);
        self.metrics.tcp_close(source, None, info.flags(), 0, 0);
        let summary = TcpSummary {
            elapsed: start.elapsed(),
            received: 0,
            sent: 0,
        };
        self.access_log.log_tcp(&summary, &info, None);
    }
}

/// Counts the bytes read from and written to the client.
struct Counted<IO> {
    io: IO,
    read: u64,
    written: u64,
}

impl<IO> Counted<IO> {
    fn new(io: IO) -> Self {
        Self {
            io,
            read: 0,
            written: 0,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.written += n as u64;
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_directions() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut counted = Counted::new(a);
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        counted.read_exact(&mut buf).await.unwrap();
        counted.write_all(b"hi").await.unwrap();
        assert_eq!((counted.read, counted.written), (5, 2));
    }
}
