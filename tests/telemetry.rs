//! Istio's telemetry from the proxy in-process, read the way Prometheus reads it: the full label set
//! with both ends named from their Pods (a Deployment's pods by their controller), both reporters
//! (the client's side once per request, the endpoints' side once per attempt, so a retry the client
//! never saw shows on the server side), request and response sizes, the TCP families for the
//! connections that carry HTTP, `istio_build`, and the exposition formats.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sluice_tests::{failing_env, Mesh};
use std::collections::BTreeMap;
use std::time::Duration;

const MAX_TIME: Duration = Duration::from_secs(5);

/// A Deployment's pod: named by its ReplicaSet `<deployment>-<hash>` (its controller), with the
/// hash label.
fn deployment_pod(deployment: &str, pod: &str, ip: &str, labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {pod}\n  generateName: {deployment}-7c9d8-\n  namespace: default\n  labels: {{pod-template-hash: 7c9d8, {labels}}}\n  ownerReferences:\n  - {{apiVersion: apps/v1, kind: ReplicaSet, name: {deployment}-7c9d8, uid: u-{pod}, controller: true}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
    )
}

/// One sample: its labels and value.
#[derive(Debug)]
struct Sample {
    labels: BTreeMap<String, String>,
    value: f64,
}

fn samples(text: &str, name: &str) -> Vec<Sample> {
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .map(|(k, v)| (k.to_string(), v.trim_end_matches('"').to_string()))
                .collect();
            Some(Sample {
                labels,
                value: value.parse().ok()?,
            })
        })
        .collect()
}

/// The sum of `name` over samples whose labels include every `(key, value)` of `want`.
fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    samples(text, name)
        .iter()
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_reporters_name_both_ends_and_count_sizes_and_connections() {
    let mut mesh = Mesh::start().await;
    let bad = mesh.fake_service("web", &failing_env("503")).await;
    let good = mesh.fake_service("web", &[]).await;
    // The client is a pod at the address the test connects from; the endpoints are pods too.
    mesh.write(
        "pods.yaml",
        &[
            deployment_pod("client", "client-7c9d8-abcde", "127.0.0.1", "app: client"),
            deployment_pod(
                "web-v1",
                "web-v1-7c9d8-aaaaa",
                "10.1.0.1",
                "app: web, version: v1",
            ),
            deployment_pod(
                "web-v2",
                "web-v2-7c9d8-bbbbb",
                "10.1.0.2",
                "app: web, version: v2",
            ),
        ]
        .join("---\n"),
    );
    mesh.write("web.yaml", &sluice_tests::yaml::service("web"));
    mesh.write(
        "web-endpoints.yaml",
        &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: {bad}}}\nendpoints:\n- addresses: [127.0.0.1]\n  targetRef: {{kind: Pod, name: web-v1-7c9d8-aaaaa}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-2\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports:\n- {{name: http, port: {good}}}\nendpoints:\n- addresses: [127.0.0.1]\n  targetRef: {{kind: Pod, name: web-v2-7c9d8-bbbbb}}\n"
        ),
    );
    // Retries on 503 go to the other endpoint (Istio's previous-hosts predicate).
    mesh.write(
        "web-vs.yaml",
        &sluice_tests::yaml::virtual_service(
            "web",
            "  - route:\n    - destination:\n        host: web\n    retries:\n      attempts: 2\n      retryOn: 5xx\n",
        ),
    );
    mesh.reload();

    const N: usize = 12;
    for _ in 0..N / 2 {
        let o = mesh.get("http://web/", MAX_TIME).await;
        assert_eq!(o.code(), 200, "{o:?}");
    }
    // A new configuration generation (new `Arc`s for every pod and Service) keeps adding to the
    // same series.
    mesh.write("extra.yaml", &sluice_tests::yaml::service("other"));
    mesh.reload();
    for _ in 0..N / 2 {
        let o = mesh.get("http://web/", MAX_TIME).await;
        assert_eq!(o.code(), 200, "{o:?}");
    }
    let m = mesh.metrics();
    let src = [("reporter", "source")];
    let dst = [("reporter", "destination")];

    // The client's side: every request once, 200, from the client Deployment to the endpoint that
    // answered, with Istio's values for every label.
    let source_samples: Vec<_> = samples(&m, "istio_requests_total")
        .into_iter()
        .filter(|s| s.labels["reporter"] == "source")
        .collect();
    assert_eq!(source_samples.len(), 1, "{source_samples:#?}");
    let s = &source_samples[0];
    assert_eq!(s.value, N as f64);
    for (k, v) in [
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "latest"),
        ("source_app", "client"),
        // As ambient reports them: the canonical service and revision.
        ("source_version", "latest"),
        ("source_principal", "unknown"),
        ("source_cluster", "Kubernetes"),
        ("destination_workload", "web-v2"),
        ("destination_workload_namespace", "default"),
        ("destination_canonical_service", "web"),
        ("destination_canonical_revision", "v2"),
        ("destination_app", "web"),
        ("destination_version", "v2"),
        ("destination_cluster", "Kubernetes"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("destination_service_name", "web"),
        ("destination_service_namespace", "default"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("grpc_response_status", ""),
        ("response_flags", "-"),
        ("connection_security_policy", "unknown"),
    ] {
        assert_eq!(s.labels.get(k).map(String::as_str), Some(v), "{k}: {s:#?}");
    }

    // The endpoints' side: one sample per attempt. What retries hid from the client shows here:
    // web-v1 answered 503 to every request that tried it first.
    let served = sum(
        &m,
        "istio_requests_total",
        &[
            dst[0],
            ("destination_workload", "web-v2"),
            ("response_code", "200"),
        ],
    );
    let failed = sum(
        &m,
        "istio_requests_total",
        &[
            dst[0],
            ("destination_workload", "web-v1"),
            ("response_code", "503"),
        ],
    );
    assert_eq!(served, N as f64, "{m}");
    assert!(
        failed >= 1.0 && failed < N as f64,
        "round robin tries web-v1 first about half the time: {failed}\n{m}"
    );
    assert_eq!(
        sum(
            &m,
            "istio_requests_total",
            &[
                dst[0],
                ("source_workload", "client"),
                ("connection_security_policy", "none")
            ]
        ),
        served + failed
    );

    // Sizes: one observation per request (client side), with bodies counted.
    assert_eq!(sum(&m, "istio_request_bytes_count", &src), N as f64);
    assert_eq!(sum(&m, "istio_response_bytes_count", &src), N as f64);
    assert!(
        sum(&m, "istio_response_bytes_sum", &src) > (N * 100) as f64,
        "fake-service's JSON bodies: {m}"
    );
    assert!(sum(&m, "istio_request_bytes_sum", &src) > 0.0);
    assert_eq!(
        sum(&m, "istio_request_duration_milliseconds_count", &dst),
        served + failed
    );

    // The connections that carried the requests: each client connection (one per request here)
    // from the client pod, and the proxy's pooled connections to each endpoint.
    assert_eq!(
        sum(
            &m,
            "istio_tcp_connections_opened_total",
            &[
                src[0],
                ("source_workload", "client"),
                ("destination_service", "web.default.svc.cluster.local")
            ]
        ),
        0.0,
        "explicit-proxy connections name no Service (the original destination does): {m}"
    );
    let client_conns = sum(
        &m,
        "istio_tcp_connections_opened_total",
        &[src[0], ("source_workload", "client")],
    );
    assert_eq!(client_conns, N as f64, "{m}");
    assert!(
        sum(
            &m,
            "istio_tcp_received_bytes_total",
            &[src[0], ("source_workload", "client")]
        ) > 0.0
    );
    assert!(
        sum(
            &m,
            "istio_tcp_sent_bytes_total",
            &[src[0], ("source_workload", "client")]
        ) > 0.0
    );
    let upstream = [
        dst[0],
        ("source_workload", "sluice"),
        ("destination_workload", "web-v2"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("request_protocol", "tcp"),
    ];
    assert!(
        sum(&m, "istio_tcp_connections_opened_total", &upstream) >= 1.0,
        "{m}"
    );
    assert!(
        sum(&m, "istio_tcp_received_bytes_total", &upstream) > 0.0,
        "{m}"
    );
    assert!(
        sum(&m, "istio_tcp_sent_bytes_total", &upstream) > 0.0,
        "{m}"
    );

    assert!(m.contains("istio_build{component=\"proxy\",tag=\""), "{m}");
}

/// `/stats/prometheus` as a scraper sees it: text 0.0.4 with every family typed under its sample
/// name, or OpenMetrics when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposition_is_typed_and_negotiated() {
    let mut mesh = Mesh::start().await;
    let port = mesh.fake_service("web", &[]).await;
    mesh.deploy("web", &[port]);
    mesh.reload();
    assert_eq!(mesh.get("http://web/", MAX_TIME).await.code(), 200);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(sluice_proxy::admin::serve_metrics(
        listener,
        mesh.handler.clone(),
        rx,
    ));
    let scrape = |accept: Option<&'static str>| async move {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut req = http::Request::get("/stats/prometheus").header("host", "sluice");
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let rsp = send
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let ct = rsp.headers()["content-type"].to_str().unwrap().to_owned();
        let body = rsp.into_body().collect().await.unwrap().to_bytes();
        (ct, String::from_utf8(body.to_vec()).unwrap())
    };

    let (ct, text) = scrape(None).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    for typed in [
        "# TYPE istio_requests_total counter",
        "# TYPE istio_request_duration_milliseconds histogram",
        "# TYPE istio_request_bytes histogram",
        "# TYPE istio_response_bytes histogram",
        "# TYPE istio_tcp_connections_opened_total counter",
        "# TYPE istio_build gauge",
        "# TYPE envoy_cluster_upstream_rq_total counter",
        "# TYPE envoy_cluster_upstream_rq_active gauge",
        "# TYPE sluice_access_log_dropped_total counter",
        "# TYPE sluice_access_log_writes_total counter",
    ] {
        assert!(text.contains(typed), "{typed}\n{text}");
    }
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    // Every sample belongs to the family its `# TYPE` line names (what Prometheus' text parser needs
    // for metadata).
    let mut family = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family = rest.split(' ').next().unwrap().to_owned();
        } else if !line.starts_with('#') && !line.is_empty() {
            let name = line.split(['{', ' ']).next().unwrap();
            let base = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                name == family || base == family,
                "{name} under # TYPE {family}"
            );
        }
    }

    let (ct, om) = scrape(Some(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    ))
    .await;
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE istio_requests counter\n"), "{om}");
    assert!(
        om.contains("# TYPE envoy_cluster_upstream_rq_total unknown\n"),
        "{om}"
    );
    assert_eq!(om.matches("# EOF").count(), 1);
}
