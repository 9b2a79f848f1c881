//! The timed response future, and the body that carries the route deadline past the headers.

use super::Scope;
use bytes::Bytes;
use futures_util::ready;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use sluice_core::{
    ArmedDeadline, Body, BoxError, ConnectionReady, Deadline, Expiry, ProxyError, RequestInfo,
    ResponseFlags,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::{sleep, sleep_until, Instant, Sleep};

pin_project! {
    /// Response future of [`Timeout`](super::Timeout).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // `None` when no timeout applies (no timer is registered at all), and for the route
        // timeout until the request body has ended. Movable as it is into the response body: one
        // timer per request, not one for the headers and another for the body.
        timer: Option<Timer>,
        // What starts the timer when it does not start at once.
        start: Option<Start>,
        timeout: Duration,
        scope: Scope,
        info: Option<Arc<RequestInfo>>,
        // Raised when the timer fires, before the inner future is dropped.
        expiry: Option<Expiry>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn passthrough(inner: F) -> Self {
        Self {
            inner,
            timer: None,
            start: None,
            timeout: Duration::ZERO,
            scope: Scope::PerTry,
            info: None,
            expiry: None,
        }
    }

    /// A timer of `timeout` that started (`timer`) or, with `start`, starts when `start` says so.
    pub(crate) fn new(
        inner: F,
        timeout: Duration,
        scope: Scope,
        info: Option<Arc<RequestInfo>>,
        expiry: Expiry,
        start: Option<Start>,
        timer: Option<Timer>,
    ) -> Self {
        debug_assert!(start.is_some() != timer.is_some());
        Self {
            inner,
            timer,
            start,
            timeout,
            scope,
            info,
            expiry: Some(expiry),
        }
    }

    #[cfg(test)]
    pub(crate) fn is_passthrough(&self) -> bool {
        self.timer.is_none() && self.start.is_none()
    }
}

/// A running timer: one of the request's own, or its deadline armed on its HTTP/1 connection's
/// timer (which wakes the connection's task, the one polling this future, when it passes).
pub(crate) enum Timer {
    Own(Pin<Box<Sleep>>),
    Conn(ArmedDeadline),
}

impl Timer {
    pub(crate) fn after(timeout: Duration) -> Self {
        Self::Own(Box::pin(sleep(timeout)))
    }

    fn until(at: Instant) -> Self {
        Self::Own(Box::pin(sleep_until(at)))
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Self::Own(sleep) => sleep.as_mut().poll(cx),
            // No waker to leave: the connection's task is woken, and polls this, when it passes.
            Self::Conn(armed) if armed.expired() => Poll::Ready(()),
            Self::Conn(_) => Poll::Pending,
        }
    }
}

/// What a timer that does not start at once waits for.
pub(crate) enum Start {
    /// The route timer: the end of the request body.
    BodyEnd(oneshot::Receiver<Instant>),
    /// The per-try timer: a connection for the attempt.
    Connection(ConnectionReady),
}

/// Whether the timer starts (`Some(at)`), never will (`None`: the request body failed or was
/// dropped unfinished, so the route timer never starts, as in Envoy), or not yet (`Pending`).
fn poll_start(start: &mut Option<Start>, cx: &mut Context<'_>) -> Poll<Option<Instant>> {
    let at = match start.as_mut() {
        None => return Poll::Ready(None),
        Some(Start::BodyEnd(rx)) => ready!(Pin::new(rx).poll(cx)).ok(),
        Some(Start::Connection(ready)) => {
            ready!(ready.poll_ready(cx));
            Some(Instant::now())
        }
    };
    *start = None;
    Poll::Ready(at)
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if this.timer.is_none() && this.start.is_none() {
            return this.inner.poll(cx);
        }
        if *this.scope == Scope::PerTry {
            // The attempt first: the cluster claims the connection signal when first polled.
            if let Poll::Ready(out) = this.inner.poll(cx) {
                return Poll::Ready(out);
            }
            if this.timer.is_none() {
                let at = ready!(poll_start(this.start, cx)).unwrap_or_else(Instant::now);
                *this.timer = Some(Timer::until(at + *this.timeout));
            }
            let timer = this.timer.as_mut().expect("set above");
            ready!(timer.poll_expired(cx));
            fire(this.expiry.as_ref(), Deadline::PerTry);
            return Poll::Ready(Err(ProxyError::PerTryTimeout(*this.timeout).into()));
        }
        if this.start.is_some() {
            if let Poll::Ready(Some(at)) = poll_start(this.start, cx) {
                *this.timer = Some(Timer::until(at + *this.timeout));
            }
        }
        let Some(timer) = this.timer.as_mut() else {
            // The upstream answered before the request body ended: the route timer starts with
            // the body's end and bounds the response body from then on.
            let rsp = ready!(this.inner.poll(cx))?;
            if rsp.body().is_end_stream() || this.start.is_none() {
                return Poll::Ready(Ok(rsp));
            }
            let timeout = *this.timeout;
            let body = TimeoutBody {
                inner: sluice_core::empty(),
                timer: None,
                start: this.start.take(),
                timeout,
                info: this.info.take(),
                expiry: this.expiry.take(),
                expired: false,
            };
            return Poll::Ready(Ok(
                rsp.map(|inner| TimeoutBody { inner, ..body }.boxed_unsync())
            ));
        };
        // The deadline first: at a tie with a per-try timer below, the route timeout wins, as
        // Envoy ignores per-try timeouts that are not shorter than the route timeout.
        if timer.poll_expired(cx).is_ready() {
            fire(this.expiry.as_ref(), Deadline::Route);
            return Poll::Ready(Err(request_timeout(*this.timeout, this.info.as_deref())));
        }
        let rsp = ready!(this.inner.poll(cx))?;
        if rsp.body().is_end_stream() {
            return Poll::Ready(Ok(rsp));
        }
        let timeout = *this.timeout;
        let info = this.info.take();
        Poll::Ready(Ok(rsp.map(|body| {
            TimeoutBody {
                inner: body,
                // The timer registered for the headers, with its deadline: it bounds the body.
                timer: this.timer.take(),
                start: None,
                timeout,
                info,
                expiry: this.expiry.take(),
                expired: false,
            }
            .boxed_unsync()
        })))
    }
}

fn fire(expiry: Option<&Expiry>, deadline: Deadline) {
    if let Some(expiry) = expiry {
        expiry.fire(deadline);
    }
}

fn request_timeout(timeout: Duration, info: Option<&RequestInfo>) -> BoxError {
    if let Some(info) = info {
        info.add_flags(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
    }
    ProxyError::RequestTimeout(timeout).into()
}

pin_project! {
    /// A response body that fails with [`ProxyError::RequestTimeout`] if the route deadline passes
    /// before it ends.
    struct TimeoutBody {
        #[pin]
        inner: Body,
        // `None` until the request body has ended (`start`), or for good if it never does.
        timer: Option<Timer>,
        start: Option<Start>,
        timeout: Duration,
        info: Option<Arc<RequestInfo>>,
        expiry: Option<Expiry>,
        expired: bool,
    }
}

impl HttpBody for TimeoutBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        if this.start.is_some() {
            if let Poll::Ready(Some(at)) = poll_start(this.start, cx) {
                *this.timer = Some(Timer::until(at + *this.timeout));
            }
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let Some(timer) = this.timer.as_mut() else {
            return Poll::Pending;
        };
        ready!(timer.poll_expired(cx));
        *this.expired = true;
        fire(this.expiry.as_ref(), Deadline::Route);
        Poll::Ready(Some(Err(request_timeout(
            *this.timeout,
            this.info.as_deref(),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// The request body under a route timeout: says when it has ended, which starts the timer.
    pub(crate) struct EndSignal {
        #[pin]
        inner: Body,
        done: Option<oneshot::Sender<Instant>>,
    }
}

impl EndSignal {
    pub(crate) fn new(inner: Body) -> (Self, oneshot::Receiver<Instant>) {
        let (tx, rx) = oneshot::channel();
        (
            Self {
                inner,
                done: Some(tx),
            },
            rx,
        )
    }
}

impl HttpBody for EndSignal {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            // A failed body never completes: dropping the sender says so.
            Some(Err(_)) => drop(this.done.take()),
            // Readers stop at `is_end_stream` (a body of known length) or at `None`.
            None => signal(this.done),
            Some(Ok(_)) if this.inner.is_end_stream() => signal(this.done),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn signal(done: &mut Option<oneshot::Sender<Instant>>) {
    if let Some(tx) = done.take() {
        let _ = tx.send(Instant::now());
    }
}
