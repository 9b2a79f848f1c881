//! The response body handed back to the proxy. It holds the attempt's resources (the connection or
//! stream, the active-request counts) until the body ends: at end of stream an h1 connection goes
//! back to idle; if the body is dropped early the connection is closed instead (it is mid-message).

use crate::cluster::Attempt;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use sluice_core::BoxError;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

pin_project! {
    pub(crate) struct UpstreamBody {
        #[pin]
        inner: Incoming,
        flight: Attempt,
    }
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, mut flight: Attempt) -> Self {
        // An empty body may never be polled (hyper checks `is_end_stream` first): finish now.
        if inner.is_end_stream() {
            flight.finish();
        }
        Self { inner, flight }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            None => this.flight.finish(),
            Some(Ok(_)) if this.inner.is_end_stream() => this.flight.finish(),
            Some(Ok(_)) => {}
            // The connection is unusable; dropping the flight closes it.
            Some(Err(_)) => this.flight.abandon(),
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
