//! Where a request's record is finished: when the last byte of its response has gone to the client
//! (Envoy logs a stream when it ends, so the duration and the response size cover the body), or
//! when the response is dropped first (the client went away: `DC`). The request body is counted on
//! its way upstream.

use crate::state::State;
use bytes::Bytes;
use http::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use sluice_core::{Body, BoxError, RequestInfo, ResponseFlags};
use sluice_telemetry::{Record, Telemetry};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::time::Instant;

/// A request's record, finished exactly once. Finishing consumes it: the record moves into the
/// telemetry (and its ring of recent requests) without a copy.
pub(crate) struct Finish {
    /// Taken only by `done` or `drop`, which end the `Finish`: present whenever it can be reached.
    open: Option<Open>,
}

struct Open {
    telemetry: Telemetry,
    /// The generation the request ran under: who its endpoints were.
    state: Arc<State>,
    record: Record,
    started: Instant,
    /// The request's place in its pod's budget, given back when the request is recorded.
    held: Option<crate::isolation::RequestSlot>,
}

impl Open {
    /// Records the request now: its access-log entry, metric samples and spans.
    fn report(mut self) {
        self.held = None;
        self.record.duration = self.started.elapsed();
        let state = &self.state;
        self.telemetry
            .request(self.record, &|addr| state.endpoint_identity(addr));
    }
}

impl Finish {
    /// The record of a request the connection got at `started`.
    pub(crate) fn new(
        telemetry: Telemetry,
        state: Arc<State>,
        record: Record,
        started: Instant,
    ) -> Self {
        Self {
            open: Some(Open {
                telemetry,
                state,
                record,
                started,
                held: None,
            }),
        }
    }

    fn open(&mut self) -> &mut Open {
        self.open
            .as_mut()
            .expect("a Finish is open until `done` or `drop` consumes it")
    }

    /// The record, to fill in before it is finished.
    pub(crate) fn record(&mut self) -> &mut Record {
        &mut self.open().record
    }

    /// Holds `slot` until the request ends.
    pub(crate) fn hold(&mut self, slot: crate::isolation::RequestSlot) {
        self.open().held = Some(slot);
    }

    /// Records the request now.
    pub(crate) fn done(mut self) {
        if let Some(open) = self.open.take() {
            open.report();
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            // Dropped before the response was complete: the client went away.
            open.record
                .info
                .add_flags(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
            open.report();
        }
    }
}

pin_project! {
    /// A response body that finishes its request's record when it ends.
    pub(crate) struct RecordedBody {
        #[pin]
        inner: Body,
        // `None` once finished.
        finish: Option<Finish>,
        // The upstream's error, held for one poll (see `poll_frame`).
        failed: Option<BoxError>,
    }
}

impl RecordedBody {
    /// `rsp` with its record: status, header size and gRPC status taken now, body counted as it
    /// goes.
    pub(crate) fn wrap(rsp: Response<Body>, mut finish: Finish) -> Response<Body> {
        let (parts, body) = rsp.into_parts();
        let record = finish.record();
        record.status = parts.status.as_u16();
        record.response_bytes = sluice_telemetry::header_bytes(&parts.headers) + 17;
        record.grpc_status = grpc_status(&parts.headers);
        let finish = if body.is_end_stream() {
            // hyper may never poll an empty body.
            finish.done();
            None
        } else {
            Some(finish)
        };
        let body = RecordedBody {
            inner: body,
            finish,
            failed: None,
        };
        Response::from_parts(parts, sluice_core::boxed(body))
    }
}

/// Finishes the record now if it is not finished yet.
fn finish_now(finish: &mut Option<Finish>) {
    if let Some(f) = finish.take() {
        f.done();
    }
}

const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

impl HttpBody for RecordedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Some(err) = this.failed.take() {
            return Poll::Ready(Some(Err(err)));
        }
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        let Some(finish) = this.finish.as_mut() else {
            return Poll::Ready(frame);
        };
        match &frame {
            Some(Ok(f)) => {
                let record = finish.record();
                if let Some(data) = f.data_ref() {
                    record.response_bytes += data.len() as u64;
                }
                if let Some(trailers) = f.trailers_ref() {
                    if let Some(code) = grpc_status(trailers) {
                        record.grpc_status = Some(code);
                    }
                }
                // hyper stops polling once the body says it has ended.
                if this.inner.is_end_stream() {
                    finish_now(this.finish);
                }
            }
            // The upstream cut the body short: the client gets a truncated response.
            Some(Err(err)) => {
                let info = &finish.record().info;
                match sluice_core::ProxyError::find(err) {
                    Some(pe) if pe.details(true).is_some() => {
                        info.add_flags(pe.flag());
                        info.set_details(pe.details(true).unwrap_or_default());
                    }
                    // The route timeout passed in the body: the proxy reset the upstream stream
                    // itself, and Envoy's router (`onResponseTimeout`) flags only `UT`.
                    Some(pe @ sluice_core::ProxyError::RequestTimeout(_)) => {
                        info.add_flags(pe.flag());
                    }
                    _ => info.add_flags(ResponseFlags::UPSTREAM_CONNECTION_TERMINATION),
                }
                finish_now(this.finish);
                // hyper drops an HTTP/1 connection at a body error without writing what it has
                // buffered, so when the cut arrives with the head (one read) the client would see
                // no response at all. Pending once lets it flush the head and the bytes so far;
                // then the error ends the stream, as Envoy's client sees it: a 200, cut short.
                if let Some(Err(err)) = frame {
                    *this.failed = Some(err);
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            None => {
                finish_now(this.finish);
            }
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

pin_project! {
    /// A request body whose bytes are counted into the request's record as they are read.
    pub(crate) struct CountedBody<B> {
        #[pin]
        inner: B,
        info: Arc<RequestInfo>,
        ended: bool,
    }
}

impl<B> CountedBody<B> {
    pub(crate) fn new(inner: B, info: Arc<RequestInfo>) -> Self {
        Self {
            inner,
            info,
            ended: false,
        }
    }
}

impl<B> HttpBody for CountedBody<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                this.info.add_request_bytes(data.len() as u64);
            }
        }
        // The request is complete with its body's last frame (or its end, when the reader asks
        // once more): the upstream's time starts there.
        let ended = match &frame {
            None => true,
            Some(Ok(_)) => this.inner.is_end_stream(),
            Some(Err(_)) => false,
        };
        if ended && !*this.ended {
            *this.ended = true;
            this.info.completed_at(Instant::now().into_std());
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
