//! What the proxy's layers hand down to the attempts of one request, in one request extension.
//!
//! `http::Extensions` boxes every entry it holds and clones each one through its own allocation;
//! the retry layer copies a request's extensions for every attempt. Kept as separate entries, the
//! request's record, the pod's quota, the timers' signals and the trace context cost a map, five
//! boxes and five boxed clones per request. As one typed value they cost one box, and an attempt's
//! copy is a few reference-count increments.

use crate::{ConnTimer, ConnectionReady, Expiry, RequestInfo, UpstreamQuota};
use http::{Extensions, HeaderMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The per-request state the layers share, found with [`RequestCtx::of`] and written through
/// [`RequestCtx::of_mut`]. Each field is set by one layer and read below it.
#[derive(Clone, Default)]
pub struct RequestCtx {
    /// The request's record, filled in by every layer (the handler sets it).
    pub info: Option<Arc<RequestInfo>>,
    /// The client pod's budget of upstream connections (the handler, under isolation limits).
    pub quota: Option<UpstreamQuota>,
    /// Raised by the innermost timeout layer before it ends an attempt.
    pub expiry: Option<Expiry>,
    /// Fired by the cluster when the attempt has its connection (the per-try timer's start).
    pub connection_ready: Option<ConnectionReady>,
    /// The route timeout and when it started (the per-try layer's expected timeout).
    pub route_clock: Option<RouteClock>,
    /// A retry may pick any host, tried ones included: the route has
    /// `retryIgnorePreviousHosts: false`, which keeps Envoy's `previous_hosts` predicate out.
    pub any_host: bool,
    /// Writes the request's trace context into each attempt (the handler sets it when the request
    /// is traced or its context propagated).
    pub trace: Option<Arc<dyn TracePropagation>>,
    /// The HTTP/1 client connection's timer, which the route timeout arms instead of a timer of
    /// its own (the handler sets it; the route layer takes it).
    pub conn_timer: Option<Arc<ConnTimer>>,
}

impl RequestCtx {
    /// The request's context, if a layer above set one.
    pub fn of(extensions: &Extensions) -> Option<&RequestCtx> {
        extensions.get::<RequestCtx>()
    }

    /// The request's context, made empty if there was none.
    pub fn of_mut(extensions: &mut Extensions) -> &mut RequestCtx {
        extensions.get_or_insert_default::<RequestCtx>()
    }

    /// The request's record, if it has one.
    pub fn info(extensions: &Extensions) -> Option<&Arc<RequestInfo>> {
        Self::of(extensions).and_then(|c| c.info.as_ref())
    }
}

impl std::fmt::Debug for RequestCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCtx")
            .field("info", &self.info.is_some())
            .field("quota", &self.quota.is_some())
            .field("expiry", &self.expiry.is_some())
            .field("connection_ready", &self.connection_ready.is_some())
            .field("route_clock", &self.route_clock)
            .field("any_host", &self.any_host)
            .field("trace", &self.trace.is_some())
            .field("conn_timer", &self.conn_timer.is_some())
            .finish()
    }
}

/// The route timeout of a request and when it started (on tokio's clock, as `std` time: tokio's
/// `Instant::now().into_std()`, so that tests with a paused clock see it move).
#[derive(Clone, Copy, Debug)]
pub struct RouteClock {
    pub start: Instant,
    pub timeout: Duration,
}

/// A request's trace context as the cluster needs it: written into each attempt's headers, naming
/// that attempt's span (`attempt` is 1 for the first).
pub trait TracePropagation: Send + Sync + 'static {
    fn inject(&self, attempt: u32, headers: &mut HeaderMap);
}
