//! Traffic per edge (source workload -> destination Service) over the last minute, for `sluice top`
//! and the admin page. Every finished request is counted in its edge's one-second bucket as it is
//! recorded, so the figures are exact however busy the node is; the ring of recent records keeps only
//! the last few thousand requests, a fraction of a second on a busy node.
//!
//! Per request this is one uncontended lock, a hash of two addresses (sources and Services are
//! interned) and a few additions. An edge keeps [`SLOTS`] buckets of about 300 bytes.

use crate::labels::{Peer, ServiceName};
use crate::{Interned, Record};
use parking_lot::Mutex;
use sluice_core::ResponseFlags;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest window, in seconds.
pub const MAX_WINDOW_S: u64 = 60;
/// One bucket per second of the window, plus the current (partial) second.
const SLOTS: usize = MAX_WINDOW_S as usize + 1;
/// Flag bits counted (every flag Sluice sets fits).
const FLAG_BITS: usize = 24;
/// Latency buckets, two per power of two of microseconds: the first holds everything below
/// 96 µs, the last everything from about 134 s.
const LATENCY_BUCKETS: usize = 44;
const FIRST_OCTAVE: u32 = 6;

#[derive(Clone)]
struct Slot {
    /// The Unix second this slot counts; a slot of an older second is reset when reused.
    second: u64,
    requests: u32,
    ok: u32,
    retries: u32,
    flags: [u32; FLAG_BITS],
    latency: [u32; LATENCY_BUCKETS],
}

impl Slot {
    const EMPTY: Self = Self {
        second: 0,
        requests: 0,
        ok: 0,
        retries: 0,
        flags: [0; FLAG_BITS],
        latency: [0; LATENCY_BUCKETS],
    };
}

struct Edge {
    source: Peer,
    service: Interned<ServiceName>,
    /// The newest second counted.
    last: u64,
    slots: Box<[Slot; SLOTS]>,
}

/// The edges' buckets. Keyed by the interned source's and Service's addresses, which stand for
/// their values for the process's life (the intern tables keep every value).
#[derive(Default)]
pub struct Edges {
    edges: Mutex<HashMap<(u64, u64), Edge, BuildHasherDefault<AddrHasher>>>,
}

/// What `top` shows for one edge over a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EdgeTotals {
    /// `namespace/workload`.
    pub source: String,
    /// The Service's host name.
    pub service: String,
    pub requests: u64,
    /// Responses below 500 (and not 0).
    pub ok: u64,
    /// Attempts beyond the first.
    pub retries: u64,
    /// Requests per response flag that occurred.
    pub flags: Vec<(ResponseFlags, u64)>,
    latency: Vec<u64>,
}

impl EdgeTotals {
    /// The `q` quantile (0-1) of the requests' durations, as the middle of its bucket (within
    /// about 17% of the true value); zero without requests.
    pub fn quantile(&self, q: f64) -> Duration {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return Duration::ZERO;
        }
        let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return bucket_middle(i);
            }
        }
        bucket_middle(LATENCY_BUCKETS - 1)
    }
}

/// The bucket of a duration: two per octave of microseconds from [`FIRST_OCTAVE`].
fn bucket_of(d: Duration) -> usize {
    let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
    if us < 1 << FIRST_OCTAVE {
        return 0;
    }
    let octave = 63 - us.leading_zeros();
    let half = (us >> (octave - 1)) & 1;
    (((octave - FIRST_OCTAVE) * 2) as usize + half as usize).min(LATENCY_BUCKETS - 1)
}

/// The middle of bucket `i`'s range.
fn bucket_middle(i: usize) -> Duration {
    let octave = FIRST_OCTAVE + (i / 2) as u32;
    let half = (i % 2) as u64;
    let low = (2 + half) << (octave - 1);
    let high = (3 + half) << (octave - 1);
    Duration::from_micros((low + high) / 2)
}

impl Edges {
    /// Counts a finished request.
    pub(crate) fn record(&self, r: &Record) {
        let (source, service, duration, status) = (&r.source, &r.service, r.duration, r.status);
        let (attempts, flags) = (r.info.attempts(), r.info.flags());
        let end = r.start + r.duration;
        let second = unix_second(end);
        let mut edges = self.edges.lock();
        let key = (source.addr(), service.addr());
        if !edges.contains_key(&key) {
            // A new edge is rare: drop those idle for longer than the window meanwhile.
            edges.retain(|_, e| e.last + MAX_WINDOW_S >= second);
            edges.insert(
                key,
                Edge {
                    source: source.clone(),
                    service: service.clone(),
                    last: second,
                    slots: Box::new([Slot::EMPTY; SLOTS]),
                },
            );
        }
        let edge = edges.get_mut(&key).expect("inserted above");
        edge.last = edge.last.max(second);
        let slot = &mut edge.slots[(second % SLOTS as u64) as usize];
        if slot.second != second {
            if slot.second > second {
                // A record from further back than the buckets go (a clock step): not counted.
                return;
            }
            *slot = Slot::EMPTY;
            slot.second = second;
        }
        slot.requests += 1;
        if status != 0 && status < 500 {
            slot.ok += 1;
        }
        slot.retries += attempts.saturating_sub(1);
        let mut bits = flags.bits();
        while bits != 0 {
            let bit = bits.trailing_zeros() as usize;
            if bit < FLAG_BITS {
                slot.flags[bit] += 1;
            }
            bits &= bits - 1;
        }
        slot.latency[bucket_of(duration)] += 1;
    }

    /// Every edge with requests in the last `window` (at most [`MAX_WINDOW_S`]) ending now, edges
    /// of equal names (a workload whose pods' identities differ only in revision, say) merged;
    /// and the span in seconds the counts cover (the current second counts as far as it has
    /// gone).
    pub fn totals(&self, window: Duration) -> (Vec<EdgeTotals>, f64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let whole = window.as_secs().clamp(1, MAX_WINDOW_S);
        let first = now.as_secs().saturating_sub(whole - 1);
        let span = (whole - 1) as f64 + f64::from(now.subsec_millis()) / 1000.0;
        let mut merged: HashMap<(String, String), EdgeTotals> = HashMap::new();
        let mut edges = self.edges.lock();
        edges.retain(|_, e| e.last + MAX_WINDOW_S >= now.as_secs());
        for edge in edges.values() {
            let slots = edge
                .slots
                .iter()
                .filter(|s| s.second >= first && s.second <= now.as_secs() && s.requests > 0);
            for slot in slots {
                let source = format!("{}/{}", edge.source.namespace, edge.source.workload);
                let t = merged
                    .entry((source.clone(), edge.service.hostname.clone()))
                    .or_insert_with(|| EdgeTotals {
                        source,
                        service: edge.service.hostname.clone(),
                        latency: vec![0; LATENCY_BUCKETS],
                        ..EdgeTotals::default()
                    });
                t.requests += u64::from(slot.requests);
                t.ok += u64::from(slot.ok);
                t.retries += u64::from(slot.retries);
                for (bit, &n) in slot.flags.iter().enumerate().filter(|(_, n)| **n > 0) {
                    let flag = ResponseFlags::from_bits(1 << bit);
                    match t.flags.iter_mut().find(|(f, _)| *f == flag) {
                        Some((_, total)) => *total += u64::from(n),
                        None => t.flags.push((flag, u64::from(n))),
                    }
                }
                for (total, &n) in t.latency.iter_mut().zip(slot.latency.iter()) {
                    *total += u64::from(n);
                }
            }
        }
        drop(edges);
        let mut out: Vec<EdgeTotals> = merged.into_values().collect();
        out.sort_by(|a, b| (&a.source, &a.service).cmp(&(&b.source, &b.service)));
        for t in &mut out {
            t.flags.sort_by_key(|(f, _)| f.bits());
        }
        (out, span.max(0.001))
    }
}

fn unix_second(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Hashes the two-address key by FxHash's mix: the addresses are already spread.
#[derive(Default)]
pub(crate) struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::unknown_identity;
    use crate::Exchange;
    use sluice_core::RequestInfo;
    use std::sync::Arc;

    #[test]
    fn buckets_cover_durations_in_order_within_their_width() {
        let mut last = 0;
        for us in [
            0u64,
            50,
            64,
            95,
            96,
            127,
            128,
            1_000,
            10_000,
            500_000,
            2_000_000,
            100_000_000,
        ] {
            let b = bucket_of(Duration::from_micros(us));
            assert!(b >= last, "{us} µs went back to bucket {b}");
            last = b;
            if us >= 64 && b < LATENCY_BUCKETS - 1 {
                let mid = bucket_middle(b).as_micros() as f64;
                assert!(
                    (mid / us as f64 - 1.0).abs() <= 0.25,
                    "{us} µs -> middle {mid}"
                );
            }
        }
        assert_eq!(bucket_of(Duration::from_secs(100_000)), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn counts_every_request_of_a_window_per_edge() {
        let edges = Edges::default();
        let source = unknown_identity();
        let service = Interned::new(ServiceName {
            hostname: "web.default.svc.cluster.local".into(),
            name: "web".into(),
            namespace: "default".into(),
        });
        let now = SystemTime::now();
        let record = |end: SystemTime, d: Duration, status: u16, attempts: u32, flags| {
            let info = Arc::new(RequestInfo::new());
            for _ in 0..attempts {
                info.add_attempt();
            }
            info.add_flags(flags);
            Record {
                start: end - d,
                duration: d,
                exchange: Exchange::Tcp {
                    received: 0,
                    sent: 0,
                },
                peer: None,
                source: source.clone(),
                service: service.clone(),
                info,
                status,
                grpc_status: None,
                response_bytes: 0,
            }
        };
        // More requests than the ring of recent records keeps.
        for i in 0..10_000u32 {
            let (status, flags, attempts) = match i % 10 {
                0 => (503, ResponseFlags::UPSTREAM_OVERFLOW, 1),
                1 => (200, ResponseFlags::empty(), 2),
                _ => (200, ResponseFlags::empty(), 1),
            };
            let d = Duration::from_millis(if i % 100 == 0 { 900 } else { 2 });
            edges.record(&record(now, d, status, attempts, flags));
        }
        // Long ago: outside any window.
        edges.record(&record(
            now - Duration::from_secs(600),
            Duration::from_millis(1),
            200,
            1,
            ResponseFlags::empty(),
        ));
        let (totals, span) = edges.totals(Duration::from_secs(10));
        // Nine whole seconds and as much of this one as has gone (none, at its very start).
        assert!((9.0..=10.0).contains(&span), "{span}");
        assert_eq!(totals.len(), 1);
        let t = &totals[0];
        assert_eq!((t.requests, t.ok, t.retries), (10_000, 9_000, 1_000));
        assert_eq!(t.flags, vec![(ResponseFlags::UPSTREAM_OVERFLOW, 1_000)]);
        let p50 = t.quantile(0.5).as_secs_f64() * 1000.0;
        assert!((1.6..=2.5).contains(&p50), "p50 {p50} ms");
        let p999 = t.quantile(0.999).as_secs_f64() * 1000.0;
        assert!((700.0..=1100.0).contains(&p999), "p99.9 {p999} ms");
    }
}
