//! The route timeout and the per-try timeout, with Envoy's semantics (router `finalTimeout`,
//! `onResponseTimeout`, `UpstreamRequest::onPerTryTimeout`):
//!
//! - route: bounds the whole request, every retry and back-off included, until the response body has
//!   ended. It starts when the downstream request is complete: at once without a body, else when
//!   the request body has ended (never, if it fails or is abandoned unfinished). Before response headers it fails with [`ProxyError::RequestTimeout`]; afterwards the
//!   response body yields that error, so the client sees a reset. Flag `UT`.
//! - per-try: bounds one attempt from the moment it has a connection (the cluster fires the attempt's
//!   [`ConnectionReady`]; a service that does not claim it gets the timer at once) until its response
//!   headers (Envoy ignores the per-try timer once the response has started). Fails with [`ProxyError::PerTryTimeout`], which the retry layer may retry.
//!
//! Before a timer ends the attempt below it, it raises the attempt's [`Expiry`] (a request
//! extension), so the cluster reports the attempt to outlier detection as a timeout; an attempt
//! dropped with no timer raised was abandoned by the client, which is reported nowhere.
//!
//! Every attempt carries `x-envoy-expected-rq-timeout-ms` when a timeout applies, as Envoy's
//! `FilterUtility::setTimeoutHeaders` writes it: the per-try timeout if one is set (and shorter than
//! the route timeout), else the route timeout, never more than what is left of the route timeout
//! (at least 1 ms). The route layer leaves its clock in the request's extensions for the per-try
//! layer, which is below the retry layer and so sees every attempt.
//!
//! `x-envoy-upstream-rq-timeout-ms` / `x-envoy-upstream-rq-per-try-timeout-ms` override the configured
//! value for one request (0 = none) and are consumed here. Envoy ignores a per-try timeout that is not
//! shorter than the route timeout; here both timers then fire together and the route layer checks its
//! timer first, which gives the same answer.

mod future;

pub use self::future::ResponseFuture;
use self::future::{EndSignal, Start, Timer};
use http_body::Body as _;

use http::{header::HeaderName, HeaderMap, Request, Response};
use sluice_core::{Body, BoxError, ConnectionReady, Expiry, RequestCtx, RouteClock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

/// Overrides the route timeout for one request, in milliseconds; 0 disables it.
pub const UPSTREAM_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-timeout-ms");
/// Overrides the per-try timeout for one request, in milliseconds; 0 disables it.
pub const UPSTREAM_RQ_PER_TRY_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms");

/// Sent upstream with each attempt: the milliseconds the attempt is expected to have.
pub const EXPECTED_RQ_TIMEOUT_MS: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");

/// `x-envoy-expected-rq-timeout-ms` for an attempt with this per-try timeout under this route
/// clock, as Envoy computes it (whole milliseconds; a per-try timeout not shorter than the route
/// timeout is ignored; once the route time is used up, 1). Envoy counts no time elapsed for the
/// first attempt (`first`: no clock read), and a retry's from the route clock's start.
fn expected_timeout_ms(
    per_try: Option<Duration>,
    route: Option<RouteClock>,
    first: bool,
) -> Option<u64> {
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let global = route.map_or(0, |r| ms(r.timeout));
    let mut expected = per_try.map_or(0, ms);
    if global != 0 && expected >= global {
        expected = 0;
    }
    if expected == 0 {
        expected = global;
    }
    if expected == 0 {
        return None;
    }
    if let Some(route) = route.filter(|_| global != 0 && !first) {
        let elapsed = ms(Instant::now()
            .into_std()
            .saturating_duration_since(route.start));
        expected = if elapsed >= global {
            1
        } else {
            expected.min(global - elapsed)
        };
    }
    Some(expected)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scope {
    Route,
    PerTry,
}

/// Builds [`Timeout`] services.
#[derive(Clone, Copy, Debug)]
pub struct TimeoutLayer {
    timeout: Option<Duration>,
    scope: Scope,
}

impl TimeoutLayer {
    /// The route `timeout`: the whole request including retries and the response body.
    pub fn route(timeout: Option<Duration>) -> Self {
        Self {
            timeout: timeout.filter(|d| !d.is_zero()),
            scope: Scope::Route,
        }
    }

    /// `perTryTimeout`: one attempt, until its response headers. Goes below the retry layer.
    pub fn per_try(timeout: Option<Duration>) -> Self {
        Self {
            timeout: timeout.filter(|d| !d.is_zero()),
            scope: Scope::PerTry,
        }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
            scope: self.scope,
        }
    }
}

/// Whether `headers` may hold a timeout header: below the retry layer every attempt carries its
/// `x-envoy-attempt-count`, which says nothing about the client's.
fn sent_timeout_headers(headers: &HeaderMap) -> bool {
    crate::has_envoy_headers(headers, Some(&crate::retry::ATTEMPT_COUNT))
}

/// A route or per-try timeout around `S`.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    timeout: Option<Duration>,
    scope: Scope,
}

impl<S> Timeout<S> {
    /// The timeout for this request: the header's if it has a valid one, else the configured one.
    /// `sent`: whether the request may hold a timeout header ([`sent_timeout_headers`]).
    fn effective(&self, headers: &mut HeaderMap, sent: bool) -> Option<Duration> {
        let name = match self.scope {
            Scope::Route => &UPSTREAM_RQ_TIMEOUT_MS,
            Scope::PerTry => &UPSTREAM_RQ_PER_TRY_TIMEOUT_MS,
        };
        if !sent {
            return self.timeout;
        }
        // Envoy removes the header even when its value does not parse, and then keeps the route's.
        let Some(value) = headers.remove(name) else {
            return self.timeout;
        };
        match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => self.timeout,
        }
    }
}

impl<S> Service<Request<Body>> for Timeout<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        // One pass over the names serves both lookups below.
        let sent = sent_timeout_headers(req.headers());
        let timeout = self.effective(req.headers_mut(), sent);
        // Taken whether or not a timeout applies: the attempts below have no use for it.
        let conn_timer = match self.scope {
            Scope::Route => req
                .extensions_mut()
                .get_mut::<RequestCtx>()
                .and_then(|ctx| ctx.conn_timer.take()),
            Scope::PerTry => None,
        };
        // When the route timer starts, if it starts now (a clock read for the route layer only).
        let mut now = None;
        match self.scope {
            Scope::Route => {
                if let Some(timeout) = timeout {
                    let start = *now.insert(Instant::now());
                    RequestCtx::of_mut(req.extensions_mut()).route_clock = Some(RouteClock {
                        start: start.into_std(),
                        timeout,
                    });
                }
            }
            Scope::PerTry => {
                let ctx = RequestCtx::of(req.extensions());
                let route = ctx.and_then(|c| c.route_clock);
                // The retry layer above counts the attempts in the request's info.
                let first = ctx
                    .and_then(|c| c.info.as_ref())
                    .is_some_and(|info| info.attempts() <= 1);
                match expected_timeout_ms(timeout, route, first) {
                    Some(ms) => {
                        req.headers_mut()
                            .insert(EXPECTED_RQ_TIMEOUT_MS, sluice_core::decimal_value(ms));
                    }
                    None if sent => {
                        req.headers_mut().remove(EXPECTED_RQ_TIMEOUT_MS);
                    }
                    None => {}
                }
            }
        }
        match timeout {
            None => ResponseFuture::passthrough(self.inner.call(req)),
            Some(timeout) => {
                let ctx = RequestCtx::of_mut(req.extensions_mut());
                let info = match self.scope {
                    Scope::Route => ctx.info.clone(),
                    // A per-try timeout that is retried leaves no flag; the final error carries `UT`.
                    Scope::PerTry => None,
                };
                // Tells the attempts below that this timer, not the client, ended them.
                let expiry = match &ctx.expiry {
                    Some(outer) => outer.child(),
                    None => Expiry::new(),
                };
                ctx.expiry = Some(expiry.clone());
                // Envoy starts the route timer when the downstream request is complete: at once
                // for a request without a body, else when its body has ended (a slow upload is
                // not the upstream's time). The per-try timer starts when the attempt has a
                // connection (waiting in the pool and connecting are not the attempt's time).
                let start = match self.scope {
                    Scope::Route if !req.body().is_end_stream() => {
                        let (parts, body) = req.into_parts();
                        let (body, start) = EndSignal::new(body);
                        req = Request::from_parts(parts, Body::new(body));
                        Some(Start::BodyEnd(start))
                    }
                    Scope::Route => None,
                    Scope::PerTry => {
                        let ready = ConnectionReady::new();
                        RequestCtx::of_mut(req.extensions_mut()).connection_ready =
                            Some(ready.clone());
                        Some(Start::Connection(ready))
                    }
                };
                // A timer that starts now: the route's on the connection's timer when there is
                // one (an HTTP/1 client), else one of its own.
                let at = now.and_then(|now| now.checked_add(timeout));
                let timer = match (&start, conn_timer, at) {
                    (Some(_), ..) => None,
                    (None, Some(conn), Some(at)) => Some(Timer::Conn(conn.arm(at.into_std()))),
                    (None, ..) => Some(Timer::after(timeout)),
                };
                ResponseFuture::new(
                    self.inner.call(req),
                    timeout,
                    self.scope,
                    info,
                    expiry,
                    start,
                    timer,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests;
