//! A task's side futures (timers, shutdown signals) polled only when one of them woke it.
//!
//! A connection's task is woken several times per request by its socket, and each wake-up polled
//! every future it waits on. A timer's poll re-registers its waker (atomic read-modify-writes), a
//! `Notify` waiter's takes a lock. The side futures are polled with this waker instead: it marks
//! that one of them fired and wakes the task, and the task polls them again only then.

use futures_util::task::AtomicWaker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake};

/// The waker a task's side futures are polled with.
#[derive(Debug)]
pub struct SideWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl SideWake {
    /// Due at the task's first poll.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        })
    }

    /// The side futures are polled at the task's next poll (a loop's new turn, whose futures
    /// are new or were set again and must be registered).
    pub fn poll_next(&self) {
        self.woken.store(true, Ordering::Release);
    }

    /// Whether the side futures must be polled now (the first poll, after [`Self::poll_next`], or
    /// one of them woke the task); if so, the task's waker is registered for the next. The task's
    /// waker must not change between polls (a spawned task's does not).
    pub fn due(&self, cx: &Context<'_>) -> bool {
        // A load first: the usual answer costs no read-modify-write. A wake-up between the load
        // and the store is not lost: the future that woke is ready, and is polled next.
        if !self.woken.load(Ordering::Acquire) {
            return false;
        }
        self.woken.store(false, Ordering::Release);
        self.task.register(cx.waker());
        true
    }
}

impl Wake for SideWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_wakes::Wakes;
    use std::task::Waker;

    #[test]
    fn due_at_first_then_only_after_a_side_wake() {
        let (task, task_waker) = Wakes::new();
        let cx = Context::from_waker(&task_waker);
        let side = SideWake::new();
        let side_waker = Waker::from(side.clone());

        assert!(side.due(&cx), "the first poll");
        assert!(!side.due(&cx), "nothing woke it");
        side_waker.wake_by_ref();
        assert_eq!(task.count(), 1, "the task is woken");
        assert!(side.due(&cx));
        assert!(!side.due(&cx));
        side.poll_next();
        assert!(side.due(&cx), "a new turn");
        assert_eq!(task.count(), 1, "without waking the task");
        // Registered again when due: the next side wake-up wakes the task again.
        side_waker.wake_by_ref();
        assert_eq!(task.count(), 2);
    }
}
