//! Scripted backends and request builders for the unit tests.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use sluice_core::{Body, BoxError, ProxyError, RequestCtx, RequestInfo};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::service_fn;
use tower_service::Service;

/// What the backend does for one call.
#[derive(Clone, Debug)]
pub enum Step {
    /// Answers with this status after reading the request body.
    Status(u16),
    /// Answers with this response (status and headers) after reading the request body.
    Headers(u16, Vec<(&'static str, &'static str)>),
    /// Fails with this error without reading the body.
    Fail(ProxyError),
    /// Waits, then answers with the status.
    Slow(Duration, u16),
}

/// One call the backend saw.
#[derive(Clone, Debug)]
pub struct Seen {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
    pub at: Instant,
}

/// Calls the backend saw, in order.
#[derive(Clone, Default)]
pub struct Calls(Arc<Mutex<Vec<Seen>>>);

impl Calls {
    pub fn len(&self) -> usize {
        self.0.lock().len()
    }
    pub fn get(&self, i: usize) -> Seen {
        self.0.lock()[i].clone()
    }
    pub fn attempt_counts(&self) -> Vec<String> {
        self.0
            .lock()
            .iter()
            .map(|s| {
                s.headers
                    .get("x-envoy-attempt-count")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// A backend that plays `script` in order and repeats its last step forever.
pub fn backend(script: Vec<Step>) -> (impl CloneService, Calls) {
    let calls = Calls::default();
    let script = Arc::new(Mutex::new(VecDeque::from(script)));
    let seen = calls.clone();
    let svc = service_fn(move |req: Request<Body>| {
        let step = {
            let mut s = script.lock();
            if s.len() > 1 {
                s.pop_front().unwrap()
            } else {
                s.front().cloned().expect("empty script")
            }
        };
        let seen = seen.clone();
        async move {
            let (parts, body) = req.into_parts();
            let at = Instant::now();
            let record = |body: Bytes, trailers: Option<HeaderMap>| {
                seen.0.lock().push(Seen {
                    headers: parts.headers.clone(),
                    body,
                    trailers,
                    at,
                })
            };
            if let Step::Fail(e) = step {
                record(Bytes::new(), None);
                return Err::<Response<Body>, BoxError>(e.into());
            }
            let collected = body.collect().await?;
            let trailers = collected.trailers().cloned();
            record(collected.to_bytes(), trailers);
            match step {
                Step::Status(code) => Ok(status(code)),
                Step::Headers(code, headers) => {
                    let mut rsp = status(code);
                    for (k, v) in headers {
                        rsp.headers_mut().insert(k, v.parse().unwrap());
                    }
                    Ok(rsp)
                }
                Step::Slow(d, code) => {
                    tokio::time::sleep(d).await;
                    Ok(status(code))
                }
                Step::Fail(_) => unreachable!(),
            }
        }
    });
    (svc, calls)
}

/// The service bound every layer needs, for `impl Trait` in test helpers.
pub trait CloneService:
    Service<Request<Body>, Response = Response<Body>, Error = BoxError, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> CloneService for S
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
}

/// A response with `code` and an empty body.
pub fn status(code: u16) -> Response<Body> {
    let mut rsp = Response::new(sluice_core::empty());
    *rsp.status_mut() = StatusCode::from_u16(code).unwrap();
    rsp
}

/// A GET carrying a fresh `RequestInfo`, returned too.
pub fn get() -> (Request<Body>, Arc<RequestInfo>) {
    with_body(sluice_core::empty())
}

/// A POST of `body` carrying a fresh `RequestInfo`, returned too.
pub fn with_body(body: Body) -> (Request<Body>, Arc<RequestInfo>) {
    let info = Arc::new(RequestInfo::new());
    let mut req = Request::new(body);
    *req.uri_mut() = "http://pricing.default.svc.cluster.local/price"
        .parse()
        .unwrap();
    RequestCtx::of_mut(req.extensions_mut()).info = Some(info.clone());
    (req, info)
}

/// Calls `svc` once it is ready.
pub async fn call<S: CloneService>(
    svc: &mut S,
    req: Request<Body>,
) -> Result<Response<Body>, BoxError> {
    futures_util::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
    svc.call(req).await
}

/// The `ProxyError` in `err`.
pub fn proxy_error(err: &BoxError) -> ProxyError {
    ProxyError::find(err).cloned().expect("a ProxyError")
}

/// An upstream that refused the connection.
pub(crate) fn refused() -> ProxyError {
    let host = "127.0.0.1:9".parse().expect("address");
    let err = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    ProxyError::ConnectFailure(sluice_core::ConnectError::io(host, err))
}

/// An upstream that reset the stream.
pub(crate) fn reset() -> ProxyError {
    ProxyError::RemoteReset {
        reason: Some(h2::Reason::INTERNAL_ERROR),
        source: sluice_core::Cause::new(h2::Error::from(h2::Reason::INTERNAL_ERROR)),
    }
}

/// An upstream that closed the connection without answering.
pub(crate) fn terminated() -> ProxyError {
    ProxyError::ConnectionTermination(sluice_core::Cause::new(std::io::Error::from(
        std::io::ErrorKind::UnexpectedEof,
    )))
}
