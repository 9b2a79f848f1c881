//! Traces end to end through the real `sluice run`: a client's W3C trace context is continued (the
//! endpoint sees the same trace with a new span id per attempt) and the request's span and its
//! attempt's span reach an OTLP receiver this test starts on loopback, decoded with
//! `opentelemetry-proto` (independent of Sluice's encoder).

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Serves `reply` to every request on loopback, sending each request's headers to the channel.
async fn serve(
    reply: impl Fn(&http::HeaderMap) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<(String, http::HeaderMap, Bytes)>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (tx, reply) = (tx.clone(), reply.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (tx, reply) = (tx.clone(), reply.clone());
                async move {
                    let path = req.uri().path().to_owned();
                    let headers = req.headers().clone();
                    let body = req.into_body().collect().await?.to_bytes();
                    let rsp = reply(&headers);
                    let _ = tx.send((path, headers, body));
                    Ok::<_, hyper::Error>(rsp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc),
            );
        }
    });
    (addr, rx)
}

/// `sluice run`, killed by PID when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn get(addr: SocketAddr, uri: &str, headers: &[(&str, &str)]) -> Option<(u16, Bytes)> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let mut req = Request::get(uri).header("host", "web");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = tx
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .ok()?;
    let code = rsp.status().as_u16();
    Some((code, rsp.into_body().collect().await.ok()?.to_bytes()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_run_continues_the_clients_trace_and_exports_its_spans() {
    // The collector, and an endpoint that answers 503 once, then 200.
    let (collector, mut exports) = serve(|_| Response::new(Full::new(Bytes::new()))).await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (web, mut seen) = serve(move |_| {
        let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let code = if n == 0 { 503 } else { 200 };
        Response::builder()
            .status(code)
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap()
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("web.yaml"),
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\naddressType: IPv4\nports: [{{name: http, port: {}}}]\nendpoints: [{{addresses: [127.0.0.1]}}]\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: web, namespace: default}}\nspec:\n  hosts: [web]\n  http:\n  - route: [{{destination: {{host: web}}}}]\n    retries: {{attempts: 2, retryOn: 5xx}}\n",
            web.port()
        ),
    )
    .unwrap();
    let listen = sluice_tests::listen::Listen::new(dir.path(), "addresses.json");
    let mut cmd = Command::new(sluice_tests::bins::sluice());
    cmd.arg("run")
        .arg("--config-dir")
        .arg(dir.path())
        .args(["--no-access-log", "--reload-interval", "50ms"])
        .args(listen.args())
        .args(["--admin-socket", "none"])
        .args(["--otlp-endpoint", &format!("http://{collector}")])
        .args(["--trace-sampling", "0"])
        .env_remove("RUST_LOG")
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    // SAFETY: prctl is async-signal-safe and touches only the child being made: if this test
    // process dies without unwinding, the agent goes with it.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut agent = Agent(cmd.spawn().expect("spawn sluice run"));
    let bound = listen.bound(&mut agent.0, Duration::from_secs(20)).await;
    let (outbound, metrics, ready) = match bound {
        Ok(b) => (b.outbound, b.metrics, b.ready),
        Err(e) => panic!("{e}"),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(ready, "/healthz/ready", &[]).await.map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "sluice run not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Sampling is 0%: only the client's own decision (sampled) makes this request traced.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{parent}-01");
    let (code, _) = get(outbound, "http://web/", &[("traceparent", &traceparent)])
        .await
        .expect("a response");
    assert_eq!(code, 200);

    // Both attempts carried the client's trace, each as a span of its own.
    let mut attempt_spans = Vec::new();
    for _ in 0..2 {
        let (_, headers, _) = tokio::time::timeout(Duration::from_secs(5), seen.recv())
            .await
            .unwrap()
            .unwrap();
        let tp = headers["traceparent"].to_str().unwrap().to_owned();
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!((parts[1], parts[3]), (trace_id, "01"), "{tp}");
        assert_ne!(parts[2], parent);
        assert_eq!(headers["x-b3-traceid"], trace_id);
        attempt_spans.push(parts[2].to_owned());
    }
    assert_ne!(attempt_spans[0], attempt_spans[1]);

    // The request's span (child of the client's) and one span per attempt reach the collector.
    let mut spans: Vec<Span> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while spans.len() < 3 && Instant::now() < deadline {
        if let Ok(Some((path, _, body))) =
            tokio::time::timeout(Duration::from_millis(500), exports.recv()).await
        {
            assert_eq!(path, "/v1/traces");
            let export = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
            for rs in export.resource_spans {
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
        }
    }
    assert_eq!(spans.len(), 3, "{spans:#?}");
    assert!(spans.iter().all(|s| hex(&s.trace_id) == trace_id));
    let request = spans
        .iter()
        .find(|s| hex(&s.parent_span_id) == parent)
        .expect("the request's span, child of the client's");
    let mut children: Vec<String> = spans
        .iter()
        .filter(|s| s.parent_span_id == request.span_id)
        .map(|s| hex(&s.span_id))
        .collect();
    children.sort();
    attempt_spans.sort();
    assert_eq!(
        children, attempt_spans,
        "the attempt spans are the ones the endpoint saw"
    );

    // The exporter counts a batch once the collector has answered, which is a moment after the
    // collector has the spans: read until it shows (bounded).
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let (_, text) = get(metrics, "/stats/prometheus", &[]).await.unwrap();
        let text = String::from_utf8_lossy(&text).into_owned();
        if text.contains("sluice_trace_spans_exported_total 3") || Instant::now() >= deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.contains("sluice_trace_spans_exported_total 3"),
        "{text}"
    );
    assert!(
        text.contains("sluice_trace_spans_dropped_total 0"),
        "{text}"
    );
}
