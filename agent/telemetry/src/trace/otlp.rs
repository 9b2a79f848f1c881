//! The OTLP/protobuf encoding of an `ExportTraceServiceRequest`, written by hand: the messages
//! Sluice sends are a small, stable part of OTLP v1 (field numbers are frozen by its stability
//! guarantee), so the agent needs neither prost nor generated types. The tests decode it with
//! `opentelemetry-proto`'s prost types, an independent implementation.

use super::span::{AttrValue, RequestSpan};
use std::time::{SystemTime, UNIX_EPOCH};

/// What every export carries about the sender.
#[derive(Clone, Debug)]
pub(crate) struct Resource {
    pub(crate) attributes: Vec<(String, String)>,
}

// Span.SpanKind
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
// Status.StatusCode
const STATUS_ERROR: u64 = 2;
// SpanFlags: the low byte is the W3C trace flags; bit 8 says bit 9 (the parent is remote) is set.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// `ExportTraceServiceRequest` with one `ResourceSpans`, one `ScopeSpans` holding every span of
/// `spans` (a request span and its attempt spans each).
pub(crate) fn encode(resource: &Resource, spans: &[RequestSpan]) -> Vec<u8> {
    let mut scope_spans = Vec::with_capacity(256 * spans.len());
    let mut scope = Vec::new();
    string(&mut scope, 1, "sluice");
    string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    message(&mut scope_spans, 1, &scope);
    let mut buf = Vec::with_capacity(512);
    for req in spans {
        buf.clear();
        request_span(&mut buf, req);
        message(&mut scope_spans, 2, &buf);
        for a in &req.attempts {
            buf.clear();
            let flags = FLAG_HAS_IS_REMOTE | FLAG_SAMPLED;
            span(
                &mut buf,
                req,
                a.span_id,
                Some(req.span_id),
                flags,
                &a.name,
                KIND_CLIENT,
                a.start,
                a.start + a.duration,
                &a.attributes,
                a.error,
            );
            message(&mut scope_spans, 2, &buf);
        }
    }
    let mut res = Vec::new();
    for (k, v) in &resource.attributes {
        key_value(&mut res, 1, k, &AttrValue::Str(v.clone()));
    }
    let mut resource_spans = Vec::with_capacity(scope_spans.len() + res.len() + 16);
    message(&mut resource_spans, 1, &res);
    message(&mut resource_spans, 2, &scope_spans);
    let mut out = Vec::with_capacity(resource_spans.len() + 8);
    message(&mut out, 1, &resource_spans);
    out
}

fn request_span(buf: &mut Vec<u8>, req: &RequestSpan) {
    let mut flags = FLAG_HAS_IS_REMOTE | FLAG_SAMPLED;
    if req.parent.is_some() {
        flags |= FLAG_IS_REMOTE;
    }
    span(
        buf,
        req,
        req.span_id,
        req.parent,
        flags,
        &req.name,
        KIND_SERVER,
        req.start,
        req.start + req.duration,
        &req.attributes,
        req.error,
    );
}

#[allow(clippy::too_many_arguments)]
fn span(
    buf: &mut Vec<u8>,
    req: &RequestSpan,
    span_id: u64,
    parent: Option<u64>,
    flags: u32,
    name: &str,
    kind: u64,
    start: SystemTime,
    end: SystemTime,
    attributes: &[(&'static str, AttrValue)],
    error: bool,
) {
    bytes(buf, 1, &req.trace_id.to_be_bytes());
    bytes(buf, 2, &span_id.to_be_bytes());
    if let Some(ts) = &req.tracestate {
        string(buf, 3, ts);
    }
    if let Some(p) = parent {
        bytes(buf, 4, &p.to_be_bytes());
    }
    string(buf, 5, name);
    varint_field(buf, 6, kind);
    fixed64(buf, 7, unix_nanos(start));
    fixed64(buf, 8, unix_nanos(end));
    for (k, v) in attributes {
        key_value(buf, 9, k, v);
    }
    if error {
        let mut status = Vec::new();
        varint_field(&mut status, 3, STATUS_ERROR);
        message(buf, 15, &status);
    }
    fixed32(buf, 16, flags);
}

fn key_value(buf: &mut Vec<u8>, field: u32, key: &str, value: &AttrValue) {
    let mut any = Vec::new();
    match value {
        AttrValue::Str(s) => string(&mut any, 1, s),
        AttrValue::Bool(b) => varint_field(&mut any, 2, u64::from(*b)),
        AttrValue::Int(i) => varint_field(&mut any, 3, *i as u64),
    }
    let mut kv = Vec::with_capacity(key.len() + any.len() + 4);
    string(&mut kv, 1, key);
    message(&mut kv, 2, &any);
    message(buf, field, &kv);
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn tag(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, (u64::from(field) << 3) | u64::from(wire));
}

fn varint_field(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, 0);
    varint(buf, v);
}

fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    tag(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn fixed32(buf: &mut Vec<u8>, field: u32, v: u32) {
    tag(buf, field, 5);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn bytes(buf: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(buf, field, 2);
    varint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

fn string(buf: &mut Vec<u8>, field: u32, s: &str) {
    bytes(buf, field, s.as_bytes());
}

fn message(buf: &mut Vec<u8>, field: u32, m: &[u8]) {
    bytes(buf, field, m);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_base_128() {
        let mut b = Vec::new();
        varint(&mut b, 300);
        assert_eq!(b, [0xac, 0x02]);
        b.clear();
        varint(&mut b, u64::MAX);
        assert_eq!(b.len(), 10);
        b.clear();
        varint_field(&mut b, 16, 1);
        assert_eq!(b, [0x80, 0x01, 0x01]);
    }
}
