//! Types every Sluice crate shares: the boxed body the proxy moves, the errors a proxied request can end
//! in (each knows its HTTP status, Envoy response flag, body text and origin: upstream, downstream or
//! the proxy), the signal a timeout layer raises before it ends an attempt, the one the cluster sends when an
//! attempt has a connection, the per-request record that layers fill in for the access log, and
//! the one request extension ([`RequestCtx`]) through which the layers hand these down.
#![forbid(unsafe_code)]

mod conn_timer;
mod ctx;
mod error;
mod expiry;
mod flags;
pub mod gather;
mod info;
mod ready;
mod side_wake;
#[cfg(test)]
mod test_wakes;

pub use self::conn_timer::{ArmedDeadline, ConnTimer};
pub use self::ctx::{RequestCtx, RouteClock, TracePropagation};
pub use self::error::{
    Cause, ConnectError, Origin, OverflowKind, Overload, ProxyError, Quota, QuotaUnit,
    StaleConnections, UpstreamQuota,
};
pub use self::expiry::{Deadline, Expiry};
pub use self::flags::ResponseFlags;
pub use self::info::{
    AttemptRecord, AttemptRecords, ClusterNote, InfoSummary, PolicyNote, RequestInfo, Routed,
};
pub use self::ready::ConnectionReady;
pub use self::side_wake::SideWake;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// The error type passed between layers; callers find a cause by walking `source()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The body type of every request and response inside the proxy.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// A header value holding `n` in decimal. `HeaderValue::from(n)` formats into a growing
/// `BytesMut` (an allocation and a reallocation); this formats on the stack and copies once, and
/// the numbers below ten need no allocation at all.
pub fn decimal_value(n: u64) -> http::HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    if let Some(digit) = usize::try_from(n).ok().and_then(|i| DIGITS.get(i)) {
        return http::HeaderValue::from_static(digit);
    }
    let mut buf = itoa::Buffer::new();
    http::HeaderValue::from_str(buf.format(n)).expect("digits are a valid header value")
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal_values() {
        for n in [0, 1, 9, 10, 99, 10_000, u64::MAX] {
            assert_eq!(super::decimal_value(n), http::HeaderValue::from(n), "{n}");
        }
    }
}
