//! The trace context of one request: read from the client's W3C `traceparent` or B3 headers (or
//! started here), and written on each upstream attempt with that attempt's own span id.
//!
//! What is read, as Envoy's Zipkin tracer does with `USE_B3_WITH_W3C_PROPAGATION` (Istio's
//! `traceContextOption`; the tracer that writes both formats): B3 first (the single `b3` header,
//! else `x-b3-traceid` + `x-b3-spanid`), then `traceparent`. A header that does not parse is
//! ignored, and the next source (or a new trace) is used; its value is replaced on the way out.
//! What is written, per attempt: `traceparent` always, `x-b3-*` unless the client used only the
//! single `b3` header, and `b3` when the client sent it, so no stale context travels upstream.
//! `tracestate` goes on untouched when it belongs to the trace continued (the client's valid
//! `traceparent` has the same trace id) and is removed otherwise. `x-b3-flags` passes through.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub(crate) const B3: HeaderName = HeaderName::from_static("b3");
pub(crate) const X_B3_TRACEID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub(crate) const X_B3_SPANID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub(crate) const X_B3_PARENTSPANID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub(crate) const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub(crate) const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
/// Envoy's request id: made when the client sent none, sent upstream and logged.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// One request's place in a trace. Cheap to clone; put in the request's `RequestCtx` so that the
/// cluster writes it on every attempt ([`TraceContext::inject`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub(crate) trace_id: u128,
    /// The request's own span.
    pub(crate) span_id: u64,
    /// The client's span, when it sent one: the request span's parent.
    pub(crate) parent: Option<u64>,
    /// Attempt span ids derive from it and the attempt number, so the span exported at the end
    /// names exactly the ids the endpoints saw, with nothing stored per attempt.
    pub(crate) seed: u64,
    pub(crate) sampled: bool,
    /// The client's B3 trace id had 64 bits: written back in 16 hex digits.
    pub(crate) b3_short: bool,
    /// Which B3 forms go upstream.
    pub(crate) b3_single: bool,
    pub(crate) b3_multi: bool,
    /// The client's `tracestate` belongs to this trace (kept upstream, reported on the spans).
    pub(crate) tracestate: Option<HeaderValue>,
    /// The client sent a `tracestate` that is not kept: each attempt removes it (most requests
    /// carry none, and a removal hashes the name and probes the map).
    pub(crate) drop_tracestate: bool,
    /// Headers are written (off: the spans are exported, nothing travels upstream).
    pub(crate) propagate: bool,
}

/// What the client's headers say, before the sampling decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Incoming {
    /// Trace id and the client's span id, from the first source that parsed.
    pub(crate) context: Option<(u128, u64)>,
    pub(crate) b3_short: bool,
    /// The sampling decision the client sent, from the same order of sources.
    pub(crate) sampled: Option<bool>,
    pub(crate) b3_single: bool,
    pub(crate) b3_multi: bool,
    pub(crate) tracestate: Option<HeaderValue>,
    /// A `tracestate` header came, kept or not.
    pub(crate) tracestate_sent: bool,
}

/// What the tracer needs to know of a request's headers, from one pass over their names: most
/// requests carry no trace context, and each lookup by name hashes the name.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Seen<'h> {
    /// `traceparent`, `b3` or an `x-b3-*` header (worth reading them).
    pub(crate) trace_headers: bool,
    pub(crate) tracestate: bool,
    pub(crate) client_trace_id: bool,
    /// The first `x-request-id`.
    pub(crate) request_id: Option<&'h HeaderValue>,
}

impl<'h> Seen<'h> {
    pub(crate) fn of(headers: &'h HeaderMap) -> Self {
        let mut seen = Seen::default();
        for (name, value) in headers {
            match name.as_str() {
                "traceparent" | "b3" => seen.trace_headers = true,
                "tracestate" => seen.tracestate = true,
                "x-client-trace-id" => seen.client_trace_id = true,
                "x-request-id" => {
                    seen.request_id.get_or_insert(value);
                }
                n if n.starts_with("x-b3-") => seen.trace_headers = true,
                _ => {}
            }
        }
        seen
    }
}

impl Incoming {
    #[cfg(test)]
    pub(crate) fn read(headers: &HeaderMap) -> Self {
        Self::read_seen(headers, &Seen::of(headers))
    }

    /// What `headers` say, `seen` being what one pass over them found.
    pub(crate) fn read_seen(headers: &HeaderMap, seen: &Seen<'_>) -> Self {
        let mut inc = Incoming {
            tracestate_sent: seen.tracestate,
            ..Incoming::default()
        };
        if seen.trace_headers {
            inc.read_headers(headers);
        }
        if !inc.b3_single {
            inc.b3_multi = true;
        }
        inc
    }

    fn read_headers(&mut self, headers: &HeaderMap) {
        let traceparent = headers.get(TRACEPARENT).and_then(parse_traceparent);
        // B3, single header first (Envoy reads it before the multi headers).
        if let Some(b3) = headers.get(B3) {
            self.b3_single = true;
            if let Some(single) = parse_b3_single(b3.as_bytes()) {
                self.sampled = single.sampled;
                if let Some((trace, span, short)) = single.context {
                    self.context = Some((trace, span));
                    self.b3_short = short;
                }
            }
        }
        let multi_trace = headers.get(X_B3_TRACEID);
        if multi_trace.is_some() || headers.contains_key(X_B3_SPANID) {
            self.b3_multi = true;
        }
        if self.context.is_none() {
            let trace = multi_trace.and_then(|v| parse_b3_trace_id(v.as_bytes()));
            let span = headers
                .get(X_B3_SPANID)
                .and_then(|v| parse_hex_u64(v.as_bytes()));
            if let (Some((trace, short)), Some(span)) = (trace, span) {
                self.context = Some((trace, span));
                self.b3_short = short;
            }
        }
        if self.sampled.is_none() {
            self.sampled = headers
                .get(X_B3_SAMPLED)
                .map(|v| matches!(v.as_bytes(), b"1" | b"true"));
        }
        // B3's debug flag implies an accept decision (B3's own rule; Envoy reads only
        // `x-b3-sampled`).
        if self.sampled.is_none() && headers.get(X_B3_FLAGS).is_some_and(|v| v == "1") {
            self.sampled = Some(true);
        }
        if let Some((trace, span, sampled)) = traceparent {
            if self.context.is_none() {
                self.context = Some((trace, span));
                self.b3_short = false;
            }
            if self.sampled.is_none() {
                self.sampled = Some(sampled);
            }
            if self.context.is_some_and(|(t, _)| t == trace) {
                self.tracestate = headers.get(TRACESTATE).map(crate::record::detached);
            }
        }
    }
}

impl TraceContext {
    /// The context the request continues (or starts); not sampled until the sampler says so.
    pub(crate) fn new(inc: Incoming) -> Self {
        let (trace_id, parent) = match inc.context {
            Some((trace, span)) => (trace, Some(span)),
            None => (new_trace_id(), None),
        };
        Self {
            trace_id,
            span_id: nonzero_u64(),
            parent,
            seed: fastrand::u64(..),
            sampled: false,
            b3_short: inc.b3_short,
            b3_single: inc.b3_single,
            b3_multi: inc.b3_multi,
            drop_tracestate: inc.tracestate_sent && inc.tracestate.is_none(),
            tracestate: inc.tracestate,
            propagate: true,
        }
    }

    /// Whether the request's spans are recorded (and the flag sent upstream).
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    pub fn trace_id(&self) -> u128 {
        self.trace_id
    }

    /// The request's span.
    pub fn span_id(&self) -> u64 {
        self.span_id
    }

    /// The client's span, the parent of the request's span, if it sent one.
    pub fn parent_span_id(&self) -> Option<u64> {
        self.parent
    }

    /// The client's `tracestate`, when it belongs to this trace.
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.tracestate.as_ref()
    }

    /// The span of upstream attempt `attempt` (1 for the first): a child of the request's span.
    pub fn attempt_span_id(&self, attempt: u32) -> u64 {
        let id = splitmix64(self.seed ^ u64::from(attempt).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if id == 0 || id == self.span_id {
            id ^ 0x5bd1_e995_0000_0001
        } else {
            id
        }
    }

    /// Writes the context of attempt `attempt` (1 for the first) into its request headers.
    pub fn inject(&self, attempt: u32, headers: &mut HeaderMap) {
        if !self.propagate {
            return;
        }
        let span = self.attempt_span_id(attempt);
        // `traceparent` then the parent span, in one buffer: every B3 multi value is a part of
        // it (one allocation and each id in hex once, not one per header).
        let mut tp = [0u8; 55 + 16];
        tp[..3].copy_from_slice(b"00-");
        hex_into(&mut tp[3..35], &self.trace_id.to_be_bytes());
        tp[35] = b'-';
        hex_into(&mut tp[36..52], &span.to_be_bytes());
        tp[52..55].copy_from_slice(if self.sampled { b"-01" } else { b"-00" });
        hex_into(&mut tp[55..], &self.span_id.to_be_bytes());
        // The array is the buffer's owner: one allocation, and each part shares it by
        // reference count (a copied slice would be copied again to be shared).
        let buf = Bytes::from_owner(tp);
        let part = |at: std::ops::Range<usize>| shared_value(buf.slice(at));
        headers.insert(TRACEPARENT, part(0..55));
        if self.drop_tracestate {
            headers.remove(TRACESTATE);
        }
        let sampled = if self.sampled { "1" } else { "0" };
        // A 64-bit B3 trace id is the low half of the 128-bit one.
        let trace = if self.b3_short { 19..35 } else { 3..35 };
        if self.b3_multi {
            headers.insert(X_B3_TRACEID, part(trace.clone()));
            headers.insert(X_B3_SPANID, part(36..52));
            headers.insert(X_B3_PARENTSPANID, part(55..71));
            headers.insert(X_B3_SAMPLED, HeaderValue::from_static(sampled));
        }
        if self.b3_single {
            // {trace}-{span}-{sampled}-{parent}
            let mut single = Vec::with_capacity(32 + 1 + 16 + 2 + 1 + 16);
            single.extend_from_slice(&tp[trace]);
            single.push(b'-');
            single.extend_from_slice(&tp[36..52]);
            single.push(b'-');
            single.extend_from_slice(sampled.as_bytes());
            single.push(b'-');
            single.extend_from_slice(&tp[55..71]);
            headers.insert(B3, shared_value(Bytes::from(single)));
        }
    }
}

impl sluice_core::TracePropagation for TraceContext {
    fn inject(&self, attempt: u32, headers: &mut HeaderMap) {
        TraceContext::inject(self, attempt, headers);
    }
}

fn shared_value(bytes: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes).expect("hex digits and dashes are a valid header value")
}

const HEX: &[u8; 16] = b"0123456789abcdef";

pub(crate) fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

fn hex_digit(c: u8, upper_ok: bool) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if upper_ok => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Exactly `s.len()` hex digits (at most 32) as a number.
fn parse_hex(s: &[u8], upper_ok: bool) -> Option<u128> {
    if s.is_empty() || s.len() > 32 {
        return None;
    }
    s.iter().try_fold(0u128, |acc, &c| {
        Some((acc << 4) | u128::from(hex_digit(c, upper_ok)?))
    })
}

/// A non-zero 64-bit id in 16 hex digits (B3 accepts either case, as Envoy does).
fn parse_hex_u64(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    parse_hex(s, true)
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v != 0)
}

/// A non-zero B3 trace id, 64 bits (16 hex digits) or 128 bits (32); `true` when it was 64.
fn parse_b3_trace_id(s: &[u8]) -> Option<(u128, bool)> {
    match s.len() {
        16 | 32 => parse_hex(s, true)
            .filter(|&v| v != 0)
            .map(|v| (v, s.len() == 16)),
        _ => None,
    }
}

/// `version-traceid-parentid-flags` (W3C Trace Context): lowercase hex, non-zero ids, version
/// `ff` refused, a later version read by its first four fields.
fn parse_traceparent(v: &HeaderValue) -> Option<(u128, u64, bool)> {
    let s = v.as_bytes();
    if s.len() < 55 || s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
        return None;
    }
    let version = parse_hex(&s[..2], false)?;
    if version == 0xff || (version == 0 && s.len() != 55) || (s.len() > 55 && s[55] != b'-') {
        return None;
    }
    let trace = parse_hex(&s[3..35], false).filter(|&t| t != 0)?;
    let span = parse_hex(&s[36..52], false)
        .and_then(|v| u64::try_from(v).ok())
        .filter(|&v| v != 0)?;
    let flags = parse_hex(&s[53..55], false)?;
    Some((trace, span, flags & 1 == 1))
}

struct B3Single {
    /// Trace id, span id, whether the trace id had 64 bits.
    context: Option<(u128, u64, bool)>,
    sampled: Option<bool>,
}

/// `{trace}-{span}[-{sampling}[-{parent}]]`, or the sampling state alone (`0`, `1`, `d`).
fn parse_b3_single(s: &[u8]) -> Option<B3Single> {
    let sampling = |c: &[u8]| match c {
        b"0" => Some(false),
        b"1" | b"d" => Some(true),
        _ => None,
    };
    if s.len() == 1 {
        return sampling(s).map(|sampled| B3Single {
            context: None,
            sampled: Some(sampled),
        });
    }
    let mut parts = s.split(|&c| c == b'-');
    let (trace, short) = parse_b3_trace_id(parts.next()?)?;
    let span = parse_hex_u64(parts.next()?)?;
    let sampled = match parts.next() {
        Some(flag) => Some(sampling(flag)?),
        None => None,
    };
    if let Some(parent) = parts.next() {
        parse_hex_u64(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(B3Single {
        context: Some((trace, span, short)),
        sampled,
    })
}

fn new_trace_id() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

pub(crate) fn nonzero_u64() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A random (version 4, RFC 9562) UUID for `x-request-id`, as Envoy makes one when the client
/// sent none.
pub fn new_request_id() -> HeaderValue {
    let mut b = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut s = [0u8; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s[at] = b'-';
            at += 1;
        }
        hex_into(&mut s[at..at + 2], &[*byte]);
        at += 2;
    }
    // Owned by its array: the retry layer's copy of the request's headers shares it without
    // another allocation.
    shared_value(Bytes::from_owner(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_tracestate_is_a_copy() {
        use crate::record::tests::{value, ReadBuffer};
        use std::sync::atomic::Ordering;
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (buf, freed) = ReadBuffer::with(format!("{tp} vendor=1").as_bytes());
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, value(&buf, 0..tp.len()));
        h.insert(TRACESTATE, value(&buf, tp.len() + 1..tp.len() + 9));
        drop(buf);
        let inc = Incoming::read(&h);
        drop(h);
        assert!(
            freed.load(Ordering::SeqCst),
            "the context keeps the read buffer alive"
        );
        assert_eq!(inc.tracestate.unwrap(), "vendor=1");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
        h.get(name)
            .unwrap_or_else(|| panic!("{name} missing"))
            .to_str()
            .unwrap()
    }

    fn sampled(mut ctx: TraceContext, sampled: bool) -> TraceContext {
        ctx.sampled = sampled;
        ctx
    }

    const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn request_ids_are_version_4_uuids() {
        let a = new_request_id();
        let a = a.to_str().unwrap();
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{a}");
        assert!(matches!(&parts[3][..1], "8" | "9" | "a" | "b"), "{a}");
        assert!(a.bytes().all(|c| c == b'-' || HEX.contains(&c)), "{a}");
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn incoming_traceparent_is_kept_with_a_new_span_id_per_attempt() {
        let inc = Incoming::read(&headers(&[
            ("traceparent", TP),
            ("tracestate", "congo=t61"),
        ]));
        assert_eq!(inc.sampled, Some(true));
        let ctx = sampled(TraceContext::new(inc), true);
        assert_eq!(ctx.trace_id(), 0x0af7651916cd43dd8448eb211c80319c);
        assert_eq!(ctx.parent_span_id(), Some(0xb7ad6b7169203331));
        let mut seen = Vec::new();
        for attempt in 1..=3 {
            let mut h = headers(&[("traceparent", TP), ("tracestate", "congo=t61")]);
            ctx.inject(attempt, &mut h);
            let tp = get(&h, "traceparent");
            assert_eq!(&tp[..36], "00-0af7651916cd43dd8448eb211c80319c-");
            assert!(tp.ends_with("-01"), "{tp}");
            let span = &tp[36..52];
            assert_eq!(span, format!("{:016x}", ctx.attempt_span_id(attempt)));
            assert_ne!(span, "b7ad6b7169203331");
            assert_eq!(get(&h, "tracestate"), "congo=t61");
            // B3 carries the same attempt span, child of the request's span.
            assert_eq!(get(&h, "x-b3-traceid"), "0af7651916cd43dd8448eb211c80319c");
            assert_eq!(get(&h, "x-b3-spanid"), span);
            assert_eq!(
                get(&h, "x-b3-parentspanid"),
                format!("{:016x}", ctx.span_id())
            );
            assert_eq!(get(&h, "x-b3-sampled"), "1");
            assert!(!h.contains_key("b3"));
            seen.push(span.to_owned());
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "one span id per attempt");
    }

    #[test]
    fn b3_in_both_out() {
        let inc = Incoming::read(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]));
        assert_eq!(inc.sampled, Some(false));
        let ctx = sampled(TraceContext::new(inc), false);
        let mut h = HeaderMap::new();
        ctx.inject(1, &mut h);
        let span = format!("{:016x}", ctx.attempt_span_id(1));
        assert_eq!(
            get(&h, "traceparent"),
            format!("00-463ac35c9f6413ad48485a3953bb6124-{span}-00")
        );
        assert_eq!(get(&h, "x-b3-traceid"), "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(get(&h, "x-b3-spanid"), span);
        assert_eq!(get(&h, "x-b3-sampled"), "0");
        assert_eq!(ctx.parent_span_id(), Some(0xa2fb4a1d1a96d312));
    }

    #[test]
    fn b3_64_bit_trace_ids_stay_64_bit_in_b3_and_pad_traceparent() {
        let inc = Incoming::read(&headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "A2FB4A1D1A96D312"),
            ("x-b3-sampled", "1"),
        ]));
        let ctx = sampled(TraceContext::new(inc), true);
        let mut h = HeaderMap::new();
        ctx.inject(2, &mut h);
        assert_eq!(get(&h, "x-b3-traceid"), "463ac35c9f6413ad");
        assert!(get(&h, "traceparent").starts_with("00-0000000000000000463ac35c9f6413ad-"));
        assert_eq!(ctx.parent_span_id(), Some(0xa2fb4a1d1a96d312));
    }

    #[test]
    fn single_b3_in_single_b3_out_and_traceparent() {
        let inc = Incoming::read(&headers(&[(
            "b3",
            "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1",
        )]));
        let ctx = sampled(TraceContext::new(inc), true);
        let mut h = headers(&[("b3", "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1")]);
        ctx.inject(1, &mut h);
        let span = format!("{:016x}", ctx.attempt_span_id(1));
        assert_eq!(
            get(&h, "b3"),
            format!(
                "463ac35c9f6413ad48485a3953bb6124-{span}-1-{:016x}",
                ctx.span_id()
            )
        );
        assert!(!h.contains_key("x-b3-traceid"), "the client used only b3");
        assert!(get(&h, "traceparent").contains(&span));
    }

    #[test]
    fn b3_wins_over_traceparent_and_a_foreign_tracestate_is_dropped() {
        let inc = Incoming::read(&headers(&[
            ("traceparent", TP),
            ("tracestate", "congo=t61"),
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]));
        // No B3 decision: the traceparent's flag decides.
        assert_eq!(inc.sampled, Some(true));
        let ctx = sampled(TraceContext::new(inc), true);
        assert_eq!(ctx.trace_id(), 0x463ac35c9f6413ad48485a3953bb6124);
        let mut h = headers(&[("traceparent", TP), ("tracestate", "congo=t61")]);
        ctx.inject(1, &mut h);
        assert!(get(&h, "traceparent").starts_with("00-463ac35c9f6413ad48485a3953bb6124-"));
        assert!(
            !h.contains_key("tracestate"),
            "it belonged to another trace"
        );
    }

    #[test]
    fn a_tracestate_without_its_traceparent_is_dropped_and_none_is_not_looked_for() {
        let h = headers(&[("tracestate", "congo=t61")]);
        let ctx = sampled(TraceContext::new(Incoming::read(&h)), true);
        assert!(ctx.drop_tracestate && ctx.tracestate().is_none());
        let mut sent = h.clone();
        ctx.inject(1, &mut sent);
        assert!(!sent.contains_key("tracestate"), "no traceparent names it");

        let ctx = sampled(TraceContext::new(Incoming::read(&HeaderMap::new())), true);
        assert!(!ctx.drop_tracestate, "nothing to remove");
        let ctx = sampled(
            TraceContext::new(Incoming::read(&headers(&[
                ("traceparent", TP),
                ("tracestate", "congo=t61"),
            ]))),
            true,
        );
        assert!(!ctx.drop_tracestate, "kept: it belongs to the trace");
    }

    #[test]
    fn malformed_headers_are_ignored_and_replaced() {
        for bad in [
            vec![("traceparent", "garbage")],
            vec![(
                "traceparent",
                "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            )],
            vec![(
                "traceparent",
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            )],
            vec![(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            )],
            vec![(
                "traceparent",
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )],
            vec![(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            )],
            vec![("x-b3-traceid", "zzz"), ("x-b3-spanid", "a2fb4a1d1a96d312")],
            vec![
                ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
                ("x-b3-spanid", "a2fb"),
            ],
            vec![("b3", "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-x")],
            vec![("b3", "not-b3")],
        ] {
            let h = headers(&bad);
            let inc = Incoming::read(&h);
            assert_eq!(inc.context, None, "{bad:?}");
            let ctx = sampled(TraceContext::new(inc), false);
            let mut out = h.clone();
            ctx.inject(1, &mut out);
            let tp = get(&out, "traceparent");
            assert_eq!(tp.len(), 55, "{bad:?}: {tp}");
            assert!(tp.contains(&format!("{:032x}", ctx.trace_id())), "{bad:?}");
            // B3 goes out in the form the client used, replaced.
            let b3 = out.get("x-b3-traceid").or(out.get("b3")).unwrap();
            let trace = format!("{:032x}", ctx.trace_id());
            assert!(b3.to_str().unwrap().starts_with(&trace), "{bad:?}");
            assert_eq!(ctx.parent_span_id(), None);
        }
    }

    #[test]
    fn a_later_traceparent_version_is_read_by_its_first_fields() {
        let h = headers(&[(
            "traceparent",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds",
        )]);
        let inc = Incoming::read(&h);
        assert_eq!(
            inc.context,
            Some((0x0af7651916cd43dd8448eb211c80319c, 0xb7ad6b7169203331))
        );
    }

    #[test]
    fn sampling_flags_from_every_source() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<bool>);
        let cases: [Case; 9] = [
            (&[], None),
            (&[("x-b3-sampled", "1")], Some(true)),
            (&[("x-b3-sampled", "true")], Some(true)),
            (&[("x-b3-sampled", "0")], Some(false)),
            (&[("x-b3-flags", "1")], Some(true)),
            (&[("b3", "0")], Some(false)),
            (&[("b3", "d")], Some(true)),
            (
                &[(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
                )],
                Some(false),
            ),
            // B3's decision wins over the traceparent's.
            (&[("traceparent", TP), ("x-b3-sampled", "0")], Some(false)),
        ];
        for (h, want) in cases {
            assert_eq!(Incoming::read(&headers(h)).sampled, want, "{h:?}");
        }
    }

    #[test]
    fn a_new_trace_when_the_client_sent_none() {
        let ctx = sampled(TraceContext::new(Incoming::read(&HeaderMap::new())), true);
        assert_ne!(ctx.trace_id(), 0);
        assert_eq!(ctx.parent_span_id(), None);
        let mut h = HeaderMap::new();
        ctx.inject(1, &mut h);
        for name in [
            "traceparent",
            "x-b3-traceid",
            "x-b3-spanid",
            "x-b3-parentspanid",
            "x-b3-sampled",
        ] {
            assert!(h.contains_key(name), "{name}");
        }
        assert!(!h.contains_key("b3"));
        assert_ne!(ctx.attempt_span_id(1), ctx.attempt_span_id(2));
        assert_ne!(ctx.attempt_span_id(1), 0);
    }
}
