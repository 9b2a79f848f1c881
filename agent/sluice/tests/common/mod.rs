//! Helpers shared by the `sluice` binary's integration tests.

use std::net::TcpListener;
use std::time::{Duration, Instant};

/// A loopback port nothing listens on, for an agent the test restarts on the same ports (the
/// eBPF programs need the outbound port before the listener opens). Chosen outside the kernel's
/// ephemeral range (`net.ipv4.ip_local_port_range`), which is where a port-0 listener or an
/// outgoing connection of any other test gets its port: so none of them can take it between this
/// check and the agent's bind. What is left is another caller picking the same one of thousands
/// of ports at random in the same instant.
#[allow(dead_code)] // not every test binary starts an eBPF agent
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let (low, high) = range
        .as_deref()
        .and_then(|r| {
            let mut it = r.split_whitespace().map(|p| p.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    // Below the range when there is room, else above it.
    let (first, last) = if low > 11_000 {
        (10_000, low - 1)
    } else {
        (high + 1, 65_535)
    };
    assert!(
        last > first + 1000,
        "no room outside the ephemeral ports {low}-{high}"
    );
    let span = last - first + 1;
    let start = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    for i in 0..span {
        let port = first + (start.wrapping_add(u64::from(i)) % u64::from(span)) as u32;
        let port = u16::try_from(port).expect("a port number");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("every port in {first}-{last} is taken");
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
