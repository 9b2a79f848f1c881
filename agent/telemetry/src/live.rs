//! A broadcast channel that tells, without taking a lock, whether anyone listens. Every finished
//! request asks before it formats or shares what it would send (`sluice logs`, `sluice tap`), and
//! usually nobody does; tokio's own count of receivers is read under the channel's lock, two
//! atomic read-modify-writes per question. Here the listeners keep a count of their own, which a
//! plain load reads. A listener that joins between the question and the send misses that one
//! item, as it would have joined a moment later.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::broadcast::{self, error::RecvError};

#[derive(Clone)]
pub struct Live<T> {
    tx: broadcast::Sender<T>,
    listeners: Arc<AtomicUsize>,
}

/// One listener of a [`Live`] channel; counted until dropped.
pub struct Listener<T> {
    rx: broadcast::Receiver<T>,
    listeners: Arc<AtomicUsize>,
}

impl<T: Clone> Live<T> {
    /// A channel that keeps up to `capacity` items for a slow listener (older ones are skipped:
    /// [`RecvError::Lagged`]).
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity);
        Self {
            tx,
            listeners: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn subscribe(&self) -> Listener<T> {
        self.listeners.fetch_add(1, Ordering::Relaxed);
        Listener {
            rx: self.tx.subscribe(),
            listeners: self.listeners.clone(),
        }
    }

    pub fn has_listeners(&self) -> bool {
        self.listeners.load(Ordering::Relaxed) > 0
    }

    /// Sends to whoever listens now; nobody listening is no error.
    pub fn send(&self, item: T) {
        let _ = self.tx.send(item);
    }
}

impl<T: Clone> Listener<T> {
    /// The next item, as [`broadcast::Receiver::recv`] gives it.
    pub async fn recv(&mut self) -> Result<T, RecvError> {
        self.rx.recv().await
    }

    /// The next item if one is waiting, as [`broadcast::Receiver::try_recv`] gives it.
    pub fn try_recv(&mut self) -> Result<T, broadcast::error::TryRecvError> {
        self.rx.try_recv()
    }
}

impl<T> Drop for Listener<T> {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_are_counted_while_they_live_and_get_what_is_sent() {
        let live = Live::new(4);
        assert!(!live.has_listeners());
        live.send(1u32);
        let mut a = live.subscribe();
        let b = live.subscribe();
        assert!(live.has_listeners());
        live.send(2);
        assert_eq!(a.recv().await, Ok(2));
        drop(b);
        assert!(live.has_listeners());
        drop(a);
        assert!(!live.has_listeners());
    }

    #[tokio::test]
    async fn a_slow_listener_is_told_what_it_missed() {
        let live = Live::new(2);
        let mut rx = live.subscribe();
        for i in 0..5u32 {
            live.send(i);
        }
        assert_eq!(rx.recv().await, Err(RecvError::Lagged(3)));
        assert_eq!(rx.recv().await, Ok(3));
    }
}
