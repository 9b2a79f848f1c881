//! The service in-process over real loopback sockets: the error schedule, the delay
//! type, upstream chaining, proxying and the JSON shape.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fake_service::{serve, Config, ErrorType, Service};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A running in-process service; aborted on drop.
struct Running {
    addr: SocketAddr,
    task: JoinHandle<std::io::Result<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(cfg: Config) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    Running {
        addr,
        task: tokio::spawn(serve(cfg, listener)),
    }
}

fn named(name: &str) -> Config {
    Config {
        name: name.to_owned(),
        ..Config::default()
    }
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let uri = format!("http://{addr}{path}").parse().unwrap();
    let resp = client.get(uri).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn codes(addr: SocketAddr, n: usize) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(get(addr, "/").await.0);
    }
    out
}

#[tokio::test]
async fn error_schedule_is_every_nth_request() {
    for (rate, expected) in [
        ("0.4", [200, 500, 200, 500, 200, 500]),
        ("0.3", [200, 200, 500, 200, 200, 500]),
        ("0.9", [500, 500, 500, 500, 500, 500]),
        ("0", [200, 200, 200, 200, 200, 200]),
    ] {
        let cfg = Config::from_lookup(|k| match k {
            "ERROR_RATE" => Some(rate.to_owned()),
            "ERROR_CODE" => Some("500".to_owned()),
            _ => None,
        })
        .unwrap();
        let svc = start(cfg).await;
        assert_eq!(codes(svc.addr, 6).await, expected, "ERROR_RATE={rate}");
        // Health checks are not counted and always pass.
        assert_eq!(get(svc.addr, "/health").await, (200, "OK".to_owned()));
    }
}

#[tokio::test]
async fn injected_error_has_the_images_shape() {
    let svc = start(Config {
        error_rate: 1.0,
        error_code: http::StatusCode::SERVICE_UNAVAILABLE,
        ..named("inventory")
    })
    .await;
    let (status, body) = get(svc.addr, "/").await;
    assert_eq!(status, 503);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["name"], "inventory");
    assert_eq!(v["code"], 503);
    assert_eq!(v["error"], "Service error automatically injected");
    assert!(v.get("body").is_none() && v.get("duration").is_none());
}

#[tokio::test]
async fn delay_type_waits_then_answers_the_error_code() {
    let svc = start(Config {
        error_rate: 0.4,
        error_type: ErrorType::Delay,
        error_delay: Duration::from_millis(50),
        ..named("pricing")
    })
    .await;
    let t = Instant::now();
    assert_eq!(get(svc.addr, "/").await.0, 200);
    let (status, body) = get(svc.addr, "/").await;
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert_eq!(
        status, 500,
        "the image answers ERROR_CODE after the delay, not 200"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"], "Service delay automatically injected");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn delay_is_exactly_error_delay_on_paused_time() {
    let svc = Service::new(Config {
        error_rate: 0.4,
        error_type: ErrorType::Delay,
        error_delay: Duration::from_secs(3),
        ..named("pricing")
    });
    let (parts, ()) = http::Request::get("/").body(()).unwrap().into_parts();
    let t = Instant::now();
    assert_eq!(svc.handle(&parts).await.status(), 200);
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(svc.handle(&parts).await.status(), 500);
    assert_eq!(t.elapsed(), Duration::from_secs(3));
    assert_eq!(svc.request_count(), 2);
}

#[tokio::test]
async fn json_shape_of_a_chained_success() {
    let pricing = start(named("pricing")).await;
    let pricing_uri = format!("http://{}", pricing.addr);
    let product = start(Config {
        upstream_uris: vec![pricing_uri.clone()],
        ..named("product")
    })
    .await;
    let (status, body) = get(product.addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        body.ends_with("}\n") && body.contains("\n  \"name\": \"product\""),
        "{body}"
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["name"], "product");
    assert_eq!(v["uri"], "/");
    assert_eq!(v["type"], "HTTP");
    assert!(v["ip_addresses"].is_array() || v.get("ip_addresses").is_none());
    assert_eq!(v["body"], "Hello World");
    assert_eq!(v["code"], 200);
    assert!(v.get("error").is_none());
    let start_time = v["start_time"].as_str().unwrap();
    assert_eq!(
        start_time.len(),
        "2006-01-02T15:04:05.000000".len(),
        "{start_time}"
    );
    assert_eq!(&start_time[10..11], "T");
    let d = v["duration"].as_str().unwrap();
    assert!(
        d.ends_with("ms") || d.ends_with("µs") || d.ends_with('s'),
        "{d}"
    );
    let up = &v["upstream_calls"][&pricing_uri];
    assert_eq!(up["name"], "pricing");
    assert_eq!(up["uri"], pricing_uri.as_str());
    assert_eq!(up["code"], 200);
    assert_eq!(up["body"], "Hello World");
    assert_eq!(up["headers"]["Content-Type"], "text/plain; charset=utf-8");
}

#[tokio::test]
async fn a_failing_upstream_makes_a_500_and_later_upstreams_are_still_called() {
    let inventory = start(Config {
        error_rate: 1.0,
        ..named("inventory")
    })
    .await;
    let pricing = start(named("pricing")).await;
    let (inv, pri) = (
        format!("http://{}", inventory.addr),
        format!("http://{}", pricing.addr),
    );
    let product = start(Config {
        upstream_uris: vec![inv.clone(), pri.clone()],
        ..named("product")
    })
    .await;
    let (status, body) = get(product.addr, "/").await;
    assert_eq!(status, 500);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["code"], 500);
    // The image sets no top-level error for an upstream failure, only the nested one.
    assert!(v.get("error").is_none());
    assert_eq!(v["upstream_calls"][&inv]["code"], 500);
    assert_eq!(
        v["upstream_calls"][&inv]["error"],
        format!("Error processing upstream request: {inv}/, expected code 200, got 500")
    );
    assert_eq!(v["upstream_calls"][&pri]["code"], 200);
}

#[tokio::test]
async fn unreachable_and_slow_upstreams_fail_the_request() {
    // A port nobody listens on: bind, read the port, close.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let slow = start(Config {
        error_rate: 1.0,
        error_type: ErrorType::Delay,
        error_delay: Duration::from_secs(5),
        ..named("slow")
    })
    .await;
    let (dead, slow_uri) = (format!("http://{closed}"), format!("http://{}", slow.addr));
    let front = start(Config {
        upstream_uris: vec![dead.clone(), slow_uri.clone()],
        upstream_timeout: Duration::from_millis(100),
        ..named("frontend")
    })
    .await;
    let t = Instant::now();
    let (status, body) = get(front.addr, "/").await;
    assert!(t.elapsed() < Duration::from_secs(2), "timeout not applied");
    assert_eq!(status, 500);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstream_calls"][&dead]["code"], -1);
    let err = v["upstream_calls"][&dead]["error"].as_str().unwrap();
    assert!(
        err.starts_with("Error communicating with upstream service"),
        "{err}"
    );
    assert_eq!(v["upstream_calls"][&slow_uri]["code"], -1);
}

/// A minimal forward proxy: records each request line and connection, and forwards
/// `http://pricing/...` to the real pricing service.
async fn test_proxy(pricing: SocketAddr) -> (SocketAddr, Arc<proxy_log::Log>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(proxy_log::Log::default());
    let log2 = log.clone();
    tokio::spawn(async move {
        let client = Client::builder(TokioExecutor::new()).build_http::<Incoming>();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            log2.connections.fetch_add(1, Ordering::SeqCst);
            let (client, log) = (client.clone(), log2.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
                    let (client, log) = (client.clone(), log.clone());
                    async move {
                        log.push(req.uri().to_string()).await;
                        assert_eq!(req.uri().host(), Some("pricing"), "absolute form expected");
                        let path = req.uri().path_and_query().unwrap().clone();
                        *req.uri_mut() = format!("http://{pricing}{path}").parse().unwrap();
                        let resp = client.request(req).await.unwrap();
                        let (parts, body) = resp.into_parts();
                        let bytes = body.collect().await.unwrap().to_bytes();
                        Ok::<_, std::convert::Infallible>(http::Response::from_parts(
                            parts,
                            Full::new(bytes),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, log)
}

/// What the test proxy saw.
mod proxy_log {
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    pub struct Log {
        pub connections: AtomicUsize,
        pub targets: tokio::sync::Mutex<Vec<String>>,
    }

    impl Log {
        pub async fn push(&self, target: String) {
            self.targets.lock().await.push(target);
        }
    }
}

#[tokio::test]
async fn upstream_calls_go_through_http_proxy_in_absolute_form_on_one_connection() {
    let pricing = start(named("pricing")).await;
    let (proxy, log) = test_proxy(pricing.addr).await;
    let cfg = Config::from_lookup(|k| match k {
        "NAME" => Some("product".to_owned()),
        "UPSTREAM_URIS" => Some("http://pricing".to_owned()),
        "http_proxy" => Some(format!("http://{proxy}")),
        _ => None,
    })
    .unwrap();
    let product = start(cfg).await;
    for _ in 0..3 {
        let (status, body) = get(product.addr, "/").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["upstream_calls"]["http://pricing"]["name"], "pricing");
    }
    assert_eq!(*log.targets.lock().await, ["http://pricing/"; 3]);
    assert_eq!(
        log.connections.load(Ordering::SeqCst),
        1,
        "upstream keep-alive"
    );
}

#[tokio::test]
async fn serves_h2c() {
    let svc = start(named("h2")).await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let resp = client
        .get(format!("http://{}/", svc.addr).parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn concurrent_requests_are_counted_exactly() {
    let svc = start(Config {
        error_rate: 0.25,
        ..named("busy")
    })
    .await;
    let failures = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (addr, failures) = (svc.addr, failures.clone());
        tasks.push(tokio::spawn(async move {
            for code in codes(addr, 10).await {
                if code == 500 {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 20, "every 4th of 80");
}
