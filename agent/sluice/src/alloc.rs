//! The agent's allocator, and the one thing the proxy asks of it: to give freed memory back.
#![allow(unsafe_code)]

/// jemalloc, not glibc's malloc: freeing a large configuration generation (tens of thousands of
/// clusters) took glibc several times as long, in free-list consolidation. Its thread-cache
/// settings are built in from `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused dirty pages go back to the kernel now.
const PURGE_ALL: &std::ffi::CStr = c"arena.4096.purge";

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
