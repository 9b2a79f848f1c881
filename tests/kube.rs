//! Kubernetes mode end to end: the real `sluice run --kubeconfig PATH --node-name node-a
//! --redirect none` process against the fake API server (`tests/fake-apiserver`) holding the
//! tutorial's Services and Istio objects (converted from `examples/tutorial/` YAML), EndpointSlices
//! pointing at real `fake-service` upstreams on loopback, and Pods of this node and another.
//! Clients reach the agent's outbound listener as an explicit HTTP proxy.
//!
//! Shown: a VirtualService created, changed and deleted through the API changes what the proxy
//! answers within a second of the write (the figure is printed); a Namespace relabel changes a pod's
//! enrollment; another node's Pods are never fetched; a relist after 410 keeps the state and makes
//! no new generation; an outage keeps the last good state serving; a 403 is reported naming verb,
//! group and resource; readiness waits for every kind's first list; a rejected VirtualService gets a
//! `SluiceRejected` Event while its last good version keeps working; start-up against 1,000
//! Services, 5,000 endpoints and 500 VirtualServices (time and RSS printed).
//!
//! Builds `sluice` itself (`cargo build -p sluice`, a no-op after `cargo test --workspace`). No root.
//! Run: `cargo test -p sluice-tests --test kube`.
// A process-level test: wall-clock time is what it measures.
#![allow(clippy::disallowed_methods)]

use serde::Deserialize;
use serde_json::{json, Value};
use sluice_admin_api as api;
use sluice_fake_apiserver::FakeApiServer;
use sluice_tests::listen::Listen;
use sluice_tests::{tutorial_yaml, Client, Outcome};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const NODE: &str = "node-a";

/// Agents started by this process, to name their files apart.
static AGENTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Every document of a tutorial file as JSON, keeping only the kinds a cluster would hold that the
/// agent reads (the Deployments are what `fake-service` instances stand in for).
fn tutorial_objects(file: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(&tutorial_yaml(file))
        .map(|doc| Value::deserialize(doc).expect("tutorial YAML"))
        .filter(|v| {
            matches!(
                v["kind"].as_str(),
                Some("Service" | "VirtualService" | "DestinationRule")
            )
        })
        .map(|mut v| {
            v["metadata"]["namespace"] = "default".into();
            v
        })
        .collect()
}

/// The tutorial VirtualService `name` from `file`.
fn tutorial_vs(file: &str, name: &str) -> Value {
    tutorial_objects(file)
        .into_iter()
        .find(|v| v["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{file} has no {name}"))
}

fn endpoint_slice(service: &str, ports: &[(String, u16)]) -> Value {
    let endpoints: Vec<Value> = ports
        .iter()
        .map(|(ip, _)| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("{service}-x1"), "namespace": "default",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4", "endpoints": endpoints,
           "ports": [{"name": "http", "port": ports[0].1, "protocol": "TCP"}]})
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "app", "image": "fake-service"}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "qosClass": "BestEffort"}})
}

/// The fake cluster: API server, the tutorial's pricing and inventory behind real `fake-service`
/// instances, a client pod on this node (namespace `shop`), and one on another node.
struct Cluster {
    fake: FakeApiServer,
    dir: tempfile::TempDir,
    upstreams: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.upstreams {
            t.abort();
        }
    }
}

async fn fake_service(name: &str) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let port = listener.local_addr().unwrap().port();
    let name = name.to_string();
    let cfg =
        fake_service::Config::from_lookup(|k| (k == "NAME").then(|| name.clone())).expect("config");
    (
        port,
        tokio::spawn(async move {
            let _ = fake_service::serve(cfg, listener).await;
        }),
    )
}

impl Cluster {
    async fn start() -> Self {
        let fake = FakeApiServer::start().await.expect("fake API server");
        let dir = tempfile::tempdir().expect("tempdir");
        fake.write_kubeconfig(&dir.path().join("kubeconfig"))
            .unwrap();
        let mut upstreams = Vec::new();
        for name in ["pricing", "inventory"] {
            let (port, task) = fake_service(name).await;
            upstreams.push(task);
            for obj in tutorial_objects(&format!("{name}.yaml")) {
                fake.create(obj).unwrap();
            }
            fake.create(endpoint_slice(name, &[("127.0.0.1".into(), port)]))
                .unwrap();
            fake.create(pod(
                "default",
                &format!("{name}-0"),
                NODE,
                "10.244.0.10",
                json!({"app": name, "version": "v1"}),
            ))
            .unwrap();
        }
        fake.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
            .unwrap();
        fake.create(pod(
            "shop",
            "client",
            NODE,
            "10.244.0.20",
            json!({"app": "client"}),
        ))
        .unwrap();
        fake.create(pod(
            "shop",
            "elsewhere",
            "node-b",
            "10.244.1.20",
            json!({"app": "client"}),
        ))
        .unwrap();
        Self {
            fake,
            dir,
            upstreams,
        }
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }
}

/// `sluice run` in Kubernetes mode, killed by PID when dropped.
struct Agent {
    child: Child,
    outbound: SocketAddr,
    admin: SocketAddr,
    ready: SocketAddr,
    log: PathBuf,
    started: Instant,
}

impl Agent {
    async fn spawn(cluster: &Cluster) -> Self {
        Self::spawn_with(cluster, sluice_tests::bins::sluice()).await
    }

    async fn spawn_with(cluster: &Cluster, bin: &Path) -> Self {
        // Several agents may run in one cluster's directory, one after another.
        let id = AGENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = cluster.dir.path().join(format!("agent-{id}.log"));
        let listen = Listen::new(cluster.dir.path(), &format!("agent-{id}.addresses"));
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--kubeconfig")
            .arg(cluster.kubeconfig())
            .args(["--node-name", NODE, "--redirect", "none", "--no-access-log"])
            .args(listen.args())
            // Several agents may run at once: none takes the node's default admin socket.
            .args(["--admin-socket", "none"])
            .env_remove("RUST_LOG")
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_NAME")
            .env_remove("SLUICE_CONFIG_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("agent log"));
        // SAFETY: prctl is async-signal-safe and touches only the child being made; if this test
        // process dies without unwinding, the agent goes with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn sluice run");
        let bound = listen
            .expect_bound(&mut child, Duration::from_secs(20), &log)
            .await;
        Self {
            child,
            outbound: bound.outbound,
            admin: bound.admin,
            ready: bound.ready,
            log,
            started,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("sluice run exited with {status}:\n{}", self.stderr());
        }
    }

    /// `/healthz/ready`'s status code, `None` while nothing answers.
    async fn ready_code(&self) -> Option<u16> {
        http_get(self.ready, "/healthz/ready").await.map(|(c, _)| c)
    }

    /// Waits until ready; the time since spawn.
    async fn wait_ready(&mut self, within: Duration) -> Duration {
        let deadline = Instant::now() + within;
        loop {
            self.assert_running();
            if self.ready_code().await == Some(200) {
                return self.started.elapsed();
            }
            assert!(
                Instant::now() < deadline,
                "not ready after {within:?}; status: {}\n{}",
                self.status_raw().await.unwrap_or_default(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn status_raw(&self) -> Option<String> {
        http_get(self.admin, "/status").await.map(|(_, b)| b)
    }

    /// `sluice status -o json`, as an operator runs it.
    async fn status(&self) -> api::Status {
        let out = tokio::process::Command::new(sluice_tests::bins::sluice())
            .args(["status", "-o", "json", "--admin", &self.admin.to_string()])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("sluice status");
        assert!(
            out.status.success(),
            "sluice status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("sluice status -o json prints JSON")
    }

    /// The pods the agent knows (`/workloads`).
    async fn workloads(&self) -> Vec<api::Workload> {
        let (code, body) = http_get(self.admin, api::paths::WORKLOADS)
            .await
            .expect("admin answers");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/workloads decodes")
    }

    async fn generation(&self) -> u64 {
        self.status().await.generation
    }

    fn client(&self) -> Client {
        Client {
            proxy: self.outbound,
        }
    }

    /// Resident and peak memory from `/proc/PID/status`, in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let field = |name| sluice_tests::proc_status_kib(self.child.id(), name).unwrap_or(0);
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGKILL by PID, then reap.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-shot `GET` (HTTP/1.0, connection closed by the server): status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}

async fn get(client: &Client, url: &str) -> Outcome {
    client.get(url, Duration::from_secs(3)).await
}

/// Sends requests back to back until one answers as `wanted` says: the time from `since` to the
/// sending of that first request and to its answer (the change took effect in between, or before).
/// Panics after `within`.
async fn first_seen(
    client: &Client,
    url: &str,
    since: Instant,
    within: Duration,
    wanted: impl Fn(&Outcome) -> bool,
) -> (Duration, Duration) {
    loop {
        let sent = Instant::now();
        let outcome = get(client, url).await;
        if wanted(&outcome) {
            return (sent - since, since.elapsed());
        }
        assert!(
            since.elapsed() < within,
            "{url}: not seen within {within:?}; last answer {} {:?}",
            outcome.code(),
            outcome.body
        );
    }
}

fn is_fault_abort(o: &Outcome, code: u16) -> bool {
    o.code() == code && String::from_utf8_lossy(&o.body).contains("fault filter abort")
}

/// The tutorial's `pricing-fault` with its abort made certain (100%) and `http_status` as given.
fn pricing_abort(http_status: u16) -> Value {
    let mut vs = tutorial_vs("fault-injection.yaml", "pricing-fault");
    vs["spec"]["http"][0]["fault"]["abort"] =
        json!({"percentage": {"value": 100}, "httpStatus": http_status});
    vs
}

/// Polls `check` (async) every 50 ms until it holds or `within` passes.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn started() -> (Cluster, Agent) {
    let cluster = Cluster::start().await;
    let mut agent = Agent::spawn(&cluster).await;
    agent.wait_ready(Duration::from_secs(20)).await;
    (cluster, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_service_changes_reach_the_proxy_within_a_second() {
    let (cluster, agent) = started().await;
    let client = agent.client();
    let url = "http://pricing/";
    assert_eq!(get(&client, url).await.code(), 200, "{}", agent.stderr());

    let t0 = Instant::now();
    cluster.fake.create(pricing_abort(500)).unwrap();
    let created = first_seen(&client, url, t0, Duration::from_secs(5), |o| {
        is_fault_abort(o, 500)
    })
    .await;

    let t1 = Instant::now();
    cluster.fake.apply(pricing_abort(418)).unwrap();
    let changed = first_seen(&client, url, t1, Duration::from_secs(5), |o| {
        is_fault_abort(o, 418)
    })
    .await;

    let t2 = Instant::now();
    cluster
        .fake
        .delete("VirtualService/default/pricing-fault")
        .unwrap();
    let deleted = first_seen(&client, url, t2, Duration::from_secs(5), |o| {
        o.code() == 200
    })
    .await;

    for (what, (sent, answered)) in [
        ("create", created),
        ("change", changed),
        ("delete", deleted),
    ] {
        println!("{what}: the first request seeing it was sent {sent:?} after the write, answered after {answered:?}");
        assert!(
            answered < Duration::from_secs(1),
            "{what} took {answered:?}"
        );
    }
    // The other service never changed.
    assert_eq!(get(&client, "http://inventory/").await.code(), 200);
}

/// Whether workload `name` is enrolled, if the agent knows it.
async fn enrolled(agent: &Agent, name: &str) -> Option<bool> {
    agent
        .workloads()
        .await
        .iter()
        .find(|w| w.name == name)
        .map(|w| w.enrolled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_relabel_changes_the_pods_enrollment() {
    let (cluster, agent) = started().await;
    assert_eq!(
        enrolled(&agent, "client").await,
        Some(false),
        "{:#?}",
        agent.workloads().await
    );

    let mut ns = cluster.fake.get("Namespace/shop").unwrap();
    ns["metadata"]["labels"]["istio.io/dataplane-mode"] = "ambient".into();
    cluster.fake.replace(ns).unwrap();
    eventually("client enrolled", Duration::from_secs(2), || async {
        enrolled(&agent, "client").await == Some(true)
    })
    .await;

    let mut ns = cluster.fake.get("Namespace/shop").unwrap();
    ns["metadata"]["labels"]
        .as_object_mut()
        .unwrap()
        .remove("istio.io/dataplane-mode");
    cluster.fake.replace(ns).unwrap();
    eventually("client released", Duration::from_secs(2), || async {
        enrolled(&agent, "client").await == Some(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_pods_are_fetched_only_as_metadata() {
    let (cluster, agent) = started().await;
    // A pod of another node created while the agent watches is not sent to it in full either.
    cluster
        .fake
        .create(pod(
            "shop",
            "elsewhere-2",
            "node-b",
            "10.244.1.21",
            json!({}),
        ))
        .unwrap();
    cluster
        .fake
        .create(pod("shop", "client-2", NODE, "10.244.0.21", json!({})))
        .unwrap();
    eventually("client-2 known", Duration::from_secs(2), || async {
        enrolled(&agent, "client-2").await.is_some()
    })
    .await;
    let pods: Vec<_> = cluster
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/pods"))
        .collect();
    let (full, metadata): (Vec<_>, Vec<_>) = pods.iter().partition(|r| !r.metadata_only);
    for requests in [&full, &metadata] {
        assert!(
            requests.iter().any(|r| r.verb == "list") && requests.iter().any(|r| r.verb == "watch"),
            "{pods:#?}"
        );
    }
    for r in &pods {
        assert!(matches!(r.verb.as_str(), "list" | "watch"), "{r:?}");
    }
    // Specs and statuses only of this node's pods; every node's only as metadata.
    for r in &full {
        assert!(
            r.query.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "{r:?}"
        );
    }
    let workloads = agent.workloads().await;
    let names: Vec<&str> = workloads.iter().map(|w| w.name.as_str()).collect();
    assert!(
        !names.iter().any(|n| n.starts_with("elsewhere")),
        "{names:?}"
    );
    assert!(!format!("{:?}", agent.status().await).contains("elsewhere"));
}

/// A pod as a Deployment's ReplicaSet makes it: generated name, controller reference, hash label.
fn deployment_pod(name: &str, node: &str, ip: &str, version: &str) -> Value {
    let (deployment, hash) = (name, "7c9d8f5b4");
    let mut p = pod(
        "default",
        &format!("{deployment}-{hash}-{node}"),
        node,
        ip,
        json!({"app": deployment, "version": version, "pod-template-hash": hash}),
    );
    p["metadata"]["generateName"] = format!("{deployment}-{hash}-").into();
    p["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet",
        "name": format!("{deployment}-{hash}"), "uid": format!("{deployment}-rs"), "controller": true,
        "blockOwnerDeletion": true}]);
    p
}

/// `service`'s EndpointSlice pointing at its upstream (the port of the slice made at start-up) and
/// naming the pod behind it, as the EndpointSlice controller writes it.
fn slice_naming(cluster: &Cluster, service: &str, pod: &str) -> Value {
    let mut slice = cluster
        .fake
        .get(&format!("EndpointSlice/default/{service}-x1"))
        .expect("the start-up slice");
    slice["endpoints"][0]["targetRef"] =
        json!({"kind": "Pod", "namespace": "default", "name": pod});
    slice
}

/// The endpoints of `service`'s clusters (`name` -> endpoints) from the admin API.
async fn policy_endpoints(agent: &Agent, service: &str) -> Vec<(String, Vec<api::PolicyEndpoint>)> {
    let (code, body) = http_get(agent.admin, &format!("/policy?service={service}"))
        .await
        .expect("admin answers");
    assert_eq!(code, 200, "{body}");
    let policy: api::Policy = serde_json::from_str(&body).expect("/policy decodes");
    policy
        .clusters
        .into_iter()
        .map(|c| (c.name, c.endpoints))
        .collect()
}

/// The identity of `service`'s first endpoint in its port cluster, once it has one.
async fn endpoint_identity(agent: &Agent, service: &str) -> Option<api::Identity> {
    let clusters = policy_endpoints(agent, service).await;
    let plain = clusters
        .iter()
        .find(|(name, _)| name.starts_with("outbound|80||"))
        .unwrap_or_else(|| panic!("{clusters:?}"));
    plain.1.first().and_then(|e| e.identity.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_on_another_node_has_its_pods_identity_and_labels() {
    let (cluster, agent) = started().await;
    let fake = &cluster.fake;
    // inventory runs on another node, pricing on this one; both are Deployments' pods.
    let remote = deployment_pod("inventory", "node-b", "10.244.1.30", "v1");
    let local = deployment_pod("pricing", NODE, "10.244.0.30", "v1");
    let (remote_name, local_name) = (
        remote["metadata"]["name"].as_str().unwrap().to_string(),
        local["metadata"]["name"].as_str().unwrap().to_string(),
    );
    fake.create(remote).unwrap();
    fake.create(local).unwrap();
    fake.replace(slice_naming(&cluster, "inventory", &remote_name))
        .unwrap();
    fake.replace(slice_naming(&cluster, "pricing", &local_name))
        .unwrap();
    let expected = |workload: &str, version: &str| {
        Some(api::Identity {
            workload: workload.into(),
            namespace: "default".into(),
            canonical_service: workload.into(),
            canonical_revision: version.into(),
            app: workload.into(),
            version: version.into(),
            principal: "unknown".into(),
        })
    };
    eventually(
        "both endpoints' identities",
        Duration::from_secs(3),
        || async {
            endpoint_identity(&agent, "inventory").await == expected("inventory", "v1")
                && endpoint_identity(&agent, "pricing").await == expected("pricing", "v1")
        },
    )
    .await;
    // The remote pod never became a workload of this node; the local one is one, with the owner
    // its identity came from.
    let workloads = agent.workloads().await;
    assert!(!workloads.iter().any(|w| w.name == remote_name));
    let owner = workloads
        .iter()
        .find(|w| w.name == local_name)
        .and_then(|w| w.owner.clone());
    assert_eq!(
        owner.as_ref().map(|o| o.name.as_str()),
        Some("pricing-7c9d8f5b4"),
        "{owner:?}"
    );

    // Its labels select it into a DestinationRule subset: a route to subset v1 reaches it.
    fake.create(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": "inventory", "namespace": "default"},
        "spec": {"host": "inventory", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}),
    )
    .unwrap();
    fake.create(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": "inventory", "namespace": "default"},
        "spec": {"hosts": ["inventory"], "http": [{"route": [{"destination": {"host": "inventory", "subset": "v1"}}]}]}}))
        .unwrap();
    first_seen(
        &agent.client(),
        "http://inventory/",
        Instant::now(),
        Duration::from_secs(3),
        |o| o.code() == 200,
    )
    .await;

    // Relabelled on its node: the subset loses it and its identity follows, within a second.
    let t0 = Instant::now();
    let mut relabelled = fake.get(&format!("Pod/default/{remote_name}")).unwrap();
    relabelled["metadata"]["labels"]["version"] = "v2".into();
    fake.replace(relabelled).unwrap();
    let (_, answered) = first_seen(
        &agent.client(),
        "http://inventory/",
        t0,
        Duration::from_secs(3),
        |o| o.code() == 503,
    )
    .await;
    println!("another node's pod relabelled: its subset emptied {answered:?} after the write");
    assert!(answered < Duration::from_secs(1), "{answered:?}");
    assert_eq!(
        endpoint_identity(&agent, "inventory").await,
        expected("inventory", "v2")
    );
}

/// Requests `url` back to back on a task until told to stop; every answer's code.
fn steady_load(
    client: Client,
    url: &'static str,
) -> (tokio::sync::watch::Sender<bool>, JoinHandle<Vec<u16>>) {
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        let mut codes = Vec::new();
        while !*stopped.borrow_and_update() && codes.len() < 100_000 {
            codes.push(get(&client, url).await.code());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        codes
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relist_after_410_keeps_the_state_and_makes_no_new_generation() {
    let (cluster, agent) = started().await;
    let fake = &cluster.fake;
    fake.create(pricing_abort(500)).unwrap();
    first_seen(
        &agent.client(),
        "http://pricing/",
        Instant::now(),
        Duration::from_secs(5),
        |o| is_fault_abort(o, 500),
    )
    .await;
    let generation = agent.generation().await;
    let (lists, expired) = (fake.stats().lists, fake.stats().expired);

    let (stop, load) = steady_load(agent.client(), "http://pricing/");
    // Hold every re-watch while the global version moves on (an object the agent does not watch)
    // and the history is compacted: each watch resumes from an expired version, gets 410 and relists.
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.istio.io", "virtualservices"),
        ("networking.istio.io", "destinationrules"),
    ] {
        fake.delay("watch", group, resource, Duration::from_millis(500));
    }
    fake.drop_watches();
    fake.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unrelated", "namespace": "default"}}))
        .unwrap();
    fake.compact();
    eventually("every kind relisted", Duration::from_secs(10), || async {
        fake.stats().expired >= expired + 6 && fake.stats().lists >= lists + 6
    })
    .await;
    // Settle: watches open again after the relists.
    eventually("watches open again", Duration::from_secs(5), || async {
        fake.stats().watches_open >= 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = stop.send(true);
    let codes = load.await.unwrap();
    assert!(codes.len() > 20, "{} requests", codes.len());
    assert!(
        codes.iter().all(|c| *c == 500),
        "every request kept the policy: {codes:?}"
    );
    assert_eq!(
        agent.generation().await,
        generation,
        "a relist of unchanged objects is not a change"
    );
    let status = agent.status().await;
    assert!(kube(&status).synced, "{status:#?}");
    // And the watches work after it.
    fake.delete("VirtualService/default/pricing-fault").unwrap();
    first_seen(
        &agent.client(),
        "http://pricing/",
        Instant::now(),
        Duration::from_secs(2),
        |o| o.code() == 200,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_serving_the_last_good_state() {
    let (cluster, agent) = started().await;
    let fake = &cluster.fake;
    fake.create(pricing_abort(500)).unwrap();
    first_seen(
        &agent.client(),
        "http://pricing/",
        Instant::now(),
        Duration::from_secs(5),
        |o| is_fault_abort(o, 500),
    )
    .await;

    let (stop, load) = steady_load(agent.client(), "http://pricing/");
    fake.set_outage(true);
    eventually("the outage noticed", Duration::from_secs(10), || async {
        let s = agent.status().await;
        kube(&s).kinds.iter().any(|k| k.last_error.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    let codes = load.await.unwrap();
    assert!(
        codes.len() > 20 && codes.iter().all(|c| *c == 500),
        "{codes:?}"
    );
    assert_eq!(get(&agent.client(), "http://inventory/").await.code(), 200);
    assert_eq!(
        agent.ready_code().await,
        Some(200),
        "an outage does not make the node's proxy unready"
    );

    // Back: a change made after the outage arrives (within kube's back-off).
    fake.set_outage(false);
    fake.delete("VirtualService/default/pricing-fault").unwrap();
    first_seen(
        &agent.client(),
        "http://pricing/",
        Instant::now(),
        Duration::from_secs(40),
        |o| o.code() == 200,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_is_reported_naming_verb_group_and_resource_and_readiness_waits() {
    let cluster = Cluster::start().await;
    cluster
        .fake
        .forbid("list", "networking.istio.io", "destinationrules");
    let mut agent = Agent::spawn(&cluster).await;
    eventually("the 403 in status", Duration::from_secs(10), || async {
        http_get(agent.admin, "/status")
            .await
            .is_some_and(|(_, b)| b.contains("destinationrules"))
    })
    .await;
    let status = agent.status().await;
    let entry = kube(&status)
        .forbidden
        .iter()
        .find(|f| f.resource == "destinationrules")
        .unwrap_or_else(|| panic!("{status:#?}"));
    assert_eq!(
        (entry.verb.as_str(), entry.group.as_str()),
        ("list", "networking.istio.io")
    );
    assert!(
        entry
            .message
            .contains("cannot list resource \"destinationrules\""),
        "{entry:?}"
    );
    assert!(!kube(&status).synced);
    // Not ready while one kind has never been listed.
    assert_eq!(agent.ready_code().await, Some(503));
    cluster
        .fake
        .allow("list", "networking.istio.io", "destinationrules");
    agent.wait_ready(Duration::from_secs(40)).await;
    assert!(kube(&agent.status().await).synced);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_on_pods_is_reported_for_both_pod_watches_and_readiness_waits() {
    // RBAC grants `pods` whatever the representation: without it neither this node's Pods nor
    // every node's Pod metadata can be listed, and each watch says so.
    let cluster = Cluster::start().await;
    cluster.fake.forbid("list", "", "pods");
    let mut agent = Agent::spawn(&cluster).await;
    eventually(
        "both pod watches failing",
        Duration::from_secs(10),
        || async {
            let Some(status) = agent.status_raw().await else {
                return false; // not listening yet
            };
            let Ok(status) = serde_json::from_str::<api::Status>(&status) else {
                return false;
            };
            ["Pod", "PodMetadata"].iter().all(|kind| {
                kube(&status).kinds.iter().any(|k| {
                    k.kind == *kind
                        && k.last_error
                            .as_deref()
                            .is_some_and(|e| e.contains("forbidden"))
                })
            })
        },
    )
    .await;
    let status = agent.status().await;
    let entry = kube(&status)
        .forbidden
        .iter()
        .find(|f| f.resource == "pods")
        .unwrap_or_else(|| panic!("{status:#?}"));
    assert_eq!((entry.verb.as_str(), entry.group.as_str()), ("list", ""));
    assert!(
        entry.message.contains("cannot list resource \"pods\""),
        "{entry:?}"
    );
    assert!(!kube(&status).synced);
    assert_eq!(agent.ready_code().await, Some(503));
    cluster.fake.allow("list", "", "pods");
    agent.wait_ready(Duration::from_secs(40)).await;
    let status = agent.status().await;
    assert!(kube(&status).forbidden.is_empty(), "{status:#?}");
    let metadata = kube(&status)
        .kinds
        .iter()
        .find(|k| k.kind == "PodMetadata")
        .expect("the kind");
    assert!(metadata.synced);
    assert!(metadata.objects >= 4, "{metadata:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_every_kinds_first_list() {
    let cluster = Cluster::start().await;
    cluster.fake.delay(
        "list",
        "discovery.k8s.io",
        "endpointslices",
        Duration::from_secs(2),
    );
    let mut agent = Agent::spawn(&cluster).await;
    // Poll readiness; note (on the fake's clock) the last 503 and the first 200.
    let (mut last_503, mut first_200) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(15);
    while first_200.is_none() {
        agent.assert_running();
        assert!(
            Instant::now() < deadline,
            "never ready:\n{}",
            agent.stderr()
        );
        match agent.ready_code().await {
            Some(503) => last_503 = Some(cluster.fake.uptime()),
            Some(200) => first_200 = Some(cluster.fake.uptime()),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slices = cluster
        .fake
        .requests()
        .into_iter()
        .find(|r| r.verb == "list" && r.path.ends_with("/endpointslices"))
        .expect("EndpointSlices listed");
    let last_503 = last_503.expect("readiness answered 503 while the list was held");
    assert!(
        last_503 >= slices.received + Duration::from_millis(500),
        "503 seen until {last_503:?}, the held list came at {:?}",
        slices.received
    );
    assert!(
        first_200.unwrap() >= slices.answered,
        "ready at {first_200:?}, before the held list was answered at {:?}",
        slices.answered
    );
    let status = agent.status().await;
    assert!(kube(&status).kinds.iter().all(|k| k.synced), "{status:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_virtual_service_gets_an_event_and_the_last_good_version_keeps_working() {
    let (cluster, agent) = started().await;
    let fake = &cluster.fake;
    fake.create(pricing_abort(500)).unwrap();
    first_seen(
        &agent.client(),
        "http://pricing/",
        Instant::now(),
        Duration::from_secs(5),
        |o| is_fault_abort(o, 500),
    )
    .await;

    let mut bad = pricing_abort(418);
    bad["spec"]["http"][0]["timeout"] = "5 s".into();
    let written = fake.apply(bad).unwrap();
    eventually("a SluiceRejected event", Duration::from_secs(5), || async {
        fake.events()
            .iter()
            .any(|e| e["reason"] == "SluiceRejected")
    })
    .await;
    let event = fake
        .events()
        .into_iter()
        .find(|e| e["reason"] == "SluiceRejected")
        .unwrap();
    let regarding = event
        .get("regarding")
        .or_else(|| event.get("involvedObject"))
        .expect("the object");
    assert_eq!(
        (regarding["kind"].as_str(), regarding["name"].as_str()),
        (Some("VirtualService"), Some("pricing-fault")),
        "{event:#}"
    );
    let note = event
        .get("note")
        .or_else(|| event.get("message"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    assert!(note.contains("spec.http[0].timeout"), "{event:#}");

    // The last good version (abort 500) still answers, not the rejected one (418).
    for _ in 0..20 {
        assert!(is_fault_abort(
            &get(&agent.client(), "http://pricing/").await,
            500
        ));
    }
    let status = agent.status().await;
    let rejection = status
        .rejections
        .iter()
        .find(|r| r.source.contains("VirtualService default/pricing-fault"))
        .unwrap_or_else(|| panic!("{status:#?}"));
    assert!(
        rejection.field.contains("spec.http[0].timeout"),
        "{rejection:?}"
    );
    println!(
        "rejection: {rejection:?} (written at resourceVersion {})",
        written["metadata"]["resourceVersion"]
    );

    // Fixing it clears the rejection.
    fake.apply(pricing_abort(418)).unwrap();
    first_seen(
        &agent.client(),
        "http://pricing/",
        Instant::now(),
        Duration::from_secs(2),
        |o| is_fault_abort(o, 418),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_up_against_a_large_cluster_in_under_two_seconds() {
    let cluster = Cluster::start().await;
    let fake = &cluster.fake;
    for i in 0..1000 {
        let name = format!("svc-{i:04}");
        fake.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
            "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}], "selector": {"app": name}}}))
            .unwrap();
        let endpoints: Vec<(String, u16)> = (0..5)
            .map(|j| (format!("10.{}.{}.{}", 1 + i / 250, i % 250, 1 + j), 8080))
            .collect();
        fake.create(endpoint_slice(&name, &endpoints)).unwrap();
        if i < 500 {
            fake.create(json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"hosts": [name], "http": [{"timeout": "3s", "retries": {"attempts": 2, "perTryTimeout": "1s"},
                    "route": [{"destination": {"host": name}}]}]}}))
                .unwrap();
        }
    }
    let spawned = cluster.fake.uptime();
    // Optimized, as on a node: a debug build's start-up says little about the agent's.
    let mut agent = Agent::spawn_with(&cluster, &sluice_tests::bins::release_bins().sluice).await;
    let took = agent.wait_ready(Duration::from_secs(30)).await;
    let (rss, peak) = agent.memory_kib();
    println!(
        "1,000 Services, 5,000 endpoints, 500 VirtualServices: ready in {took:?}; \
         RSS {rss} KiB (peak {peak} KiB)"
    );
    // What the agent asked for and when (since its spawn; how long the fake took to answer).
    let timeline: String = cluster
        .fake
        .requests()
        .iter()
        .map(|r| {
            format!(
                "{:>8.1?} {:>8.1?} {} {} {}?{}\n",
                r.received.saturating_sub(spawned),
                r.answered.saturating_sub(r.received),
                r.status,
                r.verb,
                r.path,
                r.query
            )
        })
        .collect();
    let status = agent.status().await;
    assert!(status.services >= 1000, "{status:#?}");
    assert_eq!(get(&agent.client(), "http://pricing/").await.code(), 200);
    assert!(
        took < Duration::from_secs(2),
        "ready after {took:?}; requests:\n{timeline}"
    );
}

/// Kubernetes mode's section of `/status`.
fn kube(status: &api::Status) -> &api::KubeStatus {
    status
        .kubernetes
        .as_ref()
        .unwrap_or_else(|| panic!("no kubernetes in {status:#?}"))
}
