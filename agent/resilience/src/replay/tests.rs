//! ReplayBody tests: replay, trailers, the cap and clones read concurrently.

use super::*;
use futures_util::FutureExt;
use http_body_util::{BodyExt, StreamBody};
use sluice_core::boxed;

/// A body of the given chunks, then optional trailers.
fn chunks(parts: &[&'static str], trailers: Option<HeaderMap>) -> Body {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
        .collect();
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    boxed(StreamBody::new(futures_util::stream::iter(frames)))
}

async fn read_all(body: ReplayBody) -> (Bytes, Option<HeaderMap>) {
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    (collected.to_bytes(), trailers)
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn replays_a_multi_chunk_body() {
    let first = ReplayBody::new(chunks(&["hello ", "wor", "ld"], None), 1024);
    let second = first.clone();
    let third = first.clone();
    assert_eq!(read_all(first).await.0, "hello world");
    assert_eq!(read_all(second).await.0, "hello world");
    assert_eq!(read_all(third).await.0, "hello world");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn replays_trailers() {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", "0".parse().unwrap());
    let first = ReplayBody::new(chunks(&["a", "b"], Some(t.clone())), 1024);
    let second = first.clone();
    assert_eq!(read_all(first).await, (Bytes::from("ab"), Some(t.clone())));
    assert_eq!(read_all(second).await, (Bytes::from("ab"), Some(t)));
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn clone_continues_where_the_first_attempt_stopped() {
    let mut first = ReplayBody::new(chunks(&["one", "two", "three"], None), 1024);
    let second = first.clone();
    let frame = first.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "one");
    // The upstream answered before reading the rest; the attempt is dropped.
    drop(first);
    let second_copy = second.clone();
    assert_eq!(read_all(second).await.0, "onetwothree");
    assert_eq!(read_all(second_copy).await.0, "onetwothree");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn over_the_limit_is_capped_and_not_replayable() {
    let first = ReplayBody::new(chunks(&["12345", "67890", "x"], None), 8);
    let second = first.clone();
    assert!(!first.is_capped());
    // The first attempt still gets the whole body.
    assert_eq!(read_all(first).await.0, "12345678 90x".replace(' ', ""));
    assert!(second.is_capped());
    let err = second.collect().await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<ReplayError>(),
        Some(&ReplayError::Capped(8))
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn exactly_the_limit_stays_replayable() {
    let first = ReplayBody::new(chunks(&["1234", "5678"], None), 8);
    let second = first.clone();
    assert_eq!(read_all(first).await.0, "12345678");
    assert!(!second.is_capped());
    assert_eq!(read_all(second).await.0, "12345678");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_clone_waits_while_another_reads() {
    let mut first = ReplayBody::new(chunks(&["a", "b"], None), 1024);
    let mut second = first.clone();
    assert_eq!(
        first.frame().await.unwrap().unwrap().into_data().unwrap(),
        "a"
    );

    // The first attempt still holds the body (e.g. the client is still writing it).
    let mut waiting = Box::pin(async move {
        let mut out = Vec::new();
        while let Some(frame) = second.frame().await {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        out
    });
    assert!((&mut waiting).now_or_never().is_none());

    drop(first);
    assert_eq!(waiting.await, b"ab");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn concurrent_clones_on_tasks() {
    let first = ReplayBody::new(chunks(&["x", "y", "z"], None), 1024);
    let clones: Vec<_> = (0..4).map(|_| first.clone()).collect();
    let handles: Vec<_> = clones
        .into_iter()
        .map(|c| tokio::spawn(async move { read_all(c).await.0 }))
        .collect();
    assert_eq!(read_all(first).await.0, "xyz");
    for h in handles {
        assert_eq!(h.await.unwrap(), "xyz");
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn empty_body_ends_at_once() {
    let first = ReplayBody::new(sluice_core::empty(), 1024);
    let second = first.clone();
    assert!(first.is_end_stream());
    assert_eq!(read_all(first).await.0, "");
    assert_eq!(read_all(second).await.0, "");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn size_hint_is_exact_once_recorded() {
    let first = ReplayBody::new(sluice_core::full("abcdef"), 1024);
    assert_eq!(first.size_hint().exact(), Some(6));
    let mut second = first.clone();
    read_all(first).await;
    second.frame().now_or_never(); // acquire
    assert!(second.is_end_stream());
}
