//! Root-only: a topology's pods are in their own network namespace and cgroup, reach the host
//! over the bridge from their own address (IPv4, and IPv6 in a dual-stack topology, where pods
//! also reach each other and the host reaches them), resolve names from the topology's hosts file,
//! and everything is gone after the topology is dropped. Without root (or IPv6, for the dual-stack
//! test) it says why and returns, except under `CI`, where it fails.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use sluice_netns::{cannot_run, cannot_run_ipv6, skip_because, Pod, Topology};

fn skip() -> bool {
    skip_because(cannot_run())
}

#[test]
fn pods_reach_the_host_from_their_own_address_and_are_removed() {
    if skip() {
        return;
    }
    let (netns, links, cgroup) = {
        let mut topo = Topology::create().expect("topology");
        let a = topo.add_pod("a").expect("pod a");
        let b = topo.add_pod("b").expect("pod b");
        assert_ne!(a.ip, b.ip);
        // IPv4 only unless asked for.
        assert_eq!((a.ip6, topo.host_ip6()), (None, None));
        topo.set_hosts(&[(topo.host_ip(), vec!["node".into(), "node.local".into()])])
            .unwrap();

        // Name resolution from the topology's hosts file, inside the pod only.
        let out = topo.exec(&a, "getent", &["hosts", "node.local"]).unwrap();
        assert!(out.status.success(), "getent in pod: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&topo.host_ip().to_string()),
            "{out:?}"
        );

        // The pod's process is in the pod's cgroup.
        let out = topo.exec(&a, "cat", &["/proc/self/cgroup"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let rel = a
            .cgroup
            .strip_prefix(topo.cgroup().parent().unwrap())
            .unwrap();
        assert!(
            text.lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&*rel.to_string_lossy())),
            "pod cgroup {} not in {text}",
            rel.display()
        );

        // A TCP connection from the pod arrives at the host from the pod's address.
        let listener = TcpListener::bind((topo.host_ip(), 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let script = format!("exec 3<>/dev/tcp/node/{port} && echo hello >&3 && exec 3>&-");
        let mut client = topo.command(&b, "bash").unwrap();
        client.args(["-c", &script]);
        let mut child = client.spawn().unwrap();
        let (mut stream, peer) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = String::new();
        stream.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello\n");
        assert_eq!(peer.ip(), b.ip);
        assert!(child.wait().unwrap().success());

        // A long-running process the topology must end.
        let mut sleeper = topo.command(&a, "sleep").unwrap();
        sleeper.arg("600");
        let pid = topo.spawn(&mut sleeper).unwrap();
        assert!(topo.running(pid));

        let links: Vec<String> = vec![format!("slc{}b", topo.id())];
        (
            vec![a.netns.clone(), b.netns.clone()],
            links,
            topo.cgroup().to_path_buf(),
        )
    };
    assert_gone(&netns, &links, &cgroup);
}

/// Adding pods never changes the bridge's MAC address: a pod that talked to the node before
/// other pods were added still reaches it at once, on a new connection, with the neighbour entry
/// it cached. (Without a fixed address the bridge takes its lowest port's MAC, and a pod's cached
/// entry goes stale whenever a new veth's random MAC is lower.)
#[test]
fn adding_pods_keeps_the_node_reachable_for_pods_that_talked_to_it() {
    if skip() {
        return;
    }
    let mut topo = Topology::create().expect("topology");
    let a = topo.add_pod("a").expect("pod a");
    let listener = TcpListener::bind((topo.host_ip(), 0)).unwrap();
    let host = topo.host_ip().to_string();
    assert_eq!(peer_of_line_from(&topo, &a, &host, &listener), a.ip);
    let mac = bridge_mac(&topo);
    assert_eq!(mac, topo.bridge_mac());
    for i in 0..8 {
        topo.add_pod(&format!("p{i}")).expect("pod");
        assert_eq!(
            bridge_mac(&topo),
            mac,
            "the bridge's MAC changed when pod p{i} was added"
        );
    }
    // What pod a cached for the node is still the bridge's address, and it still gets through.
    let out = Command::new("ip")
        .args(["-n", &a.netns, "neigh", "show", &host])
        .output()
        .unwrap();
    let neigh = String::from_utf8_lossy(&out.stdout);
    assert!(
        neigh.contains(&format!("lladdr {mac}")),
        "pod a's neighbour entry for the node: {neigh:?}, bridge {mac}"
    );
    assert_eq!(peer_of_line_from(&topo, &a, &host, &listener), a.ip);
}

/// The MAC address the kernel reports for the topology's bridge.
fn bridge_mac(topo: &Topology) -> String {
    let out = Command::new("ip")
        .args(["-br", "link", "show", &format!("slc{}b", topo.id())])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .expect("ip -br link: NAME STATE MAC")
        .to_string()
}

/// Every netns, link and the cgroup of a dropped topology are gone.
fn assert_gone(netns: &[String], links: &[String], cgroup: &Path) {
    for ns in netns {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "netns {ns} left behind"
        );
    }
    for link in links {
        let out = Command::new("ip")
            .args(["link", "show", link])
            .output()
            .unwrap();
        assert!(!out.status.success(), "link {link} left behind");
    }
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
}

/// From `pod`, a line sent over TCP to `host` (a name or address) at `listener`'s port: the peer
/// address the listener saw.
fn peer_of_line_from(topo: &Topology, pod: &Pod, host: &str, listener: &TcpListener) -> IpAddr {
    let port = listener.local_addr().unwrap().port();
    let script = format!("exec 3<>/dev/tcp/{host}/{port} && echo hello >&3 && exec 3>&-");
    let mut child = topo.command(pod, "bash").unwrap();
    let mut child = child.args(["-c", &script]).spawn().unwrap();
    let (peer, got) = accept_one(listener);
    assert_eq!(got, "hello\n");
    assert!(child.wait().unwrap().success());
    peer.ip()
}

/// Accepts one connection on `listener` and reads it to the end (bounded by a 5 s read timeout
/// and a 5 s accept wait): the peer address and what it sent.
fn accept_one(listener: &TcpListener) -> (SocketAddr, String) {
    listener.set_nonblocking(true).unwrap();
    let mut waited = 0;
    let (mut stream, peer) = loop {
        match listener.accept() {
            Ok(conn) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && waited < 500 => {
                waited += 1;
                #[allow(clippy::disallowed_methods)] // plain std test: bounded blocking wait
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no connection within 5 s: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut got = String::new();
    stream.read_to_string(&mut got).unwrap();
    (peer, got)
}

/// A dual-stack topology: each pod and the host have an IPv6 address on the bridge, usable at once
/// (not tentative); pods reach the host and each other over IPv6 from their own address, the host
/// reaches a pod, names resolve to IPv6 from the hosts file; a v6 listener on `::` in a pod also
/// answers an extra address given to the pod; everything is removed afterwards.
#[test]
fn dual_stack_pods_reach_each_other_and_the_host_over_ipv6() {
    if skip_because(cannot_run_ipv6()) {
        return;
    }
    let (netns, links, cgroup): (Vec<String>, Vec<String>, PathBuf) = {
        let mut topo = Topology::create_dual_stack().expect("dual-stack topology");
        let a = topo.add_pod("a").expect("pod a");
        let b = topo.add_pod("b").expect("pod b");
        let host6 = topo.host_ip6().expect("host IPv6 address");
        let (a6, b6) = (a.ip6.expect("pod a IPv6"), b.ip6.expect("pod b IPv6"));
        assert_ne!(a6, b6);
        assert!(
            [host6, a6, b6].iter().all(|ip| ip.segments()[0] == 0xfd00),
            "not ULA: {host6} {a6} {b6}"
        );
        // IPv4 is there as before.
        assert_ne!(a.ip, b.ip);

        // The addresses are usable at once: no duplicate address detection pending.
        let out = Command::new("ip")
            .args(["-n", &a.netns, "-6", "addr", "show", "dev", "eth0"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains(&format!("{a6}/64")))
            .unwrap_or_else(|| panic!("{a6} not on eth0: {text}"));
        assert!(!line.contains("tentative"), "{text}");

        topo.set_hosts(&[
            (IpAddr::V4(topo.host_ip()), vec!["node".to_string()]),
            (IpAddr::V6(host6), vec!["node6".to_string()]),
        ])
        .unwrap();
        let out = topo.exec(&b, "getent", &["ahostsv6", "node6"]).unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&host6.to_string()),
            "{out:?}"
        );

        // Pod -> host over IPv6, by name: from the pod's own IPv6 address.
        let listener = TcpListener::bind((host6, 0)).unwrap();
        let peer = peer_of_line_from(&topo, &b, "node6", &listener);
        assert_eq!(peer, IpAddr::V6(b6));

        // Pod -> pod over IPv6: a listener in pod a on `::` sees pod b's IPv6 address.
        let listener = a.listen_on("::".parse().unwrap(), 0).unwrap();
        let port = listener.local_addr().unwrap().port();
        let peer = peer_of_line_from(&topo, &b, &a6.to_string(), &listener);
        assert_eq!(peer, IpAddr::V6(b6));

        // An extra address of pod a (as a cluster IP a pod answers for in place of kube-proxy),
        // reached from pod b on the same listener.
        let extra = std::net::Ipv6Addr::from(u128::from(host6) | 0xffff_0000);
        topo.add_address(&a, IpAddr::V6(extra)).unwrap();
        let peer = peer_of_line_from(&topo, &b, &extra.to_string(), &listener);
        assert_eq!(peer, IpAddr::V6(b6));

        // Host -> pod over IPv6: from the host's address on the bridge.
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::from((a6, port)), Duration::from_secs(5))
                .unwrap();
        stream.write_all(b"from-host\n").unwrap();
        drop(stream);
        let (peer, got) = accept_one(&listener);
        assert_eq!(
            (peer.ip(), got.as_str()),
            (IpAddr::V6(host6), "from-host\n")
        );

        // IPv4 still works in the same pods.
        let listener = TcpListener::bind((topo.host_ip(), 0)).unwrap();
        let peer = peer_of_line_from(&topo, &a, "node", &listener);
        assert_eq!(peer, IpAddr::V4(a.ip));

        (
            vec![a.netns.clone(), b.netns.clone()],
            vec![format!("slc{}b", topo.id())],
            topo.cgroup().to_path_buf(),
        )
    };
    assert_gone(&netns, &links, &cgroup);
}

/// What a run killed with SIGKILL leaves (named after a PID that no longer exists) is swept; a
/// live run's objects are not.
#[test]
fn sweep_removes_only_what_dead_runs_left() {
    if skip() {
        return;
    }
    let live = Topology::create().expect("topology");
    // PID 0x3fffff is above any PID this machine hands out (pid_max is at most 2^22).
    let dead_ns = format!("{}3fffffx0-gone", sluice_netns::PREFIX);
    let dead_link = "slc3fffffx0b";
    let ok = |c: &mut Command| assert!(c.status().unwrap().success(), "{c:?}");
    ok(Command::new("ip").args(["netns", "add", &dead_ns]));
    ok(Command::new("ip").args(["link", "add", dead_link, "type", "bridge"]));
    let removed = sluice_netns::sweep_stale();
    // Clean up ourselves if sweeping failed, before asserting.
    let _ = Command::new("ip").args(["netns", "del", &dead_ns]).status();
    let _ = Command::new("ip").args(["link", "del", dead_link]).status();
    assert!(removed.contains(&format!("netns {dead_ns}")), "{removed:?}");
    assert!(
        removed.contains(&format!("link {dead_link}")),
        "{removed:?}"
    );
    assert!(live.cgroup().exists(), "a live topology was swept");
    let out = Command::new("ip")
        .args(["link", "show", &format!("slc{}b", live.id())])
        .output()
        .unwrap();
    assert!(out.status.success(), "a live topology's bridge was swept");
}

/// Kubelet-shaped pods: their processes run in a container cgroup below a pod-level cgroup named
/// as kubelet names a BestEffort pod's (either driver), which the agent's resolver finds from the
/// uid alone; dropping the topology removes those levels too, with a process still running.
#[test]
fn kubelet_shaped_pods_run_in_container_cgroups_under_kubelets_names() {
    if skip() {
        return;
    }
    use sluice_netns::CgroupDriver;
    use sluice_redirect::cgroup::{PodCgroupQuery, QosClass, Resolution, Resolver};
    let (netns, cgroup) = {
        let mut topo = Topology::create().expect("topology");
        let sd = topo
            .add_kubelet_pod("sd", CgroupDriver::Systemd)
            .expect("systemd pod");
        let fs = topo
            .add_kubelet_pod("fs", CgroupDriver::Cgroupfs)
            .expect("cgroupfs pod");
        let (sd_uid, fs_uid) = (sd.uid.clone().unwrap(), fs.uid.clone().unwrap());
        assert_ne!(sd_uid, fs_uid);
        let rel = |p: &Pod| p.cgroup.strip_prefix(topo.cgroup()).unwrap().to_path_buf();
        let sd_rel = rel(&sd).display().to_string();
        assert!(
            sd_rel.starts_with(&format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-",
                sd_uid.replace('-', "_")
            )) && sd_rel.ends_with(".scope"),
            "{sd_rel}"
        );
        assert!(
            rel(&fs)
                .display()
                .to_string()
                .starts_with(&format!("kubepods/besteffort/pod{fs_uid}/")),
            "{}",
            rel(&fs).display()
        );
        assert!(!topo.cgroup().join("sd").exists(), "no flat cgroup as well");

        // The resolver finds each pod-level cgroup from the uid and QoS class.
        let resolver = Resolver::new(topo.cgroup());
        for (pod, uid) in [(&sd, &sd_uid), (&fs, &fs_uid)] {
            let q = PodCgroupQuery {
                uid: Some(uid.clone()),
                qos: Some(QosClass::BestEffort),
                ..Default::default()
            };
            match resolver.resolve(&q) {
                Resolution::Found { path, .. } => {
                    assert_eq!(Some(path.as_path()), pod.cgroup.parent())
                }
                other => panic!("{}: {other:?}", pod.name),
            }
        }

        // The pod's process is in its container cgroup.
        let out = topo.exec(&sd, "cat", &["/proc/self/cgroup"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.lines()
                .any(|l| l.starts_with("0::") && l.ends_with(&sd_rel)),
            "{sd_rel} not in {text}"
        );
        let mut sleeper = topo.command(&fs, "sleep").unwrap();
        sleeper.arg("600");
        let pid = topo.spawn(&mut sleeper).unwrap();
        assert!(topo.running(pid));
        (
            vec![sd.netns.clone(), fs.netns.clone()],
            topo.cgroup().to_path_buf(),
        )
    };
    assert_gone(&netns, &[], &cgroup);
}
