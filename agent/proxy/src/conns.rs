//! Istio's TCP families for the connections that carry HTTP, as ztunnel reports every connection
//! of an ambient mesh: the client's connection to the proxy under `reporter="source"` (client pod
//! -> the Service it addressed, when the original destination names one), and each pooled
//! connection from the proxy to an endpoint under `reporter="destination"`, its source being the
//! node proxy itself (those connections carry many clients' requests, as a waypoint's do). Bytes
//! are counted as they flow; the close is counted when the connection ends.

use sluice_core::gather;
use sluice_policy::{Endpoint, Identity};
use sluice_telemetry::recent::{ConnectionGuard, OpenConnection, Side};
use sluice_telemetry::{Interned, Peer, Reporter, ServiceName, TcpCounters, Telemetry};
use sluice_upstream::{ConnectionMeter, ConnectionObserver};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The node proxy as a workload: the source of its pooled upstream connections.
pub(crate) fn agent_identity() -> Peer {
    static AGENT: OnceLock<Peer> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            // The DaemonSet's namespace, from the downward API when it is set.
            let namespace = std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "sluice-system".into());
            let labels = [("app".to_string(), "sluice".to_string())].into();
            let mut id = Identity::of_pod("sluice", &namespace, &labels, None);
            id.canonical_revision = env!("CARGO_PKG_VERSION").into();
            Interned::new(id)
        })
        .clone()
}

/// Counts a cluster's pooled connections to its endpoints.
pub(crate) struct UpstreamConnections {
    pub telemetry: Telemetry,
    pub service: Interned<ServiceName>,
}

impl ConnectionObserver for UpstreamConnections {
    fn opened(&self, endpoint: &Endpoint) -> Box<dyn ConnectionMeter> {
        let counters = self.telemetry.tcp_open(
            Reporter::Destination,
            &agent_identity(),
            endpoint
                .identity
                .as_ref()
                .map(|id| Interned::new(Identity::clone(id))),
            &self.service,
        );
        let conn = self.telemetry.connections().open(OpenConnection {
            side: Side::Upstream,
            peer: Some(endpoint.addr),
            pod: endpoint.pod.clone(),
            workload: endpoint
                .identity
                .as_ref()
                .map_or_else(sluice_telemetry::unknown_identity, |id| {
                    Interned::new(Identity::clone(id))
                }),
            service: self.service.clone(),
            protocol: sluice_telemetry::Protocol::Http,
            opened: std::time::SystemTime::now(),
            bytes_in: Default::default(),
            bytes_out: Default::default(),
        });
        Box::new(Open {
            telemetry: self.telemetry.clone(),
            counters,
            conn,
        })
    }
}

/// One open connection's series (closed when dropped) and its entry among the open connections.
struct Open {
    telemetry: Telemetry,
    counters: TcpCounters,
    conn: ConnectionGuard,
}

impl ConnectionMeter for Open {
    // The endpoint receives what the proxy writes and sends what it reads.
    fn read(&self, n: u64) {
        self.counters.sent(n);
        self.conn.read(n);
    }

    fn written(&self, n: u64) {
        self.counters.received(n);
        self.conn.written(n);
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.telemetry
            .tcp_close(&[&self.counters], Default::default(), None);
    }
}

/// A client's HTTP connection, counted under `reporter="source"`; small vectored writes go out as
/// one (`sluice_core::gather`).
pub(crate) struct Downstream<IO> {
    io: IO,
    open: Open,
}

impl<IO> Downstream<IO> {
    pub(crate) fn new(
        io: IO,
        telemetry: &Telemetry,
        peer: Option<(SocketAddr, Option<String>)>,
        source: &Peer,
        service: &Interned<ServiceName>,
    ) -> Self {
        let counters = telemetry.tcp_open(Reporter::Source, source, None, service);
        let (peer, pod) = peer.map_or((None, None), |(addr, pod)| (Some(addr), pod));
        let conn = telemetry.connections().open(OpenConnection {
            side: Side::Downstream,
            peer,
            pod,
            workload: source.clone(),
            service: service.clone(),
            protocol: sluice_telemetry::Protocol::Http,
            opened: std::time::SystemTime::now(),
            bytes_in: Default::default(),
            bytes_out: Default::default(),
        });
        Self {
            io,
            open: Open {
                telemetry: telemetry.clone(),
                counters,
                conn,
            },
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Downstream<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.open.counters.received(n as u64);
            self.open.conn.read(n as u64);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Downstream<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.open.counters.sent(*n as u64);
            self.open.conn.written(*n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = gather::poll_write_gathered(Pin::new(&mut self.io), cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.open.counters.sent(*n as u64);
            self.open.conn.written(*n as u64);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
