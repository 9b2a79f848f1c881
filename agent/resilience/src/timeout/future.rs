//! The timed response future, and the body that carries the route deadline past the headers.

use super::Scope;
use bytes::Bytes;
use futures_util::ready;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use sluice_core::{Body, BoxError, Deadline, Expiry, ProxyError, RequestInfo, ResponseFlags};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{sleep, sleep_until, Sleep};

pin_project! {
    /// Response future of [`Timeout`](super::Timeout).
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // `None` when no timeout applies: no timer is registered at all.
        #[pin]
        sleep: Option<Sleep>,
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
            sleep: None,
            timeout: Duration::ZERO,
            scope: Scope::PerTry,
            info: None,
            expiry: None,
        }
    }

    pub(crate) fn new(
        inner: F,
        timeout: Duration,
        scope: Scope,
        info: Option<Arc<RequestInfo>>,
        expiry: Expiry,
    ) -> Self {
        Self {
            inner,
            sleep: Some(sleep(timeout)),
            timeout,
            scope,
            info,
            expiry: Some(expiry),
        }
    }

    #[cfg(test)]
    pub(crate) fn is_passthrough(&self) -> bool {
        self.sleep.is_none()
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<Body>, BoxError>>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(mut sleep) = this.sleep.as_pin_mut() else {
            return this.inner.poll(cx);
        };
        match this.scope {
            Scope::Route => {
                // The deadline first: at a tie with a per-try timer below, the route timeout wins, as
                // Envoy ignores per-try timeouts that are not shorter than the route timeout.
                if sleep.as_mut().poll(cx).is_ready() {
                    fire(this.expiry.as_ref(), Deadline::Route);
                    return Poll::Ready(Err(request_timeout(*this.timeout, this.info.as_deref())));
                }
                let rsp = ready!(this.inner.poll(cx))?;
                if rsp.body().is_end_stream() {
                    return Poll::Ready(Ok(rsp));
                }
                let deadline = sleep.deadline();
                let timeout = *this.timeout;
                let info = this.info.take();
                Poll::Ready(Ok(rsp.map(|body| {
                    TimeoutBody {
                        inner: body,
                        sleep: sleep_until(deadline),
                        timeout,
                        info,
                        expiry: this.expiry.take(),
                        expired: false,
                    }
                    .boxed_unsync()
                })))
            }
            Scope::PerTry => {
                if let Poll::Ready(out) = this.inner.poll(cx) {
                    return Poll::Ready(out);
                }
                ready!(sleep.poll(cx));
                fire(this.expiry.as_ref(), Deadline::PerTry);
                Poll::Ready(Err(ProxyError::PerTryTimeout(*this.timeout).into()))
            }
        }
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
        #[pin]
        sleep: Sleep,
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
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            return Poll::Ready(frame);
        }
        ready!(this.sleep.poll(cx));
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
