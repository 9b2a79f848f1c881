//! Types every Sluice crate shares: the boxed body the proxy moves, the errors a proxied request can end
//! in (each knows its HTTP status, Envoy response flag, body text and origin: upstream, downstream or
//! the proxy), the signal a timeout layer raises before it ends an attempt, the one the cluster sends when an
//! attempt has a connection, and the per-request record that
//! layers fill in for the access log.
#![forbid(unsafe_code)]

mod error;
mod expiry;
mod flags;
mod info;
mod ready;

pub use self::error::{
    Cause, ConnectError, Origin, OverflowKind, Overload, ProxyError, Quota, QuotaUnit,
    StaleConnections, UpstreamQuota,
};
pub use self::expiry::{Deadline, Expiry};
pub use self::flags::ResponseFlags;
pub use self::info::{AttemptRecord, PolicyNote, RequestInfo, RetryAnyHost};
pub use self::ready::ConnectionReady;

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
