//! Who sees which policy, and where a destination without `port` goes, through the real proxy
//! in-process on loopback: clients are Pods known by their address (each test client binds its
//! own 127.0.0.x address), backends are real `fake-service` servers whose answer names them.
//!
//! * `exportTo` on VirtualServices and DestinationRules gives clients in two namespaces different
//!   policy for the same Service (istiod's per-sidecar selection).
//! * A VirtualService whose destination has no `port` sends requests on each port of a multi-port
//!   Service to that port's backend, in explicit-proxy mode (the authority's port) and for
//!   redirected connections (the original destination's port); a destination Service lacking the
//!   incoming port answers 503 NC, as Envoy does for the cluster istiod names.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sluice_proxy::server::OriginalDst;
use sluice_tests::{timed, Mesh, Outcome};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const MAX_TIME: Duration = Duration::from_secs(5);

/// One GET through `proxy` (absolute form) on a fresh connection from address `from`.
async fn get_from(proxy: SocketAddr, from: IpAddr, url: &str) -> Outcome {
    let req = Request::get(url).body(Empty::<Bytes>::new()).unwrap();
    timed(MAX_TIME, async move {
        let socket = TcpSocket::new_v4().ok()?;
        socket.bind(SocketAddr::new(from, 0)).ok()?;
        let stream = socket.connect(proxy).await.ok()?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let rsp = tx.send_request(req).await.ok()?;
        let (parts, body) = rsp.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some((parts, body))
    })
    .await
}

/// The fake-service that answered (its `name`), or the status of a local reply.
fn answered_by(o: &Outcome) -> String {
    serde_json::from_slice::<serde_json::Value>(&o.body)
        .ok()
        .and_then(|v| v["name"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{} {}", o.code(), String::from_utf8_lossy(&o.body)))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A Pod `name` in namespace `ns` at `ip` (how the proxy knows a client), with `labels`.
fn pod(name: &str, ns: &str, ip: &str, labels: &str) -> String {
    format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{{labels}}}}}\nstatus: {{podIP: {ip}}}\n---\n")
}

/// An EndpointSlice of Service `svc` (namespace default) for its port named `port_name`: one
/// loopback endpoint at `port`, standing for Pod `pod`.
fn slice(svc: &str, port_name: &str, port: u16, pod: &str) -> String {
    format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {svc}-{port_name}-{pod}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {svc}}}\naddressType: IPv4\nendpoints:\n- addresses: [127.0.0.1]\n  conditions: {{ready: true}}\n  targetRef: {{kind: Pod, name: {pod}, namespace: default}}\nports: [{{name: {port_name}, port: {port}}}]\n---\n")
}

/// Clients in two namespaces: `web` at 127.0.0.2, `shop` at 127.0.0.3.
const CLIENTS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: web}\nstatus: {podIP: 127.0.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: shop}\nstatus: {podIP: 127.0.0.3}\n";
const WEB: &str = "127.0.0.2";
const SHOP: &str = "127.0.0.3";
/// Not a known Pod: the proxy's default namespace (`default`) applies.
const UNKNOWN: &str = "127.0.0.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_exported_to_its_namespace_applies_to_its_pods_only() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("pricing", &[]).await;
    mesh.deploy("pricing", &[port]);
    mesh.write("clients.yaml", CLIENTS);
    // shop's own VirtualService for default's pricing, seen in shop only.
    mesh.write(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pricing-faults, namespace: shop}\nspec:\n  hosts: [pricing.default.svc.cluster.local]\n  exportTo: [.]\n  http:\n  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: pricing.default.svc.cluster.local}}]\n",
    );
    mesh.reload();
    let url = "http://pricing.default/";
    assert_eq!(get_from(mesh.proxy, ip(SHOP), url).await.code(), 418);
    assert_eq!(get_from(mesh.proxy, ip(WEB), url).await.code(), 200);
    assert_eq!(get_from(mesh.proxy, ip(UNKNOWN), url).await.code(), 200);

    // Exported to web by name as well: web's pods get it too.
    mesh.write(
        "vs.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pricing-faults, namespace: shop}\nspec:\n  hosts: [pricing.default.svc.cluster.local]\n  exportTo: [., web]\n  http:\n  - fault: {abort: {httpStatus: 418, percentage: {value: 100}}}\n    route: [{destination: {host: pricing.default.svc.cluster.local}}]\n",
    );
    mesh.reload();
    assert_eq!(get_from(mesh.proxy, ip(WEB), url).await.code(), 418);
    assert_eq!(get_from(mesh.proxy, ip(UNKNOWN), url).await.code(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_rule_exported_to_one_namespace_gives_its_pods_other_subsets() {
    let mut mesh = Mesh::start().await;
    let a = mesh.fake_service("pricing-a", &[]).await;
    let b = mesh.fake_service("pricing-b", &[]).await;
    let mut yaml = String::from(CLIENTS);
    yaml.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: pricing, namespace: default}\nspec:\n  ports: [{name: http, port: 80}]\n---\n");
    yaml.push_str(&pod("pricing-a", "default", "10.0.0.1", "version: a"));
    yaml.push_str(&pod("pricing-b", "default", "10.0.0.2", "version: b"));
    yaml.push_str(&slice("pricing", "http", a, "pricing-a"));
    yaml.push_str(&slice("pricing", "http", b, "pricing-b"));
    mesh.write("pricing.yaml", &yaml);
    // Everyone routes to subset `stable`. Which Pods that is: shop is shown a rule of pricing's
    // namespace (exportTo shop), everyone else falls through to the root namespace's rule.
    mesh.write(
        "policy.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pricing, namespace: default}\nspec:\n  hosts: [pricing]\n  http:\n  - route: [{destination: {host: pricing, subset: stable}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: pricing-for-shop, namespace: default}\nspec:\n  host: pricing\n  exportTo: [shop]\n  subsets: [{name: stable, labels: {version: b}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: mesh-wide, namespace: istio-system}\nspec:\n  host: \"*.svc.cluster.local\"\n  subsets: [{name: stable, labels: {version: a}}]\n",
    );
    mesh.reload();
    let url = "http://pricing.default/";
    for _ in 0..3 {
        assert_eq!(
            answered_by(&get_from(mesh.proxy, ip(SHOP), url).await),
            "pricing-b"
        );
        assert_eq!(
            answered_by(&get_from(mesh.proxy, ip(WEB), url).await),
            "pricing-a"
        );
        assert_eq!(
            answered_by(&get_from(mesh.proxy, ip(UNKNOWN), url).await),
            "pricing-a"
        );
    }
}

/// `pricing` with ports 80 (`http`, backend pricing-80) and 8080 (`http-alt`, backend
/// pricing-8080), cluster IP 10.96.0.50, routed by a VirtualService whose destination has no port;
/// the configuration's problems.
async fn multi_port(mesh: &mut Mesh) -> Vec<sluice_config::Problem> {
    let p80 = mesh.fake_service("pricing-80", &[]).await;
    let p8080 = mesh.fake_service("pricing-8080", &[]).await;
    let mut yaml = String::from("apiVersion: v1\nkind: Service\nmetadata: {name: pricing, namespace: default}\nspec:\n  clusterIP: 10.96.0.50\n  ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]\n---\n");
    yaml.push_str(&slice("pricing", "http", p80, "p"));
    yaml.push_str(&slice("pricing", "http-alt", p8080, "p"));
    yaml.push_str("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: pricing, namespace: default}\nspec:\n  hosts: [pricing]\n  http:\n  - route: [{destination: {host: pricing}}]\n    headers: {response: {set: {x-routed-by: pricing-vs}}}\n");
    mesh.write("pricing.yaml", &yaml);
    mesh.reload_checked(false)
}

/// Nothing to warn about: every incoming port is a port of the destination.
fn no_destination_warnings(problems: &[sluice_config::Problem]) {
    assert!(
        !problems.iter().any(|p| p.field.contains("destination")),
        "{problems:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_without_port_goes_to_the_port_the_request_came_in_on() {
    let mut mesh = Mesh::start().await;
    let problems = multi_port(&mut mesh).await;
    for (url, backend) in [
        ("http://pricing/", "pricing-80"),
        ("http://pricing:80/", "pricing-80"),
        ("http://pricing:8080/", "pricing-8080"),
    ] {
        let o = mesh.get(url, MAX_TIME).await;
        assert_eq!(answered_by(&o), backend, "{url}");
        assert_eq!(o.headers["x-routed-by"], "pricing-vs", "{url}");
    }
    no_destination_warnings(&problems);
}

/// Every connection accepted on the listener it serves was originally addressed to `.0`.
struct FixedDst(SocketAddr);

impl OriginalDst for FixedDst {
    fn original_dst(&self, _stream: &TcpStream) -> Option<SocketAddr> {
        Some(self.0)
    }
}

/// Proxy listeners standing in for redirected connections; stopped when dropped.
struct Redirects {
    _shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Redirects {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirected_request_without_destination_port_keeps_its_port() {
    let mut mesh = Mesh::start().await;
    let problems = multi_port(&mut mesh).await;
    let (shutdown, rx) = watch::channel(false);
    let mut redirects = Redirects {
        _shutdown: shutdown,
        tasks: Vec::new(),
    };
    for (port, backend) in [(80, "pricing-80"), (8080, "pricing-8080")] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dst = Arc::new(FixedDst(SocketAddr::new(ip("10.96.0.50"), port)));
        redirects
            .tasks
            .push(tokio::spawn(sluice_proxy::server::serve(
                listener,
                mesh.handler.clone(),
                Some(dst),
                Default::default(),
                rx.clone(),
                Duration::from_secs(1),
            )));
        // The client addressed the cluster IP; its Host header names no port.
        let o = get_from(addr, ip(UNKNOWN), "http://pricing/").await;
        assert_eq!(answered_by(&o), backend, "original destination port {port}");
    }
    no_destination_warnings(&problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_lacking_the_incoming_port_answers_no_cluster() {
    let mut mesh = Mesh::start().await;
    let backend = mesh.fake_service("backend", &[]).await;
    mesh.write(
        "objects.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: frontend, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: backend, namespace: default}}\nspec:\n  ports: [{{name: http, port: 9000}}]\n---\n{}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: frontend, namespace: default}}\nspec:\n  hosts: [frontend]\n  http:\n  - match: [{{uri: {{prefix: /pinned}}}}]\n    route: [{{destination: {{host: backend, port: {{number: 9000}}}}}}]\n  - route: [{{destination: {{host: backend}}}}]\n",
            slice("backend", "http", backend, "b")
        ),
    );
    let problems = mesh.reload_checked(false);
    let warning = problems
        .iter()
        .find(|p| p.field == "spec.http[1].route[0].destination.port")
        .unwrap_or_else(|| panic!("a warning: {problems:#?}"));
    assert!(warning.reason.contains("has no port 80"), "{warning:?}");

    let mut log = mesh.access_log();
    // Istio routes a request on port 80 to `outbound|80||backend...`, which does not exist.
    let o = mesh.get("http://frontend/", MAX_TIME).await;
    assert_eq!(o.code(), 503, "{}", answered_by(&o));
    let lines = log.drain().await;
    assert!(lines.iter().any(|l| l.has_flag("NC")), "{lines:?}");
    // With the port written out, the same Service is reached.
    let o = mesh.get("http://frontend/pinned", MAX_TIME).await;
    assert_eq!(answered_by(&o), "backend");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exported_to_its_namespace_is_unknown_elsewhere() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("ledger", &[]).await;
    mesh.write("clients.yaml", CLIENTS);
    mesh.write(
        "ledger.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: ledger\n  namespace: default\n  annotations: {{networking.istio.io/exportTo: \".,shop\"}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\n{}",
            slice("ledger", "http", port, "l")
        ),
    );
    mesh.reload();
    let url = "http://ledger.default/";
    assert_eq!(
        answered_by(&get_from(mesh.proxy, ip(SHOP), url).await),
        "ledger"
    );
    assert_eq!(
        answered_by(&get_from(mesh.proxy, ip(UNKNOWN), url).await),
        "ledger"
    );
    let mut log = mesh.access_log();
    assert_eq!(get_from(mesh.proxy, ip(WEB), url).await.code(), 503);
    let lines = log.drain().await;
    assert!(lines.iter().any(|l| l.has_flag("NC")), "{lines:?}");
}

// Connections proxied at L4 see what their client's namespace sees, as HTTP requests do: shop's
// own VirtualService sends shop's connections to subset b; everyone else follows the public one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_connections_see_their_namespaces_objects() {
    let mut mesh = Mesh::start().await;
    let a = mesh.fake_service("db-a", &[]).await;
    let b = mesh.fake_service("db-b", &[]).await;
    let mut yaml = String::from(CLIENTS);
    yaml.push_str("---\napiVersion: v1\nkind: Service\nmetadata: {name: db, namespace: default}\nspec:\n  clusterIP: 10.96.0.60\n  ports: [{name: tcp, port: 5432}]\n---\n");
    yaml.push_str(&pod("db-a", "default", "10.0.0.1", "version: a"));
    yaml.push_str(&pod("db-b", "default", "10.0.0.2", "version: b"));
    yaml.push_str(&slice("db", "tcp", a, "db-a"));
    yaml.push_str(&slice("db", "tcp", b, "db-b"));
    mesh.write("db.yaml", &yaml);
    mesh.write(
        "policy.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: db, namespace: default}\nspec:\n  host: db\n  subsets: [{name: a, labels: {version: a}}, {name: b, labels: {version: b}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db, namespace: default}\nspec:\n  hosts: [db]\n  tcp:\n  - route: [{destination: {host: db, subset: a}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: db-for-shop, namespace: shop}\nspec:\n  hosts: [db.default.svc.cluster.local]\n  exportTo: [.]\n  tcp:\n  - route: [{destination: {host: db.default.svc.cluster.local, subset: b}}]\n",
    );
    mesh.reload();
    let (shutdown, rx) = watch::channel(false);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let dst = Arc::new(FixedDst(SocketAddr::new(ip("10.96.0.60"), 5432)));
    let redirects = Redirects {
        _shutdown: shutdown,
        tasks: vec![tokio::spawn(sluice_proxy::server::serve(
            listener,
            mesh.handler.clone(),
            Some(dst),
            Default::default(),
            rx,
            Duration::from_secs(1),
        ))],
    };
    // The port is declared `tcp`: the bytes of these HTTP exchanges are proxied at L4.
    for _ in 0..3 {
        assert_eq!(
            answered_by(&get_from(addr, ip(SHOP), "http://db/").await),
            "db-b"
        );
        assert_eq!(
            answered_by(&get_from(addr, ip(WEB), "http://db/").await),
            "db-a"
        );
    }
    drop(redirects);
}
