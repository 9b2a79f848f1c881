//! Who hears about a cluster's HTTP connections: the proxy counts each one in Istio's TCP families
//! (the endpoint's side of a connection, as a mesh's server-side proxy reports it), its bytes as
//! they flow. The L4 proxy counts its own connections; only pooled HTTP connections come here.

use sluice_core::gather;
use sluice_policy::Endpoint;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Told of every HTTP connection a cluster opens.
pub trait ConnectionObserver: Send + Sync + 'static {
    /// A connection to `endpoint` is open. The meter hears its bytes; dropping it means the
    /// connection closed.
    fn opened(&self, endpoint: &Endpoint) -> Box<dyn ConnectionMeter>;
}

/// The bytes of one connection.
pub trait ConnectionMeter: Send + Sync + 'static {
    /// Bytes received from the endpoint (the response direction).
    fn read(&self, n: u64);
    /// Bytes sent to the endpoint (the request direction).
    fn written(&self, n: u64);
}

/// A connection's I/O, its bytes reported to a meter when there is one; small vectored writes go
/// out as one (`sluice_core::gather`).
pub(crate) struct Metered<IO> {
    io: IO,
    meter: Option<Box<dyn ConnectionMeter>>,
}

impl<IO> Metered<IO> {
    pub(crate) fn new(io: IO, meter: Option<Box<dyn ConnectionMeter>>) -> Self {
        Self { io, meter }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Metered<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Some(meter) = &self.meter {
            let n = buf.filled().len() - before;
            if n > 0 {
                meter.read(n as u64);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Metered<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let (Poll::Ready(Ok(n)), Some(meter)) = (&polled, &self.meter) {
            meter.written(*n as u64);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = gather::poll_write_gathered(Pin::new(&mut self.io), cx, bufs);
        if let (Poll::Ready(Ok(n)), Some(meter)) = (&polled, &self.meter) {
            meter.written(*n as u64);
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
