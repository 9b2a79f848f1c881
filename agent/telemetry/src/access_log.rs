//! One entry per request, in the order of Envoy's default format so that people who read Envoy logs
//! can read these: `[start] "METHOD PATH PROTO" STATUS FLAGS attempts=N duration=MSms "authority"
//! "upstream" cluster "request-id" service`. A connection proxied at L4 gets one line when it
//! closes, in Envoy's TCP style (`"- - -" 0`, no request) with the bytes received from and sent to
//! the client after the duration: `received=N sent=M`. When the proxy decided the outcome in a way
//! the flags do not say, Envoy's response code (or connection termination) details follow as
//! `details=direct_response` (`details=tcp_session_idle_timeout`) before the quoted fields; other
//! lines have no such token. `--access-log-format json` writes one JSON object per entry instead,
//! with the keys of Istio's JSON access log. Entries go to stdout through a writer thread (the
//! runtime never blocks on a pipe) and to live subscribers (`sluice logs`).
//!
//! The cost per entry is its formatting, straight into a shared buffer under a short lock: no
//! allocation, no channel, no wake-up. The writer thread writes a batch 50 ms after its first
//! entry, or as soon as 64 KiB are waiting, swapping the buffer for its spare and writing it with
//! one `write` (Envoy's access-log manager likewise buffers and flushes on an interval or at
//! 64 KiB). While no entries come it sleeps without a timer (an idle agent's writer does not
//! wake), and the entry that ends the quiet wakes it. When stdout cannot keep up and 8 MiB are
//! waiting, entries are dropped and counted rather than held; both counts are in the metrics.

use crate::live::{Listener, Live};
use crate::record::{Exchange, Record};
use parking_lot::{Condvar, Mutex};
use sluice_core::InfoSummary;
use sluice_policy::UNKNOWN;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// How entries are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Envoy's default text format (one line).
    #[default]
    Text,
    /// One JSON object per line, with Istio's JSON access-log keys.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown access-log format {other:?}: use text or json"
            )),
        }
    }
}

/// Where access-log entries go.
#[derive(Clone)]
pub struct AccessLog {
    stdout: Option<Arc<Writer>>,
    live: Live<Arc<str>>,
    dropped: Arc<AtomicU64>,
    format: LogFormat,
}

/// How long an entry may wait in the buffer before the writer writes it.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// Waiting bytes that wake the writer early.
const WAKE_AT: usize = 64 * 1024;
/// Waiting bytes past which entries are dropped (stdout is not keeping up).
const MAX_PENDING: usize = 8 << 20;

/// The entries waiting for the writer thread.
struct Sink {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// The writer has written everything handed to it (for [`AccessLog::flush`]).
    written: Condvar,
    /// Batches written (one `write` each).
    writes: AtomicU64,
}

struct Pending {
    buf: String,
    /// The writer sleeps until an entry comes (the next append wakes it).
    asleep: bool,
    /// The writer has a batch in hand that is not written yet.
    writing: bool,
    /// Every [`AccessLog`] is gone: write what is left and end.
    closed: bool,
}

/// The logs' handle on the writer thread: when the last clone goes, the thread writes what is
/// left and ends.
struct Writer(Arc<Sink>);

impl Drop for Writer {
    fn drop(&mut self) {
        self.0.pending.lock().closed = true;
        self.0.wake.notify_one();
    }
}

impl AccessLog {
    /// `to_stdout`: also print entries (the default, like Istio's demo profile).
    pub fn new(to_stdout: bool) -> Self {
        Self::with_format(to_stdout, LogFormat::Text)
    }

    pub fn with_format(to_stdout: bool, format: LogFormat) -> Self {
        let out = to_stdout.then(|| Box::new(std::io::stdout()) as Box<dyn std::io::Write + Send>);
        Self::writing_to(out, format)
    }

    /// Entries to `out` (in place of stdout) through the same writer thread.
    pub fn writing_to(out: Option<Box<dyn std::io::Write + Send>>, format: LogFormat) -> Self {
        let live = Live::new(1024);
        let stdout = out.map(|out| {
            let sink = Arc::new(Sink {
                pending: Mutex::new(Pending {
                    buf: String::with_capacity(WAKE_AT * 2),
                    asleep: false,
                    writing: false,
                    closed: false,
                }),
                wake: Condvar::new(),
                written: Condvar::new(),
                writes: AtomicU64::new(0),
            });
            let writer = sink.clone();
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&writer, out))
                .expect("spawn access-log writer");
            Arc::new(Writer(sink))
        });
        Self {
            stdout,
            live,
            dropped: Arc::new(AtomicU64::new(0)),
            format,
        }
    }

    /// A stream of entries as they are logged.
    pub fn subscribe(&self) -> Listener<Arc<str>> {
        self.live.subscribe()
    }

    /// Entries dropped because stdout could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Batches written to stdout, one `write` each.
    pub fn writes(&self) -> u64 {
        self.stdout
            .as_ref()
            .map_or(0, |w| w.0.writes.load(Ordering::Relaxed))
    }

    /// The entry of a finished request or L4 connection; `notes` is what its info says,
    /// read once by the caller for everything that records it.
    pub(crate) fn log(&self, record: &Record, notes: &InfoSummary) {
        let live = self.live.has_listeners();
        if self.stdout.is_none() && !live {
            return;
        }
        let now = SystemTime::now();
        if live {
            // Subscribers get the line on its own; stdout gets a copy.
            let mut line = String::with_capacity(256);
            self.format(&mut line, record, notes, now);
            if let Some(w) = &self.stdout {
                self.append(&w.0, |buf| buf.push_str(&line));
            }
            self.live.send(Arc::from(line));
        } else if let Some(w) = &self.stdout {
            self.append(&w.0, |buf| self.format(buf, record, notes, now));
        }
    }

    fn format(&self, out: &mut String, record: &Record, notes: &InfoSummary, now: SystemTime) {
        match self.format {
            LogFormat::Text => write_line_of(out, record, notes, now),
            LogFormat::Json => out.push_str(&json_of(record, notes, now)),
        }
    }

    /// Appends one line to the pending entries (`write` writes it, without its newline). Wakes
    /// the writer only for the first entry after a quiet spell and for a full batch: at most
    /// twice per batch, never per entry.
    fn append(&self, sink: &Sink, write: impl FnOnce(&mut String)) {
        let mut pending = sink.pending.lock();
        let before = pending.buf.len();
        if before >= MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        write(&mut pending.buf);
        pending.buf.push('\n');
        let full = before < WAKE_AT && pending.buf.len() >= WAKE_AT;
        if std::mem::take(&mut pending.asleep) || full {
            sink.wake.notify_one();
        }
    }

    /// Writes every entry logged so far to stdout before it returns (at most a second): called
    /// on shutdown, so the last entries are not lost with the process.
    pub fn flush(&self) {
        let Some(w) = &self.stdout else { return };
        let sink = &w.0;
        let mut pending = sink.pending.lock();
        // Bounded: 20 waits of at most 50 ms, whatever the writer does.
        for _ in 0..20 {
            if pending.buf.is_empty() && !pending.writing {
                return;
            }
            sink.wake.notify_one();
            sink.written
                .wait_for(&mut pending, Duration::from_millis(50));
        }
    }
}

/// The writer thread. It sleeps until an entry comes, gives the batch [`FLUSH_EVERY`] to fill
/// (less once [`WAKE_AT`] bytes wait, or when flushed), takes it (leaving its emptied spare in its
/// place, so neither buffer is reallocated) and writes it with one `write`. Ends when the log is
/// gone, after writing what was left.
fn write_lines(sink: &Sink, mut out: Box<dyn std::io::Write + Send>) {
    let mut spare = String::with_capacity(WAKE_AT * 2);
    loop {
        {
            let mut pending = sink.pending.lock();
            if pending.buf.is_empty() {
                sink.written.notify_all();
                if pending.closed {
                    return;
                }
                pending.asleep = true;
                sink.wake
                    .wait_while(&mut pending, |p| p.buf.is_empty() && !p.closed);
                pending.asleep = false;
            }
            // A batch's interval starts with its first entry, or now when entries came while the
            // last batch was written: a busy log is written once an interval, not in a loop of
            // small writes. A full batch, a flush or the end cut the wait short.
            if pending.buf.len() < WAKE_AT && !pending.closed {
                let _ = sink.wake.wait_for(&mut pending, FLUSH_EVERY);
            }
            std::mem::swap(&mut pending.buf, &mut spare);
            pending.writing = !spare.is_empty();
        }
        if !spare.is_empty() {
            let _ = out.write_all(spare.as_bytes());
            let _ = out.flush();
            sink.writes.fetch_add(1, Ordering::Relaxed);
            spare.clear();
            // A batch far larger than usual gives its memory back.
            if spare.capacity() > WAKE_AT * 16 {
                spare = String::with_capacity(WAKE_AT * 2);
            }
            sink.pending.lock().writing = false;
            sink.written.notify_all();
        }
    }
}

/// The Service column: its host name, `-` when the request went to no Service (none was chosen,
/// or the passthrough cluster: neither has a namespace).
fn service_of(record: &Record) -> &str {
    if record.service.namespace == UNKNOWN {
        "-"
    } else {
        &record.service.hostname
    }
}

/// The entry in Envoy's default text format.
pub fn format_line(record: &Record, now: SystemTime) -> String {
    let mut line = String::with_capacity(256);
    write_line(&mut line, record, now);
    line
}

/// An upstream address, `-` for none, formatted where it is written.
struct Upstream(Option<std::net::SocketAddr>);

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// The entry in Envoy's default text format, appended to `line` (no newline).
///
/// An HTTP request's line is written piece by piece rather than through `core::fmt`: it is
/// written once per request on the proxy's worker, and `write!` with its fourteen arguments cost
/// about as much as the rest of the line's work together.
pub fn write_line(line: &mut String, record: &Record, now: SystemTime) {
    write_line_of(line, record, &record.info.summary(), now);
}

/// [`write_line`] with the info's notes already read.
fn write_line_of(line: &mut String, record: &Record, notes: &InfoSummary, now: SystemTime) {
    let info = &record.info;
    match &record.exchange {
        Exchange::Http(req) => {
            line.push('[');
            push_time(line, now);
            line.push_str("] \"");
            line.push_str(req.method.as_str());
            line.push(' ');
            line.push_str(&req.path);
            line.push(' ');
            line.push_str(version(req.version));
            line.push_str("\" ");
            push_int(line, u64::from(record.status));
            line.push(' ');
            let flags = info.flags();
            if flags.is_empty() {
                line.push('-');
            } else {
                let _ = write!(line, "{flags}");
            }
            line.push_str(" attempts=");
            push_int(line, u64::from(info.attempts()));
            line.push_str(" duration=");
            push_int(line, record.duration.as_millis() as u64);
            line.push_str("ms");
            if let Some(d) = notes.details {
                line.push_str(" details=");
                line.push_str(d);
            }
            line.push_str(" \"");
            line.push_str(&req.authority);
            line.push_str("\" \"");
            match notes.upstream {
                Some(std::net::SocketAddr::V4(a)) => {
                    for (i, o) in a.ip().octets().iter().enumerate() {
                        if i > 0 {
                            line.push('.');
                        }
                        push_int(line, u64::from(*o));
                    }
                    line.push(':');
                    push_int(line, u64::from(a.port()));
                }
                Some(a) => {
                    let _ = write!(line, "{a}");
                }
                None => line.push('-'),
            }
            line.push_str("\" ");
            match notes.routed.cluster_name() {
                Some(c) => line.push_str(c),
                None => line.push('-'),
            }
            line.push_str(" \"");
            line.push_str(
                req.request_id
                    .as_ref()
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-"),
            );
            line.push_str("\" ");
            line.push_str(service_of(record));
        }
        Exchange::Tcp { received, sent } => {
            let upstream = Upstream(notes.upstream);
            let cluster = notes.routed.cluster_name().unwrap_or("-");
            let _ = write!(
                line,
                "[{}] \"- - -\" 0 {} attempts={} duration={}ms received={} sent={}{} \"-\" \"{}\" {} \"-\" {}",
                Rfc3339(now),
                info.flags(),
                info.attempts(),
                record.duration.as_millis(),
                received,
                sent,
                Details(notes.details),
                upstream,
                cluster,
                service_of(record),
            );
        }
    }
}

/// The entry as JSON, with the keys of Istio's JSON access log (`accessLogEncoding: JSON`).
pub fn format_json(record: &Record, now: SystemTime) -> String {
    json_of(record, &record.info.summary(), now)
}

/// [`format_json`] with the info's notes already read.
fn json_of(record: &Record, notes: &InfoSummary, now: SystemTime) -> String {
    let info = &record.info;
    let text = |v: Option<&http::HeaderValue>| v.and_then(|v| v.to_str().ok()).map(str::to_owned);
    let flags = info.flags().to_string();
    let mut v = serde_json::json!({
        "start_time": rfc3339(now),
        "response_code": record.status,
        "response_flags": flags,
        "response_code_details": notes.details,
        "duration": u64::try_from(record.duration.as_millis()).unwrap_or(u64::MAX),
        "upstream_host": notes.upstream.map(|a| a.to_string()),
        "upstream_cluster": notes.routed.cluster_name(),
        "upstream_request_attempt_count": info.attempts(),
        "downstream_remote_address": record.peer.map(|a| a.to_string()),
        "destination_service": (service_of(record) != "-").then(|| service_of(record)),
        "source_workload": record.source.workload,
        "source_namespace": record.source.namespace,
    });
    let obj = v.as_object_mut().expect("an object");
    match &record.exchange {
        Exchange::Http(req) => {
            obj.insert("method".into(), req.method.as_str().into());
            obj.insert("path".into(), req.path.clone().into());
            obj.insert("protocol".into(), format!("{:?}", req.version).into());
            obj.insert("authority".into(), req.authority.clone().into());
            obj.insert("request_id".into(), text(req.request_id.as_ref()).into());
            obj.insert("user_agent".into(), text(req.user_agent.as_ref()).into());
            obj.insert("bytes_received".into(), record.request_bytes().into());
            obj.insert("bytes_sent".into(), record.response_bytes.into());
        }
        Exchange::Tcp { received, sent } => {
            obj.insert("bytes_received".into(), (*received).into());
            obj.insert("bytes_sent".into(), (*sent).into());
        }
    }
    v.to_string()
}

/// ` details=...` when there are details, nothing otherwise.
struct Details(Option<&'static str>);

impl std::fmt::Display for Details {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(d) => write!(f, " details={d}"),
            None => Ok(()),
        }
    }
}

/// `http::Version` as its `Debug` spells it (`HTTP/1.1`, `HTTP/2.0`), which the line has always
/// used.
fn version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/?",
    }
}

fn push_int(line: &mut String, n: u64) {
    line.push_str(itoa::Buffer::new().format(n));
}

/// [`rfc3339`] appended to `line`; the date and time up to the second are made once per second
/// (per thread) and reused, only the milliseconds are written each time.
fn push_time(line: &mut String, t: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const {
            std::cell::RefCell::new((u64::MAX, String::new()))
        };
    }
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    SECOND.with_borrow_mut(|(secs, text)| {
        if *secs != d.as_secs() {
            *secs = d.as_secs();
            text.clear();
            let full = Rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(*secs)).to_string();
            // `...:SS.` without the milliseconds and the `Z`.
            text.push_str(&full[..full.len() - 4]);
        }
        line.push_str(text);
    });
    let ms = d.subsec_millis();
    line.push(char::from(b'0' + (ms / 100) as u8));
    line.push(char::from(b'0' + (ms / 10 % 10) as u8));
    line.push(char::from(b'0' + (ms % 10) as u8));
    line.push('Z');
}

/// `2026-11-23T13:40:00.123Z` without pulling in a calendar crate.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    Rfc3339(t).to_string()
}

/// [`rfc3339`], formatted where it is written.
struct Rfc3339(SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.0;
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let (days, rem) = (secs / 86_400, secs % 86_400);
        // Civil-from-days (Howard Hinnant's algorithm).
        let z = days as i64 + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        write!(
            f,
            "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::{unknown_identity, Protocol, ServiceName};
    use crate::record::HttpRequest;
    use sluice_core::{RequestInfo, ResponseFlags};
    use std::time::Duration;

    fn record(exchange: Exchange, status: u16, info: RequestInfo, ms: u64) -> Record {
        Record {
            start: SystemTime::UNIX_EPOCH,
            duration: Duration::from_millis(ms),
            exchange,
            peer: None,
            source: unknown_identity(),
            service: ServiceName::unknown(),
            info: Arc::new(info),
            status,
            grpc_status: None,
            response_bytes: 0,
        }
    }

    fn get(path: &str, authority: &str) -> Exchange {
        Exchange::Http(HttpRequest {
            method: http::Method::GET,
            path: path.into(),
            version: http::Version::HTTP_11,
            authority: authority.into(),
            request_id: None,
            protocol: Protocol::Http,
            user_agent: None,
            header_bytes: 0,
            trace: None,
        })
    }

    /// A `Write` the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    // The writer is a real thread on a real clock: waiting for it takes real time.
    #[allow(clippy::disallowed_methods)]
    #[test]
    fn entries_are_batched_and_all_written() {
        let out = Shared::default();
        let log = AccessLog::writing_to(Some(Box::new(out.clone())), LogFormat::Text);
        let r = record(get("/a", "web"), 200, RequestInfo::new(), 3);
        let start = std::time::Instant::now();
        for _ in 0..20_000 {
            log.log(&r, &r.info.summary());
        }
        log.flush();
        let elapsed = start.elapsed();
        let text = String::from_utf8(out.0.lock().clone()).unwrap();
        assert_eq!(text.lines().count(), 20_000);
        assert!(text
            .lines()
            .all(|l| l.contains("\"GET /a HTTP/1.1\" 200 - attempts=0")));
        assert_eq!(log.dropped(), 0);
        // Each batch is full (64 KiB) or waited its interval: never a loop of small writes
        // while entries keep coming. (The flush cuts at most a couple of waits short.)
        let bound =
            text.len() / WAKE_AT + (elapsed.as_millis() / FLUSH_EVERY.as_millis()) as usize + 4;
        assert!(
            log.writes() as usize <= bound,
            "{} writes of {} bytes in {elapsed:?}",
            log.writes(),
            text.len()
        );
        // Without a flush, an entry is written within the flush interval.
        log.log(&r, &r.info.summary());
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while out.0.lock().iter().filter(|b| **b == b'\n').count() < 20_001 {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(Duration::from_millis(5));
        }
        // Then, with nothing to write, the writer sleeps without a timer.
        let asleep = |log: &AccessLog| log.stdout.as_ref().unwrap().0.pending.lock().asleep;
        while !asleep(&log) {
            assert!(std::time::Instant::now() < deadline, "never asleep");
            std::thread::sleep(Duration::from_millis(5));
        }
        // The entry that ends the quiet wakes it.
        log.log(&r, &r.info.summary());
        log.flush();
        assert_eq!(out.0.lock().iter().filter(|b| **b == b'\n').count(), 20_002);
    }

    #[allow(clippy::disallowed_methods)]
    #[test]
    fn the_writer_ends_with_the_log_after_writing_what_was_left() {
        let out = Shared::default();
        let log = AccessLog::writing_to(Some(Box::new(out.clone())), LogFormat::Text);
        let sink = Arc::downgrade(&log.stdout.as_ref().unwrap().0);
        let r = record(get("/a", "web"), 200, RequestInfo::new(), 3);
        log.log(&r, &r.info.summary());
        drop(log);
        // The thread held the last reference to the sink: once it is gone, the thread ended.
        for _ in 0..400 {
            if sink.strong_count() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(sink.strong_count(), 0, "writer still running");
        assert_eq!(out.0.lock().iter().filter(|b| **b == b'\n').count(), 1);
    }

    #[test]
    fn line_pieces_agree_with_the_format_they_replace() {
        let info = RequestInfo::new();
        info.add_attempt();
        info.add_flags(ResponseFlags::UPSTREAM_OVERFLOW | ResponseFlags::DELAY_INJECTED);
        info.push_upstream("[fd00::7]:9090".parse().unwrap());
        info.set_details("direct_response");
        let mut exchange = get("/a?b=c", "pricing:8080");
        if let Exchange::Http(h) = &mut exchange {
            h.version = http::Version::HTTP_2;
            h.method = http::Method::DELETE;
            h.request_id = Some(http::HeaderValue::from_static("req-1"));
        }
        let r = record(exchange, 0, info, 1_234);
        // Across a second's boundary on one thread (the cached date is remade).
        for ms in [1_795_441_200_007u64, 1_795_441_200_999, 1_795_441_201_000] {
            let now = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
            let expected = format!(
                "[{}] \"DELETE /a?b=c HTTP/2.0\" 0 UO,DI attempts=1 duration=1234ms details=direct_response \"pricing:8080\" \"[fd00::7]:9090\" - \"req-1\" -",
                rfc3339(now)
            );
            assert_eq!(format_line(&r, now), expected);
        }
    }

    #[test]
    fn timestamps() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_441_200_123);
        assert_eq!(rfc3339(t), "2026-11-23T13:40:00.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn tcp_line_is_envoys_tcp_style() {
        let info = RequestInfo::new();
        info.add_attempt();
        info.add_flags(ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
        info.push_upstream("10.0.0.7:5432".parse().unwrap());
        info.set_cluster(Arc::from("outbound|5432||db.default.svc.cluster.local"));
        let mut r = record(
            Exchange::Tcp {
                received: 0,
                sent: 0,
            },
            0,
            info,
            3,
        );
        r.service = ServiceName::new("db.default.svc.cluster.local", "db", "default");
        assert_eq!(
            format_line(&r, SystemTime::UNIX_EPOCH),
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 UF attempts=1 duration=3ms received=0 sent=0 \"-\" \
             \"10.0.0.7:5432\" outbound|5432||db.default.svc.cluster.local \"-\" db.default.svc.cluster.local"
        );
    }

    #[test]
    fn direct_response_line_has_its_details() {
        let info = RequestInfo::new();
        info.set_details("direct_response");
        let r = record(get("/health", "web"), 200, info, 0);
        assert_eq!(
            format_line(&r, SystemTime::UNIX_EPOCH),
            "[1970-01-01T00:00:00.000Z] \"GET /health HTTP/1.1\" 200 - attempts=0 duration=0ms \
             details=direct_response \"web\" \"-\" - \"-\" -"
        );
    }

    #[test]
    fn line_has_every_field() {
        let info = RequestInfo::new();
        info.add_attempt();
        info.add_attempt();
        info.add_flags(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
        info.push_upstream("10.0.0.7:9090".parse().unwrap());
        info.set_cluster(Arc::from("outbound|80||pricing.default.svc.cluster.local"));
        let r = record(get("/", "pricing"), 503, info, 12);
        assert_eq!(
            format_line(&r, SystemTime::UNIX_EPOCH),
            "[1970-01-01T00:00:00.000Z] \"GET / HTTP/1.1\" 503 URX attempts=2 duration=12ms \"pricing\" \
             \"10.0.0.7:9090\" outbound|80||pricing.default.svc.cluster.local \"-\" -"
        );
    }

    #[test]
    fn json_entry_has_istios_keys() {
        let info = RequestInfo::new();
        info.add_attempt();
        info.push_upstream("10.0.0.7:9090".parse().unwrap());
        info.add_request_bytes(5);
        let mut r = record(get("/p?q=1", "pricing"), 200, info, 7);
        if let Exchange::Http(req) = &mut r.exchange {
            req.request_id = Some(http::HeaderValue::from_static("abc"));
            req.header_bytes = 40;
        }
        r.response_bytes = 120;
        let v: serde_json::Value =
            serde_json::from_str(&format_json(&r, SystemTime::UNIX_EPOCH)).unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/p?q=1");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["response_code"], 200);
        assert_eq!(v["response_flags"], "-");
        assert_eq!(v["duration"], 7);
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["upstream_host"], "10.0.0.7:9090");
        assert_eq!(
            (v["bytes_received"].as_u64(), v["bytes_sent"].as_u64()),
            (Some(45), Some(120))
        );
        assert!(v["destination_service"].is_null());
    }
}
