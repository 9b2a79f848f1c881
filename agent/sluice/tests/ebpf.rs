//! `sluice run --redirect ebpf` as an operator runs it (root only): it attaches the programs to a
//! cgroup of its own and pins under a directory of its own (so parallel tests do not collide),
//! shows the redirect in `sluice status`, enrolls and releases a Pod from its config directory
//! live, fails open by lease after SIGKILL, reuses its pins on restart, disables redirection on
//! SIGTERM; `sluice uninstall` removes the pins and says so, twice without harm. Everything the test
//! creates is removed by a guard, also when it fails.
//!
//! Without root or without `target/bpf/sluice-ebpf.o` the root test says why and returns, except
//! under `CI`, where it fails.
// Synchronous, process-level test with no async runtime: wall-clock polling is what it needs.
#![allow(clippy::disallowed_methods)]

mod common;
use common::{free_port, wait_for};
use serde_json::Value;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn object() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/bpf/sluice-ebpf.o")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// `Some(reason)` when the root test cannot run here.
fn cannot_run() -> Option<String> {
    if !is_root() {
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

fn sluice(args: &[&str]) -> Output {
    Command::new(SLUICE)
        .args(args)
        .output()
        .expect("run sluice")
}

/// Removes what the test created: the agent, the pins, the cgroups.
struct Cleanup {
    agent: Option<Child>,
    pins: PathBuf,
    cgroups: Vec<PathBuf>,
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
        // Innermost first; nothing runs in them.
        for cg in self.cgroups.iter().rev() {
            if let Err(e) = std::fs::remove_dir(cg) {
                if cg.exists() {
                    eprintln!("cleanup: rmdir {}: {e}", cg.display());
                }
            }
        }
    }
}

fn pod_yaml(cgroup: &Path, own_label: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: client\n  namespace: default\n  labels: {{app: client{own_label}}}\n  annotations: {{sluice.io/cgroup: {}}}\nstatus: {{podIP: 10.250.0.2}}\n",
        cgroup.display()
    )
}

struct Ports {
    outbound: u16,
    admin: u16,
    metrics: u16,
    ready: u16,
}

fn start(
    cfg: &Path,
    attach: &Path,
    pins: &Path,
    ports: &Ports,
    log: &Path,
    extra: &[&str],
) -> Child {
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let log = std::fs::File::create(log).unwrap();
    Command::new(SLUICE)
        .args(["run", "--no-access-log", "--redirect", "ebpf"])
        .args(["--config-dir", cfg.to_str().unwrap()])
        .args(["--cgroup", attach.to_str().unwrap()])
        .args(["--pin-dir", pins.to_str().unwrap()])
        .args(["--ebpf-object", object().to_str().unwrap()])
        .args([
            "--exclude-ports",
            "2222,5353",
            "--exclude-cidrs",
            "192.0.2.0/24",
        ])
        .args(["--outbound-addr", &addr(ports.outbound)])
        .args(["--admin-addr", &addr(ports.admin)])
        // Tests run agents side by side: none takes the default admin socket.
        .args(["--admin-socket", "none"])
        .args(["--metrics-addr", &addr(ports.metrics)])
        .args(["--ready-addr", &addr(ports.ready)])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sluice run")
}

fn status(admin: u16) -> Option<Value> {
    let out = sluice(&[
        "status",
        "-o",
        "json",
        "--admin",
        &format!("127.0.0.1:{admin}"),
    ]);
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn wait_serving(admin: u16, ready: u16) -> Value {
    let ready: SocketAddr = format!("127.0.0.1:{ready}").parse().unwrap();
    wait_for(Duration::from_secs(10), || {
        TcpStream::connect_timeout(&ready, Duration::from_millis(200)).ok()?;
        let v = status(admin)?;
        (v["redirect"]["lease"]["state"] == "valid").then_some(v)
    })
    .expect("agent never served with a valid lease")
    .0
}

fn enrolled(v: &Value) -> Vec<(String, u64)> {
    v["redirect"]["enrolled"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["pod"].as_str().unwrap_or("").to_string(),
                p["cgroup_id"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn run_with_ebpf_redirect_enrolls_live_fails_open_reuses_pins_and_uninstalls() {
    if let Some(why) = cannot_run() {
        if std::env::var_os("CI").is_some() {
            panic!("eBPF CLI test cannot run under CI: {why}");
        }
        eprintln!("skipping eBPF CLI test: {why}");
        return;
    }
    let tag = format!("{:x}", std::process::id() % 0xffff);
    let root = sluice_redirect::cgroup2_root().unwrap();
    let attach = root.join(format!("sluice-clitest-{tag}"));
    let pod_cg = attach.join("client");
    let pins = PathBuf::from(format!("/sys/fs/bpf/sluice-clitest-{tag}"));
    let mut guard = Cleanup {
        agent: None,
        pins: pins.clone(),
        cgroups: Vec::new(),
    };
    std::fs::create_dir(&attach).unwrap();
    guard.cgroups.push(attach.clone());
    std::fs::create_dir(&pod_cg).unwrap();
    guard.cgroups.push(pod_cg.clone());
    let pod_id = sluice_redirect::cgroup_id(&pod_cg).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config");
    std::fs::create_dir(&cfg).unwrap();
    std::fs::write(cfg.join("pods.yaml"), pod_yaml(&pod_cg, "")).unwrap();
    let ports = Ports {
        outbound: free_port(),
        admin: free_port(),
        metrics: free_port(),
        ready: free_port(),
    };
    let log1 = dir.path().join("agent-1.log");
    guard.agent = Some(start(&cfg, &attach, &pins, &ports, &log1, &[]));

    // Serving: status shows the redirect, the lease, the enrolled pod and the exclusions.
    let v = wait_serving(ports.admin, ports.ready);
    let r = &v["redirect"];
    assert_eq!(v["agent"]["redirect"], "ebpf", "{v:#}");
    assert_eq!(r["mode"], "ebpf");
    assert_eq!(r["enabled"], true);
    assert_eq!(r["sockmap"], true, "the sk_msg fast path is on by default");
    assert_eq!(r["pin_dir"], pins.display().to_string());
    assert_eq!(r["cgroup"], attach.display().to_string());
    assert_eq!(r["proxy"]["ipv4"], format!("127.0.0.1:{}", ports.outbound));
    assert_eq!(
        r["programs"]["attached"].as_array().unwrap().len(),
        5,
        "{r:#}"
    );
    assert_eq!(r["exclusions"]["ports"], serde_json::json!([2222, 5353]));
    assert_eq!(
        r["exclusions"]["cidrs"],
        serde_json::json!(["192.0.2.0/24"])
    );
    assert!(r["counters"]["connect_fail_open"].is_u64(), "{r:#}");
    assert_eq!(
        enrolled(&v),
        vec![("default/client".to_string(), pod_id)],
        "{r:#}"
    );
    let table = sluice(&["status", "--admin", &format!("127.0.0.1:{}", ports.admin)]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("redirect:         ebpf"), "{table}");
    assert!(table.contains("default/client"), "{table}");
    let log = read(&log1);
    assert!(log.contains("attached [sluice_connect4"), "{log}");
    assert!(
        log.contains(&format!(
            "enrolled pod default/client: cgroup {}",
            pod_cg.display()
        )),
        "{log}"
    );

    // The pod opts out by its own label: released within the reload second; back in likewise.
    std::fs::write(
        cfg.join("pods.yaml"),
        pod_yaml(&pod_cg, ", istio.io/dataplane-mode: none"),
    )
    .unwrap();
    let (_, took) = wait_for(Duration::from_secs(3), || {
        status(ports.admin).filter(|v| enrolled(v).is_empty())
    })
    .expect("pod never released");
    assert!(took < Duration::from_secs(1), "release took {took:?}");
    assert!(read(&log1).contains("released pod default/client"));
    std::fs::write(cfg.join("pods.yaml"), pod_yaml(&pod_cg, "")).unwrap();
    let (_, took) = wait_for(Duration::from_secs(3), || {
        status(ports.admin).filter(|v| !enrolled(v).is_empty())
    })
    .expect("pod never enrolled again");
    assert!(took < Duration::from_secs(1), "enrollment took {took:?}");

    // SIGKILL: nobody renews the lease; it runs out within 2 s (fail open).
    let mut agent = guard.agent.take().unwrap();
    agent.kill().unwrap();
    agent.wait().unwrap();
    let maps = sluice_redirect::Maps::open(&pins).expect("pins survive the agent");
    let (_, took) = wait_for(Duration::from_secs(3), || {
        matches!(maps.lease().ok()?, sluice_redirect::Lease::Expired(_)).then_some(())
    })
    .expect("lease never expired after SIGKILL");
    assert!(
        took < Duration::from_secs(2),
        "lease expired after {took:?}"
    );
    assert_eq!(maps.enrolled_cgroups(), vec![pod_id], "enrollment survives");

    // Restart: the pins are reused, not attached twice; this time without the sk_msg fast path.
    let log2 = dir.path().join("agent-2.log");
    guard.agent = Some(start(
        &cfg,
        &attach,
        &pins,
        &ports,
        &log2,
        &["--no-sockmap"],
    ));
    let v = wait_serving(ports.admin, ports.ready);
    assert_eq!(v["redirect"]["sockmap"], false, "{v:#}");
    assert!(!maps.sockmap().unwrap(), "NO_SOCKMAP in the pinned config");
    assert_eq!(
        v["redirect"]["programs"]["reused"]
            .as_array()
            .unwrap()
            .len(),
        5,
        "{v:#}"
    );
    assert_eq!(enrolled(&v), vec![("default/client".to_string(), pod_id)]);
    let log = read(&log2);
    assert!(
        log.contains("attached [], reused [sluice_connect4, sluice_connect6, sluice_getsockopt, sluice_sock_ops, sluice_sk_msg]"),
        "{log}"
    );

    // SIGTERM: redirection is disabled before the drain, and the process exits cleanly.
    let mut agent = guard.agent.take().unwrap();
    let pid = agent.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (code, _) = wait_for(Duration::from_secs(8), || agent.try_wait().ok().flatten())
        .expect("agent did not exit after SIGTERM");
    assert!(code.success(), "{code}");
    assert!(
        read(&log2).contains("redirection disabled"),
        "{}",
        read(&log2)
    );
    assert!(!maps.config().unwrap().enabled());
    drop(maps);

    // Uninstall says what it removed; again, that there is nothing left.
    let pin_arg = pins.to_str().unwrap();
    let out = sluice(&["uninstall", "--pin-dir", pin_arg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("detached: sluice_connect4"), "{text}");
    assert!(text.contains("SLUICE_CONFIG"), "{text}");
    assert!(!pins.exists(), "pins removed");
    let out = sluice(&["uninstall", "--pin-dir", pin_arg]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("nothing to remove"), "{text}");
}

#[test]
fn ebpf_flags_without_ebpf_mode_and_a_missing_object_are_explained() {
    let out = sluice(&["run", "--proxy-ip", "10.0.0.1", "--no-sockmap"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--proxy-ip, --no-sockmap: only meaningful with --redirect ebpf"),
        "{err}"
    );

    let port = free_port();
    let out = sluice(&[
        "run",
        "--redirect",
        "ebpf",
        "--ebpf-object",
        "/nonexistent/sluice-ebpf.o",
        "--outbound-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cargo xtask build-ebpf"), "{err}");

    let out = sluice(&[
        "run",
        "--redirect",
        "ebpf",
        "--ebpf-object",
        "/dev/null",
        "--outbound-addr",
        &format!("0.0.0.0:{port}"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pass --proxy-ip"), "{err}");
}
