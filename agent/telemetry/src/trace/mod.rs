//! Traces: context propagation (W3C `traceparent`/`tracestate`, B3), sampling, and the spans of
//! each request exported over OTLP.
//!
//! The life of one request's trace:
//! 1. [`Tracer::start`] reads the client's headers (after `x-request-id` is settled, see
//!    [`new_request_id`]) and decides sampling ([`Sampler`]): a [`TraceContext`], which the handler
//!    keeps in the request's record ([`HttpRequest::trace`](crate::HttpRequest)) and puts in the
//!    request's extensions.
//! 2. The cluster calls [`TraceContext::inject`] on every attempt it sends, with the attempt's
//!    number: `traceparent` and B3 naming a span of that attempt's own, a child of the request's
//!    span (ids derive from the context and the number, so nothing is stored per attempt).
//! 3. When the request is recorded, a sampled one becomes a [`RequestSpan`] with one
//!    [`AttemptSpan`] per attempt record ([`RequestSpan::of`]), handed to [`Tracer::finish`], which
//!    queues it for the export thread and returns at once.
//!
//! Cost: a disabled [`Tracer`] (no propagation, no export) returns no context and allocates
//! nothing. Propagation costs the parse of the trace headers and the header values written per
//! attempt; an unsampled request allocates nothing more, and a sampled one builds its spans only
//! when they are exported.

mod config;
mod context;
mod export;
mod otlp;
mod span;

pub use self::config::{
    ConfigError, ExportConfig, OtlpProtocol, Root, Sampler, TraceArgs, TraceConfig,
    DEFAULT_SAMPLING_PERCENT,
};
pub use self::context::{new_request_id, TraceContext, X_REQUEST_ID};
pub use self::span::{AttemptSpan, AttrValue, Attributes, RequestSpan};

use self::context::{Incoming, Seen};
use self::export::Exporter;
use http::HeaderMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// Starts request traces and exports their spans. Cheap to clone; [`Tracer::disabled`] is a
/// no-op.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<Inner>>);

struct Inner {
    propagate: bool,
    sampler: Sampler,
    exporter: Option<Exporter>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            None => f.write_str("Tracer(disabled)"),
            Some(i) => f
                .debug_struct("Tracer")
                .field("propagate", &i.propagate)
                .field("sampler", &i.sampler)
                .field("exporting", &i.exporter.is_some())
                .finish(),
        }
    }
}

impl Tracer {
    /// Neither propagates nor exports.
    pub fn disabled() -> Self {
        Tracer(None)
    }

    /// A tracer as `cfg` says; with an export configured, starts the export thread.
    pub fn from_config(cfg: TraceConfig) -> std::io::Result<Self> {
        if !cfg.propagate && cfg.export.is_none() {
            return Ok(Self::disabled());
        }
        let exporter = cfg.export.map(Exporter::start).transpose()?;
        Ok(Tracer(Some(Arc::new(Inner {
            propagate: cfg.propagate,
            sampler: cfg.sampler,
            exporter,
        }))))
    }

    /// The trace context of a request with these headers, or `None` when this request has
    /// nothing to propagate or record.
    pub fn start(&self, headers: &HeaderMap) -> Option<TraceContext> {
        let inner = self.0.as_ref()?;
        let seen = Seen::of(headers);
        let inc = if inner.propagate {
            Incoming::read_seen(headers, &seen)
        } else {
            Incoming::default()
        };
        let client = inc.sampled;
        let mut ctx = TraceContext::new(inc);
        ctx.sampled = inner.sampler.sample_seen(client, &seen, ctx.trace_id);
        ctx.propagate = inner.propagate;
        // Without propagation, only a request whose spans are exported needs a context.
        let exported = ctx.sampled && inner.exporter.is_some();
        if !(inner.propagate || exported) {
            return None;
        }
        Some(ctx)
    }

    /// Whether sampled requests' spans are exported.
    pub fn exporting(&self) -> bool {
        self.0.as_ref().is_some_and(|i| i.exporter.is_some())
    }

    /// Queues a finished request's spans for export; never blocks (a full queue drops them, and
    /// [`Tracer::dropped`] counts them).
    pub fn finish(&self, span: RequestSpan) {
        if let Some(exporter) = self.0.as_ref().and_then(|i| i.exporter.as_ref()) {
            exporter.send(span);
        }
    }

    /// Spans dropped: the queue was full, or the collector did not take them.
    pub fn dropped(&self) -> u64 {
        self.stat(|s| s.dropped.load(Ordering::Relaxed))
    }

    /// Spans the collector accepted.
    pub fn exported(&self) -> u64 {
        self.stat(|s| s.exported.load(Ordering::Relaxed))
    }

    fn stat(&self, f: impl Fn(&export::Stats) -> u64) -> u64 {
        self.0
            .as_ref()
            .and_then(|i| i.exporter.as_ref())
            .map_or(0, |e| f(&e.stats))
    }

    /// Blocks until every span finished so far was exported or dropped (at shutdown, and in
    /// tests); `false` if that took longer than `timeout`. Call it off any runtime (it panics
    /// on one): from `spawn_blocking`, or after the runtime ended.
    pub fn flush(&self, timeout: Duration) -> bool {
        match self.0.as_ref().and_then(|i| i.exporter.as_ref()) {
            Some(e) => e.flush(timeout),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_tracing_starts_nothing() {
        let t = Tracer::from_config(TraceConfig {
            propagate: false,
            export: None,
            ..TraceConfig::default()
        })
        .unwrap();
        assert!(t.0.is_none());
        assert_eq!(t.start(&HeaderMap::new()), None);
        assert!(!t.exporting());
        assert_eq!(t.dropped(), 0);
    }

    #[test]
    fn propagation_without_export_still_decides_sampling() {
        let t = Tracer::from_config(TraceConfig {
            sampler: Sampler::AlwaysOn,
            ..TraceConfig::default()
        })
        .unwrap();
        let ctx = t.start(&HeaderMap::new()).unwrap();
        assert!(ctx.sampled());
        let mut h = HeaderMap::new();
        ctx.inject(1, &mut h);
        assert!(h["traceparent"].to_str().unwrap().ends_with("-01"));
    }

    #[test]
    fn without_propagation_the_clients_headers_are_neither_read_nor_written() {
        let cfg = |sampler| TraceConfig {
            propagate: false,
            sampler,
            // Nothing listens on the discard port; no span is finished in this test anyway.
            export: Some(ExportConfig::new(
                "http://127.0.0.1:9/v1/traces".parse().unwrap(),
                OtlpProtocol::HttpProtobuf,
            )),
        };
        let mut h = HeaderMap::new();
        h.insert("x-b3-sampled", "1".parse().unwrap());
        let t = Tracer::from_config(cfg(Sampler::ParentBased(Root::AlwaysOff))).unwrap();
        assert_eq!(t.start(&h), None, "the client's decision is not read");
        let t = Tracer::from_config(cfg(Sampler::AlwaysOn)).unwrap();
        let ctx = t.start(&h).expect("sampled and exported");
        let mut out = HeaderMap::new();
        ctx.inject(1, &mut out);
        assert!(out.is_empty(), "{out:?}");
    }
}
