//! Sluice's eBPF programs: enrolled pods' TCP `connect()`s go to the node proxy, the proxy learns
//! each connection's original destination, and data between a pod's socket and the proxy's socket
//! skips the loopback TCP stack.
//!
//! - `cgroup/connect4`, `cgroup/connect6`: save the original destination by socket cookie and
//!   rewrite the destination to the proxy (only enrolled cgroups; never loopback, the proxy itself
//!   or an exclusion; nothing at all while redirection is disabled or the agent's lease on it has
//!   expired: fail open).
//! - `sock_ops`: on established, re-key the original destination by 4-tuple and put the pod's and
//!   the proxy's sockets into the SOCKHASH (unless the operator turned the fast path off).
//! - `sk_msg`: redirect `sendmsg` data to the peer socket's ingress queue.
//! - `cgroup/getsockopt`: answer `SO_ORIGINAL_DST` from the 4-tuple map.
//!
//! Map keys and values, byte orders and names live in `sluice-ebpf-common`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_ops, sk_action::SK_PASS, BPF_F_INGRESS, BPF_NOEXIST,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
    },
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_map_lookup_elem, bpf_sk_release,
    },
    macros::{cgroup_sock_addr, cgroup_sockopt, map, sk_msg, sock_ops},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
    EbpfContext,
};
use aya_log_ebpf::debug;
use sluice_ebpf_common::{
    be_to_ip4, is_loopback4, is_loopback6, is_v4_mapped, Counter, Endpoint, EnrolledCgroup,
    OriginalDst, ProxyConfig, TupleKey, AF_INET, AF_INET6, MAX_CGROUP_DEPTH, MAX_CONNECTIONS,
    MAX_ENROLLED, MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS, SOL_IP, SOL_IPV6, SO_ORIGINAL_DST,
};

const SOCK_STREAM: u32 = 1;

/// The build's variant: `SLUICE_EBPF_VARIANT` (a number) when the object was built, 0 without it.
/// `cargo xtask build-ebpf --variant N` builds an object whose connect programs differ from the
/// plain build's by this constant alone (another program tag, same maps and behaviour), so tests
/// can upgrade a running installation to a genuinely different build in place.
const VARIANT: u64 = parse_variant(option_env!("SLUICE_EBPF_VARIANT"));

const fn parse_variant(v: Option<&str>) -> u64 {
    let Some(v) = v else { return 0 };
    let b = v.as_bytes();
    let mut n = 0u64;
    let mut i = 0;
    while i < b.len() {
        assert!(
            b[i].is_ascii_digit(),
            "SLUICE_EBPF_VARIANT must be a number"
        );
        n = n * 10 + (b[i] - b'0') as u64;
        i += 1;
    }
    n
}

/// Puts [`VARIANT`] into the program's instructions (a stack store and load the optimiser must
/// keep), so that builds of different variants have different program tags.
#[inline(always)]
fn mark_variant() {
    let v = VARIANT;
    // SAFETY: reads a local.
    unsafe { core::ptr::read_volatile(&v) };
}
/// Verdicts of cgroup programs: 1 lets the call proceed.
const ALLOW: i32 = 1;

#[map(name = "SLUICE_CONFIG")]
static CONFIG: Array<ProxyConfig> = Array::with_max_entries(1, 0);

#[map(name = "SLUICE_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledCgroup> = HashMap::with_max_entries(MAX_ENROLLED, 0);

/// Destination ports (host order) that are never redirected.
#[map(name = "SLUICE_EXCL_PORTS")]
static EXCLUDED_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_EXCLUDED_PORTS, 0);

/// Destination CIDRs that are never redirected (addresses in network order).
#[map(name = "SLUICE_EXCL_V4")]
static EXCLUDED_V4: LpmTrie<u32, u8> =
    LpmTrie::with_max_entries(MAX_EXCLUDED_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "SLUICE_EXCL_V6")]
static EXCLUDED_V6: LpmTrie<[u32; 4], u8> =
    LpmTrie::with_max_entries(MAX_EXCLUDED_CIDRS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map(name = "SLUICE_ORIG_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, OriginalDst> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

#[map(name = "SLUICE_ORIG_TUPLE")]
static ORIG_BY_TUPLE: LruHashMap<TupleKey, OriginalDst> =
    LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);

/// Redirected pods' sockets and the proxy's accepted sockets, keyed by their own (local, remote).
#[map(name = "SLUICE_SOCKETS")]
static SOCKETS: SockHash<TupleKey> = SockHash::with_max_entries(MAX_CONNECTIONS, 0);

/// The proxy's listening socket at index 0, put there by the agent once it listens; the kernel
/// takes it out when the socket closes (the agent stopped, was killed or crashed).
#[map(name = "SLUICE_LISTENER")]
static LISTENER: SockMap = SockMap::with_max_entries(1, 0);

#[map(name = "SLUICE_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // SAFETY: the pointer comes from a successful lookup of this CPU's slot, which stays valid
        // for the program's run; per-CPU slots are not shared with other CPUs.
        unsafe { *v += 1 };
    }
}

/// Reads one `u32` context field. Volatile keeps LLVM from merging neighbouring fields into one
/// 8-byte load, which the verifier rejects for most context fields.
#[inline(always)]
fn rd(p: *const u32) -> u32 {
    // SAFETY: callers pass a pointer to a field of this program's context.
    unsafe { core::ptr::read_volatile(p) }
}

#[inline(always)]
fn rd6(p: *const [u32; 4]) -> [u32; 4] {
    let p = p.cast::<u32>();
    // SAFETY: `p` points at a four-element array of this program's context.
    unsafe { [rd(p), rd(p.add(1)), rd(p.add(2)), rd(p.add(3))] }
}

/// Writes one `u32` context field (see [`rd`]).
#[inline(always)]
fn wr(p: *mut u32, v: u32) {
    // SAFETY: callers pass a pointer to a writable field of this program's context.
    unsafe { core::ptr::write_volatile(p, v) }
}

#[inline(always)]
fn config() -> Option<ProxyConfig> {
    CONFIG.get(0).copied()
}

/// Whether the proxy is serving: enabled, and the agent renewed its lease recently enough.
/// Counts a fail-open skip otherwise.
#[inline(always)]
fn proxy_serving(cfg: &ProxyConfig) -> bool {
    // SAFETY: helper without arguments (CLOCK_MONOTONIC, the clock the agent's lease uses).
    let now = unsafe { bpf_ktime_get_ns() };
    if cfg.redirects_at(now) {
        return true;
    }
    count(Counter::ConnectFailOpen);
    false
}

/// Whether the proxy's listening socket is open, when the agent registered it
/// ([`ProxyConfig::LISTENER`]): a killed agent's connects fail open at once rather than being
/// refused by its closed port until the lease runs out. Counts a fail-open skip otherwise.
#[inline(always)]
fn proxy_listening(cfg: &ProxyConfig) -> bool {
    if cfg.flags & ProxyConfig::LISTENER == 0 {
        return true;
    }
    let key: u32 = 0;
    // SAFETY: the map pointer is the SOCKMAP's definition (what aya-ebpf's own methods pass) and
    // the key a local `u32`; a socket found is a reference the verifier makes us release.
    let sk = unsafe {
        bpf_map_lookup_elem(
            (&raw const LISTENER).cast_mut().cast(),
            (&raw const key).cast(),
        )
    };
    if sk.is_null() {
        count(Counter::ConnectFailOpen);
        return false;
    }
    // SAFETY: `sk` is the non-null socket the lookup returned, released once.
    unsafe { bpf_sk_release(sk) };
    true
}

#[inline(always)]
fn debug_on(cfg: &ProxyConfig) -> bool {
    cfg.flags & ProxyConfig::DEBUG_LOG != 0
}

/// Whether the current task's cgroup, or one of its ancestors, is enrolled.
#[inline(always)]
fn enrolled() -> bool {
    // SAFETY: helper without arguments.
    let id = unsafe { bpf_get_current_cgroup_id() };
    if redirects(id) {
        return true;
    }
    let mut level = 1;
    while level < MAX_CGROUP_DEPTH as i32 {
        // SAFETY: helper with a plain integer argument; returns 0 past the task's depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 {
            return false;
        }
        if redirects(id) {
            return true;
        }
        level += 1;
    }
    false
}

#[inline(always)]
fn redirects(cgroup: u64) -> bool {
    // SAFETY: the value is copied out before the map can change.
    match unsafe { ENROLLED.get(&cgroup) } {
        Some(v) => v.flags & EnrolledCgroup::REDIRECT != 0,
        None => false,
    }
}

/// Whether a lookup found something, as a plain scalar. Without the volatile round trip LLVM may
/// OR two lookups' pointers together and test the result once, which the verifier rejects
/// ("pointer |= pointer prohibited").
#[inline(always)]
fn present<T>(v: Option<&T>) -> bool {
    let found = v.is_some();
    // SAFETY: reads a local.
    unsafe { core::ptr::read_volatile(&found) }
}

// The exclusion maps are looked up only while their flag says they hold entries.

#[inline(always)]
fn port_excluded(cfg: &ProxyConfig, port: u16) -> bool {
    // SAFETY: only the presence of the key is used.
    cfg.flags & ProxyConfig::EXCL_PORTS != 0 && present(unsafe { EXCLUDED_PORTS.get(&port) })
}

/// `ip`: network order.
#[inline(always)]
fn v4_excluded(cfg: &ProxyConfig, ip: u32) -> bool {
    cfg.flags & ProxyConfig::EXCL_V4 != 0 && present(EXCLUDED_V4.get(Key::new(32, ip)))
}

#[inline(always)]
fn v6_excluded(cfg: &ProxyConfig, ip: [u32; 4]) -> bool {
    cfg.flags & ProxyConfig::EXCL_V6 != 0 && present(EXCLUDED_V6.get(Key::new(128, ip)))
}

#[inline(always)]
fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: `ctx` is this program's context, the helper's only argument.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    // Errors never block a connect(): the connection goes where it was going.
    let _ = try_connect4(&ctx);
    ALLOW
}

fn try_connect4(ctx: &SockAddrContext) -> Result<(), i64> {
    mark_variant();
    count(Counter::ConnectSeen);
    let sa = ctx.sock_addr;
    // SAFETY (field projections below): the kernel passes a valid `bpf_sock_addr`.
    if rd(unsafe { &raw const (*sa).type_ }) != SOCK_STREAM || !enrolled() {
        return Ok(());
    }
    let cfg = config().ok_or(0)?;
    if !proxy_serving(&cfg) || !proxy_listening(&cfg) {
        return Ok(());
    }
    let dst_ip = rd(unsafe { &raw const (*sa).user_ip4 });
    let dst_port = u16::from_be(rd(unsafe { &raw const (*sa).user_port }) as u16);
    let skip = cfg.flags & ProxyConfig::HAS_V4 == 0
        || is_loopback4(dst_ip)
        || dst_ip == 0
        || (dst_ip == cfg.ip4 && dst_port == cfg.port)
        || port_excluded(&cfg, dst_port)
        || v4_excluded(&cfg, dst_ip);
    if skip {
        count(Counter::ConnectSkipped);
        return Ok(());
    }
    let orig = Endpoint::v4(dst_ip, dst_port);
    if ORIG_BY_COOKIE.insert(socket_cookie(ctx), orig, 0).is_err() {
        count(Counter::ConnectSaveFailed);
        return Ok(());
    }
    wr(unsafe { &raw mut (*sa).user_ip4 }, cfg.ip4);
    wr(
        unsafe { &raw mut (*sa).user_port },
        u32::from(cfg.port.to_be()),
    );
    count(Counter::ConnectRedirected);
    if debug_on(&cfg) {
        debug!(ctx, "connect4 {}:{} -> proxy", be_to_ip4(dst_ip), dst_port);
    }
    Ok(())
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect6(&ctx);
    ALLOW
}

fn try_connect6(ctx: &SockAddrContext) -> Result<(), i64> {
    mark_variant();
    count(Counter::ConnectSeen);
    let sa = ctx.sock_addr;
    // SAFETY (field projections below): the kernel passes a valid `bpf_sock_addr`.
    if rd(unsafe { &raw const (*sa).type_ }) != SOCK_STREAM || !enrolled() {
        return Ok(());
    }
    let cfg = config().ok_or(0)?;
    if !proxy_serving(&cfg) || !proxy_listening(&cfg) {
        return Ok(());
    }
    let dst = rd6(unsafe { &raw const (*sa).user_ip6 });
    let dst_port = u16::from_be(rd(unsafe { &raw const (*sa).user_port }) as u16);
    let mapped = is_v4_mapped(&dst);
    let (proxy_ok, to_proxy, cidr_excluded) = if mapped {
        // A dual-stack socket connecting to an IPv4 address: IPv4 rules, IPv4 proxy.
        (
            cfg.flags & ProxyConfig::HAS_V4 != 0,
            dst[3] == cfg.ip4 && dst_port == cfg.port,
            v4_excluded(&cfg, dst[3]),
        )
    } else {
        (
            cfg.flags & ProxyConfig::HAS_V6 != 0,
            dst == cfg.ip6 && dst_port == cfg.port,
            v6_excluded(&cfg, dst),
        )
    };
    let unspecified = dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == 0;
    let skip = !proxy_ok
        || is_loopback6(&dst)
        || unspecified
        || to_proxy
        || port_excluded(&cfg, dst_port)
        || cidr_excluded;
    if skip {
        count(Counter::ConnectSkipped);
        return Ok(());
    }
    let orig = if mapped {
        Endpoint::v4(dst[3], dst_port)
    } else {
        Endpoint::v6(dst, dst_port)
    };
    if ORIG_BY_COOKIE.insert(socket_cookie(ctx), orig, 0).is_err() {
        count(Counter::ConnectSaveFailed);
        return Ok(());
    }
    let new = if mapped {
        [0, 0, u32::from_be(0xffff), cfg.ip4]
    } else {
        cfg.ip6
    };
    let ip6 = unsafe { &raw mut (*sa).user_ip6 }.cast::<u32>();
    // SAFETY: `ip6` points at the four-element `user_ip6` array.
    unsafe {
        wr(ip6, new[0]);
        wr(ip6.add(1), new[1]);
        wr(ip6.add(2), new[2]);
        wr(ip6.add(3), new[3]);
    }
    wr(
        unsafe { &raw mut (*sa).user_port },
        u32::from(cfg.port.to_be()),
    );
    count(Counter::ConnectRedirected);
    if debug_on(&cfg) {
        debug!(
            ctx,
            "connect6 port {} -> proxy (mapped {})", dst_port, mapped as u8
        );
    }
    Ok(())
}

#[sock_ops]
pub fn sluice_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    // sock_ops ignores the return value for the established callbacks.
    1
}

/// This socket's connection as (local, remote), canonical.
#[inline(always)]
fn own_tuple(ops: *const bpf_sock_ops) -> Option<TupleKey> {
    // SAFETY (field projections below): `ops` is this program's context.
    // remote_port is the network-order port in the upper 16 bits; local_port is host order.
    let remote_port = (u32::from_be(rd(unsafe { &raw const (*ops).remote_port })) & 0xffff) as u16;
    let local_port = rd(unsafe { &raw const (*ops).local_port }) as u16;
    match rd(unsafe { &raw const (*ops).family }) as u16 {
        AF_INET => Some(TupleKey::new(
            AF_INET,
            [rd(unsafe { &raw const (*ops).local_ip4 }), 0, 0, 0],
            local_port,
            [rd(unsafe { &raw const (*ops).remote_ip4 }), 0, 0, 0],
            remote_port,
        )),
        AF_INET6 => Some(TupleKey::new(
            AF_INET6,
            rd6(unsafe { &raw const (*ops).local_ip6 }),
            local_port,
            rd6(unsafe { &raw const (*ops).remote_ip6 }),
            remote_port,
        )),
        _ => None,
    }
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        // Only the proxy's sockets ask for state callbacks. Forget the original destination when
        // the proxy's end closes: the proxy has asked for it by then, and a later connection
        // reusing the 4-tuple must not inherit it. (Not on the pod's close: a short-lived client
        // may close before the proxy asks.)
        if ctx.arg(1) == BPF_TCP_CLOSE {
            let key = own_tuple(ctx.ops).ok_or(0)?;
            if ORIG_BY_TUPLE.remove(&key.reversed()).is_ok() {
                count(Counter::SockOpsTupleRemoved);
            }
        }
        return Ok(());
    }
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return Ok(());
    }
    count(Counter::SockOpsEstablished);
    let mut key = own_tuple(ctx.ops).ok_or(0)?;
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // A pod's socket: only ones connect4/6 redirected.
        let cookie = socket_cookie(ctx);
        // SAFETY: copied out before the entry is removed.
        let orig = match unsafe { ORIG_BY_COOKIE.get(&cookie) } {
            Some(o) => *o,
            None => return Ok(()),
        };
        let _ = ORIG_BY_COOKIE.remove(&cookie);
        ORIG_BY_TUPLE.insert(&key, &orig, 0)?;
        count(Counter::SockOpsTupleSaved);
    } else {
        // The proxy's accepted socket: only when its peer is a redirected pod socket.
        // SAFETY: only the presence of the key is used.
        if !present(unsafe { ORIG_BY_TUPLE.get(&key.reversed()) }) {
            return Ok(());
        }
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    }
    if config().is_none_or(|c| c.flags & ProxyConfig::NO_SOCKMAP != 0) {
        return Ok(());
    }
    // SAFETY: the kernel passes a valid `bpf_sock_ops` for this program's run.
    let ops = unsafe { &mut *ctx.ops };
    match SOCKETS.update(&mut key, ops, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(Counter::SockOpsSockhashInserted),
        Err(_) => count(Counter::SockOpsSockhashFailed),
    }
    Ok(())
}

#[sk_msg]
pub fn sluice_sk_msg(ctx: SkMsgContext) -> u32 {
    try_sk_msg(&ctx);
    SK_PASS
}

fn try_sk_msg(ctx: &SkMsgContext) {
    count(Counter::SkMsgSeen);
    let md = ctx.msg;
    // SAFETY (field projections below): the kernel passes a valid `sk_msg_md`.
    let remote_port = (u32::from_be(rd(unsafe { &raw const (*md).remote_port })) & 0xffff) as u16;
    let local_port = rd(unsafe { &raw const (*md).local_port }) as u16;
    // The peer socket is keyed by its own (local, remote) = our (remote, local).
    let mut peer = match rd(unsafe { &raw const (*md).family }) as u16 {
        AF_INET => TupleKey::new(
            AF_INET,
            [rd(unsafe { &raw const (*md).remote_ip4 }), 0, 0, 0],
            remote_port,
            [rd(unsafe { &raw const (*md).local_ip4 }), 0, 0, 0],
            local_port,
        ),
        AF_INET6 => TupleKey::new(
            AF_INET6,
            rd6(unsafe { &raw const (*md).remote_ip6 }),
            remote_port,
            rd6(unsafe { &raw const (*md).local_ip6 }),
            local_port,
        ),
        _ => return,
    };
    // On a miss the helper leaves the message alone and SK_PASS sends it the normal way.
    if SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(Counter::SkMsgRedirected);
    }
}

#[cgroup_sockopt(getsockopt)]
pub fn sluice_getsockopt(ctx: SockoptContext) -> i32 {
    let _ = try_getsockopt(&ctx);
    ALLOW
}

const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

fn try_getsockopt(ctx: &SockoptContext) -> Result<(), i64> {
    let so = ctx.sockopt;
    // SAFETY: the kernel passes a valid `bpf_sockopt` for this program's run; plain field reads.
    let (level, optname) = unsafe { ((*so).level, (*so).optname) };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return Ok(());
    }
    count(Counter::GetsockoptSeen);
    // SAFETY: as above; `sk` is always set for getsockopt.
    let sk: *const bpf_sock = unsafe { (*so).__bindgen_anon_1.sk };
    // SAFETY (field projections below): `sk` is the socket of this call.
    // dst_port is a network-order u16; src_port is host order.
    let dst_port = u16::from_be(unsafe { core::ptr::read_volatile(&raw const (*sk).dst_port) });
    let src_port = rd(unsafe { &raw const (*sk).src_port }) as u16;
    // The proxy's accepted socket: src is the proxy, dst the pod: look up (dst, src).
    let key = match rd(unsafe { &raw const (*sk).family }) as u16 {
        AF_INET => TupleKey::new(
            AF_INET,
            [rd(unsafe { &raw const (*sk).dst_ip4 }), 0, 0, 0],
            dst_port,
            [rd(unsafe { &raw const (*sk).src_ip4 }), 0, 0, 0],
            src_port,
        ),
        AF_INET6 => TupleKey::new(
            AF_INET6,
            rd6(unsafe { &raw const (*sk).dst_ip6 }),
            dst_port,
            rd6(unsafe { &raw const (*sk).src_ip6 }),
            src_port,
        ),
        _ => return Ok(()),
    };
    // SAFETY: copied out immediately.
    let orig = match unsafe { ORIG_BY_TUPLE.get(&key) } {
        Some(o) => *o,
        None => return Ok(()),
    };
    // SAFETY: as above.
    let (optval, optval_end) = unsafe {
        (
            (*so).__bindgen_anon_2.optval as usize,
            (*so).__bindgen_anon_3.optval_end as usize,
        )
    };
    let len = if level == SOL_IP {
        if orig.family != AF_INET || optval + SOCKADDR_IN_LEN > optval_end {
            return Ok(());
        }
        let p = optval as *mut u8;
        let port = orig.port.to_be_bytes();
        let ip = orig.addr[0].to_ne_bytes();
        // SAFETY: `optval..optval + 16` was checked against `optval_end` above.
        unsafe {
            write_bytes(p, &AF_INET.to_ne_bytes(), 0);
            write_bytes(p, &port, 2);
            write_bytes(p, &ip, 4);
            write_bytes(p, &[0; 8], 8);
        }
        SOCKADDR_IN_LEN
    } else {
        if optval + SOCKADDR_IN6_LEN > optval_end {
            return Ok(());
        }
        // An IPv4 original destination is answered as its IPv4-mapped form.
        let addr = if orig.family == AF_INET {
            [0, 0, u32::from_be(0xffff), orig.addr[0]]
        } else {
            orig.addr
        };
        let p = optval as *mut u8;
        let port = orig.port.to_be_bytes();
        // SAFETY: `optval..optval + 28` was checked against `optval_end` above.
        unsafe {
            write_bytes(p, &AF_INET6.to_ne_bytes(), 0);
            write_bytes(p, &port, 2);
            write_bytes(p, &[0; 4], 4); // flowinfo
            write_bytes(p, &addr[0].to_ne_bytes(), 8);
            write_bytes(p, &addr[1].to_ne_bytes(), 12);
            write_bytes(p, &addr[2].to_ne_bytes(), 16);
            write_bytes(p, &addr[3].to_ne_bytes(), 20);
            write_bytes(p, &[0; 4], 24); // scope id
        }
        SOCKADDR_IN6_LEN
    };
    // Separate volatile stores: LLVM may otherwise merge optlen and retval into one 8-byte store,
    // which the verifier rejects.
    // SAFETY: both are writable fields of this program's context.
    unsafe {
        core::ptr::write_volatile(&raw mut (*so).optlen, len as i32);
        core::ptr::write_volatile(&raw mut (*so).retval, 0);
    }
    count(Counter::GetsockoptAnswered);
    Ok(())
}

/// Writes `bytes` at `base + offset`.
///
/// # Safety
/// `base + offset .. base + offset + N` must be writable.
#[inline(always)]
unsafe fn write_bytes<const N: usize>(base: *mut u8, bytes: &[u8; N], offset: usize) {
    let mut i = 0;
    while i < N {
        // SAFETY: the caller guarantees the range is writable.
        unsafe { base.add(offset + i).write(bytes[i]) };
        i += 1;
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
