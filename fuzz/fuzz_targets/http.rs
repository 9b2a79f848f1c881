//! Raw client bytes at the proxy's listeners, HTTP/1 and h2c, explicit and redirected (see
//! `sluice_fuzz_harness::front`).
#![no_main]

use std::sync::OnceLock;

static FRONT: OnceLock<sluice_fuzz_harness::front::Front> = OnceLock::new();

libfuzzer_sys::fuzz_target!(
    init: {
        // libFuzzer's `main` runs this target, not Rust's, which sets SIGPIPE to SIG_IGN before
        // every Rust program's `main` (the `sluice` binary's included): a write to a connection
        // the peer closed (hyper writes with writev, which cannot opt out of the signal) must be
        // an EPIPE error here too, as in the agent, not the end of the process.
        // SAFETY: called once before any thread of the target exists; SIG_IGN is a valid
        // disposition for SIGPIPE.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        }
    },
    |data: &[u8]| {
        FRONT.get_or_init(Default::default).exchange(data);
    }
);
