//! Enrollment of real pods as root: `sluice run --redirect ebpf` with Pod objects that carry no
//! `sluice.io/cgroup` annotation, in front of kubelet-shaped cgroup trees the test builds under a
//! cgroup of its own (systemd driver, cgroupfs driver, and kind's nested layout), with processes
//! in container cgroups below the pod cgroups. Shows: the pods are found and their containers'
//! connect()s redirected; a container started later is redirected too; a pod whose cgroup
//! appears after its Pod object is enrolled within 100 ms of the directory's creation (median of
//! 20); a deleted and recreated pod cgroup is enrolled again under its new id; a deleted map pin
//! and a detached link are repaired and counted; a hostNetwork pod and an unenrolled pod are
//! untouched; 500 more pods are reconciled within the CPU budget. Everything the test creates is
//! removed by a guard, also when it fails. The agent runs with only CAP_BPF, CAP_NET_ADMIN and
//! CAP_PERFMON (`setpriv --bounding-set`), the set the README lists.
//!
//! Pods are `sluice-netns` pods (a network namespace on a bridge) whose processes run in the
//! container cgroups of those trees; the hostNetwork pod's process stays in the host's network
//! namespace. Redirected `connect()`s reach the agent's outbound listener on the bridge address;
//! the others reach a listener of the test there directly.
// Synchronous, process-level test with no async runtime: wall-clock polling is what it needs.
#![allow(clippy::disallowed_methods)]

mod common;
use common::{free_port, wait_for};
use serde_json::Value;
use sluice_netns::{Pod, Topology};
use sluice_redirect::{Counter, Maps};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn object() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bpf/sluice-ebpf.o")
}

fn cannot_run() -> Option<String> {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uid = s.lines().find(|l| l.starts_with("Uid:"))?;
            Some(uid.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        return Some("needs root (cgroups, bpf)".into());
    }
    if !object().is_file() {
        return Some(format!(
            "{} is missing: run `cargo xtask build-ebpf`",
            object().display()
        ));
    }
    if sluice_redirect::cgroup2_root().is_err() {
        return Some("no cgroup v2 hierarchy mounted".into());
    }
    None
}

/// The agent, the pins and the kubelet-shaped trees the test made under the topology's cgroup
/// (removed deepest first, before the topology removes its own).
struct Cleanup {
    agent: Option<Child>,
    pins: PathBuf,
    trees: Vec<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Err(e) = sluice_redirect::uninstall(&self.pins) {
            eprintln!("cleanup: uninstall {}: {e}", self.pins.display());
        }
        for tree in &self.trees {
            remove_tree(tree);
        }
    }
}

/// Removes a cgroup tree bottom-up, ending whatever runs in it (only the test's processes do).
fn remove_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("cleanup: could not remove {}", dir.display());
}

fn uid(n: usize) -> String {
    format!("5c1ce000-0000-4000-8000-{n:012}")
}

fn us(n: usize) -> String {
    uid(n).replace('-', "_")
}

/// A container id as containerd writes them (64 hex digits).
fn ctr(n: usize) -> String {
    format!("{n:064x}")
}

/// A Pod as the API server would show it for a running pod (uid, qosClass, phase, podIP, the
/// container's containerd ID), without any Sluice annotation.
struct PodSpec {
    name: String,
    n: usize,
    qos: &'static str,
    /// More `spec` lines.
    extra: &'static str,
    /// More labels (after `app`).
    label: &'static str,
    phase: &'static str,
}

fn pod(name: &str, n: usize, qos: &'static str) -> PodSpec {
    PodSpec {
        name: name.into(),
        n,
        qos,
        extra: "",
        label: "",
        phase: "Running",
    }
}

fn pod_yaml(p: &PodSpec) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: default\n  uid: {}\n  labels: {{app: {}{}}}\nspec:\n  containers: [{{name: app}}]\n{}status:\n  phase: {}\n  qosClass: {}\n  podIP: 10.251.{}.{}\n  containerStatuses: [{{name: app, containerID: 'containerd://{}'}}]\n---\n",
        p.name,
        uid(p.n),
        p.name,
        p.label,
        p.extra,
        p.phase,
        p.qos,
        p.n / 250,
        p.n % 250 + 1,
        ctr(p.n),
    )
}

/// Where the test's pods connect to: a listener of the test on the bridge address (accepting
/// and dropping), reached directly unless the connect() is redirected to the agent.
struct Target {
    topo: Topology,
    dst: SocketAddr,
}

impl Target {
    /// `n` connect()s in a row from one process in `cgroup`, in `pod`'s network namespace (or
    /// the host's); returns how many the programs redirected.
    fn redirects(&self, maps: &Maps, pod: Option<&Pod>, cgroup: &Path, n: usize) -> u64 {
        let before = maps.counter(Counter::ConnectRedirected).unwrap();
        let script = format!(
            "for i in $(seq {n}); do exec 3<>/dev/tcp/{}/{} || exit 1; exec 3>&-; done",
            self.dst.ip(),
            self.dst.port()
        );
        let mut cmd = match pod {
            Some(pod) => {
                let mut in_ctr = pod.clone();
                in_ctr.cgroup = cgroup.to_path_buf();
                self.topo.command(&in_ctr, "timeout").unwrap()
            }
            None => {
                let mut cmd = Command::new("timeout");
                sluice_netns::join_cgroup(&mut cmd, cgroup).unwrap();
                cmd
            }
        };
        let status = cmd
            .args(["5", "bash", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run bash");
        assert!(
            status.success(),
            "connects from {} failed: {status}",
            cgroup.display()
        );
        maps.counter(Counter::ConnectRedirected).unwrap() - before
    }
}

fn status(admin: u16) -> Option<Value> {
    let out = Command::new(SLUICE)
        .args([
            "status",
            "-o",
            "json",
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())?
}

fn pod_entry<'a>(v: &'a Value, pod: &str) -> Option<&'a Value> {
    v["redirect"]["enrolled"]
        .as_array()?
        .iter()
        .find(|p| p["pod"] == format!("default/{pod}"))
}

fn ino(p: &Path) -> u64 {
    sluice_redirect::cgroup_id(p).unwrap()
}

fn repairs(v: &Value, kind: &str) -> u64 {
    v["redirect"]["enrollment"]["repairs"][kind]
        .as_u64()
        .unwrap_or(0)
}

#[test]
fn kubelet_shaped_pods_are_found_enrolled_and_kept_enrolled() {
    if sluice_netns::skip_because(cannot_run().or_else(sluice_netns::cannot_run)) {
        return;
    }
    // The topology (bridge, network namespaces, its cgroup) goes last: declared first.
    let mut topo = Topology::create().expect("topology");
    let top = topo.cgroup().to_path_buf();
    let pins = PathBuf::from(format!("/sys/fs/bpf/sluice-enrolltest-{}", topo.id()));
    let mut guard = Cleanup {
        agent: None,
        pins: pins.clone(),
        trees: ["kubepods.slice", "kubepods", "system.slice"]
            .iter()
            .map(|t| top.join(t))
            .collect(),
    };
    let mk = |rel: &str| {
        let p = top.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    };
    // One network-namespace pod per Pod object but the hostNetwork one.
    let mut netns_pod = |name: &str| Some(topo.add_pod(name).expect("pod"));
    let (systemd, cgroupfs, kindpod) = (netns_pod("sd"), netns_pod("cgfs"), netns_pod("kind"));
    let (unenrolled, odd, pending) = (netns_pod("unenr"), netns_pod("odd"), netns_pod("pend"));
    let listener = std::net::TcpListener::bind((topo.host_ip(), 0)).unwrap();
    let dst = listener.local_addr().unwrap();
    // Accepts and drops until the process ends (a blocked accept() cannot be interrupted).
    std::thread::spawn(move || listener.incoming().for_each(drop));
    let host_ip = topo.host_ip();
    let node = Target { topo, dst };

    // Three layouts under one root, as three nodes would have them.
    let sd = "kubepods.slice/kubepods-burstable.slice";
    let kind = "system.slice/docker-0f1e2d3c4b5a.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice";
    let systemd_pod = mk(&format!("{sd}/kubepods-burstable-pod{}.slice", us(1)));
    let systemd_ctr = mk(&format!(
        "{sd}/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        us(1),
        ctr(1)
    ));
    let cgroupfs_pod = mk(&format!("kubepods/pod{}", uid(2)));
    let cgroupfs_ctr = mk(&format!("kubepods/pod{}/{}", uid(2), ctr(2)));
    let kind_pod = mk(&format!(
        "{kind}/kubelet-kubepods-besteffort-pod{}.slice",
        us(3)
    ));
    let kind_ctr = mk(&format!(
        "{kind}/kubelet-kubepods-besteffort-pod{}.slice/cri-containerd-{}.scope",
        us(3),
        ctr(3)
    ));
    let hostnet_ctr = mk(&format!(
        "{sd}/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        us(4),
        ctr(4)
    ));
    let unenrolled_ctr = mk(&format!(
        "{sd}/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        us(5),
        ctr(5)
    ));
    let bulk = "kubepods/burstable";
    for n in 1000..1500 {
        mk(&format!("{bulk}/pod{}", uid(n)));
    }

    // A pod sandbox named in no way kubelet's rules give: found from its container's ID.
    let odd_pod = mk(&format!("{sd}/sandbox-6.slice"));
    let odd_ctr = mk(&format!(
        "{sd}/sandbox-6.slice/cri-containerd-{}.scope",
        ctr(6)
    ));
    let pending_ctr = mk(&format!(
        "{sd}/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        us(7),
        ctr(7)
    ));

    let mut pods = vec![
        pod("systemd", 1, "Burstable"),
        pod("cgroupfs", 2, "Guaranteed"),
        pod("kind", 3, "BestEffort"),
        PodSpec {
            extra: "  hostNetwork: true\n",
            ..pod("hostnet", 4, "Burstable")
        },
        PodSpec {
            label: ", istio.io/dataplane-mode: none",
            ..pod("unenrolled", 5, "Burstable")
        },
        pod("oddname", 6, "Burstable"),
        PodSpec {
            phase: "Pending",
            ..pod("pending", 7, "Burstable")
        },
    ];
    // Pods whose cgroups appear later (systemd driver, Burstable), and 500 more that exist.
    for i in 0..20 {
        pods.push(pod(&format!("late{i}"), 100 + i, "Burstable"));
    }
    for n in 1000..1500 {
        pods.push(pod(&format!("bulk{n}"), n, "Burstable"));
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg).unwrap();
    let mut yaml = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}\n---\n".to_string();
    for p in &pods {
        yaml.push_str(&pod_yaml(p));
    }
    std::fs::write(cfg.join("pods.yaml"), yaml).unwrap();

    let (outbound, admin, metrics, ready) = (free_port(), free_port(), free_port(), free_port());
    let log = dir.path().join("agent.log");
    let a = |p: u16| format!("127.0.0.1:{p}");
    // Least privilege: the capabilities the DaemonSet grants and nothing else.
    let setpriv = |cmd: &mut Command| {
        cmd.args([
            "--inh-caps=-all",
            "--bounding-set=-all,+bpf,+net_admin,+perfmon",
            "--",
            SLUICE,
        ]);
    };
    let start_agent = |log: &Path| {
        let mut cmd = Command::new("setpriv");
        setpriv(&mut cmd);
        cmd.args(["run", "--no-access-log", "--redirect", "ebpf"])
            .args(["--outbound-addr", &format!("{host_ip}:{outbound}")])
            .args(["--config-dir", cfg.to_str().unwrap()])
            .args([
                "--cgroup",
                top.to_str().unwrap(),
                "--cgroup-root",
                top.to_str().unwrap(),
            ])
            .args(["--pin-dir", pins.to_str().unwrap()])
            .args(["--ebpf-object", object().to_str().unwrap()])
            .args(["--reconcile-interval", "300ms"])
            .args(["--admin-addr", &a(admin)])
            // Tests run agents side by side: none takes the default admin socket.
            .args(["--admin-socket", "none"])
            .args(["--metrics-addr", &a(metrics), "--ready-addr", &a(ready)])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    guard.agent = Some(start_agent(&log));
    let (v, _) = wait_for(Duration::from_secs(20), || {
        let v = status(admin)?;
        (v["redirect"]["lease"]["state"] == "valid"
            && v["redirect"]["enrolled"].as_array()?.len() == 504)
            .then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "agent never enrolled the 504 present pods: {}",
            std::fs::read_to_string(&log).unwrap()
        )
    });
    for (pod, dir) in [
        ("systemd", &systemd_pod),
        ("cgroupfs", &cgroupfs_pod),
        ("kind", &kind_pod),
    ] {
        let p = pod_entry(&v, pod).unwrap_or_else(|| panic!("{pod} not enrolled: {v:#}"));
        assert_eq!(p["cgroup"], dir.display().to_string(), "{p:#}");
        assert_eq!(p["cgroup_id"], ino(dir), "{p:#}");
        assert_eq!(p["found_by"], "kubelet-name", "{p:#}");
        assert!(
            p["enrolled_since_unix_ms"].is_u64() && p["last_verified_unix_ms"].is_u64(),
            "{p:#}"
        );
    }
    let odd_entry = pod_entry(&v, "oddname").expect("oddname not enrolled");
    assert_eq!(odd_entry["found_by"], "container-id", "{odd_entry:#}");
    assert_eq!(
        odd_entry["cgroup"],
        odd_pod.display().to_string(),
        "{odd_entry:#}"
    );
    for pod in ["hostnet", "unenrolled", "pending"] {
        assert!(pod_entry(&v, pod).is_none(), "{pod} enrolled");
    }
    let not: Vec<&Value> = v["redirect"]["not_redirected"]
        .as_array()
        .unwrap()
        .iter()
        .collect();
    assert!(
        not.iter().any(|p| p["pod"] == "default/hostnet"
            && p["reason"].as_str().unwrap().contains("hostNetwork")),
        "{not:?}"
    );
    assert!(
        not.iter()
            .any(|p| p["pod"] == "default/pending"
                && p["reason"].as_str().unwrap().contains("Pending")),
        "{not:?}"
    );
    assert!(
        !not.iter().any(|p| p["pod"] == "default/unenrolled"),
        "unenrolled pods are not wanted at all"
    );

    let table = Command::new(SLUICE)
        .args(["status", "--admin", &a(admin)])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("FOUND BY") && table.contains("kubelet-name"),
        "{table}"
    );
    assert!(table.contains("reconciliations"), "{table}");

    // Containers' connect()s: redirected for the enrolled pods, not for the others.
    let maps = Maps::open(&pins).unwrap();
    for (pod, ctr_dir) in [
        (&systemd, &systemd_ctr),
        (&cgroupfs, &cgroupfs_ctr),
        (&kindpod, &kind_ctr),
        (&odd, &odd_ctr),
    ] {
        assert_eq!(
            node.redirects(&maps, pod.as_ref(), ctr_dir, 1),
            1,
            "from {}",
            ctr_dir.display()
        );
    }
    assert_eq!(
        node.redirects(&maps, None, &hostnet_ctr, 1),
        0,
        "hostNetwork pod redirected"
    );
    assert_eq!(
        node.redirects(&maps, unenrolled.as_ref(), &unenrolled_ctr, 1),
        0,
        "unenrolled pod redirected"
    );
    assert_eq!(
        node.redirects(&maps, pending.as_ref(), &pending_ctr, 1),
        0,
        "pod not Running redirected"
    );
    // A container started later in an enrolled pod: covered by the pod-level cgroup.
    let second = mk(&format!(
        "{sd}/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        us(1),
        ctr(11)
    ));
    assert_eq!(
        node.redirects(&maps, systemd.as_ref(), &second, 1),
        1,
        "second container not redirected"
    );

    // The redirect decision with 524 pods enrolled: connect4 runs once per connect() and
    // sock_ops for each redirected one, over 200 connect()s from a systemd-driver pod, from the
    // kind pod, whose container is 8 levels below the root (8 lookups), and from an unenrolled
    // pod. Their run times (the kernel's own accounting) are printed, not judged: a shared host's
    // speed decides them, so the 2 us target is a verdict of `cargo xtask bench-redirect`.
    let stats = sluice_redirect::enable_run_stats().expect("BPF_ENABLE_STATS");
    for (what, pod, ctr_dir, redirected) in [
        ("systemd pod", &systemd, &systemd_ctr, 200),
        ("kind pod", &kindpod, &kind_ctr, 200),
        // Every ancestor looked up, none enrolled: the most lookups a decision makes here.
        ("unenrolled pod", &unenrolled, &unenrolled_ctr, 0),
    ] {
        let take = || {
            let all = sluice_redirect::run_stats(&pins).unwrap();
            let get = |p: &str| all.iter().find(|s| s.program == p).copied().unwrap();
            (get("sluice_connect4"), get("sluice_sock_ops"))
        };
        let (c0, s0) = take();
        assert_eq!(
            node.redirects(&maps, pod.as_ref(), ctr_dir, 200),
            redirected,
            "{what}"
        );
        let (c1, s1) = take();
        let runs = c1.runs - c0.runs;
        // At least: connect4 is attached to the whole test cgroup, where nothing else should
        // connect meanwhile, but a stray connect() must not fail the test.
        assert!(
            runs >= 200,
            "{what}: connect4 ran {runs} times for 200 connects"
        );
        let sock_ops_runs = s1.runs - s0.runs;
        assert!(
            sock_ops_runs >= redirected,
            "{what}: sock_ops ran {sock_ops_runs} times for {redirected} redirected connects"
        );
        let connect_ns = (c1.run_time - c0.run_time).as_nanos() as f64 / runs as f64;
        let sock_ops = if redirected > 0 {
            let ns = (s1.run_time - s0.run_time).as_nanos() as f64 / redirected as f64;
            format!(
                "; sock_ops (tuple save + SOCKHASH inserts) {:.2} us per redirected connect()",
                ns / 1e3
            )
        } else {
            String::new()
        };
        println!(
            "{what}: connect4 {:.2} us per connect() ({runs} runs){sock_ops}",
            connect_ns / 1e3
        );
    }
    drop(stats);

    // Pods whose cgroup appears after their Pod object: enrolled as the directory appears.
    let mut delays = Vec::new();
    for i in 0..20 {
        let path = top.join(format!("{sd}/kubepods-burstable-pod{}.slice", us(100 + i)));
        let start = Instant::now();
        std::fs::create_dir(&path).unwrap();
        let id = ino(&path);
        // Polled every 0.2 ms (the shared helper's 20 ms would be most of the figure).
        while !maps.enrolled_cgroups().contains(&id) {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "late pod {i} never enrolled"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        delays.push(start.elapsed());
    }
    delays.sort();
    let median = delays[10];
    println!(
        "enrollment after the cgroup appears: median {:.1} ms, min {:.1} ms, max {:.1} ms (20 pods)",
        median.as_secs_f64() * 1e3,
        delays[0].as_secs_f64() * 1e3,
        delays[19].as_secs_f64() * 1e3
    );
    assert!(median < Duration::from_millis(100), "{delays:?}");

    // Reconciling 504 + 20 pods: the agent's CPU per pass (its own thread's time).
    let mut cpu = Vec::new();
    let mut seen = 0;
    wait_for(Duration::from_secs(10), || {
        let v = status(admin)?;
        let n = v["redirect"]["enrollment"]["reconciliations"].as_u64()?;
        if n != seen {
            seen = n;
            cpu.push(v["redirect"]["enrollment"]["last_reconcile_cpu_us"].as_u64()?);
        }
        (cpu.len() >= 7).then_some(())
    })
    .expect("reconciliations did not run");
    cpu.sort_unstable();
    println!(
        "reconciliation of 524 enrolled pods: median {} us of agent CPU (passes {cpu:?})",
        cpu[3]
    );
    assert!(cpu[3] < 50_000, "{cpu:?}");

    // Delete and recreate the cgroupfs pod's cgroup (a pod sandbox restarted in place).
    let old = ino(&cgroupfs_pod);
    std::fs::remove_dir(&cgroupfs_ctr).unwrap();
    std::fs::remove_dir(&cgroupfs_pod).unwrap();
    std::fs::create_dir(&cgroupfs_pod).unwrap();
    std::fs::create_dir(&cgroupfs_ctr).unwrap();
    let new = ino(&cgroupfs_pod);
    assert_ne!(old, new);
    let (v, _) = wait_for(Duration::from_secs(5), || {
        let v = status(admin)?;
        (pod_entry(&v, "cgroupfs")?["cgroup_id"] == new).then_some(v)
    })
    .expect("recreated cgroup never enrolled again");
    assert!(
        repairs(&v, "cgroup_recreated") + repairs(&v, "cgroup_deleted") >= 1,
        "{:#}",
        v["redirect"]["enrollment"]
    );
    assert!(
        !maps.enrolled_cgroups().contains(&old),
        "old id still enrolled"
    );
    assert_eq!(
        node.redirects(&maps, cgroupfs.as_ref(), &cgroupfs_ctr, 1),
        1
    );

    // A deleted map pin: pinned again (the same map: the programs' one).
    std::fs::remove_file(pins.join("maps/SLUICE_ENROLLED")).unwrap();
    let (v, _) = wait_for(Duration::from_secs(5), || {
        let v = status(admin)?;
        (repairs(&v, "map_pin_missing") >= 1).then_some(v)
    })
    .expect("deleted map pin never repaired");
    assert!(pins.join("maps/SLUICE_ENROLLED").exists());
    assert_eq!(
        Maps::open(&pins).unwrap().enrolled_cgroups().len(),
        maps.enrolled_cgroups().len()
    );
    let _ = v;

    // A detached link: attached again; the pod is redirected again.
    sluice_redirect::detach_link(&pins.join("links/sluice_connect4")).unwrap();
    // Not redirected while detached, unless a reconciliation (every 300 ms) came first.
    let while_detached = node.redirects(&maps, systemd.as_ref(), &systemd_ctr, 1);
    let repaired_first = status(admin).is_some_and(|v| repairs(&v, "link_detached") >= 1);
    assert!(
        while_detached == 0 || repaired_first,
        "detached link still redirected"
    );
    wait_for(Duration::from_secs(5), || {
        (repairs(&status(admin)?, "link_detached") >= 1).then_some(())
    })
    .expect("detached link never repaired");
    assert_eq!(
        node.redirects(&maps, systemd.as_ref(), &systemd_ctr, 1),
        1,
        "repaired link redirects"
    );
    // A deleted link pin: the link goes with it (nothing else holds it); attached again.
    std::fs::remove_file(pins.join("links/sluice_connect6")).unwrap();
    wait_for(Duration::from_secs(5), || {
        (repairs(&status(admin)?, "link_missing") >= 1).then_some(())
    })
    .expect("deleted link pin never repaired");
    assert!(pins.join("links/sluice_connect6").exists());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("eBPF installation repaired"), "{text}");
    assert!(text.contains("enrollment repaired"), "{text}");

    // Restart on the pins with the same capabilities: everything reused, pods still enrolled
    // and redirected, nothing to repair.
    let mut agent = guard.agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    let log2 = dir.path().join("agent-2.log");
    guard.agent = Some(start_agent(&log2));
    let (v, _) = wait_for(Duration::from_secs(20), || {
        let v = status(admin)?;
        (v["redirect"]["lease"]["state"] == "valid"
            && v["redirect"]["enrolled"].as_array()?.len() == 524
            && v["redirect"]["enrollment"]["reconciliations"].as_u64()? >= 2)
            .then_some(v)
    })
    .unwrap_or_else(|| panic!("restart: {}", std::fs::read_to_string(&log2).unwrap()));
    let r = &v["redirect"];
    assert_eq!(
        r["programs"]["reused"].as_array().unwrap().len(),
        5,
        "{r:#}"
    );
    assert_eq!(r["enrollment"]["repairs"], serde_json::json!({}), "{r:#}");
    assert_eq!(
        node.redirects(&maps, systemd.as_ref(), &systemd_ctr, 1),
        1,
        "after restart"
    );
    drop(maps);

    // Uninstall with the same capabilities.
    let mut agent = guard.agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    let mut cmd = Command::new("setpriv");
    setpriv(&mut cmd);
    let out = cmd
        .args(["uninstall", "--pin-dir", pins.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.exists(), "uninstall left pins");
    drop(guard);
    drop(node);
    assert!(!top.exists() && !pins.exists(), "left behind");
}
