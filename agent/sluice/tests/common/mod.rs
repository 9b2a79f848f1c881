//! Helpers shared by the `sluice` binary's integration tests.

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A loopback port nothing listens on right now. Racy (another process may take it before it is
/// used): only for the eBPF tests' outbound listener, whose port the programs need up front.
#[allow(dead_code)] // not every test binary starts an eBPF agent
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `limit`.
#[allow(clippy::disallowed_methods)] // plain std tests: blocking sleeps and wall-clock time
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(v) = f() {
            return Some((v, start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
