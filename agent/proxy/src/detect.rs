//! Protocol of a redirected connection, decided as Istio decides it: the Service port's declared
//! protocol (`appProtocol`, or the port name's prefix) when there is one, otherwise the first bytes
//! the client sends (Envoy's `http_inspector`): an HTTP/1.x request line or the HTTP/2 preface is
//! HTTP, anything else is TCP. A client that sends nothing within the detection timeout is taken to
//! speak a server-first protocol (MySQL, SMTP, ...) and is proxied at L4.
//!
//! The bytes read while detecting are not lost: [`Prefixed`] replays them to whoever reads next.

use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a redirected connection is proxied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Tcp,
}

/// The protocol a Service port declares, as Istio reads `appProtocol` or the port name prefix
/// (`http-web`, `grpc`, `tcp-db`, ...); `None` means "detect it".
pub fn declared(app_protocol: Option<&str>) -> Option<Protocol> {
    let p = app_protocol?.to_ascii_lowercase();
    match p.as_str() {
        "http" | "http2" | "http_proxy" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c"
        | "kubernetes.io/ws" => Some(Protocol::Http),
        // TLS and the databases Istio knows are opaque bytes to a proxy without mTLS.
        "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/wss" => {
            Some(Protocol::Tcp)
        }
        _ => None,
    }
}

/// What the first bytes say so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniff {
    Http,
    Tcp,
    NeedMore,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods of an HTTP/1.x request line (RFC 9110 and the WebDAV ones clients still send).
const METHODS: [&[u8]; 16] = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
];

/// Longest request line looked at; past it without a line end, the bytes are not HTTP to us.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;

/// Classifies the first bytes of a connection. HTTP/1 needs the whole request line
/// (`METHOD SP target SP HTTP/1.x CRLF`): a known method alone is not enough, since Redis's inline
/// commands (`GET key\r\n`) start the same way.
pub fn sniff(buf: &[u8]) -> Sniff {
    if buf.is_empty() {
        return Sniff::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Sniff::Http
        } else {
            Sniff::NeedMore
        };
    }
    let Some(sp) = buf.iter().position(|&b| b == b' ') else {
        // Still inside the method token?
        let could_be = METHODS
            .iter()
            .any(|m| m.len() > buf.len() && m.starts_with(buf));
        return if could_be {
            Sniff::NeedMore
        } else {
            Sniff::Tcp
        };
    };
    if !METHODS.contains(&&buf[..sp]) {
        return Sniff::Tcp;
    }
    let Some(lf) = buf.iter().position(|&b| b == b'\n') else {
        let rest = &buf[sp + 1..];
        if buf.len() > MAX_REQUEST_LINE || rest.iter().any(|&b| b < 0x20 && b != b'\r') {
            return Sniff::Tcp;
        }
        return Sniff::NeedMore;
    };
    let line = buf[..lf].strip_suffix(b"\r").unwrap_or(&buf[..lf]);
    let mut parts = line[sp + 1..].rsplitn(2, |&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let ok_target = !target.is_empty() && target.iter().all(|&b| b > 0x20 && b != 0x7f);
    if ok_target && (version == b"HTTP/1.1" || version == b"HTTP/1.0") {
        Sniff::Http
    } else {
        Sniff::Tcp
    }
}

/// Reads from `io` until [`sniff`] decides or `timeout` passes; returns the protocol and the bytes
/// read. No bytes at all before the timeout (a server-first protocol) or the client's EOF is TCP.
/// A zero `timeout` waits for the client without limit (current Istio's `protocolDetectionTimeout:
/// 0s`).
pub async fn detect<IO>(io: &mut IO, timeout: Duration) -> io::Result<(Protocol, Bytes)>
where
    IO: AsyncRead + Unpin,
{
    let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        match sniff(&buf) {
            Sniff::Http => return Ok((Protocol::Http, buf.freeze())),
            Sniff::Tcp => return Ok((Protocol::Tcp, buf.freeze())),
            Sniff::NeedMore => {}
        }
        let read = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await,
            None => Ok(io.read_buf(&mut buf).await),
        };
        match read {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Tcp, buf.freeze())),
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(err),
        }
    }
}

pin_project_lite::pin_project! {
    /// An I/O object whose first reads return `prefix` (bytes consumed while detecting).
    pub struct Prefixed<IO> {
        prefix: Bytes,
        #[pin]
        io: IO,
    }
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Self { prefix, io }
    }
}

impl<IO: AsyncRead> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn declared_protocols_follow_istio() {
        assert_eq!(declared(Some("http")), Some(Protocol::Http));
        assert_eq!(declared(Some("GRPC")), Some(Protocol::Http));
        assert_eq!(declared(Some("kubernetes.io/h2c")), Some(Protocol::Http));
        assert_eq!(declared(Some("tcp")), Some(Protocol::Tcp));
        assert_eq!(declared(Some("mysql")), Some(Protocol::Tcp));
        assert_eq!(declared(Some("custom")), None);
        assert_eq!(declared(None), None);
    }

    #[test]
    fn sniffs_http1_h2_and_the_rest() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\nHost: x\r\n"), Sniff::Http);
        assert_eq!(sniff(b"POST /api?a=b HTTP/1.0\n"), Sniff::Http);
        assert_eq!(sniff(H2_PREFACE), Sniff::Http);
        // Undecided until the line ends or the preface is complete.
        assert_eq!(sniff(b"G"), Sniff::NeedMore);
        assert_eq!(sniff(b"GET /very/long"), Sniff::NeedMore);
        assert_eq!(sniff(b"PRI * HTTP/2"), Sniff::NeedMore);
        assert_eq!(sniff(b""), Sniff::NeedMore);
        // Not HTTP.
        assert_eq!(sniff(b"hello\n"), Sniff::Tcp);
        assert_eq!(sniff(b"GET key\r\n"), Sniff::Tcp, "Redis inline command");
        assert_eq!(sniff(b"*1\r\n$4\r\nPING\r\n"), Sniff::Tcp);
        assert_eq!(
            sniff(b"\x16\x03\x01\x02\x00"),
            Sniff::Tcp,
            "TLS ClientHello"
        );
        assert_eq!(sniff(b"GET / HTTP/2.0\r\n"), Sniff::Tcp);
        assert_eq!(sniff(b"get / HTTP/1.1\r\n"), Sniff::Tcp);
        let mut long = b"GET /".to_vec();
        long.resize(MAX_REQUEST_LINE + 1, b'a');
        assert_eq!(sniff(&long), Sniff::Tcp);
    }

    #[tokio::test(start_paused = true)]
    async fn detection_waits_for_a_line_and_times_out_on_silence() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HT").await.unwrap();
        let task = tokio::spawn(async move {
            let r = detect(&mut server, Duration::from_millis(100)).await;
            (r, server)
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        let (r, server) = task.await.unwrap();
        let (proto, prefix) = r.unwrap();
        assert_eq!(proto, Protocol::Http);
        assert_eq!(&prefix[..], b"GET / HTTP/1.1\r\n");

        // The replay: prefix first, then the rest of the stream.
        client.write_all(b"rest").await.unwrap();
        drop(client);
        let mut replay = Prefixed::new(prefix, server);
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.unwrap();
        assert_eq!(&all[..], b"GET / HTTP/1.1\r\nrest");

        // Server-first: nothing arrives, TCP after the timeout with no bytes consumed.
        let (_client, mut server) = tokio::io::duplex(64);
        let start = Instant::now();
        let (proto, prefix) = detect(&mut server, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!((proto, prefix.len()), (Protocol::Tcp, 0));
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_timeout_waits_for_the_client_without_limit() {
        let (mut client, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(async move { detect(&mut server, Duration::ZERO).await });
        // An hour of silence (paused time) does not decide anything.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(!task.is_finished());
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (proto, _) = task.await.unwrap().unwrap();
        assert_eq!(proto, Protocol::Http);
    }
}
