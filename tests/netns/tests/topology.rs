//! Root-only: a topology's pods are in their own network namespace and cgroup, reach the host
//! over the bridge from their own address, resolve names from the topology's hosts file, and
//! everything is gone after the topology is dropped. Without root it says why and returns, except
//! under `CI`, where it fails.

use std::{io::Read as _, net::TcpListener, path::Path, process::Command, time::Duration};

use sluice_netns::{cannot_run, Topology};

fn skip() -> bool {
    match cannot_run() {
        None => false,
        Some(why) if std::env::var_os("CI").is_some() => panic!("cannot run under CI: {why}"),
        Some(why) => {
            eprintln!("skipped: {why}");
            true
        }
    }
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
    for ns in &netns {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "netns {ns} left behind"
        );
    }
    for link in &links {
        let out = Command::new("ip")
            .args(["link", "show", link])
            .output()
            .unwrap();
        assert!(!out.status.success(), "link {link} left behind");
    }
    assert!(!cgroup.exists(), "cgroup {} left behind", cgroup.display());
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
