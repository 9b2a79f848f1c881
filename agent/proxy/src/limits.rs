//! What one client connection may do, with Envoy's meaning (`HttpConnectionManager` and its
//! codecs), and the counters of each limit that fired, under Envoy's stat names.
//!
//! Defaults are Envoy's where Istio leaves the field unset for a sidecar, except the request
//! headers timeout: Istio leaves it unset (no limit), so a client that sends half a request line
//! would hold its connection forever; Sluice is shared by every pod on the node, as a gateway is
//! by its clients, and takes the value Istio's `EDGE` connection-settings profile gives gateways
//! (60 s). See the README's "Limits".

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The limits on every client connection of the outbound listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DownstreamLimits {
    /// Time from a request's first byte to the end of its headers (HTTP/1; Envoy's
    /// `request_headers_timeout`): past it the client gets `408` and the connection closes.
    /// `None`: no limit (Envoy's default, and Istio's for sidecars).
    #[serde(with = "secs")]
    pub request_headers_timeout: Option<Duration>,
    /// Time a connection may stay without a request under way (Envoy's
    /// `common_http_protocol_options.idle_timeout`, 1 h; Istio sets it only from the proxy's
    /// `ISTIO_META_IDLE_TIMEOUT`). HTTP/1 connections close, HTTP/2 ones get a GOAWAY.
    #[serde(with = "secs")]
    pub idle_timeout: Option<Duration>,
    /// Request headers, in KiB (Envoy's `max_request_headers_kb`, 60): over it, `431` on HTTP/1
    /// (the request line, header lines and the blank line are counted) and a stream reset on
    /// HTTP/2 (names and values, pseudo-headers included).
    pub max_request_headers_kb: u32,
    /// Request headers, by count (Envoy's `max_headers_count`, 100; HTTP/2 counts
    /// pseudo-headers): over it, as for the size.
    pub max_request_headers_count: u32,
    /// Streams at once on one HTTP/2 connection (Envoy's `max_concurrent_streams`, 2^31-1, which
    /// Istio keeps for sidecars).
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams the client reset before the proxy accepted them, at once, before the
    /// connection gets a GOAWAY (the `h2` crate's rapid-reset defence, 20).
    pub http2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the proxy had to reset for the client's protocol errors before the
    /// connection gets a GOAWAY (the `h2` crate's defence, 1024).
    pub http2_max_local_error_reset_streams: usize,
    /// Envoy's premature-reset rule (runtime `overload.premature_reset_total_stream_count`, 500):
    /// a connection whose client reset at least half of this many requests early, or half of
    /// its requests once it has had this many, is closed.
    pub premature_reset_total_stream_count: u64,
    /// What "early" means there (runtime `overload.premature_reset_min_stream_lifetime_seconds`,
    /// 1 s): reset before its response started, within this many whole seconds.
    #[serde(serialize_with = "secs::one")]
    pub premature_reset_min_stream_lifetime: Duration,
}

impl Default for DownstreamLimits {
    fn default() -> Self {
        Self {
            request_headers_timeout: Some(Duration::from_secs(60)),
            idle_timeout: Some(Duration::from_secs(3600)),
            max_request_headers_kb: 60,
            max_request_headers_count: 100,
            http2_max_concurrent_streams: 2_147_483_647,
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            premature_reset_total_stream_count: 500,
            premature_reset_min_stream_lifetime: Duration::from_secs(1),
        }
    }
}

/// A limit that cannot be applied.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidLimit {
    pub field: &'static str,
    pub reason: &'static str,
}

impl DownstreamLimits {
    /// Checks the limits as Envoy validates its fields.
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        let bad = |field, reason| Err(InvalidLimit { field, reason });
        if !(1..=8192).contains(&self.max_request_headers_kb) {
            return bad(
                "max_request_headers_kb",
                "must be 1 to 8192 (Envoy's range)",
            );
        }
        if self.max_request_headers_count == 0 {
            return bad("max_request_headers_count", "must be at least 1");
        }
        if self.http2_max_concurrent_streams == 0 {
            return bad("http2_max_concurrent_streams", "must be at least 1");
        }
        if self.premature_reset_total_stream_count == 0 {
            return bad("premature_reset_total_stream_count", "must be at least 1");
        }
        Ok(())
    }

    /// The header limit in bytes.
    pub(crate) fn max_header_bytes(&self) -> usize {
        self.max_request_headers_kb as usize * 1024
    }
}

impl crate::Handler {
    /// Holds every client connection to `limits` (defaults: [`DownstreamLimits::default`]).
    pub fn with_limits(mut self, limits: DownstreamLimits) -> Self {
        self.limits = std::sync::Arc::new(limits);
        self
    }

    /// The limits client connections are held to.
    pub fn limits(&self) -> &DownstreamLimits {
        &self.limits
    }

    /// How often the downstream limit `reason` fired (Envoy's details, like
    /// `request_header_timeout`, or the `h2` crate's GOAWAY reason, like `too_many_resets`).
    pub fn limit_fired(&self, reason: &str) -> u64 {
        self.downstream.count(reason)
    }
}

/// Durations as seconds, `null` for none (as `sluice config` shows the agent's other durations).
mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn one<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// Why the proxy ended a client's request or connection itself; each is counted, and the access
/// log shows the request-level ones as Envoy's `%RESPONSE_CODE_DETAILS%`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fired {
    /// `408`: the request's headers did not arrive in time.
    RequestHeaderTimeout,
    /// The connection was idle for the idle timeout.
    IdleTimeout,
    /// `431` on HTTP/1: the head was larger than allowed.
    Http1HeadersTooLarge,
    /// `431` on HTTP/1: more header lines than allowed.
    Http1TooManyHeaders,
    /// `400` on HTTP/1: not a valid request head.
    Http1CodecError,
    /// HTTP/2 stream reset: more headers than allowed.
    Http2TooManyHeaders,
    /// HTTP/2 stream reset: headers larger than allowed.
    Http2HeaderListSizeTooLarge,
    /// Envoy's premature-reset rule closed the connection.
    TooManyPrematureResets,
}

impl Fired {
    /// Envoy's name for it: the response code details, or the connection termination details.
    pub(crate) fn details(self) -> &'static str {
        match self {
            Self::RequestHeaderTimeout => "request_header_timeout",
            Self::IdleTimeout => "idle_timeout",
            Self::Http1HeadersTooLarge => "http1.headers_too_large",
            Self::Http1TooManyHeaders => "http1.too_many_headers",
            Self::Http1CodecError => "http1.codec_error",
            Self::Http2TooManyHeaders => "http2.too_many_headers",
            Self::Http2HeaderListSizeTooLarge => "http2.header_list_size_too_large",
            Self::TooManyPrematureResets => "too_many_premature_resets",
        }
    }
}

/// The counters of the downstream side (process-wide, shared by every connection).
#[derive(Default)]
pub(crate) struct DownstreamStats {
    rq_header_timeout: AtomicU64,
    cx_idle_timeout: AtomicU64,
    cx_protocol_error: AtomicU64,
    rq_too_many_premature_resets: AtomicU64,
    rq_rx_reset: AtomicU64,
    http2_header_overflow: AtomicU64,
    http2_header_list_size_too_large: AtomicU64,
    http2_tx_reset: AtomicU64,
    http2_goaway_sent: AtomicU64,
    /// Every limit that fired, by its reason (Envoy's details, or the debug data of the GOAWAY
    /// the `h2` crate sent): rare, so a lock is fine.
    by_reason: Mutex<BTreeMap<String, u64>>,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl DownstreamStats {
    /// `fired` happened: its Envoy counters and its reason.
    pub(crate) fn fired(&self, fired: Fired) {
        match fired {
            Fired::RequestHeaderTimeout => inc(&self.rq_header_timeout),
            Fired::IdleTimeout => inc(&self.cx_idle_timeout),
            Fired::Http1HeadersTooLarge | Fired::Http1TooManyHeaders | Fired::Http1CodecError => {
                inc(&self.cx_protocol_error)
            }
            Fired::Http2TooManyHeaders => {
                inc(&self.http2_header_overflow);
                inc(&self.http2_tx_reset);
            }
            Fired::Http2HeaderListSizeTooLarge => {
                inc(&self.http2_header_list_size_too_large);
                inc(&self.http2_tx_reset);
            }
            Fired::TooManyPrematureResets => inc(&self.rq_too_many_premature_resets),
        }
        self.reason(fired.details());
    }

    /// The proxy sent a GOAWAY with `code` and `debug` data. One with an error code is the `h2`
    /// crate closing the connection for the client's protocol errors or abuse; its reason is the
    /// debug data (`too_many_resets`, `too_many_continuations`, ...), else the code's name.
    pub(crate) fn goaway(&self, code: u32, debug: &[u8]) {
        inc(&self.http2_goaway_sent);
        if code == 0 {
            return;
        }
        inc(&self.cx_protocol_error);
        let reason = match std::str::from_utf8(debug) {
            Ok(d) if !d.is_empty() => d.to_owned(),
            _ => format!("{:?}", h2::Reason::from(code)),
        };
        if reason == "too_many_resets" {
            // The codec's own rapid-reset defence: Envoy's meaning of this counter.
            inc(&self.rq_too_many_premature_resets);
        }
        tracing::warn!(%reason, "closed an HTTP/2 client connection (GOAWAY) for its protocol errors or abuse");
        self.reason(&reason);
    }

    /// A request the client reset (or left) before its response ended.
    pub(crate) fn rx_reset(&self) {
        inc(&self.rq_rx_reset);
    }

    fn reason(&self, reason: &str) {
        *self.by_reason.lock().entry(reason.to_owned()).or_default() += 1;
    }

    /// How often `reason` fired (tests, `sluice status`).
    pub fn count(&self, reason: &str) -> u64 {
        self.by_reason.lock().get(reason).copied().unwrap_or(0)
    }

    /// The counters in Prometheus' text format: Envoy's connection-manager series (prefix
    /// `outbound`, as the oracle's Envoy names its listener), Envoy's HTTP/2 codec series, and
    /// `sluice_downstream_limit_total` by reason.
    pub(crate) fn encode(&self, out: &mut String) {
        const HTTP: &str = "envoy_http_conn_manager_prefix=\"outbound\"";
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        for (name, c) in [
            ("downstream_rq_header_timeout", &self.rq_header_timeout),
            ("downstream_cx_idle_timeout", &self.cx_idle_timeout),
            ("downstream_cx_protocol_error", &self.cx_protocol_error),
            (
                "downstream_rq_too_many_premature_resets",
                &self.rq_too_many_premature_resets,
            ),
            ("downstream_rq_rx_reset", &self.rq_rx_reset),
        ] {
            let _ = writeln!(out, "# TYPE envoy_http_{name} counter");
            let _ = writeln!(out, "envoy_http_{name}{{{HTTP}}} {}", load(c));
        }
        for (name, c) in [
            ("header_overflow", &self.http2_header_overflow),
            (
                "header_list_size_too_large",
                &self.http2_header_list_size_too_large,
            ),
            ("tx_reset", &self.http2_tx_reset),
            ("goaway_sent", &self.http2_goaway_sent),
        ] {
            let _ = writeln!(out, "# TYPE envoy_http2_{name} counter");
            let _ = writeln!(out, "envoy_http2_{name} {}", load(c));
        }
        let reasons = self.by_reason.lock();
        if !reasons.is_empty() {
            let _ = writeln!(out, "# TYPE sluice_downstream_limit_total counter");
            for (reason, n) in reasons.iter() {
                let _ = writeln!(
                    out,
                    "sluice_downstream_limit_total{{reason=\"{reason}\"}} {n}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_envoys_and_validate() {
        let d = DownstreamLimits::default();
        assert_eq!(d.max_header_bytes(), 61_440);
        assert!(d.validate().is_ok());
        let bad = DownstreamLimits {
            max_request_headers_kb: 8193,
            ..d.clone()
        };
        assert_eq!(
            bad.validate().unwrap_err().to_string(),
            "max_request_headers_kb: must be 1 to 8192 (Envoy's range)"
        );
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["request_headers_timeout"], 60.0);
        assert_eq!(v["idle_timeout"], 3600.0);
    }

    #[test]
    fn exposition_has_envoys_names() {
        let s = DownstreamStats::default();
        s.fired(Fired::RequestHeaderTimeout);
        s.fired(Fired::Http2TooManyHeaders);
        s.goaway(11, b"too_many_resets");
        s.goaway(0, b"");
        let mut out = String::new();
        s.encode(&mut out);
        assert!(out.contains(
            "envoy_http_downstream_rq_header_timeout{envoy_http_conn_manager_prefix=\"outbound\"} 1"
        ));
        assert!(out.contains("envoy_http2_header_overflow 1"));
        assert!(out.contains("envoy_http2_tx_reset 1"));
        assert!(out.contains("envoy_http2_goaway_sent 2"));
        assert!(out.contains(
            "envoy_http_downstream_rq_too_many_premature_resets{envoy_http_conn_manager_prefix=\"outbound\"} 1"
        ));
        assert!(out.contains("sluice_downstream_limit_total{reason=\"too_many_resets\"} 1"));
        assert_eq!(s.count("request_header_timeout"), 1);
    }
}
