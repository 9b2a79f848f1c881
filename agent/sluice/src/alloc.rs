//! The agent's allocator, and what the agent asks of it: to give freed memory back, on its own
//! while the agent is idle and at once under memory pressure.
#![allow(unsafe_code)]

use std::ffi::CStr;

/// jemalloc, not glibc's malloc: freeing a large configuration generation (tens of thousands of
/// clusters) took glibc several times as long, in free-list consolidation. Its thread-cache
/// settings are built in from `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused dirty pages go back to the kernel now.
const PURGE_ALL: &CStr = c"arena.4096.purge";

/// Gives jemalloc's freed pages back to the kernel. jemalloc keeps them resident and returns
/// them only by decay, on allocator activity: after a burst, an agent under light load keeps its
/// peak resident size, which the memory overload check would read as pressure and shed for.
/// Called by that check, at most about once a second, before it sheds anything. Returns whether
/// jemalloc accepted the call.
pub fn release_free_memory() -> bool {
    // SAFETY: `mallctl` with a NUL-terminated name that takes no value and returns none: both
    // value pointers null and lengths zero, as jemalloc documents for `arena.<i>.purge`.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    rc == 0
}

/// Starts jemalloc's background thread, which returns freed pages to the kernel as they decay
/// (its default 10 s), whether or not anything allocates. Without it decay advances only on
/// allocator activity: after a burst, an idle agent kept its peak resident size until it
/// allocated again (measured here: 65 of a 74 MiB peak still resident 30 s later; 13 MiB
/// within 20 s with the thread), which is what a node's kubelet and OOM killer read. One thread
/// serves every arena: the agent allocates on a few threads, and a thread per CPU of a large
/// node would be idle weight. Only `sluice run` calls this; the CLI's short runs never start
/// the thread. Returns jemalloc's error code if it refused (a jemalloc built without
/// background-thread support).
pub fn purge_in_background() -> Result<(), i32> {
    // One thread first: enabling starts the threads, and the limit must be in force by then.
    write(c"max_background_threads", 1usize)?;
    write(c"background_thread", true)
}

/// Whether jemalloc's background thread is on.
#[cfg(test)]
fn purging_in_background() -> bool {
    let mut on = false;
    let mut len = std::mem::size_of::<bool>();
    // SAFETY: `background_thread` reads as a `bool`; `on` and `len` are valid for writes of
    // that size, and no new value is passed.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"background_thread".as_ptr(),
            (&mut on as *mut bool).cast(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    rc == 0 && on
}

/// Sets the jemalloc control `name` to `value`, of the type jemalloc documents for it.
fn write<T: Copy>(name: &CStr, mut value: T) -> Result<(), i32> {
    // SAFETY: `name` is NUL-terminated; the new value is read from `value`, valid for
    // `size_of::<T>()` bytes, and both callers pass the type the control takes (`size_t`,
    // `bool`); no old value is read.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            (&mut value as *mut T).cast(),
            std::mem::size_of::<T>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(rc)
    }
}

#[cfg(test)]
mod tests {
    /// The thread starts, on its own, and only one: the process's threads named as jemalloc
    /// names it.
    #[test]
    #[allow(clippy::disallowed_methods)] // a plain test thread: no runtime to block
    fn the_background_thread_starts_and_is_one() {
        super::purge_in_background().expect("jemalloc starts its background thread");
        assert!(super::purging_in_background());
        // Named by the thread itself once it runs: wait for it, bounded.
        let named = || {
            std::fs::read_dir("/proc/self/task")
                .expect("/proc/self/task")
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|comm| comm.trim() == "jemalloc_bg_thd")
                .count()
        };
        let mut seen = 0;
        for _ in 0..100 {
            seen = named();
            if seen > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(seen, 1, "jemalloc's background threads in this process");
    }
}
