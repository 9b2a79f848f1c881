//! Span export against an OTLP receiver each test starts on loopback: what arrives is decoded with
//! `opentelemetry-proto`'s prost types (an implementation independent of Sluice's encoder) and
//! checked for trace ids, parent/child links, names, kinds, attributes and per-attempt spans.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use sluice_core::{AttemptRecord, Deadline, RequestInfo, ResponseFlags};
use sluice_policy::Identity;
use sluice_telemetry::trace::{
    ExportConfig, OtlpProtocol, RequestSpan, Sampler, TraceConfig, TraceContext, Tracer,
};
use sluice_telemetry::{AccessLog, Exchange, HttpRequest, Metrics, Record, ServiceName, Telemetry};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// What the receiver got: the request's path and headers, and the decoded export.
struct Received {
    path: String,
    headers: HeaderMap,
    export: ExportTraceServiceRequest,
}

/// A loopback OTLP receiver: http/protobuf (`POST /v1/traces`) or gRPC (`TraceService/Export`),
/// answering `status` (and gRPC status 0).
async fn receiver(grpc: bool, status: u16) -> (SocketAddr, mpsc::UnboundedReceiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let tx = tx.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    let headers = req.headers().clone();
                    let body = req.into_body().collect().await?.to_bytes();
                    let message = if grpc {
                        assert_eq!(body[0], 0, "uncompressed");
                        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
                        assert_eq!(len, body.len() - 5);
                        body.slice(5..)
                    } else {
                        body
                    };
                    let export = ExportTraceServiceRequest::decode(message)
                        .expect("a valid ExportTraceServiceRequest");
                    let _ = tx.send(Received {
                        path,
                        headers,
                        export,
                    });
                    let mut rsp = Response::builder().status(status);
                    if grpc {
                        rsp = rsp
                            .header("content-type", "application/grpc")
                            .header("grpc-status", "0");
                    }
                    Ok::<_, hyper::Error>(rsp.body(Full::new(Bytes::new())).unwrap())
                }
            });
            let io = TokioIo::new(stream);
            tokio::spawn(async move {
                if grpc {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, rx)
}

fn export_to(addr: SocketAddr, protocol: OtlpProtocol) -> ExportConfig {
    let path = match protocol {
        OtlpProtocol::HttpProtobuf => "/v1/traces",
        OtlpProtocol::Grpc => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    };
    let mut cfg = ExportConfig::new(format!("http://{addr}{path}").parse().unwrap(), protocol);
    cfg.delay = Duration::from_millis(20);
    cfg.service_name = "sluice-test".into();
    cfg.resource = vec![("k8s.node.name".into(), "node-a".into())];
    cfg.headers = vec![(
        "x-tenant".parse().unwrap(),
        HeaderValue::from_static("mesh"),
    )];
    cfg
}

/// Waits (at most 10 s) for the receiver's next export.
async fn next(rx: &mut mpsc::UnboundedReceiver<Received>) -> Received {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an export within 10 s")
        .expect("receiver running")
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> &'a str {
    match attr(attrs, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key}: {other:?}"),
    }
}

const CLIENT_TRACE: u128 = 0x0af7651916cd43dd8448eb211c80319c;
const CLIENT_SPAN: u64 = 0xb7ad6b7169203331;

fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "traceparent",
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    h.insert("tracestate", HeaderValue::from_static("congo=t61rcWkgMzE"));
    h.insert(
        "x-request-id",
        HeaderValue::from_static("5ee2b5c0-1f3a-4e1b-8c2d-3f4a5b6c7d8e"),
    );
    h
}

/// A request that went to `pricing` twice: a 503 ended by the per-try timeout, then a 200. The
/// attempt span ids the endpoints saw are returned with the record.
fn retried_request(ctx: &TraceContext) -> (Record, [u64; 2]) {
    let info = RequestInfo::new();
    info.set_cluster(Arc::from(
        "outbound|80|v1|pricing.default.svc.cluster.local",
    ));
    info.add_request_bytes(11);
    // The request began 30 ms ago, its attempts 0 and 10 ms into it.
    let t0 = tokio::time::Instant::now().into_std() - Duration::from_millis(30);
    let mut seen = [0; 2];
    for (i, (status, timeout, flags)) in [
        (
            503,
            Some(Deadline::PerTry),
            ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        ),
        (200, None, ResponseFlags::empty()),
    ]
    .into_iter()
    .enumerate()
    {
        let attempt = i as u32 + 1;
        let mut headers = HeaderMap::new();
        ctx.inject(attempt, &mut headers);
        let tp = headers["traceparent"].to_str().unwrap();
        seen[i] = u64::from_str_radix(&tp[36..52], 16).unwrap();
        info.push_attempt(AttemptRecord {
            attempt,
            endpoint: format!("10.1.0.{}:8080", 7 + i).parse().unwrap(),
            started: t0 + Duration::from_millis(10 * i as u64),
            duration: Duration::from_millis(5),
            reached: true,
            status,
            flags,
            timeout,
            response_bytes: 2,
        });
    }
    let mut req = HttpRequest::of(
        &Request::builder()
            .uri("/prices?item=1")
            .header("user-agent", "curl/8")
            .header("x-request-id", "5ee2b5c0-1f3a-4e1b-8c2d-3f4a5b6c7d8e")
            .body(())
            .unwrap(),
        "pricing".into(),
    );
    req.trace = Some(std::sync::Arc::new(ctx.clone()));
    let source = Identity {
        workload: "frontend".into(),
        namespace: "shop".into(),
        canonical_service: "frontend".into(),
        canonical_revision: "v1".into(),
        app: "frontend".into(),
        version: "v1".into(),
        principal: "unknown".into(),
    };
    let record = Record {
        start: SystemTime::now() - Duration::from_millis(30),
        duration: Duration::from_millis(30),
        exchange: Exchange::Http(req),
        peer: Some("10.1.0.3:41000".parse().unwrap()),
        source: sluice_telemetry::Interned::new(source),
        service: ServiceName::unknown(),
        info: Arc::new(info),
        status: 200,
        grpc_status: None,
        response_bytes: 120,
    };
    (record, seen)
}

fn exporting(export: ExportConfig) -> Tracer {
    Tracer::from_config(TraceConfig {
        propagate: true,
        sampler: Sampler::default(),
        export: Some(export),
    })
    .unwrap()
}

fn check_request_and_attempts(spans: &[Span], seen: [u64; 2]) {
    assert_eq!(spans.len(), 3, "the request's span and one per attempt");
    let trace = CLIENT_TRACE.to_be_bytes().to_vec();
    assert!(spans.iter().all(|s| s.trace_id == trace), "one trace");
    let req = &spans[0];
    assert_eq!(req.name, "pricing.default.svc.cluster.local:80/*");
    assert_eq!(req.kind, SpanKind::Server as i32);
    assert_eq!(req.parent_span_id, CLIENT_SPAN.to_be_bytes().to_vec());
    assert_eq!(req.trace_state, "congo=t61rcWkgMzE");
    assert_eq!(req.flags & 0x301, 0x301, "sampled, remote parent");
    let a = &req.attributes;
    assert_eq!(str_attr(a, "http.method"), "GET");
    assert_eq!(str_attr(a, "http.url"), "http://pricing/prices?item=1");
    assert_eq!(str_attr(a, "http.status_code"), "200");
    assert_eq!(str_attr(a, "http.protocol"), "HTTP/1.1");
    assert_eq!(
        str_attr(a, "guid:x-request-id"),
        "5ee2b5c0-1f3a-4e1b-8c2d-3f4a5b6c7d8e"
    );
    assert_eq!(
        str_attr(a, "upstream_cluster"),
        "outbound|80|v1|pricing.default.svc.cluster.local"
    );
    assert_eq!(str_attr(a, "component"), "proxy");
    assert_eq!(str_attr(a, "response_flags"), "-");
    assert_eq!(str_attr(a, "request_size"), "11");
    assert_eq!(str_attr(a, "response_size"), "120");
    assert_eq!(str_attr(a, "user_agent"), "curl/8");
    assert_eq!(str_attr(a, "peer.address"), "10.1.0.3");
    assert_eq!(str_attr(a, "istio.canonical_service"), "frontend");
    assert_eq!(str_attr(a, "istio.canonical_revision"), "v1");
    assert_eq!(str_attr(a, "istio.namespace"), "shop");
    assert_eq!(str_attr(a, "istio.cluster_id"), "Kubernetes");
    assert!(str_attr(a, "node_id").starts_with("sluice~10.1.0.3~frontend.shop~"));
    assert!(attr(a, "error").is_none());
    assert_eq!(
        req.end_time_unix_nano - req.start_time_unix_nano,
        30_000_000
    );

    for (i, s) in spans[1..].iter().enumerate() {
        assert_eq!(s.span_id, seen[i].to_be_bytes().to_vec(), "the id it saw");
        assert_eq!(s.parent_span_id, req.span_id, "a child of the request");
        assert_eq!(s.kind, SpanKind::Client as i32);
        assert_eq!(
            s.name,
            "router outbound|80|v1|pricing.default.svc.cluster.local egress"
        );
        assert!(s.start_time_unix_nano >= req.start_time_unix_nano);
        assert!(s.end_time_unix_nano <= req.end_time_unix_nano);
        assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 5_000_000);
        let endpoint = format!("10.1.0.{}:8080", 7 + i);
        assert_eq!(str_attr(&s.attributes, "upstream_address"), endpoint);
        assert_eq!(str_attr(&s.attributes, "peer.address"), endpoint);
        assert_eq!(
            attr(&s.attributes, "network.peer.port"),
            Some(&Value::IntValue(8080))
        );
        assert_eq!(
            str_attr(&s.attributes, "istio.canonical_service"),
            "frontend"
        );
    }
    let (first, second) = (&spans[1].attributes, &spans[2].attributes);
    assert_eq!(str_attr(first, "http.status_code"), "503");
    assert_eq!(str_attr(first, "response_flags"), "UT");
    assert_eq!(str_attr(first, "sluice.timeout"), "per_try");
    assert_eq!(str_attr(first, "error"), "true");
    assert_eq!(str_attr(first, "canceled"), "true");
    assert!(attr(first, "retry.count").is_none(), "the first try");
    assert_eq!(
        spans[1].status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(str_attr(second, "http.status_code"), "200");
    assert_eq!(str_attr(second, "retry.count"), "1");
    assert!(attr(second, "error").is_none());
    assert!(attr(second, "sluice.timeout").is_none());
}

#[tokio::test]
async fn a_sampled_request_and_its_attempts_reach_the_collector_as_one_trace() {
    let (addr, mut rx) = receiver(false, 200).await;
    let tracer = exporting(export_to(addr, OtlpProtocol::HttpProtobuf));
    let ctx = tracer.start(&client_headers()).expect("a context");
    assert!(ctx.sampled(), "the client's traceparent says sampled");
    let (record, seen) = retried_request(&ctx);
    // Through the record's one exit, as the proxy finishes a request.
    let telemetry =
        Telemetry::new(Metrics::new(), AccessLog::new(false), "Kubernetes").with_tracer(tracer);
    telemetry.request(record, &|_| None);

    let got = next(&mut rx).await;
    assert_eq!(got.path, "/v1/traces");
    assert_eq!(got.headers["content-type"], "application/x-protobuf");
    assert_eq!(got.headers["x-tenant"], "mesh");
    let rs = &got.export.resource_spans;
    assert_eq!(rs.len(), 1);
    let resource = &rs[0].resource.as_ref().unwrap().attributes;
    assert_eq!(str_attr(resource, "service.name"), "sluice-test");
    assert_eq!(str_attr(resource, "k8s.node.name"), "node-a");
    let scope = &rs[0].scope_spans[0];
    assert_eq!(scope.scope.as_ref().unwrap().name, "sluice");
    check_request_and_attempts(&scope.spans, seen);
    let t = telemetry.tracer().clone();
    // Blocking, so off this runtime (the receiver runs on it).
    tokio::task::spawn_blocking(move || assert!(t.flush(Duration::from_secs(5))))
        .await
        .unwrap();
    let t = telemetry.tracer();
    assert_eq!((t.exported(), t.dropped()), (3, 0));
}

#[tokio::test]
async fn grpc_export_carries_the_same_spans() {
    let (addr, mut rx) = receiver(true, 200).await;
    let tracer = exporting(export_to(addr, OtlpProtocol::Grpc));
    let ctx = tracer.start(&client_headers()).unwrap();
    let (record, seen) = retried_request(&ctx);
    let Exchange::Http(req) = &record.exchange else {
        unreachable!()
    };
    let attempts = record.info.attempt_records();
    tracer.finish(RequestSpan::of(&record, req, &ctx, &attempts, "Kubernetes"));
    let got = next(&mut rx).await;
    assert_eq!(
        got.path,
        "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
    );
    assert_eq!(got.headers["content-type"], "application/grpc");
    check_request_and_attempts(&got.export.resource_spans[0].scope_spans[0].spans, seen);
    let t = tracer.clone();
    tokio::task::spawn_blocking(move || assert!(t.flush(Duration::from_secs(5))))
        .await
        .unwrap();
    assert_eq!(tracer.exported(), 3);
}

#[tokio::test]
async fn unsampled_requests_export_nothing_and_a_root_trace_is_made_when_absent() {
    let (addr, mut rx) = receiver(false, 200).await;
    let tracer = exporting(export_to(addr, OtlpProtocol::HttpProtobuf));
    let telemetry =
        Telemetry::new(Metrics::new(), AccessLog::new(false), "Kubernetes").with_tracer(tracer);
    // The client said "not sampled".
    let mut h = client_headers();
    h.insert(
        "traceparent",
        HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"),
    );
    let ctx = telemetry.tracer().start(&h).unwrap();
    assert!(!ctx.sampled());
    telemetry.request(retried_request(&ctx).0, &|_| None);
    // No context at all, forced by x-client-trace-id (Istio's client sampling is 100%).
    let mut h = HeaderMap::new();
    h.insert("x-client-trace-id", HeaderValue::from_static("debug-1"));
    let root = telemetry.tracer().start(&h).unwrap();
    assert!(root.sampled());
    let (record, _) = retried_request(&root);
    telemetry.request(record, &|_| None);

    let got = next(&mut rx).await;
    let spans = &got.export.resource_spans[0].scope_spans[0].spans;
    assert_eq!(spans.len(), 3, "only the forced request's spans");
    assert_eq!(spans[0].trace_id, root.trace_id().to_be_bytes().to_vec());
    assert!(spans[0].parent_span_id.is_empty(), "a root span");
    assert_eq!(spans[0].flags & 0x301, 0x101, "sampled, no remote parent");
    let t = telemetry.tracer().clone();
    tokio::task::spawn_blocking(move || assert!(t.flush(Duration::from_secs(5))))
        .await
        .unwrap();
    assert_eq!(telemetry.tracer().exported(), 3);
}

#[tokio::test]
async fn a_refusing_collector_and_a_full_queue_are_counted_as_dropped() {
    // Answers 503 to every export.
    let (addr, mut rx) = receiver(false, 503).await;
    let tracer = exporting(export_to(addr, OtlpProtocol::HttpProtobuf));
    let ctx = tracer.start(&client_headers()).unwrap();
    let (record, _) = retried_request(&ctx);
    let Exchange::Http(req) = &record.exchange else {
        unreachable!()
    };
    let attempts = record.info.attempt_records();
    tracer.finish(RequestSpan::of(&record, req, &ctx, &attempts, "Kubernetes"));
    next(&mut rx).await;
    let t = tracer.clone();
    tokio::task::spawn_blocking(move || assert!(t.flush(Duration::from_secs(5))))
        .await
        .unwrap();
    assert_eq!((tracer.exported(), tracer.dropped()), (0, 3));

    // A collector that takes the connection and never answers: the export thread waits (up to
    // its timeout) while the queue of 2 fills; what does not fit is dropped at once.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let mut cfg = export_to(silent_addr, OtlpProtocol::HttpProtobuf);
    cfg.max_queue = 2;
    cfg.max_batch = 1;
    cfg.timeout = Duration::from_millis(300);
    let tracer = exporting(cfg);
    let ctx = tracer.start(&client_headers()).unwrap();
    let (record, _) = retried_request(&ctx);
    let Exchange::Http(req) = &record.exchange else {
        unreachable!()
    };
    let mut span = RequestSpan::of(&record, req, &ctx, &[], "Kubernetes");
    span.attempts.clear();
    for _ in 0..10 {
        tracer.finish(span.clone());
    }
    // At most one in the exporter's hands and two queued.
    assert!(tracer.dropped() >= 7, "{} dropped", tracer.dropped());
    let t = tracer.clone();
    tokio::task::spawn_blocking(move || assert!(t.flush(Duration::from_secs(10))))
        .await
        .unwrap();
    assert_eq!((tracer.exported(), tracer.dropped()), (0, 10));
    held.abort();
}
