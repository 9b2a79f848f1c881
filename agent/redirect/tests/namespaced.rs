//! Root-only: loads the real programs, puts a client in its own cgroup and network namespace
//! (veth to the host) and checks that its `connect()` to an address nobody serves reaches a host
//! listener standing in for the proxy, which recovers the original destination with
//! `getsockopt(SO_ORIGINAL_DST)` and from the map; then that a second install reuses the pins and
//! that uninstall removes them. Everything created carries a unique suffix and is removed by
//! guards, also when the test fails.
//!
//! Without root or without `target/bpf/sluice-ebpf.o` the test says why and returns, except under
//! `CI`, where it fails.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use sluice_redirect::{install, uninstall, Counter, Options, ProxyConfig};

fn object() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bpf/sluice-ebpf.o")
}

/// `Some(reason)` when the test cannot run here.
fn cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (cgroups, network namespaces, bpf)".into());
    }
    if !object().is_file() {
        return Some(format!(
            "{} is missing: run `cargo xtask build-ebpf`",
            object().display()
        ));
    }
    for tool in ["ip", "bash"] {
        if Command::new(tool).arg("-V").output().is_err()
            && Command::new(tool).arg("--version").output().is_err()
        {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes what the test created, in reverse order, ignoring what is already gone.
struct Cleanup {
    netns: Option<String>,
    veth: Option<String>,
    cgroup: Option<PathBuf>,
    pins: Option<PathBuf>,
}

// A plain std test without a runtime: blocking sleeps are fine here.
#[allow(clippy::disallowed_methods)]
impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(pins) = self.pins.take() {
            if let Err(e) = uninstall(&pins) {
                eprintln!("cleanup: uninstall {}: {e}", pins.display());
            }
        }
        if let Some(veth) = self.veth.take() {
            let _ = Command::new("ip").args(["link", "del", &veth]).output();
        }
        if let Some(ns) = self.netns.take() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        if let Some(cg) = self.cgroup.take() {
            // The client has exited; rmdir fails only if something is still inside (bounded retry).
            for _ in 0..50 {
                if std::fs::remove_dir(&cg).is_ok() || !cg.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Runs `bash` in `cgroup` and `ns` that connects to `dst`, sends "ping" and prints the reply.
fn spawn_client(cgroup: &Path, ns: &str, dst: SocketAddr) -> Child {
    // Into the cgroup first: `ip netns exec` remounts /sys and hides the cgroup tree.
    let script = format!(
        "echo $$ > {procs} && exec ip netns exec {ns} bash -c \
         'exec 3<>/dev/tcp/{ip}/{port} && echo ping >&3 && read -t 5 reply <&3 && echo \"$reply\"'",
        procs = cgroup.join("cgroup.procs").display(),
        ip = dst.ip(),
        port = dst.port(),
    );
    Command::new("bash")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Polls a non-blocking listener for up to `tries` times 20 ms.
#[allow(clippy::disallowed_methods)] // a plain std test without a runtime
fn accept_within(listener: &TcpListener, tries: usize) -> Option<(TcpStream, SocketAddr)> {
    for i in 0..tries {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                return Some((stream, peer));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if i + 1 < tries {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

#[allow(clippy::disallowed_methods)] // a plain std test without a runtime
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// Answers the client's "ping" with "pong" and checks it got it.
fn ping_pong(mut stream: TcpStream, client: Child, why: &str) {
    let mut buf = [0u8; 5];
    stream.read_exact(&mut buf).expect("the client's bytes");
    assert_eq!(&buf, b"ping\n", "{why}");
    stream.write_all(b"pong\n").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{why}: client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "pong", "{why}");
}

/// One test's network: a namespace with a veth to the host, a cgroup for its client, a pin
/// directory; all removed by the returned guard.
struct Net {
    ns: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    host_ip6: Ipv6Addr,
    ns_ip6: Ipv6Addr,
    cgroup_root: PathBuf,
    cgroup: PathBuf,
    pins: PathBuf,
}

/// `Some(guard, net)`, or `None` after saying why the test cannot run (a failure under `CI`).
/// `slot` (0..=1) keeps tests of one process apart: names and subnets differ per slot.
fn setup(slot: u32) -> Option<(Cleanup, Net)> {
    if let Some(why) = cannot_run() {
        if std::env::var_os("CI").is_some() {
            panic!("namespaced redirect test cannot run under CI: {why}");
        }
        eprintln!("skipping namespaced redirect test: {why}");
        return None;
    }
    let id = std::process::id();
    let tag = format!("{:x}{slot}", id % 0xffff);
    let octet = (id % 100 + 20 + slot * 100) as u8;
    let host_ip = Ipv4Addr::new(10, 251, octet, 1);
    let ns_ip = Ipv4Addr::new(10, 251, octet, 2);
    let host_ip6 = Ipv6Addr::new(0xfd00, 0x5, 0, u16::from(octet), 0, 0, 0, 1);
    let ns_ip6 = Ipv6Addr::new(0xfd00, 0x5, 0, u16::from(octet), 0, 0, 0, 2);
    let ns = format!("sluice-t-{tag}");
    let (veth_host, veth_ns) = (format!("slh{tag}"), format!("sln{tag}"));
    let cgroup_root = sluice_redirect::cgroup2_root().expect("cgroup v2 mounted");
    let cgroup = cgroup_root.join(format!("sluice-test-{tag}"));
    let pins = PathBuf::from(format!("/sys/fs/bpf/sluice-test-{tag}"));
    let mut guard = Cleanup {
        netns: None,
        veth: None,
        cgroup: None,
        pins: None,
    };

    run("ip", &["netns", "add", &ns]);
    guard.netns = Some(ns.clone());
    run(
        "ip",
        &[
            "link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns,
        ],
    );
    guard.veth = Some(veth_host.clone());
    run("ip", &["link", "set", &veth_ns, "netns", &ns]);
    run(
        "ip",
        &["addr", "add", &format!("{host_ip}/24"), "dev", &veth_host],
    );
    run("ip", &["link", "set", &veth_host, "up"]);
    run(
        "ip",
        &[
            "-6",
            "addr",
            "add",
            &format!("{host_ip6}/64"),
            "dev",
            &veth_host,
            "nodad",
        ],
    );
    let in_ns = |args: &[&str]| {
        let mut all = vec!["netns", "exec", &ns];
        all.extend_from_slice(args);
        run("ip", &all);
    };
    in_ns(&["ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &veth_ns]);
    in_ns(&["ip", "link", "set", &veth_ns, "up"]);
    in_ns(&["ip", "link", "set", "lo", "up"]);
    in_ns(&[
        "ip",
        "-6",
        "addr",
        "add",
        &format!("{ns_ip6}/64"),
        "dev",
        &veth_ns,
        "nodad",
    ]);
    std::fs::create_dir(&cgroup).expect("create test cgroup");
    guard.cgroup = Some(cgroup.clone());

    guard.pins = Some(pins.clone());
    let net = Net {
        ns,
        host_ip,
        ns_ip,
        host_ip6,
        ns_ip6,
        cgroup_root,
        cgroup,
        pins,
    };
    Some((guard, net))
}

#[test] // a plain std test: blocking sleeps are fine here
fn enrolled_client_reaches_the_proxy_which_recovers_the_original_destination() {
    let Some((mut guard, net)) = setup(0) else {
        return;
    };
    let Net {
        ns,
        host_ip,
        ns_ip,
        host_ip6,
        ns_ip6,
        cgroup_root,
        cgroup,
        pins,
    } = net;

    // The proxy stand-in, on the host end of the veth.
    let listener = TcpListener::bind(SocketAddrV4::new(host_ip, 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let proxy = listener.local_addr().unwrap();

    let opts = Options {
        object: object(),
        cgroup: cgroup_root.clone(),
        pin_dir: pins.clone(),
    };
    let redirect = install(&opts).expect("install");
    assert!(
        redirect.report().reused.is_empty(),
        "{:?}",
        redirect.report()
    );
    let maps = redirect.maps();
    // The IPv6 listener shares the IPv4 one's port (the programs know one proxy port).
    let listener6 = TcpListener::bind(SocketAddr::from((host_ip6, proxy.port()))).unwrap();
    listener6.set_nonblocking(true).unwrap();
    // The agent renews a short lease while it serves; this test has no agent, so one long lease.
    let point_at_proxy = || {
        maps.set_proxy(
            Some(proxy),
            Some(SocketAddr::from((host_ip6, proxy.port()))),
            true,
        )
        .unwrap();
        maps.renew_lease(Duration::from_secs(600)).unwrap();
    };
    point_at_proxy();
    let before = maps.counter(Counter::ConnectRedirected).unwrap();
    maps.enroll_cgroup(&cgroup).unwrap();

    // TEST-NET-1: nothing answers there, and the namespace has no route to it either.
    let original = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 10), 8080));
    let mut client = spawn_client(&cgroup, &ns, original);
    let accepted = accept_within(&listener, 250);
    let Some((stream, peer)) = accepted else {
        client.kill().unwrap();
        let out = client.wait_with_output().unwrap();
        panic!(
            "the enrolled client never reached the proxy; client stderr: {}; counters: {:?}",
            String::from_utf8_lossy(&out.stderr),
            maps.counters()
        );
    };
    assert_eq!(peer.ip(), ns_ip, "the client came through the veth");

    let from_map = maps.original_dst(peer, stream.local_addr().unwrap());
    assert_eq!(
        from_map,
        Some(original),
        "original destination from the 4-tuple map"
    );
    let sock = socket2::SockRef::from(&stream);
    let from_sockopt = sock.original_dst_v4().expect("getsockopt(SO_ORIGINAL_DST)");
    assert_eq!(from_sockopt.as_socket(), Some(original), "SO_ORIGINAL_DST");

    let (peer_addr, local_addr) = (peer, stream.local_addr().unwrap());
    ping_pong(stream, client, "first redirected connection");
    // The proxy's end is closed (dropped in ping_pong): once it reaches CLOSE (the peer's last ACK
    // may still be in flight), its original destination is forgotten.
    let forgotten = (0..100).any(|_| {
        let gone = maps.original_dst(peer_addr, local_addr).is_none();
        if !gone {
            pause(Duration::from_millis(20));
        }
        gone
    });
    assert!(forgotten, "entry removed on the proxy's close");

    let counters = maps.counters().unwrap();
    eprintln!("counters: {counters:?}");
    let get = |c: Counter| {
        counters
            .iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| *v)
            .unwrap_or(0)
    };
    assert!(get(Counter::ConnectRedirected) > before, "{counters:?}");
    assert!(get(Counter::SockOpsTupleSaved) >= 1, "{counters:?}");
    assert!(get(Counter::GetsockoptAnswered) >= 1, "{counters:?}");
    // Both sockets are in the SOCKHASH before the proxy writes, so at least its reply took the
    // sk_msg fast path (the client's first bytes may race the proxy socket's insertion).
    assert!(get(Counter::SockOpsSockhashInserted) >= 2, "{counters:?}");
    assert!(get(Counter::SkMsgRedirected) >= 1, "{counters:?}");
    assert!(get(Counter::SockOpsTupleRemoved) >= 1, "{counters:?}");

    // What must pass untouched: a real destination on the host, reachable from the namespace.
    let real = TcpListener::bind(SocketAddrV4::new(host_ip, 0)).unwrap();
    real.set_nonblocking(true).unwrap();
    let real_addr = real.local_addr().unwrap();
    let lands_on = |target: &TcpListener, why: &str| {
        let client = spawn_client(&cgroup, &ns, real_addr);
        let Some((stream, _)) = accept_within(target, 250) else {
            let out = client.wait_with_output().unwrap();
            panic!(
                "{why}: nothing arrived; client stderr: {}; counters: {:?}",
                String::from_utf8_lossy(&out.stderr),
                maps.counters()
            );
        };
        ping_pong(stream, client, why);
    };
    lands_on(&listener, "enrolled, no exclusion: redirected");
    // The programs look an exclusion map up only while its flag says it holds entries.
    let flags = || maps.config().unwrap().flags;
    let excl = ProxyConfig::EXCL_PORTS | ProxyConfig::EXCL_V4 | ProxyConfig::EXCL_V6;
    assert_eq!(flags() & excl, 0, "no exclusions, no lookups");
    maps.set_excluded_ports(&[real_addr.port()]).unwrap();
    assert_eq!(flags() & excl, ProxyConfig::EXCL_PORTS);
    lands_on(&real, "excluded port");
    maps.set_excluded_ports(&[]).unwrap();
    assert_eq!(flags() & excl, 0);
    lands_on(&listener, "port exclusion lifted: redirected");
    maps.set_excluded_cidrs(&[(IpAddr::V4(host_ip), 32)])
        .unwrap();
    assert_eq!(flags() & excl, ProxyConfig::EXCL_V4);
    lands_on(&real, "excluded CIDR");
    maps.set_excluded_cidrs(&[]).unwrap();
    assert_eq!(flags() & excl, 0);
    maps.set_enabled(false).unwrap();
    lands_on(&real, "redirection disabled (fail open)");
    maps.set_enabled(true).unwrap();
    maps.release_cgroup(&cgroup).unwrap();
    lands_on(&real, "released cgroup");
    maps.enroll_cgroup(&cgroup).unwrap();
    lands_on(&listener, "enrolled again: redirected");
    assert!(
        accept_within(&listener, 1).is_none(),
        "no stray connection reached the proxy"
    );

    // The fast path off (`--no-sockmap`): still redirected, the original destination still
    // recovered, but no socket enters the SOCKHASH and no data takes the sk_msg path. The setting
    // survives a change of the proxy's address.
    maps.set_sockmap(false).unwrap();
    point_at_proxy();
    assert!(!maps.sockmap().unwrap(), "the setting outlives set_proxy");
    let count = |c: Counter| maps.counter(c).unwrap();
    let (inserted, sk_msg, saved) = (
        count(Counter::SockOpsSockhashInserted),
        count(Counter::SkMsgRedirected),
        count(Counter::SockOpsTupleSaved),
    );
    let client = spawn_client(&cgroup, &ns, original);
    let Some((stream, peer)) = accept_within(&listener, 250) else {
        let out = client.wait_with_output().unwrap();
        panic!(
            "no sockmap: nothing reached the proxy; client stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    assert_eq!(
        maps.original_dst(peer, stream.local_addr().unwrap()),
        Some(original),
        "no sockmap: original destination"
    );
    ping_pong(stream, client, "redirected without the fast path");
    assert_eq!(count(Counter::SockOpsTupleSaved), saved + 1);
    assert_eq!(
        count(Counter::SockOpsSockhashInserted),
        inserted,
        "no insert"
    );
    assert_eq!(
        count(Counter::SkMsgRedirected),
        sk_msg,
        "no sk_msg redirect"
    );
    maps.set_sockmap(true).unwrap();
    assert!(maps.sockmap().unwrap());

    // IPv6: connect6 redirects, SO_ORIGINAL_DST at SOL_IPV6 and the map recover the destination.
    let original6 = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10), 8080));
    let client = spawn_client(&cgroup, &ns, original6);
    let Some((stream, peer)) = accept_within(&listener6, 250) else {
        let out = client.wait_with_output().unwrap();
        panic!(
            "IPv6: nothing reached the proxy; client stderr: {}; counters: {:?}",
            String::from_utf8_lossy(&out.stderr),
            maps.counters()
        );
    };
    assert_eq!(peer.ip(), IpAddr::V6(ns_ip6));
    let from_map = maps.original_dst(peer, stream.local_addr().unwrap());
    assert_eq!(
        from_map,
        Some(original6),
        "IPv6 original destination from the map"
    );
    let from_sockopt = socket2::SockRef::from(&stream)
        .original_dst_v6()
        .expect("IP6T_SO_ORIGINAL_DST");
    assert_eq!(
        from_sockopt.as_socket(),
        Some(original6),
        "IPv6 SO_ORIGINAL_DST"
    );
    ping_pong(stream, client, "IPv6 redirected connection");

    // A restart reuses the pins instead of attaching twice.
    drop(redirect);
    let again = install(&opts).expect("second install");
    assert!(again.report().attached.is_empty(), "{:?}", again.report());
    assert_eq!(
        again.maps().config().unwrap().port,
        proxy.port(),
        "maps survived the restart"
    );
    drop(again);

    let removed = uninstall(&pins).expect("uninstall");
    assert_eq!(removed.detached.len(), 4, "{removed:?}");
    assert!(!pins.exists(), "pins removed");
    guard.pins = None;
}

/// Where a client's connection arrived.
#[derive(Debug, PartialEq, Eq)]
enum Landed {
    Proxy,
    Real,
}

/// Runs one client in the net's cgroup and namespace towards `dst` and reports which of the two
/// listeners got it (polling both for up to 5 s), after a full ping-pong.
#[allow(clippy::disallowed_methods)] // a plain std test without a runtime
fn landed(net: &Net, dst: SocketAddr, proxy: &TcpListener, real: &TcpListener) -> Landed {
    let client = spawn_client(&net.cgroup, &net.ns, dst);
    for _ in 0..250 {
        for (listener, which) in [(proxy, Landed::Proxy), (real, Landed::Real)] {
            if let Some((stream, _)) = accept_within(listener, 1) {
                ping_pong(stream, client, &format!("landed on {which:?}"));
                return which;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = client.wait_with_output().unwrap();
    panic!(
        "the client's connection reached neither listener; client stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test] // a plain std test: blocking sleeps and wall-clock time are fine here
#[allow(clippy::disallowed_methods)]
fn lease_expiry_fails_open_within_two_seconds_and_renewal_resumes_redirection() {
    let Some((_guard, net)) = setup(1) else {
        return;
    };
    let proxy_l = TcpListener::bind(SocketAddrV4::new(net.host_ip, 0)).unwrap();
    proxy_l.set_nonblocking(true).unwrap();
    let real_l = TcpListener::bind(SocketAddrV4::new(net.host_ip, 0)).unwrap();
    real_l.set_nonblocking(true).unwrap();
    let real = real_l.local_addr().unwrap();
    let redirect = install(&Options {
        object: object(),
        cgroup: net.cgroup_root.clone(),
        pin_dir: net.pins.clone(),
    })
    .expect("install");
    let maps = redirect.maps();
    maps.set_proxy(Some(proxy_l.local_addr().unwrap()), None, true)
        .unwrap();
    maps.enroll_cgroup(&net.cgroup).unwrap();
    let to = |expected: Landed, why: &str| {
        assert_eq!(
            landed(&net, real, &proxy_l, &real_l),
            expected,
            "{why}; lease {:?}, counters {:?}",
            maps.lease(),
            maps.counters()
        );
    };

    // Enabled, but no agent ever renewed the lease: fail open.
    assert_eq!(maps.lease().unwrap(), sluice_redirect::Lease::None);
    let fail_open = maps.counter(Counter::ConnectFailOpen).unwrap();
    to(Landed::Real, "never leased");
    assert!(maps.counter(Counter::ConnectFailOpen).unwrap() > fail_open);

    // Leased: redirected.
    let lease = Duration::from_secs(1);
    maps.renew_lease(lease).unwrap();
    let renewed = std::time::Instant::now();
    to(Landed::Proxy, "leased");

    // The renewer stops (as when the agent is SIGKILLed): new connections fail open once the lease
    // runs out, well within 2 s, and not before.
    let mut first_real = None;
    for _ in 0..40 {
        let at = renewed.elapsed();
        if landed(&net, real, &proxy_l, &real_l) == Landed::Real {
            first_real = Some(at);
            break;
        }
        assert!(at < lease, "still redirected {at:?} after the last renewal");
        std::thread::sleep(Duration::from_millis(100));
    }
    let first_real = first_real.expect("never failed open");
    eprintln!("failed open {first_real:?} after the last renewal (lease {lease:?})");
    assert!(first_real < Duration::from_secs(2), "{first_real:?}");
    assert!(
        first_real + Duration::from_millis(150) >= lease,
        "{first_real:?}"
    );
    assert!(matches!(
        maps.lease().unwrap(),
        sluice_redirect::Lease::Expired(_)
    ));

    // Serving again: redirection resumes at once.
    maps.renew_lease(lease).unwrap();
    to(Landed::Proxy, "renewed");
    // A graceful stop ends the lease (or disables) first: fail open at once.
    maps.end_lease().unwrap();
    to(Landed::Real, "lease ended");
    maps.renew_lease(lease).unwrap();
    maps.set_enabled(false).unwrap();
    to(Landed::Real, "disabled while leased");
    maps.set_enabled(true).unwrap();
    to(Landed::Proxy, "enabled again");
    assert!(
        accept_within(&proxy_l, 1).is_none() && accept_within(&real_l, 1).is_none(),
        "no stray connections"
    );
}

/// With the proxy's listening socket registered (`SLUICE_LISTENER`), the programs redirect while
/// it is open and fail open the moment it closes, whatever the lease says: a killed agent's
/// port refuses nothing, as the kernel takes a closed socket out of a SOCKMAP by itself.
#[test]
fn a_closed_listener_fails_open_at_once_while_the_lease_holds() {
    let Some((_guard, net)) = setup(1) else {
        return;
    };
    let proxy_l = TcpListener::bind(SocketAddrV4::new(net.host_ip, 0)).unwrap();
    proxy_l.set_nonblocking(true).unwrap();
    let real_l = TcpListener::bind(SocketAddrV4::new(net.host_ip, 0)).unwrap();
    real_l.set_nonblocking(true).unwrap();
    let real = real_l.local_addr().unwrap();
    let redirect = install(&Options {
        object: object(),
        cgroup: net.cgroup_root.clone(),
        pin_dir: net.pins.clone(),
    })
    .expect("install");
    let maps = redirect.maps();
    let proxy = proxy_l.local_addr().unwrap();
    maps.set_proxy(Some(proxy), None, true).unwrap();
    maps.enroll_cgroup(&net.cgroup).unwrap();
    maps.renew_lease(Duration::from_secs(600)).unwrap();
    maps.set_listener(&proxy_l).unwrap();
    assert_ne!(maps.config().unwrap().flags & ProxyConfig::LISTENER, 0);
    assert_eq!(landed(&net, real, &proxy_l, &real_l), Landed::Proxy);

    // The listener closes (as when the agent is killed): the next connect goes direct at once,
    // counted as a fail-open skip, with 10 minutes of lease left.
    drop(proxy_l);
    let fail_open = maps.counter(Counter::ConnectFailOpen).unwrap();
    let nobody = TcpListener::bind(SocketAddrV4::new(net.host_ip, 0)).unwrap();
    nobody.set_nonblocking(true).unwrap();
    assert_eq!(landed(&net, real, &nobody, &real_l), Landed::Real);
    assert!(maps.counter(Counter::ConnectFailOpen).unwrap() > fail_open);
    assert!(matches!(
        maps.lease().unwrap(),
        sluice_redirect::Lease::Valid(_)
    ));

    // A new listener on the same address, registered: redirected again.
    let proxy_l = TcpListener::bind(proxy).unwrap();
    proxy_l.set_nonblocking(true).unwrap();
    maps.set_listener(&proxy_l).unwrap();
    assert_eq!(landed(&net, real, &proxy_l, &real_l), Landed::Proxy);
}

/// `bpf(cmd, attr)` for the test's few raw calls.
fn bpf_raw(cmd: libc::c_long, attr: &mut [u32; 32]) -> std::io::Result<i32> {
    // SAFETY: `attr` is a zeroed `union bpf_attr`-sized buffer with the command's fields set;
    // pointers inside it outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as u32,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret as i32)
}

/// Creates an old-layout `SLUICE_CONFIG` (an array of one 24-byte value, before the lease) and
/// pins it at `path`, as an older build would have left it.
fn pin_old_config_map(path: &Path) {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let mut attr = [0u32; 32];
    attr[..4].copy_from_slice(&[BPF_MAP_TYPE_ARRAY, 4, 24, 1]);
    let fd = bpf_raw(BPF_MAP_CREATE, &mut attr).expect("BPF_MAP_CREATE");
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let ptr = c_path.as_ptr() as u64;
    let mut attr = [0u32; 32];
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    attr[2] = fd as u32;
    bpf_raw(BPF_OBJ_PIN, &mut attr).expect("BPF_OBJ_PIN");
    // SAFETY: `fd` is the map descriptor created above and owned by nobody else.
    unsafe { libc::close(fd as i32) };
}

/// For tests that only install and inspect: a fresh empty cgroup of their own (nothing on the
/// machine is affected) and pin directory, both removed by the guard. `None` (after saying why)
/// when the test cannot run here outside CI.
fn install_alone(what: &str, suffix: char) -> Option<(Cleanup, Options)> {
    if let Some(why) = cannot_run() {
        if std::env::var_os("CI").is_some() {
            panic!("{what} test cannot run under CI: {why}");
        }
        eprintln!("skipping {what} test: {why}");
        return None;
    }
    let tag = format!("{:x}{suffix}", std::process::id() % 0xffff);
    let cgroup = sluice_redirect::cgroup2_root()
        .expect("cgroup v2 mounted")
        .join(format!("sluice-test-{tag}"));
    let pins = PathBuf::from(format!("/sys/fs/bpf/sluice-test-{tag}"));
    let mut guard = Cleanup {
        netns: None,
        veth: None,
        cgroup: None,
        pins: Some(pins.clone()),
    };
    std::fs::create_dir(&cgroup).expect("create test cgroup");
    guard.cgroup = Some(cgroup.clone());
    let opts = Options {
        object: object(),
        cgroup,
        pin_dir: pins,
    };
    Some((guard, opts))
}

#[test]
fn stale_layout_pins_are_detected_and_replaced_whole() {
    let Some((guard, opts)) = install_alone("stale-layout", 's') else {
        return;
    };
    let pins = opts.pin_dir.clone();
    let first = install(&opts).expect("first install");
    assert_eq!(first.report().attached.len(), 5, "{:?}", first.report());
    drop(first);

    // An older build's config map in place of ours (its programs are still attached).
    let config_pin = pins.join("maps").join("SLUICE_CONFIG");
    std::fs::remove_file(&config_pin).unwrap();
    pin_old_config_map(&config_pin);

    let again = install(&opts).expect("install over a stale layout");
    let report = again.report().clone();
    assert_eq!(
        report.replaced,
        vec!["SLUICE_CONFIG: value_size 24, this build's 32".to_string()],
        "{report:?}"
    );
    assert!(
        report.reused.is_empty(),
        "old programs must not be kept: {report:?}"
    );
    assert_eq!(report.attached.len(), 5, "{report:?}");
    let maps = again.maps();
    maps.set_proxy(Some("10.0.0.1:15001".parse().unwrap()), None, true)
        .unwrap();
    maps.renew_lease(Duration::from_secs(5)).unwrap();
    assert!(matches!(
        maps.lease().unwrap(),
        sluice_redirect::Lease::Valid(_)
    ));
    drop(again);

    // A current layout is reused as before.
    let third = install(&opts).expect("third install");
    assert!(third.report().replaced.is_empty(), "{:?}", third.report());
    assert_eq!(third.report().reused.len(), 5, "{:?}", third.report());
    drop(third);
    drop(guard);
    assert!(!pins.exists(), "pins removed by the cleanup");
}

/// Makes the pinned connect4 link run "another build's" program: a two-instruction
/// `cgroup/connect4` that allows every connect and redirects nothing.
fn link_runs_an_older_build(link_pin: &Path) {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // mov r0, 1; exit
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    let mut attr = [0u32; 32];
    attr[0] = 18; // BPF_PROG_TYPE_CGROUP_SOCK_ADDR
    attr[1] = insns.len() as u32;
    let p = insns.as_ptr() as u64;
    (attr[2], attr[3]) = (p as u32, (p >> 32) as u32);
    let l = license.as_ptr() as u64;
    (attr[4], attr[5]) = (l as u32, (l >> 32) as u32);
    attr[17] = 10; // expected_attach_type BPF_CGROUP_INET4_CONNECT
    let prog = bpf_raw(5, &mut attr).expect("BPF_PROG_LOAD of the stand-in program");
    // SAFETY: a new descriptor nothing else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(prog) };
    let path = std::ffi::CString::new(link_pin.as_os_str().as_encoded_bytes()).unwrap();
    let mut attr = [0u32; 32];
    let p = path.as_ptr() as u64;
    (attr[0], attr[1]) = (p as u32, (p >> 32) as u32);
    let link = bpf_raw(7, &mut attr).expect("BPF_OBJ_GET of the pinned link");
    // SAFETY: a new descriptor nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(link) };
    let mut attr = [0u32; 32];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    bpf_raw(29, &mut attr).expect("BPF_LINK_UPDATE to the stand-in program");
}

/// The tag of the program the pinned link runs.
fn link_tag(link_pin: &Path) -> u64 {
    let link = aya::programs::links::PinnedLink::from_pin(link_pin).expect("pinned link");
    let id = aya::programs::links::FdLink::from(link)
        .info()
        .expect("link info")
        .program_id();
    aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .expect("the link's program is loaded")
        .tag()
}

/// An agent upgraded to a build whose programs changed (maps unchanged) swaps its programs into
/// the pinned links in place, instead of keeping the old build's programs; while it runs,
/// `Redirect::repair` puts back another program swapped into a link, a detached link, a deleted
/// link pin and a deleted map pin, each reported once.
#[test]
fn a_pinned_link_running_another_builds_program_is_upgraded_in_place_and_drift_repaired() {
    let Some((guard, opts)) = install_alone("upgrade", 'u') else {
        return;
    };
    let pins = opts.pin_dir.clone();
    let link_pin = pins.join("links").join("sluice_connect4");
    let first = install(&opts).expect("first install");
    assert_eq!(first.report().attached.len(), 5, "{:?}", first.report());
    drop(first);
    let ours = link_tag(&link_pin);

    link_runs_an_older_build(&link_pin);
    assert_ne!(
        link_tag(&link_pin),
        ours,
        "the stand-in program is in the link"
    );

    let again = install(&opts).expect("install over an older build's program");
    let report = again.report().clone();
    assert_eq!(report.upgraded, vec!["sluice_connect4"], "{report:?}");
    assert_eq!(report.reused.len(), 4, "{report:?}");
    assert!(report.attached.is_empty(), "{report:?}");
    assert_eq!(
        link_tag(&link_pin),
        ours,
        "this build's program is back in the link"
    );
    drop(again);

    // Nothing to upgrade the next time.
    let mut third = install(&opts).expect("third install");
    assert!(third.report().upgraded.is_empty(), "{:?}", third.report());
    assert_eq!(third.report().reused.len(), 5, "{:?}", third.report());

    // While running: repair() finds each kind of drift in the kernel and puts it back, once.
    assert_eq!(third.repair().unwrap(), vec![], "nothing drifted");
    link_runs_an_older_build(&link_pin);
    sluice_redirect::detach_link(&pins.join("links/sluice_connect6")).unwrap();
    std::fs::remove_file(pins.join("links/sluice_getsockopt")).unwrap();
    std::fs::remove_file(pins.join("maps/SLUICE_COUNTERS")).unwrap();
    let repairs: Vec<(&str, &str)> = third
        .repair()
        .unwrap()
        .iter()
        .map(|r| (r.kind, r.what))
        .collect();
    assert_eq!(
        repairs,
        vec![
            ("program_replaced", "sluice_connect4"),
            ("link_detached", "sluice_connect6"),
            ("link_missing", "sluice_getsockopt"),
            ("map_pin_missing", "SLUICE_COUNTERS"),
        ]
    );
    assert_eq!(link_tag(&link_pin), ours, "this build's program is back");
    assert!(pins.join("links/sluice_getsockopt").exists());
    assert!(pins.join("maps/SLUICE_COUNTERS").exists());
    assert_eq!(third.repair().unwrap(), vec![], "repaired for good");
    drop(third);
    drop(guard);
    assert!(!pins.exists(), "pins removed by the cleanup");
}
