//! One client connection under the [`DownstreamLimits`]: what it is doing (receiving a request
//! head, requests under way, idle), the limits that end a request or the connection, and what is
//! recorded when one fires.
//!
//! * [`Guarded`] sits between the socket and hyper on every connection. On HTTP/1 it follows
//!   each request head from its first byte: past Envoy's `request_headers_timeout` it answers
//!   `408` (hyper's own timer also runs while a keep-alive connection is idle, and sends nothing,
//!   so it is off), over the size or count limit (Envoy's accounting: request line, header
//!   lines, blank line) `431`, and hyper never sees that head; for a head hyper finds is not
//!   HTTP it writes Envoy's `400` in place of hyper's bodiless one. On HTTP/2 it reads the GOAWAY
//!   frames the proxy writes: their debug data is the only place the `h2` crate says why it
//!   closed a connection.
//! * [`InFlight`] follows each request from the service call to the end of its response: idle
//!   time is counted from the last one, and Envoy's premature-reset rule (codec-agnostic, so
//!   HTTP/2 rapid reset in particular) is applied as they end.
//! * [`Conn::check_h2_headers`] applies the header limits to an HTTP/2 request with Envoy's
//!   accounting (pseudo-headers included); hyper resets the stream (`INTERNAL_ERROR`) when the
//!   service fails, as Envoy's codec does.
//!
//! Every limit that fires is counted ([`DownstreamStats`]); those that end a request get an
//! access-log entry with Envoy's flags and `%RESPONSE_CODE_DETAILS%` (no Istio metric sample:
//! Envoy's stats filter never sees these streams).

use crate::limits::{DownstreamLimits, DownstreamStats, Fired};
use crate::stamp::{wall_time_of, Stamp};
use crate::Handler;
use bytes::Bytes;
use http::{Method, Request, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use sluice_core::{Body, BoxError, RequestInfo, ResponseFlags};
use sluice_telemetry::{Exchange, HttpRequest, Protocol, Record, ServiceName};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What one client connection is doing, shared by its socket wrapper, its requests and the task
/// that drives it.
pub(crate) struct Conn {
    pub(crate) limits: Arc<DownstreamLimits>,
    stats: Arc<DownstreamStats>,
    handler: Arc<Handler>,
    peer: SocketAddr,
    /// Service calls so far (a request head has been received when this moves).
    requests: AtomicU64,
    /// Requests whose response has not ended.
    in_flight: AtomicU32,
    /// An HTTP/1 request head is arriving.
    head_active: AtomicBool,
    /// When the connection was accepted.
    accepted: Instant,
    /// When the last request ended (or the connection was accepted), after `accepted`.
    idle_since: Stamp,
    /// Wakes the connection's task when it must be closed (its idle timer needs no waking: it
    /// is never later than the idle deadline, and checks it when it fires).
    changed: Notify,
    /// Envoy's premature-reset accounting: requests that ended (not by the proxy's own doing),
    /// and those the client reset early.
    closed: AtomicU64,
    premature: AtomicU64,
    /// The premature-reset rule fired: the connection is to be closed at once.
    abort: AtomicBool,
    /// A request ended with its body not read to the end: hyper drains or drops the rest, so the
    /// next bytes may not start a head.
    body_left: AtomicBool,
}

impl Conn {
    pub(crate) fn new(handler: Arc<Handler>, peer: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            limits: handler.limits.clone(),
            stats: handler.downstream.clone(),
            handler,
            peer,
            requests: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            head_active: AtomicBool::new(false),
            accepted: Instant::now(),
            idle_since: Stamp::default(),
            changed: Notify::new(),
            closed: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            abort: AtomicBool::new(false),
            body_left: AtomicBool::new(false),
        })
    }

    pub(crate) fn stats(&self) -> &DownstreamStats {
        &self.stats
    }

    /// A request's head has been received and it goes to the service: the request (its body
    /// watched, to know where the next head starts) and its [`InFlight`].
    pub(crate) fn request_started<B>(
        self: &Arc<Self>,
        req: Request<B>,
    ) -> (Request<Watched<B>>, InFlight)
    where
        B: HttpBody,
    {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.body_left.store(false, Ordering::Release);
        // A request without a body (most) has nothing to watch: no flag is shared for it.
        let body_done = (!req.body().is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        let req = req.map(|inner| Watched {
            inner,
            done: body_done.clone(),
        });
        let request = InFlight {
            conn: self.clone(),
            started: Instant::now(),
            responded: false,
            ended: false,
            local: false,
            body_done,
        };
        (req, request)
    }

    /// The connection's idle timeout, if it has one.
    pub(crate) fn idle_timeout(&self) -> Option<Duration> {
        self.limits.idle_timeout
    }

    /// When the connection's idle timeout runs out, if it is idle now.
    pub(crate) fn idle_deadline(&self) -> Option<Instant> {
        let timeout = self.limits.idle_timeout?;
        let busy =
            self.in_flight.load(Ordering::Acquire) > 0 || self.head_active.load(Ordering::Acquire);
        (!busy).then(|| self.idle_since.get(self.accepted) + timeout)
    }

    /// Resolves when the connection must be aborted.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Envoy's premature-reset rule fired: close the connection now.
    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::Acquire)
    }

    fn request_ended(&self, r: &InFlight) {
        if !r.ended && !r.local {
            self.stats.rx_reset();
        }
        if r.body_done
            .as_ref()
            .is_some_and(|d| !d.load(Ordering::Acquire))
        {
            self.body_left.store(true, Ordering::Release);
        }
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.set(self.accepted, Instant::now());
        }
        if r.local {
            // The proxy reset it itself: Envoy leaves such streams out of the rule.
            return;
        }
        let closed = self.closed.fetch_add(1, Ordering::AcqRel) + 1;
        let min = self.limits.premature_reset_min_stream_lifetime.as_secs();
        // Envoy compares whole seconds (`lifetime > min` is not premature) and calls premature a
        // stream reset before it had a response code.
        let early = !r.responded && !r.ended && r.started.elapsed().as_secs() <= min;
        let premature = if early {
            self.premature.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.premature.load(Ordering::Acquire)
        };
        let limit = self.limits.premature_reset_total_stream_count;
        let trips = if closed < limit {
            premature >= limit / 2 && premature > 0
        } else {
            premature * 2 >= closed
        };
        if trips && !self.abort.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                peer = %self.peer,
                requests = closed,
                premature,
                "closing a client connection that reset too many requests early (HTTP/2 rapid reset?)"
            );
            self.stats.fired(Fired::TooManyPrematureResets);
            self.changed.notify_one();
        }
    }

    /// The HTTP/2 request's headers over the limits, counted as Envoy's codec counts them: every
    /// header and pseudo-header, names and values, in the order they came; the first limit
    /// crossed is the reason.
    pub(crate) fn check_h2_headers<B>(&self, req: &Request<B>) -> Option<Fired> {
        let max_count = self.limits.max_request_headers_count as usize;
        let max_bytes = self.limits.max_header_bytes();
        let uri = req.uri();
        let pseudo = [
            Some((":method".len(), req.method().as_str().len())),
            uri.scheme_str().map(|s| (":scheme".len(), s.len())),
            uri.authority()
                .map(|a| (":authority".len(), a.as_str().len())),
            uri.path_and_query()
                .filter(|_| req.method() != Method::CONNECT)
                .map(|p| (":path".len(), p.as_str().len())),
        ];
        let regular = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().len(), v.len()));
        let (mut count, mut bytes) = (0usize, 0usize);
        for (name, value) in pseudo.into_iter().flatten().chain(regular) {
            count += 1;
            bytes += name + value;
            if bytes > max_bytes {
                return Some(Fired::Http2HeaderListSizeTooLarge);
            }
            if count > max_count {
                return Some(Fired::Http2TooManyHeaders);
            }
        }
        None
    }

    /// Records a limit that ended a request before it reached the router: counted, and logged
    /// as Envoy logs it (`"- - HTTP/x"`, the status sent, its flags, the details).
    pub(crate) fn reject(&self, r: Rejected) {
        let Rejected {
            fired,
            version,
            status,
            flags,
            started,
            head_bytes,
            response_bytes,
        } = r;
        self.stats.fired(fired);
        let info = Arc::new(RequestInfo::new());
        info.add_flags(flags);
        info.set_details(fired.details());
        let state = self.handler.state();
        let record = Record {
            start: started.0,
            duration: started.1.elapsed(),
            exchange: Exchange::Http(HttpRequest {
                method: Method::from_bytes(b"-").expect("a token"),
                path: "-".into(),
                version,
                authority: "-".into(),
                request_id: None,
                protocol: Protocol::Http,
                user_agent: None,
                header_bytes: head_bytes,
                trace: None,
            }),
            peer: Some(self.peer),
            source: state.source_identity(self.peer.ip()),
            service: ServiceName::unknown(),
            info,
            status,
            grpc_status: None,
            response_bytes,
        };
        // The access-log entry alone: no counters to close, no Istio sample.
        self.handler.telemetry.tcp_close(&[], flags, Some(record));
    }
}

/// A request the proxy ended before it reached the router.
pub(crate) struct Rejected {
    pub(crate) fired: Fired,
    pub(crate) version: Version,
    /// The status sent; 0 for none (a stream reset).
    pub(crate) status: u16,
    pub(crate) flags: ResponseFlags,
    /// When its first byte came (wall clock for the log, monotonic for the duration).
    pub(crate) started: (SystemTime, Instant),
    pub(crate) head_bytes: u64,
    pub(crate) response_bytes: u64,
}

/// One request from its service call to the end of its response.
pub(crate) struct InFlight {
    conn: Arc<Conn>,
    started: Instant,
    /// The service produced a response (its headers go out now).
    responded: bool,
    /// The response ended (or failed upstream): not reset by the client.
    ended: bool,
    /// The proxy reset the stream itself.
    local: bool,
    /// Whether the request body has been read to its end (`None`: it had none).
    body_done: Option<Arc<AtomicBool>>,
}

impl InFlight {
    /// When the service got the request (hyper had parsed its head): the record's clock starts
    /// here too, not at a clock read of its own.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// The proxy reset the stream itself (a header limit).
    pub(crate) fn local_reset(mut self) {
        self.local = true;
    }

    /// `rsp` goes to the client; the request ends with its body.
    pub(crate) fn respond(mut self, rsp: http::Response<Body>) -> http::Response<Body> {
        self.responded = true;
        let (parts, body) = rsp.into_parts();
        if body.is_end_stream() {
            self.ended = true;
        }
        let body = Tracked {
            inner: body,
            request: self,
        };
        http::Response::from_parts(parts, sluice_core::boxed(body))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.conn.request_ended(self);
    }
}

pin_project! {
    /// A request body that says when it has been read to its end.
    pub(crate) struct Watched<B> {
        #[pin]
        inner: B,
        done: Option<Arc<AtomicBool>>,
    }
}

impl<B: HttpBody> HttpBody for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if frame.is_none() || this.inner.is_end_stream() {
            if let Some(done) = this.done {
                done.store(true, Ordering::Release);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends its request when it ends (or is dropped: the client reset the
/// stream or left).
struct Tracked {
    inner: Body,
    request: InFlight,
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        // An upstream failure mid-body is not the client's reset.
        if !matches!(frame, Some(Ok(_))) {
            self.request.ended = true;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.request.ended = true;
        }
    }
}

/// Which protocol the connection speaks, from its first bytes (hyper decides the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Fewer bytes than the h2 preface so far, all of them a prefix of it.
    Sniffing,
    Http1,
    Http2,
}

/// An HTTP/1 request head on its way: when it began, and what has come of it.
struct Head {
    /// When its first byte came, read only for a head that did not come whole in that first read
    /// (most do): only such a head can run out of time; one refused at once started now.
    started: Option<Instant>,
    /// `Conn::requests` when it began: the head is complete once that moves.
    at_request: u64,
    /// Bytes of the head so far (up to its blank line), and its non-empty lines.
    bytes: u64,
    lines: u32,
    /// The line under way has a byte other than CR.
    line_has_text: bool,
    complete: bool,
}

impl Head {
    fn new(at_request: u64) -> Self {
        Self {
            started: None,
            at_request,
            bytes: 0,
            lines: 0,
            line_has_text: false,
            complete: false,
        }
    }

    /// Follows the head through `data` as HTTP/1 frames it: lines end in LF (CR before it is
    /// part of the line ending), empty lines before the request line are skipped (as hyper and
    /// Envoy skip them), an empty line after it ends the head.
    fn scan(&mut self, mut data: &[u8]) {
        // A line at a time: the line end found with `memchr`, not a branch per byte (a head of a
        // few hundred bytes cost about 17 instructions per byte that way).
        while !self.complete && !data.is_empty() {
            let (line, ended) = match memchr::memchr(b'\n', data) {
                Some(at) => (&data[..at], true),
                None => (data, false),
            };
            self.bytes += line.len() as u64;
            self.line_has_text |= line.iter().any(|&b| b != b'\r');
            data = &data[line.len()..];
            if !ended {
                break;
            }
            data = &data[1..];
            self.bytes += 1;
            match (self.line_has_text, self.lines) {
                (false, 0) => self.bytes = 0,
                (false, _) => self.complete = true,
                (true, _) => {
                    self.lines += 1;
                    self.line_has_text = false;
                }
            }
        }
    }

    /// The limit this head is over, if any: its size (request line, headers and the blank line,
    /// as Envoy counts `max_request_headers_kb`) or its header count.
    fn over(&self, limits: &DownstreamLimits) -> Option<Fired> {
        if self.bytes > limits.max_header_bytes() as u64 {
            Some(Fired::Http1HeadersTooLarge)
        } else if self.lines.saturating_sub(1) > limits.max_request_headers_count {
            Some(Fired::Http1TooManyHeaders)
        } else {
            None
        }
    }
}

/// Bytes the proxy writes in hyper's stead.
struct Owed {
    bytes: Bytes,
    written: usize,
}

/// Follows the frames the proxy writes on an HTTP/2 connection, to see its GOAWAYs: the `h2`
/// crate's defences say why they closed a connection only in the frame's debug data.
#[derive(Default)]
struct FrameScan {
    header: [u8; 9],
    have: usize,
    remaining: usize,
    /// The payload of the GOAWAY being written (its first bytes: code and debug data).
    goaway: Option<Vec<u8>>,
}

impl FrameScan {
    /// Follows `data`; calls `sent` with each complete GOAWAY's error code and debug data.
    fn feed(&mut self, mut data: &[u8], sent: &mut impl FnMut(u32, &[u8])) {
        while !data.is_empty() {
            if self.remaining == 0 && self.goaway.is_none() {
                let k = (9 - self.have).min(data.len());
                self.header[self.have..self.have + k].copy_from_slice(&data[..k]);
                self.have += k;
                data = &data[k..];
                if self.have < 9 {
                    return;
                }
                self.have = 0;
                let h = &self.header;
                self.remaining =
                    (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                if h[3] == 7 {
                    self.goaway = Some(Vec::with_capacity(self.remaining.min(264)));
                }
            }
            let k = self.remaining.min(data.len());
            if let Some(payload) = self.goaway.as_mut() {
                let room = 264usize.saturating_sub(payload.len()).min(k);
                payload.extend_from_slice(&data[..room]);
            }
            self.remaining -= k;
            data = &data[k..];
            if self.remaining == 0 {
                if let Some(payload) = self.goaway.take() {
                    if payload.len() >= 8 {
                        let code =
                            u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                        sent(code, &payload[8..]);
                    }
                }
            }
        }
    }
}

pin_project! {
    /// A client connection's socket as hyper sees it (see the module's header).
    pub(crate) struct Guarded<IO> {
        #[pin]
        io: IO,
        conn: Arc<Conn>,
        mode: Mode,
        seen: usize,
        head: Option<Head>,
        timer: Option<Pin<Box<Sleep>>>,
        owed: Option<Owed>,
        refused: bool,
        frames: FrameScan,
    }
}

impl<IO> Guarded<IO> {
    pub(crate) fn new(io: IO, conn: Arc<Conn>) -> Self {
        Self {
            io,
            conn,
            mode: Mode::Sniffing,
            seen: 0,
            head: None,
            timer: None,
            owed: None,
            refused: false,
            frames: FrameScan::default(),
        }
    }
}

/// The start of hyper's own reply to a request head that is not HTTP (`Server::on_error`). The
/// proxy refuses heads over its limits itself, before hyper sees them.
const HYPER_BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\n";

/// Envoy's local reply on HTTP/1, closing the connection.
fn local_reply(status_line: &str, body: &str) -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 {status_line}\r\ncontent-length: {}\r\ncontent-type: text/plain\r\ndate: {}\r\nconnection: close\r\n\r\n{body}",
        body.len(),
        httpdate::fmt_http_date(SystemTime::now()),
    ))
}

/// Envoy's reply to a head `fired` refused: status, status line, body, response flags.
fn refusal_of(fired: Fired) -> (u16, &'static str, &'static str, ResponseFlags) {
    match fired {
        Fired::RequestHeaderTimeout => (
            408,
            "408 Request Timeout",
            "request header timeout",
            ResponseFlags::empty(),
        ),
        Fired::Http1CodecError => (
            400,
            "400 Bad Request",
            "Bad Request",
            ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
        ),
        _ => (
            431,
            "431 Request Header Fields Too Large",
            "Request Header Fields Too Large",
            ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
        ),
    }
}

impl<IO: AsyncWrite> Guarded<IO> {
    /// Writes what the proxy owes the client, as far as the socket takes it now.
    fn poll_owed(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        while let Some(owed) = this.owed.as_mut() {
            let n = ready!(this.io.as_mut().poll_write(cx, &owed.bytes[owed.written..]))?;
            owed.written += n;
            if n == 0 || owed.written == owed.bytes.len() {
                *this.owed = None;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Ends the head under way with Envoy's reply for `fired`: recorded, owed to the client.
    fn refuse(self: Pin<&mut Self>, fired: Fired) {
        let this = self.project();
        let Some(head) = this.head.take() else {
            return;
        };
        this.conn.head_active.store(false, Ordering::Release);
        let (status, status_line, body, flags) = refusal_of(fired);
        let reply = local_reply(status_line, body);
        this.conn.reject(Rejected {
            fired,
            version: Version::HTTP_11,
            status,
            flags,
            started: match head.started {
                Some(at) => (wall_time_of(at), at),
                None => (SystemTime::now(), Instant::now()),
            },
            head_bytes: head.bytes,
            response_bytes: reply.len() as u64,
        });
        *this.owed = Some(Owed {
            bytes: reply,
            written: 0,
        });
    }

    /// Whether `first` (the start of what hyper writes) is hyper's refusal of the head under
    /// way (hyper writes nothing else before the service has the request); if so, Envoy's
    /// reply is owed instead.
    fn hyper_refused(mut self: Pin<&mut Self>, first: &[u8]) -> bool {
        let this = self.as_mut().project();
        let in_head = *this.mode == Mode::Http1
            && this.head.as_ref().is_some_and(|h| {
                this.conn.requests.load(Ordering::Acquire) == h.at_request
                    && this.conn.in_flight.load(Ordering::Acquire) == 0
            });
        if !in_head || !first.starts_with(HYPER_BAD_REQUEST) {
            return false;
        }
        self.refuse(Fired::Http1CodecError);
        true
    }

    /// Counts the GOAWAYs among the first `n` bytes of `bufs`, just written.
    fn written(self: Pin<&mut Self>, bufs: &[&[u8]], mut n: usize) {
        let this = self.project();
        if *this.mode != Mode::Http2 {
            return;
        }
        let stats = this.conn.stats();
        let mut sent = |code: u32, debug: &[u8]| stats.goaway(code, debug);
        for buf in bufs {
            let k = n.min(buf.len());
            this.frames.feed(&buf[..k], &mut sent);
            n -= k;
            if n == 0 {
                break;
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite> AsyncRead for Guarded<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.refused {
            return Poll::Ready(Err(io::ErrorKind::ConnectionAborted.into()));
        }
        let before = buf.filled().len();
        let polled = {
            let this = self.as_mut().project();
            // The head under way was completed: hyper called the service.
            if let Some(head) = this.head.as_ref() {
                if this.conn.requests.load(Ordering::Acquire) != head.at_request {
                    *this.head = None;
                    this.conn.head_active.store(false, Ordering::Release);
                }
            }
            this.io.poll_read(cx, buf)
        };
        if let Poll::Ready(Ok(())) = &polled {
            let data = &buf.filled()[before..];
            if !data.is_empty() {
                self.as_mut().arrived(data);
            }
        }
        let over = {
            let this = self.as_mut().project();
            this.head.as_ref().and_then(|h| h.over(&this.conn.limits))
        };
        let fired = over.or_else(|| {
            self.as_mut()
                .head_timed_out(cx)
                .then_some(Fired::RequestHeaderTimeout)
        });
        if let Some(fired) = fired {
            // Envoy's reply, written now (one try: a client that does not read gets what fits),
            // and the connection ends; hyper never sees the head.
            self.as_mut().refuse(fired);
            *self.as_mut().project().refused = true;
            let _ = self.as_mut().poll_owed(cx);
            let _ = self.as_mut().project().io.poll_flush(cx);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                fired.details(),
            )));
        }
        polled
    }
}

impl<IO> Guarded<IO> {
    /// `data` came from the client: the protocol, and the HTTP/1 head it starts or continues.
    fn arrived(self: Pin<&mut Self>, data: &[u8]) {
        let this = self.project();
        if *this.mode == Mode::Sniffing {
            let upto = (*this.seen + data.len()).min(H2_PREFACE.len());
            let want = &H2_PREFACE[*this.seen..upto];
            *this.mode = if !data.starts_with(want) {
                Mode::Http1
            } else if upto == H2_PREFACE.len() {
                Mode::Http2
            } else {
                Mode::Sniffing
            };
            *this.seen = upto;
        }
        let conn = &*this.conn;
        if *this.mode == Mode::Http2 {
            if this.head.take().is_some() {
                conn.head_active.store(false, Ordering::Release);
            }
            return;
        }
        // After a request whose body was left unread, these bytes may be the rest of it: that
        // head is left to hyper (untimed; the idle timeout and hyper's buffer limit still hold).
        let fresh = !conn.body_left.load(Ordering::Acquire);
        if this.head.is_none() && fresh && conn.in_flight.load(Ordering::Acquire) == 0 {
            // A request's first byte (Envoy starts its timer here, not while idle).
            *this.head = Some(Head::new(conn.requests.load(Ordering::Acquire)));
            conn.head_active.store(true, Ordering::Release);
        }
        if let Some(head) = this.head.as_mut() {
            head.scan(data);
            if !head.complete && head.started.is_none() {
                // The first read of this head (a later one finds `started` set).
                head.started = Some(Instant::now());
            }
        }
    }

    /// Whether the head under way has run out of time (arming the timer otherwise).
    fn head_timed_out(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let this = self.project();
        let (Some(head), Some(limit)) =
            (this.head.as_ref(), this.conn.limits.request_headers_timeout)
        else {
            return false;
        };
        // Envoy disarms the timer at the head's last byte. A head that arrives in one read (most
        // do) never arms it.
        if head.complete {
            return false;
        }
        let Some(started) = head.started else {
            return false;
        };
        let deadline = started + limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

impl<IO: AsyncWrite> AsyncWrite for Guarded<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.as_mut().poll_owed(cx))?;
        if self.as_mut().hyper_refused(buf) {
            // hyper's reply is replaced by Envoy's, owed until written.
            let _ = self.as_mut().poll_owed(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(self.as_mut().project().io.poll_write(cx, buf))?;
        self.written(&[buf], n);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.as_mut().poll_owed(cx))?;
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if self.as_mut().hyper_refused(first) {
            let _ = self.as_mut().poll_owed(cx)?;
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        let n = ready!(self.as_mut().project().io.poll_write_vectored(cx, bufs))?;
        if self.mode == Mode::Http2 {
            let slices: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
            self.written(&slices, n);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_owed(cx))?;
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.as_mut().poll_owed(cx))?;
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `Head::scan` computes, a byte at a time: (bytes, lines, complete).
    fn scan_bytewise(data: &[u8]) -> (u64, u32, bool) {
        let (mut bytes, mut lines, mut line_len) = (0u64, 0u32, 0usize);
        for &b in data {
            bytes += 1;
            match b {
                b'\n' if line_len == 0 && lines == 0 => bytes = 0,
                b'\n' if line_len == 0 => return (bytes, lines, true),
                b'\n' => {
                    lines += 1;
                    line_len = 0;
                }
                b'\r' => {}
                _ => line_len += 1,
            }
        }
        (bytes, lines, false)
    }

    #[test]
    fn head_scan_agrees_with_a_bytewise_scan_however_the_head_is_split() {
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet = b"\r\n\r\nab: ";
        for _ in 0..2_000 {
            let len = rng.usize(0..60);
            let data: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let mut h = Head::new(0);
            let mut rest = &data[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len());
                h.scan(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(
                (h.bytes, h.lines, h.complete),
                scan_bytewise(&data),
                "{:?}",
                String::from_utf8_lossy(&data)
            );
        }
    }

    #[test]
    fn head_scan_counts_lines_and_stops_at_the_blank_line() {
        let mut h = Head::new(0);
        h.scan(b"\r\nGET / HTTP/1.1\r\nHost: a\r\nx-a: 1\r\n");
        assert!(!h.complete);
        h.scan(b"\r\nbody");
        assert!(h.complete);
        assert_eq!(h.lines, 3);
        // The leading empty line is not part of the head.
        assert_eq!(
            h.bytes as usize,
            "GET / HTTP/1.1\r\nHost: a\r\nx-a: 1\r\n\r\n".len()
        );
        let limits = DownstreamLimits {
            max_request_headers_count: 1,
            ..Default::default()
        };
        assert_eq!(h.over(&limits), Some(Fired::Http1TooManyHeaders));
        let limits = DownstreamLimits {
            max_request_headers_kb: 1,
            ..Default::default()
        };
        assert_eq!(h.over(&limits), None);
        h.bytes = 1025;
        assert_eq!(h.over(&limits), Some(Fired::Http1HeadersTooLarge));
    }

    #[test]
    fn goaways_are_found_across_writes() {
        let mut frames = Vec::new();
        // SETTINGS, then GOAWAY(last 1, ENHANCE_YOUR_CALM, "too_many_resets"), split anywhere.
        frames.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
        let mut payload = vec![0, 0, 0, 1, 0, 0, 0, 11];
        payload.extend_from_slice(b"too_many_resets");
        frames.extend([0, 0, payload.len() as u8, 7, 0, 0, 0, 0, 0]);
        frames.extend(&payload);
        for split in [1, 5, 9, 12, 20, frames.len() - 1] {
            let mut scan = FrameScan::default();
            let mut seen = Vec::new();
            let mut sent = |code: u32, debug: &[u8]| seen.push((code, debug.to_vec()));
            scan.feed(&frames[..split], &mut sent);
            scan.feed(&frames[split..], &mut sent);
            assert_eq!(
                seen,
                [(11, b"too_many_resets".to_vec())],
                "split at {split}"
            );
        }
    }

    #[test]
    fn replies_are_envoys() {
        // hyper's `Server::on_error` writes the canonical reason phrase.
        assert_eq!(
            http::StatusCode::BAD_REQUEST.canonical_reason(),
            Some("Bad Request")
        );
        let r = local_reply(
            "431 Request Header Fields Too Large",
            "Request Header Fields Too Large",
        );
        let text = std::str::from_utf8(&r).unwrap();
        assert!(text
            .starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 31\r\n"));
        assert!(text.ends_with("connection: close\r\n\r\nRequest Header Fields Too Large"));
    }
}
