//! The retry loop of one request: attempt, classify, back off, attempt again.

use super::budget::{RetryBudget, RetryPermit};
use super::classify::On;
use super::ATTEMPT_COUNT;
use crate::backoff::Backoff;
use crate::replay::ReplayBody;
use futures_util::ready;
use http::{request::Parts, Extensions, HeaderMap, Request, Response};
use pin_project_lite::pin_project;
use sluice_core::{Body, BoxError, RequestCtx, RequestInfo, ResponseFlags};
use sluice_policy::RetryPolicy;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Sleep;
use tower_service::Service;

/// How later attempts get their body.
pub(super) enum Replay {
    /// The request has no body.
    Empty,
    /// No retry can happen (0 retries left from the start), so nothing was buffered.
    Never,
    /// Clones of the first attempt's body.
    Body(ReplayBody),
}

/// Headers the layers below the retry add to each attempt: `x-envoy-attempt-count`,
/// `x-envoy-expected-rq-timeout-ms`, `traceparent` and four `x-b3-*` (or `b3`).
pub(super) const PER_ATTEMPT_HEADERS: usize = 7;

/// Everything the loop needs to make and judge attempts.
pub(super) struct Attempts {
    /// The request as the retries copy it (its extensions without the context, when that was
    /// all they held).
    pub(super) parts: Parts,
    /// The request's context as it was before the first attempt.
    pub(super) ctx: Option<RequestCtx>,
    pub(super) replay: Replay,
    pub(super) on: On,
    pub(super) policy: Arc<RetryPolicy>,
    pub(super) extra_codes: Vec<u16>,
    pub(super) remaining: u32,
    pub(super) attempt: u32,
    pub(super) budget: Arc<RetryBudget>,
    pub(super) permit: Option<RetryPermit>,
    pub(super) backoff: Backoff,
    pub(super) rng: fastrand::Rng,
    pub(super) info: Option<Arc<RequestInfo>>,
}

impl Attempts {
    /// The first attempt's request, on the request's own header map and extensions (the loop
    /// keeps copies of them for the retries).
    pub(super) fn first(
        &mut self,
        body: Body,
        mut headers: HeaderMap,
        extensions: Extensions,
    ) -> Request<Body> {
        headers.reserve(PER_ATTEMPT_HEADERS);
        self.attempt_on(body, headers, extensions)
    }

    /// A retry's request: a copy of the original with its extensions and the attempt count.
    pub(super) fn request(&mut self, body: Body) -> Request<Body> {
        // Room for what each attempt adds (its count here; the trace context and the expected
        // timeout below): a clone is sized to its entries exactly, and grew twice per attempt.
        let mut headers = HeaderMap::with_capacity(self.parts.headers.len() + PER_ATTEMPT_HEADERS);
        for (name, value) in &self.parts.headers {
            headers.append(name.clone(), value.clone());
        }
        let mut extensions = self.parts.extensions.clone();
        if let Some(ctx) = &self.ctx {
            extensions.insert(ctx.clone());
        }
        self.attempt_on(body, headers, extensions)
    }

    fn attempt_on(
        &mut self,
        body: Body,
        headers: HeaderMap,
        extensions: Extensions,
    ) -> Request<Body> {
        self.attempt += 1;
        let mut req = Request::new(body);
        *req.method_mut() = self.parts.method.clone();
        *req.uri_mut() = self.parts.uri.clone();
        *req.version_mut() = self.parts.version;
        *req.headers_mut() = headers;
        *req.extensions_mut() = extensions;
        req.headers_mut().insert(
            ATTEMPT_COUNT,
            sluice_core::decimal_value(u64::from(self.attempt)),
        );
        if let Some(info) = &self.info {
            info.add_attempt();
        }
        req
    }

    fn retry_body(&self) -> Body {
        match &self.replay {
            Replay::Body(handle) => Body::new(handle.clone()),
            Replay::Empty => sluice_core::empty(),
            Replay::Never => unreachable!("no retry is scheduled without a replayable body"),
        }
    }

    fn flag(&self, flag: ResponseFlags) {
        if let Some(info) = &self.info {
            info.add_flags(flag);
        }
    }

    /// Decides, as Envoy's `RetryStateImpl::shouldRetry`, whether to retry after `outcome`; returns
    /// the back-off to wait if so.
    fn after(&mut self, outcome: &Result<Response<Body>, BoxError>) -> Option<Duration> {
        // The retry that produced this outcome no longer counts against the budget.
        self.permit = None;
        let retriable = match outcome {
            Ok(rsp) => self.on.response(
                rsp.status(),
                rsp.headers(),
                &[
                    &self.policy.retry_on.retriable_status_codes,
                    &self.extra_codes,
                ],
            ),
            Err(err) => self.on.error(err),
        };
        if !retriable {
            return None;
        }
        if matches!(&self.replay, Replay::Body(body) if body.is_capped()) {
            return None;
        }
        if self.remaining == 0 {
            self.flag(ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
            return None;
        }
        self.remaining -= 1;
        let Some(permit) = self.budget.try_acquire() else {
            self.flag(ResponseFlags::UPSTREAM_OVERFLOW);
            return None;
        };
        self.permit = Some(permit);
        Some(self.backoff.next_delay(&mut self.rng))
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Calling { #[pin] fut: F },
        Backoff { #[pin] sleep: Sleep },
        Ready,
    }
}

pin_project! {
    /// Response future of [`Retry`](super::Retry).
    pub struct ResponseFuture<S, F> {
        #[pin]
        state: State<F>,
        // Both `None` when the request has no retry state.
        inner: Option<S>,
        attempts: Option<Attempts>,
    }
}

impl<S, F> ResponseFuture<S, F> {
    pub(super) fn once(fut: F) -> Self {
        Self {
            state: State::Calling { fut },
            inner: None,
            attempts: None,
        }
    }

    pub(super) fn retrying(fut: F, inner: S, attempts: Attempts) -> Self {
        Self {
            state: State::Calling { fut },
            inner: Some(inner),
            attempts: Some(attempts),
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
                StateProj::Calling { fut } => {
                    let outcome = ready!(fut.poll(cx));
                    let Some(attempts) = this.attempts.as_mut() else {
                        return Poll::Ready(outcome);
                    };
                    match attempts.after(&outcome) {
                        None => return Poll::Ready(outcome),
                        Some(delay) => {
                            // Dropping the retriable response resets its stream, as Envoy does.
                            drop(outcome);
                            this.state.set(State::Backoff {
                                sleep: tokio::time::sleep(delay),
                            });
                        }
                    }
                }
                StateProj::Backoff { sleep } => {
                    ready!(sleep.poll(cx));
                    this.state.set(State::Ready);
                }
                StateProj::Ready => {
                    let inner = this
                        .inner
                        .as_mut()
                        .expect("a retrying future owns a service");
                    let ready = ready!(inner.poll_ready(cx));
                    let attempts = this
                        .attempts
                        .as_mut()
                        .expect("a retrying future has attempts");
                    if let Err(err) = ready {
                        // Give the budget slot back now rather than when the future is dropped.
                        attempts.permit = None;
                        return Poll::Ready(Err(err));
                    }
                    let req = attempts.request(attempts.retry_body());
                    this.state.set(State::Calling {
                        fut: inner.call(req),
                    });
                }
            }
        }
    }
}
