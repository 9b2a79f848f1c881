//! The `sluice` binary as an operator runs it: `validate` output and exit codes, and `run` as a real
//! process that reloads its config directory within a second, keeps the last good configuration when
//! an edit is bad (and says so in `sluice status`), and drains on SIGTERM.
// Synchronous, process-level test with no async runtime: wall-clock polling is what it needs.
#![allow(clippy::disallowed_methods)]

mod common;
use common::wait_for;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn sluice(args: &[&str]) -> Output {
    Command::new(SLUICE)
        .args(args)
        .output()
        .expect("run sluice")
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::write(dir.join(file), text).unwrap();
}

#[test]
fn validate_accepts_the_tutorials_yaml() {
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/tutorial");
    let out = sluice(&["validate", examples]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("0 error(s)"), "{stdout}");
}

#[test]
fn validate_names_file_document_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ok}\nspec:\n  hosts: [a]\n  http:\n  - route: [{destination: {host: a}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pricing}\nspec:\n  hosts: [pricing]\n  http:\n  - route: [{destination: {host: pricing}}]\n    timeout: 5 s\n",
    );
    let out = sluice(&["validate", dir.path().to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("error:"))
        .expect("an error line");
    assert!(line.contains("bad.yaml"), "{line}");
    assert!(line.contains("document 2"), "{line}");
    assert!(line.contains("VirtualService default/pricing"), "{line}");
    assert!(line.contains("spec.http[0].timeout"), "{line}");
}

#[test]
fn validate_warns_about_typos_and_strict_fails_on_them() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: inventory}\nspec:\n  host: inventory\n  trafficPolicy:\n    outlierDetection:\n      consecutive5xxError: 5\n",
    );
    let path = dir.path().to_str().unwrap();
    let out = sluice(&["validate", path]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("spec.trafficPolicy.outlierDetection.consecutive5xxError"),
        "{stdout}"
    );
    assert_eq!(
        sluice(&["validate", "--strict", path]).status.code(),
        Some(1)
    );
    assert_eq!(
        sluice(&["validate", "/nonexistent/x.yaml"]).status.code(),
        Some(1)
    );
}

/// Kills the agent if a test fails before it ends it.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A minimal upstream: answers `200 ok` to at most 200 connections, then stops.
fn upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200) {
            let Ok(mut s) = stream else { continue };
            let mut buf = [0u8; 4096];
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    port
}

/// `curl -x PROXY http://pricing/`: status code of a fresh connection's response.
fn get_via(proxy: SocketAddr, url: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&proxy, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {url} HTTP/1.1\r\nHost: pricing\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut rsp = String::new();
    s.read_to_string(&mut rsp).ok()?;
    rsp.split_whitespace().nth(1)?.parse().ok()
}

const REGISTRY: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: pricing, namespace: default}\nspec:\n  clusterIP: 10.96.0.20\n  ports: [{name: http, port: 80, targetPort: 9090}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: pricing-1, namespace: default, labels: {kubernetes.io/service-name: pricing}}\naddressType: IPv4\nendpoints: [{addresses: [127.0.0.1]}]\nports: [{name: http, port: PORT}]\n";

fn abort_vs(status: u16) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: pricing}}\nspec:\n  hosts: [pricing]\n  http:\n  - fault:\n      abort:\n        httpStatus: {status}\n        percentage: {{value: 100}}\n    route: [{{destination: {{host: pricing}}}}]\n")
}

/// With eBPF redirection the programs are given the outbound port before the listener opens, so a
/// port the kernel would choose is refused up front, naming the flag.
#[test]
fn run_refuses_an_outbound_port_0_with_ebpf_redirection() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(SLUICE)
        .args([
            "run",
            "--redirect",
            "ebpf",
            "--outbound-addr",
            "127.0.0.1:0",
        ])
        .arg("--config-dir")
        .arg(dir.path())
        .args(["--admin-socket", "none"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--outbound-addr 127.0.0.1:0") && stderr.contains("cannot be 0"),
        "{stderr}"
    );
}

#[test]
fn run_reloads_within_a_second_keeps_last_good_and_drains_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "registry.yaml",
        &REGISTRY.replace("PORT", &upstream().to_string()),
    );
    // Every listener on port 0: the agent binds what the kernel gives it and says which in
    // --address-file (no free port guessed here, which another test could take meanwhile).
    let addresses = dir.path().join("addresses.json");
    let child = Command::new(SLUICE)
        .args([
            "run",
            "--no-access-log",
            "--config-dir",
            dir.path().to_str().unwrap(),
        ])
        .args([
            "--outbound-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        // Tests run agents side by side: none takes the default admin socket.
        .args(["--admin-socket", "none"])
        .args([
            "--metrics-addr",
            "127.0.0.1:0",
            "--ready-addr",
            "127.0.0.1:0",
        ])
        .arg("--address-file")
        .arg(&addresses)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice run");
    let mut agent = Agent(child);
    let (bound, _) = wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&addresses).ok()?;
        Some(serde_json::from_str::<serde_json::Value>(&text).expect("the address file is JSON"))
    })
    .expect("the agent never wrote its addresses");
    let addr = |key: &str| -> SocketAddr {
        let a: SocketAddr = bound[key].as_str().unwrap().parse().unwrap();
        assert!(a.ip().is_loopback() && a.port() != 0, "{key}: {a}");
        a
    };
    let (proxy, ready, metrics) = (addr("outbound"), addr("ready"), addr("metrics"));
    let admin = addr("admin").to_string();
    let ports: std::collections::BTreeSet<u16> =
        [proxy, ready, metrics].iter().map(|a| a.port()).collect();
    assert_eq!(ports.len(), 3, "{bound:#}");

    let ready_code = wait_for(Duration::from_secs(10), || {
        get_via(ready, "/healthz/ready").filter(|c| *c == 200)
    });
    assert!(ready_code.is_some(), "agent never became ready");
    assert_eq!(get_via(proxy, "http://pricing/"), Some(200));

    // `sluice config`: the snapshot's fields at the top, the agent's own configuration under
    // `agent` (its listeners as bound, the address file's); `sluice status` has no Kubernetes
    // section in standalone mode.
    let config: serde_json::Value =
        serde_json::from_slice(&sluice(&["config", "-o", "json", "--admin", &admin]).stdout)
            .expect("sluice config -o json");
    assert_eq!(config["agent"]["mode"], "standalone", "{config:#}");
    assert_eq!(config["agent"]["listeners"], bound, "{config:#}");
    assert_eq!(get_via(metrics, "/stats/prometheus"), Some(200));
    assert_eq!(config["agent"]["cluster_domain"], "cluster.local");
    assert_eq!(
        config["agent"]["config_dir"].as_str(),
        dir.path().to_str(),
        "{config:#}"
    );
    assert!(config
        .pointer("/services/pricing.default.svc.cluster.local/cluster_ips/0")
        .is_some());
    let status: serde_json::Value =
        serde_json::from_slice(&sluice(&["status", "-o", "json", "--admin", &admin]).stdout)
            .expect("sluice status -o json");
    assert!(status["kubernetes"].is_null(), "{status:#}");

    // A new VirtualService takes effect within a second, without restart.
    write(dir.path(), "vs.yaml", &abort_vs(418));
    let (_, took) = wait_for(Duration::from_secs(3), || {
        get_via(proxy, "http://pricing/").filter(|c| *c == 418)
    })
    .expect("the new VirtualService never took effect");
    assert!(took < Duration::from_secs(1), "reload took {took:?}");

    // A bad edit is rejected: the last good VirtualService stays in force, and status says why.
    write(
        dir.path(),
        "vs.yaml",
        &abort_vs(418).replace("httpStatus: 418", "httpStatus: 418\n        percent: nope"),
    );
    let rejected = wait_for(Duration::from_secs(3), || {
        let out = sluice(&["status", "-o", "json", "--admin", &admin]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("vs.yaml").then_some(text)
    })
    .map(|(t, _)| t)
    .expect("rejection never shown in sluice status");
    assert!(rejected.contains("\"rejections\""), "{rejected}");
    assert!(rejected.contains("percent"), "{rejected}");
    assert_eq!(
        get_via(proxy, "http://pricing/"),
        Some(418),
        "last good config must stay in force"
    );

    // SIGTERM: readiness drops, the process exits cleanly.
    let pid = agent.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let exited = wait_for(Duration::from_secs(8), || agent.0.try_wait().ok().flatten());
    let (status, _) = exited.expect("agent did not exit after SIGTERM");
    assert!(status.success(), "exit status {status}");
}

#[test]
fn run_takes_exactly_one_mode_and_kubernetes_mode_needs_the_node() {
    let run = |args: &[&str]| {
        Command::new(SLUICE)
            .arg("run")
            .args(args)
            .env_remove("NODE_NAME")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("run sluice")
    };
    let out = run(&[
        "--config-dir",
        "/nonexistent",
        "--kubeconfig",
        "/nonexistent",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exclude each other"), "{stderr}");

    let out = run(&["--kubeconfig", "/nonexistent"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--node-name"), "{stderr}");

    // With the node, a kubeconfig that cannot be read is named.
    let out = run(&[
        "--kubeconfig",
        "/nonexistent/kubeconfig",
        "--node-name",
        "n1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/kubeconfig"), "{stderr}");
}
