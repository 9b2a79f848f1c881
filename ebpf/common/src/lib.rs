//! Map keys and values shared by Sluice's eBPF programs (`ebpf/programs`) and the loader
//! (`agent/redirect`). Every type is `#[repr(C)]` with explicit padding fields, so a key built in
//! the kernel and one built in userspace compare equal byte for byte.
//!
//! Byte orders: IP addresses are kept exactly as the kernel stores them (network order, one `u32`
//! per 4 bytes; IPv4 uses `addr[0]` only and leaves the rest zero); ports are host order.
#![cfg_attr(not(test), no_std)]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `AF_INET` (Linux).
pub const AF_INET: u16 = 2;
/// `AF_INET6` (Linux).
pub const AF_INET6: u16 = 10;
/// `SO_ORIGINAL_DST` at level `SOL_IP`, and `IP6T_SO_ORIGINAL_DST` at level `SOL_IPV6`.
pub const SO_ORIGINAL_DST: i32 = 80;
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;

/// Names of the maps in the object file (the loader looks them up by these).
pub mod maps {
    pub const CONFIG: &str = "SLUICE_CONFIG";
    pub const ENROLLED: &str = "SLUICE_ENROLLED";
    pub const EXCLUDED_PORTS: &str = "SLUICE_EXCL_PORTS";
    pub const EXCLUDED_V4: &str = "SLUICE_EXCL_V4";
    pub const EXCLUDED_V6: &str = "SLUICE_EXCL_V6";
    pub const ORIG_BY_COOKIE: &str = "SLUICE_ORIG_COOKIE";
    pub const ORIG_BY_TUPLE: &str = "SLUICE_ORIG_TUPLE";
    pub const SOCKETS: &str = "SLUICE_SOCKETS";
    pub const COUNTERS: &str = "SLUICE_COUNTERS";
    /// A SOCKMAP holding the proxy's listening socket (index 0) while it listens.
    pub const LISTENER: &str = "SLUICE_LISTENER";
}

/// Names of the program functions in the object file (not their section names: a function named
/// like its section does not link).
pub mod programs {
    pub const CONNECT4: &str = "sluice_connect4";
    pub const CONNECT6: &str = "sluice_connect6";
    pub const SOCK_OPS: &str = "sluice_sock_ops";
    pub const SK_MSG: &str = "sluice_sk_msg";
    pub const GETSOCKOPT: &str = "sluice_getsockopt";
}

/// Capacity of the maps, shared so tests can reason about them.
pub const MAX_ENROLLED: u32 = 4096;
pub const MAX_EXCLUDED_PORTS: u32 = 256;
pub const MAX_EXCLUDED_CIDRS: u32 = 256;
pub const MAX_CONNECTIONS: u32 = 65536;
/// How many cgroup ancestors the connect programs check for enrollment (a pod's cgroup may hold
/// one cgroup per container).
pub const MAX_CGROUP_DEPTH: u32 = 16;

/// An address and port in the kernel's layout (see the module header for byte orders).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u32; 4],
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
}

impl Endpoint {
    pub const fn v4(addr_be: u32, port: u16) -> Self {
        Endpoint {
            addr: [addr_be, 0, 0, 0],
            port,
            family: AF_INET,
        }
    }

    pub const fn v6(addr_be: [u32; 4], port: u16) -> Self {
        Endpoint {
            addr: addr_be,
            port,
            family: AF_INET6,
        }
    }

    pub fn from_socket_addr(addr: SocketAddr) -> Self {
        match addr.ip() {
            IpAddr::V4(ip) => Self::v4(ip4_to_be(ip), addr.port()),
            IpAddr::V6(ip) => Self::v6(ip6_to_be(ip), addr.port()),
        }
    }

    /// `None` when the family is neither IPv4 nor IPv6 (an empty entry).
    pub fn to_socket_addr(&self) -> Option<SocketAddr> {
        let ip = match self.family {
            AF_INET => IpAddr::V4(be_to_ip4(self.addr[0])),
            AF_INET6 => IpAddr::V6(be_to_ip6(self.addr)),
            _ => return None,
        };
        Some(SocketAddr::new(ip, self.port))
    }
}

/// The destination a redirected socket asked for, saved by `connect4/6` (keyed by socket cookie)
/// and re-keyed by `sock_ops` (by [`TupleKey`]).
pub type OriginalDst = Endpoint;

/// One TCP connection as seen from the client: `src` is the client's (the pod's) address, `dst`
/// the proxy's. The proxy looks an accepted socket up as (peer, local). IPv4-mapped IPv6 addresses
/// are stored as IPv4 ([`TupleKey::canonical`]) so a dual-stack client meets an IPv4 proxy.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub family: u16,
    pub _pad: u16,
}

impl TupleKey {
    pub fn new(family: u16, src: [u32; 4], src_port: u16, dst: [u32; 4], dst_port: u16) -> Self {
        TupleKey {
            src,
            dst,
            src_port,
            dst_port,
            family,
            _pad: 0,
        }
        .canonical()
    }

    /// The same connection seen from the other end.
    pub fn reversed(&self) -> Self {
        TupleKey {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            family: self.family,
            _pad: 0,
        }
    }

    /// IPv4 form of a connection whose two addresses are IPv4-mapped IPv6 addresses; IPv4 keys
    /// keep only `addr[0]`.
    pub fn canonical(self) -> Self {
        let mut k = self;
        if k.family == AF_INET6 && is_v4_mapped(&k.src) && is_v4_mapped(&k.dst) {
            k.family = AF_INET;
            k.src = [k.src[3], 0, 0, 0];
            k.dst = [k.dst[3], 0, 0, 0];
        } else if k.family == AF_INET {
            k.src = [k.src[0], 0, 0, 0];
            k.dst = [k.dst[0], 0, 0, 0];
        }
        k
    }
}

/// Global settings, in slot 0 of the `SLUICE_CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// The proxy's outbound listener for IPv4 clients (network order).
    pub ip4: u32,
    /// The proxy's outbound listener for IPv6 clients (network order).
    pub ip6: [u32; 4],
    /// The outbound listener's port (host order).
    pub port: u16,
    /// [`ProxyConfig::ENABLED`] and friends.
    pub flags: u16,
    /// Redirect only while `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) is below this: the agent renews
    /// it while its listener serves, so a proxy that stopped or was killed fails open by itself.
    /// 0: never renewed, fail open.
    pub lease_until_ns: u64,
}

impl ProxyConfig {
    /// Redirect at all (cleared while the proxy is not serving: fail open).
    pub const ENABLED: u16 = 1;
    /// `ip4` is set: IPv4 connections may be redirected.
    pub const HAS_V4: u16 = 2;
    /// `ip6` is set: IPv6 connections may be redirected.
    pub const HAS_V6: u16 = 4;
    /// Emit aya-log debug lines (kept off on busy nodes).
    pub const DEBUG_LOG: u16 = 8;
    /// Do not put redirected connections' sockets into the SOCKHASH: no sk_msg fast path, and
    /// none of its cost in `connect()` (the kernel allocates a psock, a link and an element per
    /// socket). Clear (the default, also in maps pinned by older builds): fast path on.
    pub const NO_SOCKMAP: u16 = 16;
    /// `SLUICE_EXCL_PORTS` holds entries: `connect4/6` look the destination port up. Clear, they
    /// skip the lookup (a hash lookup per redirected `connect()`).
    pub const EXCL_PORTS: u16 = 32;
    /// `SLUICE_EXCL_V4` holds entries (an LPM lookup per redirected IPv4 `connect()` otherwise).
    pub const EXCL_V4: u16 = 64;
    /// `SLUICE_EXCL_V6` holds entries.
    pub const EXCL_V6: u16 = 128;
    /// The agent put its listening socket into `SLUICE_LISTENER`: redirect only while it is
    /// there. The kernel removes a socket from a SOCKMAP when it closes, so once the agent is
    /// gone (SIGKILL, crash) new connections fail open at once instead of being refused until
    /// the lease runs out. Clear (an agent that could not register, or an older one): the lease
    /// alone decides.
    pub const LISTENER: u16 = 256;
    /// Flags that are settings of the operator or describe the exclusion maps, kept when the
    /// proxy's address changes.
    pub const SETTINGS: u16 =
        Self::DEBUG_LOG | Self::NO_SOCKMAP | Self::EXCL_PORTS | Self::EXCL_V4 | Self::EXCL_V6;

    pub fn enabled(&self) -> bool {
        self.flags & Self::ENABLED != 0
    }

    /// Whether a `connect()` at monotonic time `now_ns` may be redirected: enabled and leased.
    pub fn redirects_at(&self, now_ns: u64) -> bool {
        self.enabled() && now_ns < self.lease_until_ns
    }
}

/// Value of `SLUICE_ENROLLED` (key: cgroup v2 id, the inode number of the cgroup's directory).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledCgroup {
    /// [`EnrolledCgroup::REDIRECT`].
    pub flags: u32,
    /// Free for the agent (e.g. an index into its pod table); the programs ignore it.
    pub tag: u32,
}

impl EnrolledCgroup {
    /// Redirect this cgroup's outbound TCP connections to the proxy.
    pub const REDIRECT: u32 = 1;
}

/// Index of one counter in the `SLUICE_COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Counter {
    /// `connect()` calls the connect4/6 programs saw.
    ConnectSeen = 0,
    /// ... from an enrolled cgroup, rewritten to the proxy.
    ConnectRedirected,
    /// ... from an enrolled cgroup, left alone: loopback, the proxy itself, an exclusion, or no
    /// proxy address for the family.
    ConnectSkipped,
    /// ... whose original destination could not be saved (map full).
    ConnectSaveFailed,
    /// `sock_ops` established callbacks.
    SockOpsEstablished,
    /// ... whose original destination was re-keyed by 4-tuple.
    SockOpsTupleSaved,
    /// ... sockets put into the SOCKHASH.
    SockOpsSockhashInserted,
    /// ... SOCKHASH inserts that failed.
    SockOpsSockhashFailed,
    /// ... original destinations forgotten when the proxy's end closed.
    SockOpsTupleRemoved,
    /// `sendmsg` calls the `sk_msg` program saw.
    SkMsgSeen,
    /// ... redirected to the peer socket (the fast path).
    SkMsgRedirected,
    /// `getsockopt(SO_ORIGINAL_DST)` calls the getsockopt program saw.
    GetsockoptSeen,
    /// ... answered from the 4-tuple map.
    GetsockoptAnswered,
    /// `connect()`s from an enrolled cgroup left alone because the proxy is not serving
    /// (redirection disabled, or its lease expired): fail open.
    ConnectFailOpen,
}

impl Counter {
    pub const COUNT: u32 = 14;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::ConnectSeen,
        Counter::ConnectRedirected,
        Counter::ConnectSkipped,
        Counter::ConnectSaveFailed,
        Counter::SockOpsEstablished,
        Counter::SockOpsTupleSaved,
        Counter::SockOpsSockhashInserted,
        Counter::SockOpsSockhashFailed,
        Counter::SockOpsTupleRemoved,
        Counter::SkMsgSeen,
        Counter::SkMsgRedirected,
        Counter::GetsockoptSeen,
        Counter::GetsockoptAnswered,
        Counter::ConnectFailOpen,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectSeen => "connect_seen",
            Counter::ConnectRedirected => "connect_redirected",
            Counter::ConnectSkipped => "connect_skipped",
            Counter::ConnectSaveFailed => "connect_save_failed",
            Counter::SockOpsEstablished => "sock_ops_established",
            Counter::SockOpsTupleSaved => "sock_ops_tuple_saved",
            Counter::SockOpsSockhashInserted => "sock_ops_sockhash_inserted",
            Counter::SockOpsSockhashFailed => "sock_ops_sockhash_failed",
            Counter::SockOpsTupleRemoved => "sock_ops_tuple_removed",
            Counter::SkMsgSeen => "sk_msg_seen",
            Counter::SkMsgRedirected => "sk_msg_redirected",
            Counter::GetsockoptSeen => "getsockopt_seen",
            Counter::GetsockoptAnswered => "getsockopt_answered",
            Counter::ConnectFailOpen => "connect_fail_open",
        }
    }
}

/// An IPv4 address as the kernel stores it (network order in a `u32`).
pub fn ip4_to_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn be_to_ip4(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(addr.to_ne_bytes())
}

/// An IPv6 address as the kernel stores it (network order, four `u32`).
pub fn ip6_to_be(ip: Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

pub fn be_to_ip6(addr: [u32; 4]) -> Ipv6Addr {
    let mut o = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = addr[i].to_ne_bytes();
        o[i * 4] = b[0];
        o[i * 4 + 1] = b[1];
        o[i * 4 + 2] = b[2];
        o[i * 4 + 3] = b[3];
        i += 1;
    }
    Ipv6Addr::from(o)
}

/// `::ffff:a.b.c.d`.
pub fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// 127.0.0.0/8 (network-order `u32`).
pub fn is_loopback4(addr_be: u32) -> bool {
    addr_be.to_ne_bytes()[0] == 127
}

/// `::1`, or an IPv4-mapped loopback address.
pub fn is_loopback6(addr: &[u32; 4]) -> bool {
    (addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1]))
        || (is_v4_mapped(addr) && is_loopback4(addr[3]))
}

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` for every map key and value, so the loader can read and write them.
    use super::{Endpoint, EnrolledCgroup, ProxyConfig, TupleKey};

    // SAFETY: `#[repr(C)]`, only integer fields, padding made explicit (`u16` after the `u32`
    // array is followed by another `u16`, size 20, align 4): every bit pattern is valid, no
    // uninitialized bytes.
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: `#[repr(C)]`, integer fields only, the trailing `_pad` makes the size (40) a multiple
    // of the alignment (4) without implicit padding.
    unsafe impl aya::Pod for TupleKey {}
    // SAFETY: `#[repr(C)]`, integer fields only: u32 + [u32; 4] + u16 + u16 = 24 bytes, then the
    // u64 at offset 24 (already 8-aligned): 32 bytes, align 8, no implicit padding.
    unsafe impl aya::Pod for ProxyConfig {}
    // SAFETY: `#[repr(C)]`, two `u32`: no padding, every bit pattern valid.
    unsafe impl aya::Pod for EnrolledCgroup {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Endpoint>(), 20);
        assert_eq!(core::mem::size_of::<TupleKey>(), 40);
        assert_eq!(core::mem::size_of::<ProxyConfig>(), 32);
        assert_eq!(core::mem::offset_of!(ProxyConfig, lease_until_ns), 24);
        assert_eq!(core::mem::size_of::<EnrolledCgroup>(), 8);
    }

    #[test]
    fn redirects_only_while_enabled_and_leased() {
        let mut cfg = ProxyConfig {
            flags: ProxyConfig::ENABLED,
            lease_until_ns: 1_000,
            ..Default::default()
        };
        assert!(cfg.redirects_at(999));
        assert!(!cfg.redirects_at(1_000), "expired");
        cfg.lease_until_ns = 0;
        assert!(!cfg.redirects_at(0), "never renewed");
        cfg.lease_until_ns = u64::MAX;
        cfg.flags = 0;
        assert!(!cfg.redirects_at(0), "disabled");
    }

    #[test]
    fn counters_are_listed_once_in_index_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{}", c.name());
        }
    }

    #[test]
    fn endpoints_round_trip() {
        for s in ["10.96.0.10:80", "[fd00::1]:8080"] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(Endpoint::from_socket_addr(a).to_socket_addr(), Some(a));
        }
        assert_eq!(Endpoint::default().to_socket_addr(), None);
    }

    #[test]
    fn mapped_tuples_become_ipv4() {
        let m = |s: &str| ip6_to_be(s.parse().unwrap());
        let k = TupleKey::new(
            AF_INET6,
            m("::ffff:10.0.0.2"),
            40000,
            m("::ffff:10.0.0.1"),
            15001,
        );
        let v4 = TupleKey::new(
            AF_INET,
            [ip4_to_be(Ipv4Addr::new(10, 0, 0, 2)), 0, 0, 0],
            40000,
            [ip4_to_be(Ipv4Addr::new(10, 0, 0, 1)), 0, 0, 0],
            15001,
        );
        assert_eq!(k, v4);
        assert_eq!(k.reversed().reversed(), k);
    }

    #[test]
    fn loopback() {
        assert!(is_loopback4(ip4_to_be(Ipv4Addr::new(127, 1, 2, 3))));
        assert!(!is_loopback4(ip4_to_be(Ipv4Addr::new(10, 0, 0, 1))));
        assert!(is_loopback6(&ip6_to_be(Ipv6Addr::LOCALHOST)));
        assert!(is_loopback6(&ip6_to_be(
            "::ffff:127.0.0.1".parse().unwrap()
        )));
        assert!(!is_loopback6(&ip6_to_be("fd00::1".parse().unwrap())));
    }
}
