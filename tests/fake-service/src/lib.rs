//! A stand-in for `nicholasjackson/fake-service` v0.26 (HTTP only), for Sluice's tests,
//! demo and benchmarks.
//!
//! Behaviour follows the image's source (`handlers/request_http.go`, `errors/errors.go`,
//! `client/http.go`): every request to a path other than `/health` is counted; every
//! Nth one (N = `int(1/ERROR_RATE)`) fails with `ERROR_CODE`, after `ERROR_DELAY` when
//! `ERROR_TYPE=delay`; otherwise `UPSTREAM_URIS` are called one after the other and any
//! failure among them makes the answer a 500. Differences from the image are listed
//! in `README.md`.

#![forbid(unsafe_code)]

pub mod config;
pub mod duration;
pub mod inject;
pub mod response;
mod upstream;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::time::Instant;

pub use config::{Config, ErrorType};
pub use inject::{ErrorMode, Injector};
pub use response::Response;

/// The image's error texts.
pub const ERROR_INJECTED: &str = "Service error automatically injected";
pub const ERROR_DELAYED: &str = "Service delay automatically injected";

/// The request handler, shared by every connection.
pub struct Service {
    cfg: Arc<Config>,
    injector: Injector,
    upstreams: upstream::Upstreams,
}

impl Service {
    pub fn new(cfg: Config) -> Self {
        let cfg = Arc::new(cfg);
        Self {
            injector: Injector::new(cfg.error_rate, cfg.error_mode),
            upstreams: upstream::Upstreams::new(cfg.clone()),
            cfg,
        }
    }

    /// Requests counted by the error injector so far (health checks excluded).
    pub fn request_count(&self) -> u64 {
        self.injector.count()
    }

    /// Answers one request; only the head matters, the body is ignored as in the image.
    pub async fn handle(&self, req: &http::request::Parts) -> http::Response<Bytes> {
        if req.uri.path() == "/health" {
            return text(StatusCode::OK, Bytes::from_static(b"OK"));
        }
        let started = Instant::now();
        let started_wall = SystemTime::now();
        let mut resp = Response {
            name: self.cfg.name.clone(),
            uri: req.uri.to_string(),
            kind: "HTTP".to_owned(),
            ip_addresses: response::ip_addresses().to_vec(),
            ..Default::default()
        };

        if self.injector.next_fails() {
            // Like the image: no timing fields, no body, no upstream calls.
            resp.error = match self.cfg.error_type {
                ErrorType::HttpError => ERROR_INJECTED,
                ErrorType::Delay => {
                    tokio::time::sleep(self.cfg.error_delay).await;
                    ERROR_DELAYED
                }
            }
            .to_owned();
            resp.code = i32::from(self.cfg.error_code.as_u16());
            return text(self.cfg.error_code, resp.to_json().into());
        }

        // Sequential, and every upstream is called even after one fails (the image's
        // single worker drains its queue and keeps the first error).
        let mut failed = false;
        for uri in &self.cfg.upstream_uris {
            let call = self.upstreams.call(uri, req).await;
            failed |= call.is_err();
            let nested = call.unwrap_or_else(|e| e);
            resp.upstream_calls.insert(uri.clone(), nested);
        }

        let status = if failed {
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            StatusCode::OK
        };
        resp.code = i32::from(status.as_u16());
        let elapsed = started.elapsed();
        resp.start_time = response::timestamp(started_wall);
        resp.end_time = response::timestamp(started_wall + elapsed);
        resp.duration = duration::format(elapsed);
        resp.body = Some(response::body_from_message(&self.cfg.message));
        text(status, resp.to_json().into())
    }
}

/// Go sniffs JSON text as `text/plain; charset=utf-8`; so do we, for the same headers.
fn text(status: StatusCode, body: Bytes) -> http::Response<Bytes> {
    let mut resp = http::Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Serves HTTP/1.1 and h2c on `listener` until the task is dropped.
///
/// Accept errors (say, out of file descriptors) are reported and retried after a pause
/// rather than ending the service.
pub async fn serve(cfg: Config, listener: TcpListener) -> std::io::Result<()> {
    let keep_alive = cfg.server_keep_alive;
    let service = Arc::new(Service::new(cfg));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().keep_alive(keep_alive);
    let builder = Arc::new(builder);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("fake-service: accept failed: {e}; retrying in 100ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<Incoming>| {
                let service = service.clone();
                async move {
                    let (parts, _body) = req.into_parts();
                    let resp = service.handle(&parts).await;
                    Ok::<_, Infallible>(resp.map(Full::new))
                }
            });
            // A peer that resets or speaks nonsense only ends its own connection.
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
