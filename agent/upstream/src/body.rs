//! The response body handed back to the proxy. It holds the attempt's resources (the connection or
//! stream, the active-request counts) until the body ends: at end of stream an h1 connection goes
//! back to idle; if the body is dropped early (the client stopped reading or went away) the
//! connection is closed instead (it is mid-message) and nothing is reported; if the upstream cuts
//! the body short, that is an upstream reset and is reported as one.

use crate::cluster::{classify, Attempt};
use crate::outcome::Event;
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
        attempt: Attempt,
    }
}

impl UpstreamBody {
    pub(crate) fn new(inner: Incoming, mut attempt: Attempt) -> Self {
        // An empty body may never be polled (hyper checks `is_end_stream` first): finish now.
        if inner.is_end_stream() {
            attempt.finish();
        }
        Self { inner, attempt }
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
        let frame = match ready!(this.inner.as_mut().poll_frame(cx)) {
            None => {
                this.attempt.finish();
                None
            }
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.attempt.add_response_bytes(data.len());
                }
                if this.inner.is_end_stream() {
                    this.attempt.finish();
                }
                Some(Ok(frame))
            }
            // The upstream cut the body short (closed or reset mid-response): Envoy reports this
            // reset to outlier detection as it does one before headers. The connection is unusable.
            Some(Err(err)) => {
                let err = classify(err);
                Some(Err(this.attempt.ended(err, |e| Event::Failed(e)).into()))
            }
        };
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
