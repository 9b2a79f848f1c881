//! The proxy's side of redirection: an accepted connection's original destination. The 4-tuple
//! map first (filled by `sock_ops` for redirected pods; the `cgroup/getsockopt` program answers
//! only processes inside the attach cgroup, which the agent usually is not), then
//! `getsockopt(SO_ORIGINAL_DST)` on the socket, which also covers iptables `REDIRECT`. Counts
//! where each answer came from.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use crate::Maps;

/// Where the original destinations came from, so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LookupCounts {
    pub from_map: u64,
    pub from_sockopt: u64,
    pub unknown: u64,
}

#[derive(Default)]
struct Counts {
    map: AtomicU64,
    sockopt: AtomicU64,
    unknown: AtomicU64,
}

/// Looks up accepted connections' original destinations.
#[derive(Clone)]
pub struct OriginalDstLookup {
    maps: Arc<Maps>,
    counts: Arc<Counts>,
}

impl OriginalDstLookup {
    pub fn new(maps: Arc<Maps>) -> Self {
        OriginalDstLookup {
            maps,
            counts: Arc::default(),
        }
    }

    /// The original destination of an accepted connection, if it was redirected.
    pub fn lookup(&self, stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
        let (Ok(peer), Ok(local)) = (stream.peer_addr(), stream.local_addr()) else {
            return None;
        };
        if let Some(dst) = self.maps.original_dst(peer, local) {
            self.counts.map.fetch_add(1, Ordering::Relaxed);
            return Some(dst);
        }
        let dst = sockopt_original_dst(socket2::SockRef::from(stream), peer, local);
        match dst {
            Some(_) => self.counts.sockopt.fetch_add(1, Ordering::Relaxed),
            None => self.counts.unknown.fetch_add(1, Ordering::Relaxed),
        };
        dst
    }

    pub fn counts(&self) -> LookupCounts {
        LookupCounts {
            from_map: self.counts.map.load(Ordering::Relaxed),
            from_sockopt: self.counts.sockopt.load(Ordering::Relaxed),
            unknown: self.counts.unknown.load(Ordering::Relaxed),
        }
    }
}

/// `SO_ORIGINAL_DST` (IPv4 first for IPv4 and IPv4-mapped peers), unless it only repeats the
/// socket's own address (conntrack's answer for a connection that was not NATed).
pub fn sockopt_original_dst(
    sock: socket2::SockRef<'_>,
    peer: SocketAddr,
    local: SocketAddr,
) -> Option<SocketAddr> {
    let v4_conn = local.is_ipv4() || peer.ip().to_canonical().is_ipv4();
    let found = if v4_conn {
        sock.original_dst_v4().or_else(|_| sock.original_dst_v6())
    } else {
        sock.original_dst_v6()
    };
    found
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .filter(|a| *a != local && *a != SocketAddr::new(local.ip().to_canonical(), local.port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain loopback connection was not redirected: no original destination, whether or not
    /// conntrack knows the socket.
    #[test]
    fn a_connection_that_was_not_redirected_has_none() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, peer) = l.accept().unwrap();
        let local = s.local_addr().unwrap();
        assert_eq!(
            sockopt_original_dst(socket2::SockRef::from(&s), peer, local),
            None
        );
    }
}
