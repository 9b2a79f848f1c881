//! Istio `fault` injection with the semantics of Envoy's fault filter (which Istio configures):
//! first the delay (`fixedDelay` for `percentage` of requests, flag `DI`), then the abort
//! (`percentage` of requests, flag `FI`), answered by the proxy without calling the upstream.
//!
//! Percentages follow Istio's translation to Envoy: `percentage.value` becomes a fraction per million
//! (`value * 10000`, truncated), so 0.1 % works, and a request is hit when a uniform draw in
//! `[0, 1_000_000)` falls below it. Delay and abort are drawn independently.
//!
//! An HTTP abort answers `httpStatus` with body `fault filter abort` (`text/plain`); a gRPC abort
//! answers a trailers-only gRPC response: HTTP 200, `content-type: application/grpc`,
//! `grpc-status: <code>` and `grpc-message: fault filter abort`.

use futures_util::ready;
use http::{header, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use sluice_core::{Body, BoxError, RequestCtx, ResponseFlags};
use sluice_policy::{Fault, FaultAbort};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Sleep;
use tower_layer::Layer;
use tower_service::Service;

/// The body text of an injected abort, as Envoy sends it.
pub const ABORT_BODY: &str = "fault filter abort";

/// Builds [`FaultInjection`] services for one route.
#[derive(Clone, Debug)]
pub struct FaultLayer {
    fault: Option<Arc<Fault>>,
    rng: Option<fastrand::Rng>,
}

impl FaultLayer {
    /// Injects `fault`; `None` is a pass-through.
    pub fn new(fault: Option<Arc<Fault>>) -> Self {
        Self { fault, rng: None }
    }

    /// Draws from `rng` instead of the thread's generator (seeded, for deterministic tests).
    pub fn with_rng(mut self, rng: fastrand::Rng) -> Self {
        self.rng = Some(rng);
        self
    }
}

impl<S> Layer<S> for FaultLayer {
    type Service = FaultInjection<S>;

    fn layer(&self, inner: S) -> FaultInjection<S> {
        self.clone().into_service(inner)
    }
}

impl FaultLayer {
    /// The service for `inner`, built from this layer alone: what [`Layer::layer`] makes, with
    /// the fault moved in rather than its reference count raised (and dropped with the layer)
    /// again. For a stack built per request.
    pub fn into_service<S>(self, inner: S) -> FaultInjection<S> {
        FaultInjection {
            inner,
            fault: self.fault,
            rng: self.rng,
        }
    }
}

/// Injects a route's fault in front of `S`.
#[derive(Clone, Debug)]
pub struct FaultInjection<S> {
    inner: S,
    fault: Option<Arc<Fault>>,
    rng: Option<fastrand::Rng>,
}

impl<S> FaultInjection<S> {
    /// Whether a request falls within `percentage` (0.0 to 100.0).
    fn hit(&mut self, percentage: f64) -> bool {
        // Istio's FractionalPercent: parts per million, truncated (`as` saturates; NaN is 0).
        let per_million = (percentage * 10_000.0) as u32;
        if per_million == 0 {
            return false;
        }
        if per_million >= 1_000_000 {
            return true;
        }
        let draw = match &mut self.rng {
            Some(rng) => rng.u32(..1_000_000),
            None => fastrand::u32(..1_000_000),
        };
        draw < per_million
    }
}

impl<S> Service<Request<Body>> for FaultInjection<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let Some(fault) = self.fault.clone() else {
            return ResponseFuture::inner(self.inner.call(req));
        };
        // Both draws happen now, delay first; Envoy draws the abort after the delay, which gives the
        // same distribution.
        let delay = fault
            .delay
            .as_ref()
            .filter(|d| self.hit(d.percentage))
            .map(|d| d.fixed_delay);
        let abort = fault.abort.as_ref().filter(|a| {
            let pct = match a {
                FaultAbort::Http { percentage, .. } | FaultAbort::Grpc { percentage, .. } => {
                    *percentage
                }
            };
            self.hit(pct)
        });
        let info = RequestCtx::info(req.extensions());
        if let Some(info) = info {
            if delay.is_some() {
                info.add_flags(ResponseFlags::DELAY_INJECTED);
            }
            if abort.is_some() {
                info.add_flags(ResponseFlags::FAULT_INJECTED);
            }
        }
        let abort = abort.map(abort_response);
        match (delay, abort) {
            (None, None) => ResponseFuture::inner(self.inner.call(req)),
            (None, Some(rsp)) => ResponseFuture {
                state: State::Abort { rsp: Some(rsp) },
            },
            (Some(delay), abort) => {
                // The upstream is called after the delay, so take the service that is ready now.
                let svc = abort.is_none().then(|| {
                    let clone = self.inner.clone();
                    std::mem::replace(&mut self.inner, clone)
                });
                ResponseFuture {
                    state: State::Delay {
                        sleep: tokio::time::sleep(delay),
                        next: Some((req, svc, abort)),
                    },
                }
            }
        }
    }
}

/// The local reply for `abort`.
fn abort_response(abort: &FaultAbort) -> Response<Body> {
    match abort {
        FaultAbort::Http { status, .. } => {
            let mut rsp = Response::new(sluice_core::full(ABORT_BODY));
            *rsp.status_mut() =
                StatusCode::from_u16(*status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            rsp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            rsp
        }
        FaultAbort::Grpc { status, .. } => {
            let mut rsp = Response::new(sluice_core::empty());
            let headers = rsp.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(grpc_code(status)));
            headers.insert("grpc-message", HeaderValue::from_static(ABORT_BODY));
            rsp
        }
    }
}

/// The numeric gRPC status for Istio's `grpcStatus` name (or a number); unknown names are UNKNOWN.
pub fn grpc_code(name: &str) -> u32 {
    let name = name.trim();
    if let Ok(n) = name.parse() {
        return n;
    }
    sluice_policy::GRPC_STATUS_NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map_or(2, |i| i as u32)
}

type Next<S> = (Request<Body>, Option<S>, Option<Response<Body>>);

pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        Inner { #[pin] fut: F },
        Delay { #[pin] sleep: Sleep, next: Option<Next<S>> },
        Abort { rsp: Option<Response<Body>> },
    }
}

pin_project! {
    /// Response future of [`FaultInjection`].
    pub struct ResponseFuture<S, F> {
        #[pin]
        state: State<S, F>,
    }
}

impl<S, F> ResponseFuture<S, F> {
    fn inner(fut: F) -> Self {
        Self {
            state: State::Inner { fut },
        }
    }
}

impl<S> Future for ResponseFuture<S, S::Future>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Inner { fut } => return fut.poll(cx),
                StateProj::Abort { rsp } => {
                    return Poll::Ready(Ok(rsp.take().expect("polled after completion")))
                }
                StateProj::Delay { mut sleep, next } => {
                    ready!(sleep.as_mut().poll(cx));
                    let (req, svc, abort) = next.take().expect("polled after completion");
                    if let Some(info) = RequestCtx::info(req.extensions()) {
                        // The timer's deadline is when the delay ended (no clock read).
                        info.completed_at(sleep.deadline().into_std());
                    }
                    match (abort, svc) {
                        (Some(rsp), _) => return Poll::Ready(Ok(rsp)),
                        (None, Some(mut svc)) => {
                            let fut = svc.call(req);
                            this.state.set(State::Inner { fut });
                        }
                        (None, None) => unreachable!("a delay without abort keeps the service"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
