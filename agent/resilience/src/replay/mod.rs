//! A request body that can be sent again on retry, like linkerd2-proxy's `ReplayBody` and Envoy's
//! retry buffer: the first attempt streams the original body while up to `max_bytes` of it is
//! recorded; a clone replays the recorded data and trailers, then continues the original where the
//! earlier attempt stopped reading it.
//!
//! Only one clone reads at a time. The reader owns the shared state (no lock per frame) and hands it
//! back when dropped; a clone polled while another still holds it waits for that drop. Once more than
//! `max_bytes` has been recorded the recording is dropped and the body is capped: it can no longer be
//! replayed, and the retry layer stops retrying (Envoy abandons the retry state the same way when the
//! request outgrows its buffer).

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use parking_lot::Mutex;
use sluice_core::{Body, BoxError};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// How much of a request body is kept for retries by default: Envoy's router buffers a request for
/// retries up to the connection's buffer limit, `per_connection_buffer_limit_bytes`, 1 MiB by default
/// and left alone by Istio on sidecars.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;

/// Why a clone cannot produce the body again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The body was larger than the retry buffer.
    #[error("request body exceeded the {0}-byte retry buffer and cannot be replayed; raise the limit or make the request smaller")]
    Capped(usize),
    /// Reading the original body failed on an earlier attempt.
    #[error("request body failed on an earlier attempt and cannot be replayed")]
    Failed,
}

/// A replayable request body; see the module docs.
pub struct ReplayBody {
    /// The shared state while this clone is the reader.
    state: Option<State>,
    shared: Arc<Shared>,
    /// Recorded chunks (and their bytes) this clone has produced.
    pos: usize,
    pos_bytes: usize,
    trailers_sent: bool,
    done: bool,
}

struct Shared {
    slot: Mutex<Slot>,
    capped: AtomicBool,
    max_bytes: usize,
}

struct Slot {
    state: Option<State>,
    waiters: Vec<Waker>,
}

struct State {
    /// The rest of the original body; `None` once it ended or failed.
    original: Option<Body>,
    failed: bool,
    /// Data chunks read from the original so far; `recorded` holds all of them unless capped.
    chunks_read: usize,
    recorded: Vec<Bytes>,
    recorded_bytes: usize,
    trailers: Option<HeaderMap>,
}

impl ReplayBody {
    /// Wraps `body`, recording up to `max_bytes` of it. The returned value is the first attempt's
    /// body; clone it for later attempts.
    pub fn new(body: Body, max_bytes: usize) -> Self {
        let state = State {
            original: Some(body),
            failed: false,
            chunks_read: 0,
            recorded: Vec::new(),
            recorded_bytes: 0,
            trailers: None,
        };
        Self {
            state: Some(state),
            shared: Arc::new(Shared {
                slot: Mutex::new(Slot {
                    state: None,
                    waiters: Vec::new(),
                }),
                capped: AtomicBool::new(false),
                max_bytes,
            }),
            pos: 0,
            pos_bytes: 0,
            trailers_sent: false,
            done: false,
        }
    }

    /// Whether more than `max_bytes` was read, so that the body cannot be sent again.
    pub fn is_capped(&self) -> bool {
        self.shared.capped.load(Ordering::Acquire)
    }

    fn acquire(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.state.is_some() {
            return Poll::Ready(());
        }
        let mut slot = self.shared.slot.lock();
        match slot.state.take() {
            Some(state) => {
                self.state = Some(state);
                Poll::Ready(())
            }
            None => {
                if !slot.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    slot.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Clone for ReplayBody {
    fn clone(&self) -> Self {
        Self {
            state: None,
            shared: self.shared.clone(),
            pos: 0,
            pos_bytes: 0,
            trailers_sent: false,
            done: false,
        }
    }
}

impl Drop for ReplayBody {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            let waiters = {
                let mut slot = self.shared.slot.lock();
                slot.state = Some(state);
                std::mem::take(&mut slot.waiters)
            };
            waiters.into_iter().for_each(Waker::wake);
        }
    }
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        futures_util::ready!(this.acquire(cx));
        let shared = &this.shared;
        let state = this.state.as_mut().expect("acquired");

        // First what earlier attempts already read.
        if this.pos < state.chunks_read {
            if shared.capped.load(Ordering::Acquire) {
                this.done = true;
                return Poll::Ready(Some(Err(ReplayError::Capped(shared.max_bytes).into())));
            }
            let chunk = state.recorded[this.pos].clone();
            this.pos += 1;
            this.pos_bytes += chunk.len();
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }

        // Then the rest of the original.
        if let Some(original) = state.original.as_mut() {
            match futures_util::ready!(Pin::new(original).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            state.chunks_read += 1;
                            this.pos += 1;
                            this.pos_bytes += data.len();
                            if !shared.capped.load(Ordering::Relaxed) {
                                state.recorded_bytes += data.len();
                                if state.recorded_bytes > shared.max_bytes {
                                    shared.capped.store(true, Ordering::Release);
                                    state.recorded = Vec::new();
                                } else {
                                    state.recorded.push(data.clone());
                                }
                            }
                            Frame::data(data)
                        }
                        Err(frame) => {
                            if let Some(trailers) = frame.trailers_ref() {
                                state.trailers = Some(trailers.clone());
                                this.trailers_sent = true;
                            }
                            frame
                        }
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Err(err)) => {
                    state.original = None;
                    state.failed = true;
                    this.done = true;
                    return Poll::Ready(Some(Err(err)));
                }
                None => state.original = None,
            }
        }

        if state.failed {
            this.done = true;
            return Poll::Ready(Some(Err(ReplayError::Failed.into())));
        }
        if !this.trailers_sent {
            if let Some(trailers) = &state.trailers {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers.clone()))));
            }
        }
        this.done = true;
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        match &self.state {
            Some(state) => {
                !state.failed
                    && self.pos >= state.chunks_read
                    && state.original.as_ref().is_none_or(HttpBody::is_end_stream)
                    && (state.trailers.is_none() || self.trailers_sent)
            }
            None => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        let Some(state) = &self.state else {
            return SizeHint::default();
        };
        if self.shared.capped.load(Ordering::Relaxed) && self.pos < state.chunks_read {
            return SizeHint::default();
        }
        let recorded_left = (state.recorded_bytes.saturating_sub(self.pos_bytes)) as u64;
        match &state.original {
            None => SizeHint::with_exact(recorded_left),
            Some(original) => {
                let rest = original.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + recorded_left);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + recorded_left);
                }
                hint
            }
        }
    }
}

impl std::fmt::Debug for ReplayBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayBody")
            .field("reader", &self.state.is_some())
            .field("capped", &self.is_capped())
            .field("pos", &self.pos)
            .finish()
    }
}

#[cfg(test)]
mod tests;
