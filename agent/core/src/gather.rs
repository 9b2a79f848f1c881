//! Small vectored writes sent as one plain write.
//!
//! hyper hands a connection's pending bytes over as slices (a message's head, then its body) and
//! tokio writes several slices with `writev(2)`, one with `send(2)`. On Linux a socket's `writev`
//! takes the file layer's path (the file position lock, the permission hook, the I/O vector copied
//! in and checked), which `send` skips. Sampled with `perf` under load, that path took about 0.4 us
//! per proxied request more than `send` (about half of the kernel time per request the proxy
//! spent beyond HAProxy's, which sends with `sendto(2)`). A proxied request's writes are mostly
//! small (a head and a short body), and copying them into one stack buffer costs far less. Larger
//! writes stay vectored: the copy would outgrow what it saves.
//!
//! hyper still sees a vectored writer and keeps its queue of slices: flattening them in hyper's own
//! buffer instead would pin that buffer at its largest size for the connection's life.

use smallvec::SmallVec;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// The most bytes copied to send several slices at once: a response head with a body of a few
/// KiB. The copy of that much takes less time than `writev`'s extra path on this class of machine.
pub const GATHER_MAX: usize = 4096;

/// Writes `bufs` to `io`: one slice as it is, several totalling at most [`GATHER_MAX`] bytes as one
/// copy, more than that vectored. Returns what `io` wrote, as `poll_write_vectored` would: the
/// count is of the slices' bytes in order.
pub fn poll_write_gathered<W: AsyncWrite + ?Sized>(
    io: Pin<&mut W>,
    cx: &mut Context<'_>,
    bufs: &[IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    let total = bufs.iter().map(|b| b.len()).sum::<usize>();
    match bufs.iter().find(|b| !b.is_empty()) {
        None => io.poll_write(cx, &[]),
        Some(only) if only.len() == total => io.poll_write(cx, only),
        Some(_) if total > GATHER_MAX => io.poll_write_vectored(cx, bufs),
        Some(_) => {
            let mut copy = SmallVec::<[u8; GATHER_MAX]>::new();
            for b in bufs {
                copy.extend_from_slice(b);
            }
            io.poll_write(cx, &copy)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each call it gets and accepts at most `limit` bytes of it.
    struct Recorder {
        calls: Vec<(&'static str, Vec<u8>)>,
        limit: usize,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.limit);
            self.calls.push(("write", buf.to_vec()));
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all = bufs
                .iter()
                .flat_map(|b| b.iter().copied())
                .collect::<Vec<_>>();
            let n = all.len().min(self.limit);
            self.calls.push(("writev", all));
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write(limit: usize, bufs: &[&[u8]]) -> (usize, Vec<(&'static str, Vec<u8>)>) {
        let mut w = Recorder {
            calls: Vec::new(),
            limit,
        };
        let slices = bufs.iter().map(|b| IoSlice::new(b)).collect::<Vec<_>>();
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let Poll::Ready(Ok(n)) = poll_write_gathered(Pin::new(&mut w), &mut cx, &slices) else {
            panic!("the recorder is always ready");
        };
        (n, w.calls)
    }

    #[test]
    fn small_slices_go_out_as_one_write_of_their_bytes_in_order() {
        let (n, calls) = write(usize::MAX, &[b"HTTP/1.1 200 OK\r\n\r\n", b"", b"body"]);
        assert_eq!(n, 23);
        assert_eq!(calls, [("write", b"HTTP/1.1 200 OK\r\n\r\nbody".to_vec())]);
    }

    #[test]
    fn a_partial_write_counts_the_slices_bytes_in_order() {
        let (n, calls) = write(5, &[b"abc", b"defg"]);
        assert_eq!(n, 5);
        assert_eq!(calls, [("write", b"abcdefg".to_vec())]);
    }

    #[test]
    fn one_slice_is_written_as_it_is_whatever_its_size() {
        let big = vec![7u8; GATHER_MAX * 4];
        let (n, calls) = write(usize::MAX, &[b"", &big, b""]);
        assert_eq!(n, big.len());
        assert_eq!(calls, [("write", big)]);
        let (n, calls) = write(usize::MAX, &[]);
        assert_eq!((n, calls), (0, vec![("write", Vec::new())]));
    }

    #[test]
    fn more_than_the_gather_limit_stays_vectored() {
        let head = vec![1u8; 100];
        let body = vec![2u8; GATHER_MAX - 100];
        let (_, calls) = write(usize::MAX, &[&head, &body]);
        assert_eq!(calls[0].0, "write", "exactly the limit is copied");
        let body = vec![2u8; GATHER_MAX - 99];
        let (n, calls) = write(usize::MAX, &[&head, &body]);
        assert_eq!(n, GATHER_MAX + 1);
        assert_eq!(calls, [("writev", [head, body].concat())]);
    }
}
