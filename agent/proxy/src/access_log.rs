//! One line per request, in the order of Envoy's default format so that people who read Envoy logs can
//! read these: `[start] "METHOD PATH PROTO" STATUS FLAGS attempts=N duration=MSms "authority"
//! "upstream" cluster "request-id" service`. A connection proxied at L4 gets one line when it closes,
//! in Envoy's TCP style (`"- - -" 0`, no request) with the bytes received from and sent to the
//! client after the duration: `received=N sent=M`. When the proxy decided the outcome in a way the
//! flags do not say, Envoy's response code (or connection termination) details follow as
//! `details=direct_response` (`details=tcp_session_idle_timeout`) before the quoted fields; other
//! lines have no such token. Lines go to stdout through a writer thread (the runtime never blocks on
//! a pipe) and to live subscribers (`sluice logs`).

use crate::handler::RequestSummary;
use sluice_core::RequestInfo;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::broadcast;

/// Where access-log lines go.
#[derive(Clone)]
pub struct AccessLog {
    stdout: Option<mpsc::SyncSender<String>>,
    live: broadcast::Sender<Arc<str>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// `to_stdout`: also print lines (the default, like Istio's demo profile).
    pub fn new(to_stdout: bool) -> Self {
        let (live, _) = broadcast::channel(1024);
        let stdout = to_stdout.then(|| {
            let (tx, rx) = mpsc::sync_channel::<String>(8192);
            std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(rx))
                .expect("spawn access-log writer");
            tx
        });
        Self {
            stdout,
            live,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A stream of lines as they are logged.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.live.subscribe()
    }

    /// Lines dropped because stdout could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// One line for a request; `status` 0 when no response was sent (the client went away: `DC`).
    pub(crate) fn log(
        &self,
        req: &RequestSummary,
        status: u16,
        info: &RequestInfo,
        elapsed: Duration,
        service: Option<&sluice_policy::Service>,
    ) {
        if self.stdout.is_none() && self.live.receiver_count() == 0 {
            return;
        }
        let line = format_line(req, status, info, elapsed, service, SystemTime::now());
        self.emit(line);
    }

    /// One line for a connection proxied at L4.
    pub(crate) fn log_tcp(&self, conn: &TcpSummary, info: &RequestInfo, service: Option<&str>) {
        if self.stdout.is_none() && self.live.receiver_count() == 0 {
            return;
        }
        self.emit(format_tcp_line(conn, info, service, SystemTime::now()));
    }

    fn emit(&self, line: String) {
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(Arc::from(line.as_str()));
        }
        if let Some(tx) = &self.stdout {
            if tx.try_send(line).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the access log needs of one L4 connection.
pub(crate) struct TcpSummary {
    pub elapsed: Duration,
    /// Bytes from the client (Envoy's `%BYTES_RECEIVED%`).
    pub received: u64,
    /// Bytes to the client (`%BYTES_SENT%`).
    pub sent: u64,
}

pub(crate) fn format_tcp_line(
    conn: &TcpSummary,
    info: &RequestInfo,
    service: Option<&str>,
    now: SystemTime,
) -> String {
    let mut line = String::with_capacity(200);
    let _ = write!(
        line,
        "[{}] \"- - -\" 0 {} attempts={} duration={}ms received={} sent={}{} \"-\" \"{}\" {} \"-\" {}",
        rfc3339(now),
        info.flags(),
        info.attempts(),
        conn.elapsed.as_millis(),
        conn.received,
        conn.sent,
        Details(info.details()),
        info.upstream()
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        info.cluster().as_deref().unwrap_or("-"),
        service.unwrap_or("-"),
    );
    line
}

fn write_lines(rx: mpsc::Receiver<String>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Ok(line) = rx.recv() {
        let _ = writeln!(out, "{line}");
        // Drain what is queued, then flush once: one syscall per burst, not per line.
        while let Ok(line) = rx.try_recv() {
            let _ = writeln!(out, "{line}");
        }
        let _ = out.flush();
    }
}

pub(crate) fn format_line(
    req: &RequestSummary,
    status: u16,
    info: &RequestInfo,
    elapsed: Duration,
    service: Option<&sluice_policy::Service>,
    now: SystemTime,
) -> String {
    let mut line = String::with_capacity(256);
    let _ = write!(
        line,
        "[{}] \"{} {} {:?}\" {} {} attempts={} duration={}ms{} \"{}\" \"{}\" {} \"{}\" {}",
        rfc3339(now),
        req.method,
        req.path,
        req.version,
        status,
        info.flags(),
        info.attempts(),
        elapsed.as_millis(),
        Details(info.details()),
        req.authority,
        info.upstream()
            .map_or_else(|| "-".to_owned(), |a| a.to_string()),
        info.cluster().as_deref().unwrap_or("-"),
        req.request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-"),
        service.map_or("-", |s| s.hostname.as_str()),
    );
    line
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

/// `2026-11-23T13:40:00.123Z` without pulling in a calendar crate.
pub(crate) fn rfc3339(t: SystemTime) -> String {
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
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::ResponseFlags;

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
        info.set_cluster(std::sync::Arc::from(
            "outbound|5432||db.default.svc.cluster.local",
        ));
        let conn = TcpSummary {
            elapsed: Duration::from_millis(3),
            received: 0,
            sent: 0,
        };
        let line = format_tcp_line(
            &conn,
            &info,
            Some("db.default.svc.cluster.local"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            line,
            "[1970-01-01T00:00:00.000Z] \"- - -\" 0 UF attempts=1 duration=3ms received=0 sent=0 \"-\" \
             \"10.0.0.7:5432\" outbound|5432||db.default.svc.cluster.local \"-\" db.default.svc.cluster.local"
        );
    }

    #[test]
    fn direct_response_line_has_its_details() {
        let info = RequestInfo::new();
        info.set_details("direct_response");
        let req = RequestSummary {
            method: http::Method::GET,
            path: "/health".into(),
            version: http::Version::HTTP_11,
            authority: "web".into(),
            request_id: None,
        };
        let line = format_line(
            &req,
            200,
            &info,
            Duration::ZERO,
            None,
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            line,
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
        info.set_cluster(std::sync::Arc::from(
            "outbound|80||pricing.default.svc.cluster.local",
        ));
        let req = RequestSummary {
            method: http::Method::GET,
            path: "/".into(),
            version: http::Version::HTTP_11,
            authority: "pricing".into(),
            request_id: None,
        };
        let line = format_line(
            &req,
            503,
            &info,
            Duration::from_millis(12),
            None,
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(
            line,
            "[1970-01-01T00:00:00.000Z] \"GET / HTTP/1.1\" 503 URX attempts=2 duration=12ms \"pricing\" \
             \"10.0.0.7:9090\" outbound|80||pricing.default.svc.cluster.local \"-\" -"
        );
    }
}
