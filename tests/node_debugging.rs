//! Debugging a node with the `sluice` command: the real `sluice run` in front of real upstreams
//! (fake-service, or a small server that fails on cue), and the real `sluice` CLI reading it over
//! the admin Unix socket, decoded with the admin API's own types. Each test checks what real
//! traffic did: an ejected endpoint, a retried request's two attempts, the tap and top of a mix of
//! good and failing requests, the pods and the redirect.

use bytes::Bytes;
use http::Request;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use sluice_admin_api as api;
use sluice_tests::listen::{Bound, Listen};
use sluice_tests::{endpoint_slice, failing_env, yaml, Client};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// Keeps the child from outliving this test process when it dies without unwinding.
fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child being made.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `sluice run` over a config directory with its admin API on a socket of its own; killed by
/// PID when dropped.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
    outbound: SocketAddr,
    admin: SocketAddr,
    socket: PathBuf,
}

impl Agent {
    /// Starts the agent over `files` (name, YAML) and waits until it is ready.
    async fn start(files: &[(&str, String)]) -> Self {
        Self::start_with(files, &[]).await
    }

    /// The same, with more `sluice run` arguments.
    async fn start_with(files: &[(&str, String)], extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::create_dir(&cfg).unwrap();
        for (name, yaml) in files {
            std::fs::write(cfg.join(name), yaml).unwrap();
        }
        let socket = dir.path().join("run/admin.sock");
        let listen = Listen::new(dir.path(), "addresses.json");
        let mut cmd = Command::new(sluice_tests::bins::sluice());
        cmd.arg("run")
            .arg("--config-dir")
            .arg(&cfg)
            .args(["--no-access-log", "--reload-interval", "50ms"])
            .args(listen.args())
            .arg("--admin-socket")
            .arg(&socket)
            .args(extra)
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("SLUICE_ADMIN_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("spawn sluice run");
        let bound = listen.bound(&mut child, Duration::from_secs(20)).await;
        let Bound {
            outbound,
            admin,
            ready,
            ..
        } = bound.expect("sluice run listens");
        let agent = Self {
            child,
            dir,
            outbound,
            admin,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = Client { proxy: ready }
                .get("http://localhost/healthz/ready", Duration::from_secs(1))
                .await;
            if ready.code() == 200 && agent.socket.exists() {
                break;
            }
            assert!(Instant::now() < deadline, "sluice run not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        agent
    }

    fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    fn client(&self) -> Client {
        Client {
            proxy: self.outbound,
        }
    }

    /// The `sluice` CLI against this agent's socket, whether it succeeds or not.
    async fn run_cli(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(sluice_tests::bins::sluice())
            .args(args)
            .arg("--admin-socket")
            .arg(&self.socket)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run sluice")
    }

    /// The `sluice` CLI against this agent's socket; it must succeed.
    async fn cli(&self, args: &[&str]) -> Output {
        let out = self.run_cli(args).await;
        assert!(
            out.status.success(),
            "sluice {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `sluice ARGS -o json`, decoded.
    async fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.cli(&all).await;
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "sluice {all:?} -o json: {e}: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    async fn table(&self, args: &[&str]) -> String {
        String::from_utf8(self.cli(args).await.stdout).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// fake-service in-process on a loopback port.
async fn fake_service(name: &str, env: &[(&str, &str)]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut vars: Vec<(String, String)> = vec![("NAME".into(), name.into())];
    vars.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let cfg = fake_service::Config::from_lookup(|k| {
        vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .expect("fake-service config");
    tokio::spawn(async move {
        let _ = fake_service::serve(cfg, listener).await;
    });
    port
}

/// An upstream that answers 503 to its first request and 200 to every later one.
async fn fails_once() -> u16 {
    let calls = Arc::new(AtomicUsize::new(0));
    let addr = sluice_tests::answering_upstream(move |_| {
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            503
        } else {
            200
        }
    })
    .await;
    addr.port()
}

fn service(name: &str, ports: &[u16]) -> (String, String) {
    let mut y = yaml::service(name);
    if !ports.is_empty() {
        y.push_str("---\n");
        y.push_str(&endpoint_slice(name, ports));
    }
    (format!("{name}.yaml"), y)
}

async fn get_with_id(client: &Client, url: &str, id: &str) -> u16 {
    client
        .send(
            Request::get(url)
                .header("x-request-id", id)
                .body(Empty::<Bytes>::new())
                .unwrap(),
            Duration::from_secs(5),
        )
        .await
        .code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_shows_the_failing_endpoint_ejected_once_and_clusters_its_ejection() {
    let good = fake_service("web-good", &[]).await;
    let bad = fake_service("web-bad", &failing_env("500")).await;
    let (name, svc) = service("web", &[good, bad]);
    // No retries: each request is one attempt, so the first 500 is the one that ejects.
    let vs = yaml::virtual_service(
        "web",
        "  - route:\n    - destination: {host: web}\n    retries: {attempts: 0}\n",
    );
    let dr = yaml::destination_rule(
        "web",
        "  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    outlierDetection:\n      consecutive5xxErrors: 1\n      interval: 10s\n      baseEjectionTime: 60s\n      maxEjectionPercent: 100\n",
    );
    let agent = Agent::start(&[(&name, svc), ("vs.yaml", vs), ("dr.yaml", dr)]).await;

    // Round robin reaches the failing endpoint within two requests; its first 500 ejects it.
    let client = agent.client();
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(
            client
                .get("http://web/", Duration::from_secs(5))
                .await
                .code(),
        );
    }
    assert_eq!(
        codes.iter().filter(|c| **c == 500).count(),
        1,
        "once ejected, the failing endpoint gets nothing: {codes:?}"
    );

    let rows: Vec<api::Endpoint> = agent.json(&["endpoints", "web"]).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let row = |port: u16| {
        rows.iter()
            .find(|r| r.host.addr == format!("127.0.0.1:{port}"))
            .unwrap_or_else(|| panic!("{port} in {rows:#?}"))
    };
    let (b, g) = (row(bad), row(good));
    assert_eq!(
        (b.outlier_check.as_str(), b.status.as_str(), b.host.ejected),
        ("FAILED", "UNHEALTHY", true)
    );
    assert_eq!(b.host.ejection_count, 1);
    assert!(b.ejected_until_unix_ms.is_some() && b.host.ejected_for_ms.is_some());
    assert_eq!(b.service, "web.default.svc.cluster.local");
    assert_eq!(
        (
            g.outlier_check.as_str(),
            g.host.ejection_count,
            g.host.ejected
        ),
        ("OK", 0, false)
    );
    assert_eq!(g.host.total_requests, 3, "{g:?}");

    // The table an operator reads, and YAML for scripts, say the same.
    let table = agent.table(&["endpoints", "web"]).await;
    println!("{table}");
    let bad_line = table
        .lines()
        .find(|l| l.starts_with(&format!("127.0.0.1:{bad}")))
        .expect("the failing endpoint's row");
    assert!(
        bad_line.contains("UNHEALTHY") && bad_line.contains("FAILED"),
        "{bad_line}"
    );
    let yaml_rows: Vec<api::Endpoint> =
        serde_yaml::from_slice(&agent.cli(&["endpoints", "web", "-o", "yaml"]).await.stdout)
            .unwrap();
    assert_eq!(yaml_rows.len(), 2);

    // `sluice clusters` keeps the ejection in its recent history.
    let clusters: Vec<api::Cluster> = agent.json(&["clusters"]).await;
    let web = clusters
        .iter()
        .find(|c| c.name == yaml::cluster_name("web"))
        .expect("the web cluster");
    assert_eq!(web.stat("outlier_detection_ejections_enforced_total"), 1);
    let ejections: Vec<_> = web
        .outlier_events
        .iter()
        .filter_map(|e| match &e.kind {
            api::OutlierEventKind::Ejected {
                reason, ejections, ..
            } => Some((e.host.clone(), reason.clone(), *ejections)),
            api::OutlierEventKind::Unejected => None,
        })
        .collect();
    assert_eq!(
        ejections,
        vec![(format!("127.0.0.1:{bad}"), "Consecutive5xx".to_owned(), 1)]
    );
    let table = agent.table(&["clusters"]).await;
    assert!(table.contains("recent ejections"), "{table}");

    // An unknown service is an error that says so.
    let out = tokio::process::Command::new(sluice_tests::bins::sluice())
        .args(["endpoints", "nothing-here", "--admin-socket"])
        .arg(&agent.socket)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no service \"nothing-here\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--recent-requests N` keeps the last N finished requests for `sluice trace`; 0 keeps none,
/// and `trace` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_finds_only_the_requests_kept() {
    let port = fake_service("web", &[]).await;
    for (kept, missing_says) in [
        ("1", "among the last 1 the agent keeps"),
        ("0", "the agent keeps none (--recent-requests 0)"),
    ] {
        let (name, svc) = service("web", &[port]);
        let agent = Agent::start_with(&[(&name, svc)], &["--recent-requests", kept]).await;
        for id in ["kept-older", "kept-newer"] {
            assert_eq!(get_with_id(&agent.client(), "http://web/", id).await, 200);
        }
        // A record is kept once the response has gone: bounded wait for the newer one.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = agent.run_cli(&["trace", "kept-newer", "-o", "json"]).await;
            if kept == "0" || out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "kept-newer never kept");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let missing = if kept == "0" {
            "kept-newer"
        } else {
            "kept-older"
        };
        let out = agent.run_cli(&["trace", missing]).await;
        assert!(
            !out.status.success(),
            "--recent-requests {kept}: {missing} found"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(missing_says),
            "--recent-requests {kept}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_shows_both_attempts_of_a_retried_request() {
    let port = fails_once().await;
    let (name, svc) = service("web", &[port]);
    let vs = |attempts: u32| {
        yaml::virtual_service(
            "web",
            &format!(
                "  - name: everything\n    match:\n    - uri: {{prefix: /admin}}\n    - uri: {{prefix: /}}\n    route:\n    - destination: {{host: web}}\n    retries: {{attempts: {attempts}, retryOn: 5xx}}\n"
            ),
        )
    };
    let dr = yaml::destination_rule(
        "web",
        "  trafficPolicy:\n    connectionPool:\n      tcp: {maxConnections: 7}\n    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 30s}\n",
    );
    let agent = Agent::start(&[(&name, svc), ("vs.yaml", vs(2)), ("dr.yaml", dr)]).await;
    let id = "debug-trace-0001";
    assert_eq!(get_with_id(&agent.client(), "http://web/", id).await, 200);

    // The policy a trace shows is the one the request ran under: a reload since changes nothing.
    let before: api::Status = agent.json(&["status"]).await;
    std::fs::write(agent.dir.path().join("config/vs.yaml"), vs(5)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now: api::Status = agent.json(&["status"]).await;
        if now.generation > before.generation {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the changed VirtualService was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let r: api::Request = agent.json(&["trace", id]).await;
    assert_eq!(r.request_id.as_deref(), Some(id));
    assert_eq!((r.status, r.flags.as_str()), (200, "-"));
    assert_eq!(
        r.cluster.as_deref(),
        Some(yaml::cluster_name("web").as_str())
    );
    let route = r.route.as_ref().expect("the route taken");
    assert_eq!(
        (
            route.virtual_service.as_str(),
            route.route.as_str(),
            route.retries
        ),
        ("default/web", "everything", 2),
        "{route:#?}"
    );
    // `/` fitted the second `match` entry, not the first.
    let matched = route.matched.as_ref().expect("the match entry");
    assert_eq!(matched.index, 1, "{route:#?}");
    assert_eq!(
        matched.conditions,
        serde_json::json!({"uri": {"Prefix": "/"}}),
        "only the conditions it sets: {route:#?}"
    );
    assert!(route.retry_on.iter().any(|c| c == "5xx"), "{route:?}");
    let dest = r.destination.as_ref().expect("the cluster's policy");
    assert_eq!(dest.destination_rule.as_deref(), Some("default/web"));
    assert_eq!(dest.max_connections, 7);
    assert!(dest.outlier_detection.is_some(), "{dest:#?}");
    let attempts: Vec<(u32, u16, bool)> = r
        .attempts
        .iter()
        .map(|a| (a.attempt, a.status, a.reached))
        .collect();
    assert_eq!(attempts, vec![(1, 503, true), (2, 200, true)]);
    assert!(
        r.attempts[1].start_offset_ms >= r.attempts[0].start_offset_ms + r.attempts[0].duration_ms,
        "the retry starts after the first attempt ended: {r:#?}"
    );
    let table = agent.table(&["trace", id]).await;
    println!("{table}");
    assert!(
        table.contains("route    default/web everything  (match[1] ")
            && table.contains("policy   default/web  maxConnections 7"),
        "{table}"
    );
    assert!(
        table.contains("answered 503; retryOn matched")
            && table.contains("answered 200; last attempt"),
        "{table}"
    );

    // A request the agent never saw.
    let out = tokio::process::Command::new(sluice_tests::bins::sluice())
        .args(["trace", "never-sent", "--admin-socket"])
        .arg(&agent.socket)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no request \"never-sent\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_only_matching_requests_and_top_counts_each_edge() {
    let ok = fake_service("ok", &[]).await;
    let bad = fake_service("bad", &failing_env("500")).await;
    let (ok_name, ok_svc) = service("ok", &[ok]);
    let (bad_name, bad_svc) = service("bad", &[bad]);
    // A service with no endpoints: every request is a 503 with UH.
    let (empty_name, empty_svc) = service("empty", &[]);
    let agent = Agent::start(&[
        (&ok_name, ok_svc),
        (&bad_name, bad_svc),
        (&empty_name, empty_svc),
    ])
    .await;

    // The tap, filtered to 5xx of `bad`, as an operator runs it.
    let mut tap = Command::new(sluice_tests::bins::sluice());
    tap.args([
        "tap", "--to", "bad", "--status", "5xx", "-o", "json", "--count", "1",
    ])
    .arg("--admin-socket")
    .arg(&agent.socket)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    die_with_parent(&mut tap);
    let mut tap = tap.spawn().unwrap();
    let stdout = tap.stdout.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Traffic until the tap (which may still be connecting) has seen one failing request; the
    // successes to `ok` and the 503s of `empty` are filtered out.
    let client = agent.client();
    let mut sent = 0;
    let line = loop {
        assert_eq!(
            client
                .get("http://ok/", Duration::from_secs(5))
                .await
                .code(),
            200
        );
        assert_eq!(
            client
                .get("http://empty/", Duration::from_secs(5))
                .await
                .code(),
            503
        );
        assert_eq!(
            client
                .get("http://bad/", Duration::from_secs(5))
                .await
                .code(),
            500
        );
        sent += 1;
        match tokio::time::timeout(Duration::from_millis(200), lines.recv()).await {
            Ok(Some(line)) => break line,
            _ => assert!(sent < 50, "the tap printed nothing"),
        }
    };
    let tapped: api::Request = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (tapped.service.as_str(), tapped.status),
        ("bad.default.svc.cluster.local", 500)
    );
    let status = tokio::task::spawn_blocking(move || tap.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "--count 1 ends the tap");

    let top: api::Top = agent.json(&["top", "--once", "--window", "60"]).await;
    println!(
        "{}",
        agent.table(&["top", "--once", "--window", "60"]).await
    );
    let edge = |service: &str| {
        top.edges
            .iter()
            .find(|e| e.service == format!("{service}.default.svc.cluster.local"))
            .unwrap_or_else(|| panic!("{service} in {top:#?}"))
    };
    let (ok, bad, empty) = (edge("ok"), edge("bad"), edge("empty"));
    for e in [ok, bad, empty] {
        assert_eq!(e.requests, sent, "{e:?}");
        assert_eq!(e.source, "unknown/unknown", "loopback clients are no pod");
    }
    assert_eq!(
        (ok.success_pct, bad.success_pct, empty.success_pct),
        (100.0, 0.0, 0.0)
    );
    assert_eq!(empty.flags.get("UH"), Some(&sent), "{empty:?}");
    assert!(ok.flags.is_empty() && bad.flags.is_empty(), "{top:#?}");
    assert!(ok.p50_ms > 0.0 && ok.p99_ms >= ok.p50_ms);

    // The registry's Services, each with the cluster IP allocated for it (10.96.0.0/12).
    let services: Vec<api::Service> = agent.json(&["services"]).await;
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["bad", "empty", "ok"]);
    for s in &services {
        let ip: std::net::Ipv4Addr = s.cluster_ips[0].parse().unwrap();
        let o = ip.octets();
        assert!(o[0] == 10 && (96..112).contains(&o[1]), "{s:?}");
        assert_eq!(s.ports, [80]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_say_why_a_pod_is_not_redirected_and_redirects_the_mode() {
    let pod = |name: &str, labels: &str, ip: &str| {
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{{labels}}}\nstatus:\n  phase: Running\n  podIP: {ip}\n")
    };
    let agent = Agent::start(&[
        (
            "meshed.yaml",
            pod(
                "meshed",
                "app: shop, istio.io/dataplane-mode: ambient",
                "10.244.0.7",
            ),
        ),
        ("plain.yaml", pod("plain", "app: batch", "10.244.0.8")),
    ])
    .await;
    let workloads: Vec<api::Workload> = agent.json(&["workloads"]).await;
    let w = |name: &str| {
        workloads
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("{name} in {workloads:#?}"))
    };
    let (meshed, plain) = (w("meshed"), w("plain"));
    assert!(meshed.enrolled && !plain.enrolled);
    assert_eq!(meshed.ips, vec!["10.244.0.7".to_owned()]);
    assert_eq!(meshed.labels.get("app").map(String::as_str), Some("shop"));
    assert!(
        meshed
            .not_redirected
            .as_deref()
            .is_some_and(|w| w.contains("--redirect none")),
        "{meshed:?}"
    );
    assert!(
        plain
            .not_redirected
            .as_deref()
            .is_some_and(|w| w.starts_with("not enrolled")),
        "{plain:?}"
    );
    let table = agent.table(&["workloads"]).await;
    println!("{table}");
    assert!(table.contains("default/meshed") && table.contains("no: not enrolled"));

    let redirect: api::RedirectStatus = agent.json(&["redirects"]).await;
    assert_eq!(redirect, api::RedirectStatus::None);
    let status: api::Status = agent.json(&["status"]).await;
    assert_eq!(status.workloads, 2);
    assert_eq!(
        status.agent.listeners.admin_socket.as_deref(),
        Some(agent.socket.to_str().unwrap())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_is_private_and_the_cli_says_when_no_agent_answers() {
    let agent = Agent::start(&[]).await;
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    let missing = agent.dir.path().join("nobody.sock");
    let out = Command::new(sluice_tests::bins::sluice())
        .args(["status", "--admin-socket"])
        .arg(&missing)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is `sluice run` running on this node?"),
        "{err}"
    );

    // The admin API never listens beyond loopback.
    let out = Command::new(sluice_tests::bins::sluice())
        .args(["run", "--admin-addr", "0.0.0.0:0", "--admin-socket", "none"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listens only on loopback"), "{err}");

    // Shell completions know the commands.
    let out = Command::new(sluice_tests::bins::sluice())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && script.contains("_sluice"));
    for cmd in ["endpoints", "workloads", "redirects", "top", "tap", "trace"] {
        assert!(script.contains(cmd), "{cmd}");
    }

    // A stopped agent takes its socket with it.
    let socket = agent.socket.clone();
    let dir_path: &Path = agent.dir.path();
    assert!(dir_path.exists());
    let mut agent = agent;
    // SIGTERM: the agent shuts down and removes the socket file.
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let _ = agent.child.wait();
    assert!(!socket.exists(), "{} left behind", socket.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_lists_a_clients_open_connection_and_the_pooled_one_to_its_endpoint() {
    let port = fake_service("web", &[]).await;
    let (name, svc) = service("web", &[port]);
    let agent = Agent::start(&[(&name, svc)]).await;

    // A client that keeps its connection open after one request.
    let stream = tokio::net::TcpStream::connect(agent.outbound)
        .await
        .unwrap();
    let local = stream.local_addr().unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let rsp = tx
        .send_request(
            Request::get("http://web/")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(rsp.status(), 200);
    http_body_util::BodyExt::collect(rsp.into_body())
        .await
        .unwrap();

    let conns: Vec<api::Connection> = agent.json(&["connections"]).await;
    println!("{}", agent.table(&["connections"]).await);
    let client = conns
        .iter()
        .find(|c| c.side == "downstream" && c.peer.as_deref() == Some(&local.to_string()))
        .unwrap_or_else(|| panic!("{local} in {conns:#?}"));
    assert!(
        client.bytes_received > 0 && client.bytes_sent > 0,
        "{client:?}"
    );
    let upstream = conns
        .iter()
        .find(|c| c.side == "upstream")
        .unwrap_or_else(|| panic!("the pooled connection in {conns:#?}"));
    assert_eq!(
        upstream.peer.as_deref(),
        Some(format!("127.0.0.1:{port}").as_str())
    );
    assert_eq!(upstream.service, "web.default.svc.cluster.local");
    assert!(
        upstream.bytes_received > 0 && upstream.bytes_sent > 0,
        "{upstream:?}"
    );

    // Closed, it leaves the list.
    drop(tx);
    let _ = conn.await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let conns: Vec<api::Connection> = agent.json(&["connections"]).await;
        if !conns
            .iter()
            .any(|c| c.peer.as_deref() == Some(&local.to_string()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "still listed: {conns:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Debian's `chromium`, or why the page test cannot run.
fn chromium() -> Result<PathBuf, String> {
    ["chromium", "chromium-browser"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
        .ok_or_else(|| "chromium is not installed (apt-get install chromium)".to_owned())
}

/// A headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
/// the browser reads commands on fd 3 and writes answers on fd 4, each message NUL-terminated), so
/// the test reads the live page whenever it wants instead of one dump at a guessed moment.
struct Browser {
    child: tokio::process::Child,
    commands: tokio::net::unix::pipe::Sender,
    answers: tokio::net::unix::pipe::Receiver,
    read: Vec<u8>,
    next_id: u64,
    session: Option<String>,
}

impl Browser {
    async fn start(binary: &Path, profile: &Path) -> Browser {
        use std::os::fd::{AsRawFd, OwnedFd};
        let (their_commands, our_commands) = std::io::pipe().expect("pipe");
        let (our_answers, their_answers) = std::io::pipe().expect("pipe");
        let (read_fd, write_fd) = (their_commands.as_raw_fd(), their_answers.as_raw_fd());
        let mut cmd = Command::new(binary);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        // SAFETY: dup2 and fcntl are async-signal-safe and touch only the child's fds.
        unsafe {
            cmd.pre_exec(move || {
                for (from, to) in [(read_fd, 3), (write_fd, 4)] {
                    // dup2 onto itself would keep close-on-exec set.
                    let ok = if from == to {
                        libc::fcntl(to, libc::F_SETFD, 0) == 0
                    } else {
                        libc::dup2(from, to) == to
                    };
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts");
        // The browser's ends now live in the child only.
        drop((their_commands, their_answers));
        let commands = tokio::net::unix::pipe::Sender::from_owned_fd(OwnedFd::from(our_commands))
            .expect("command pipe");
        let answers = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(our_answers))
            .expect("answer pipe");
        Browser {
            child,
            commands,
            answers,
            read: Vec::new(),
            next_id: 1,
            session: None,
        }
    }

    /// Sends one command (to the page once attached) and waits for its answer, skipping events.
    async fn call(&mut self, method: &str, params: serde_json::Value) -> serde_json::Value {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = serde_json::json!({"id": id, "method": method, "params": params});
        if let Some(session) = &self.session {
            msg["sessionId"] = session.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .await
            .expect("chromium reads");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            while let Some(end) = self.read.iter().position(|b| *b == 0) {
                let frame: Vec<u8> = self.read.drain(..=end).collect();
                let answer: serde_json::Value =
                    serde_json::from_slice(&frame[..end]).expect("a JSON message");
                if answer["id"] == id {
                    assert!(answer.get("error").is_none(), "{method}: {answer}");
                    return answer["result"].clone();
                }
            }
            let mut buf = [0u8; 64 * 1024];
            let n = tokio::time::timeout_at(deadline, self.answers.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method} in 30 s"))
                .expect("chromium's answers");
            assert!(
                n > 0,
                "chromium closed its pipe; it exited: {:?}",
                self.child.try_wait()
            );
            self.read.extend_from_slice(&buf[..n]);
        }
    }

    /// Opens `url` in a new page and attaches to it.
    async fn open(&mut self, url: &str) {
        let target = self
            .call("Target.createTarget", serde_json::json!({ "url": url }))
            .await;
        let attached = self
            .call(
                "Target.attachToTarget",
                serde_json::json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        self.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
    }

    /// The page's document as it is now.
    async fn dom(&mut self) -> String {
        let got = self
            .call(
                "Runtime.evaluate",
                serde_json::json!({
                    "expression": "document.documentElement.outerHTML",
                    "returnByValue": true,
                }),
            )
            .await;
        got["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Closes the browser (its renderers with it) and waits for it to exit.
    async fn close(mut self) {
        self.session = None;
        let _ = self.call("Browser.close", serde_json::json!({})).await;
        let exited = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        assert!(
            matches!(exited, Ok(Ok(_))),
            "chromium did not exit: {exited:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_page_shows_the_edges_of_real_traffic_and_the_tap_updates() {
    let binary = match chromium() {
        Ok(b) => b,
        Err(why) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: {why}");
            return;
        }
        Err(why) => panic!("{why}"),
    };
    let ok = fake_service("ok", &[]).await;
    let bad = fake_service("bad", &failing_env("500")).await;
    let (ok_name, ok_svc) = service("ok", &[ok]);
    let (bad_name, bad_svc) = service("bad", &[bad]);
    let agent = Agent::start(&[(&ok_name, ok_svc), (&bad_name, bad_svc)]).await;
    let client = agent.client();
    // Traffic before the page loads (the edges) and while it is open (the tap).
    for _ in 0..5 {
        client.get("http://ok/", Duration::from_secs(5)).await;
        client.get("http://bad/", Duration::from_secs(5)).await;
    }
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let load = tokio::spawn(async move {
        let mut n = 0u32;
        while !*stopped.borrow_and_update() && n < 400 {
            let id = format!("ui-{n}");
            get_with_id(&client, "http://bad/", &id).await;
            n += 1;
            let _ = tokio::time::timeout(Duration::from_millis(50), stopped.changed()).await;
        }
    });

    let mut browser = Browser::start(&binary, &agent.dir.path().join("chromium")).await;
    browser
        .open(&format!("http://{}{}", agent.admin_addr(), api::paths::UI))
        .await;
    let section = |dom: &str, id: &str| -> Option<String> {
        let start = dom.find(&format!("<table id=\"{id}\">"))?;
        let end = dom[start..].find("</table>")? + start;
        Some(dom[start..end].to_owned())
    };
    // The page refreshes every second and the tap streams as requests finish: read the live page
    // until it shows everything below (or 20 s pass, and the assertions say what is missing).
    let deadline = Instant::now() + Duration::from_secs(20);
    let dom = loop {
        let dom = browser.dom().await;
        let shown = |id: &str, what: &str| section(&dom, id).is_some_and(|s| s.contains(what));
        let complete = shown("edges", "<td>ok.default.svc.cluster.local</td>")
            && shown("edges", "<td>bad.default.svc.cluster.local</td>")
            && shown("endpoints", &format!("127.0.0.1:{ok}"))
            && shown("endpoints", &format!("127.0.0.1:{bad}"))
            && shown("tap", "<td>ui-");
        if complete || Instant::now() >= deadline {
            break dom;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = stop.send(true);
    load.await.unwrap();
    browser.close().await;
    let section = |id: &str| section(&dom, id).unwrap_or_else(|| panic!("no {id} in {dom}"));
    // The edges: both services, from the loopback client, `bad` all errors.
    let edges = section("edges");
    println!("{edges}");
    for svc in [
        "ok.default.svc.cluster.local",
        "bad.default.svc.cluster.local",
    ] {
        assert!(edges.contains(&format!("<td>{svc}</td>")), "{edges}");
    }
    assert!(edges.contains("100.0%"), "bad's error ratio: {edges}");
    // The endpoints of both.
    let endpoints = section("endpoints");
    assert!(
        endpoints.contains(&format!("127.0.0.1:{ok}"))
            && endpoints.contains(&format!("127.0.0.1:{bad}")),
        "{endpoints}"
    );
    // The tap filled in as requests finished while the page was open.
    let tap = section("tap");
    let tapped = tap.matches("<td>ui-").count();
    println!("tap rows while the page was open: {tapped}");
    assert!(tapped >= 1, "{tap}");
}
