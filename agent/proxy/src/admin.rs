//! The node-local operator endpoints: the admin API (15000, localhost only) that the `sluice` CLI
//! reads, Prometheus metrics (15020) and readiness (15021), on ports and paths Istio users know.

use crate::handler::Handler;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{json, Value};
use sluice_core::Body;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Changes the agent's log filter; owned by the binary, which owns the subscriber.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The redirect's live state for `/status` (mode, proxy address, lease, enrolled pods,
/// exclusions, eBPF counters), read when asked; owned by the binary, which owns the redirect.
pub type RedirectStatus = Arc<dyn Fn() -> Value + Send + Sync>;

/// Kubernetes mode's sync state for `/status` (`kubernetes`), read when asked; `None` in
/// standalone mode.
pub type KubernetesStatus = Arc<dyn Fn() -> Value + Send + Sync>;

/// What the admin API serves.
pub struct AdminState {
    pub handler: Arc<Handler>,
    pub set_log_level: SetLogLevel,
    /// The agent's own configuration (version, mode, node, listeners, flags), shown by `/status`
    /// and `/config_dump` under `agent`.
    pub agent: Value,
    /// `None` in explicit-proxy mode (`--redirect none`): `/status` shows `{"mode": "none"}`.
    pub redirect: Option<RedirectStatus>,
    /// `None` in standalone mode: `/status` shows `"kubernetes": null`.
    pub kubernetes: Option<KubernetesStatus>,
}

pub async fn serve_admin(
    listener: TcpListener,
    state: Arc<AdminState>,
    shutdown: watch::Receiver<bool>,
) {
    serve_http(listener, shutdown, move |req| {
        let state = state.clone();
        async move { admin(&state, req).await }
    })
    .await
}

pub async fn serve_metrics(
    listener: TcpListener,
    handler: Arc<Handler>,
    shutdown: watch::Receiver<bool>,
) {
    serve_http(listener, shutdown, move |req: Request<Incoming>| {
        let handler = handler.clone();
        async move {
            match req.uri().path() {
                "/stats/prometheus" | "/metrics" => {
                    let mut out = String::with_capacity(16 * 1024);
                    handler.metrics.encode(&mut out);
                    crate::cluster_stats::encode_prometheus(&handler.state(), &mut out);
                    text(
                        StatusCode::OK,
                        out,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )
                }
                _ => text(
                    StatusCode::NOT_FOUND,
                    "try /stats/prometheus\n".into(),
                    "text/plain",
                ),
            }
        }
    })
    .await
}

pub async fn serve_ready(
    listener: TcpListener,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) {
    serve_http(listener, shutdown, move |req: Request<Incoming>| {
        let ready = *ready.borrow();
        async move {
            match (req.uri().path(), ready) {
                ("/healthz/ready", true) => text(StatusCode::OK, "ready\n".into(), "text/plain"),
                ("/healthz/ready", false) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready\n".into(),
                    "text/plain",
                ),
                _ => text(
                    StatusCode::NOT_FOUND,
                    "try /healthz/ready\n".into(),
                    "text/plain",
                ),
            }
        }
    })
    .await
}

async fn admin(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == name).then(|| percent_decode(v))
        })
    };
    let current = state.handler.state();
    let snapshot = &current.snapshot;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") => json_reply(&json!({
            "agent": state.agent,
            "generation": snapshot.generation,
            "services": snapshot.services.len(),
            "clusters": snapshot.clusters.len(),
            "virtual_hosts": snapshot.virtual_hosts.len() + snapshot.wildcard_hosts.len(),
            "workloads": snapshot.workloads.len(),
            "rejections": snapshot.rejections,
            "warnings": snapshot.warnings,
            "access_log_dropped": state.handler.access_log.dropped(),
            "redirect": state.redirect.as_ref().map_or_else(|| json!({"mode": "none"}), |f| f()),
            "kubernetes": state.kubernetes.as_ref().map(|f| f()),
        })),
        (&Method::GET, "/config_dump") => {
            // The snapshot's fields at the top (scripts point into them), plus the agent's own.
            let mut dump = serde_json::to_value(&**snapshot).unwrap_or(Value::Null);
            if let Some(map) = dump.as_object_mut() {
                map.insert("agent".into(), state.agent.clone());
            }
            json_reply(&dump)
        }
        (&Method::GET, "/clusters") => json_reply(&crate::cluster_stats::clusters_json(&current)),
        (&Method::GET, "/policy") => {
            let Some(service) = param("service") else {
                return text(StatusCode::BAD_REQUEST, "usage: /policy?service=NAME\n".into(), "text/plain");
            };
            match snapshot.resolve_host(&service, "default") {
                Some(svc) => {
                    let vh = snapshot.virtual_host(&svc.hostname);
                    let clusters: Vec<Value> = snapshot
                        .clusters
                        .values()
                        .filter(|c| c.key.host == svc.hostname)
                        .map(|c| json!({"name": c.key.to_string(), "endpoints": c.endpoints, "traffic_policy": c.policy}))
                        .collect();
                    json_reply(&json!({
                        "service": svc,
                        "routes": vh.map_or_else(
                            || json!({"name": "default (no VirtualService: Istio's implicit route, default retries)"}),
                            |vh| serde_json::to_value(&**vh).unwrap_or(Value::Null),
                        ),
                        "clusters": clusters,
                    }))
                }
                None => text(
                    StatusCode::NOT_FOUND,
                    format!("no service {service:?} in the registry (try the FQDN, or `sluice config`)\n"),
                    "text/plain",
                ),
            }
        }
        (&Method::POST, "/logging") => match param("level") {
            Some(level) => match (state.set_log_level)(&level) {
                Ok(()) => text(StatusCode::OK, format!("log level: {level}\n"), "text/plain"),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n"), "text/plain"),
            },
            None => text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=debug\n".into(), "text/plain"),
        },
        (&Method::GET, "/access_log") => {
            let rx = state.handler.access_log.subscribe();
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(line) => {
                            let frame = Frame::data(Bytes::from(format!("{line}\n")));
                            return Some((Ok::<_, Infallible>(frame), rx));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            Response::builder()
                .header(http::header::CONTENT_TYPE, "text/plain")
                .body(sluice_core::boxed(StreamBody::new(stream)))
                .expect("valid response")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "endpoints: GET /status /config_dump /clusters /policy?service= /access_log, POST /logging?level=\n".into(),
            "text/plain",
        ),
    }
}

fn json_reply(v: &Value) -> Response<Body> {
    let body =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text(StatusCode::OK, body, "application/json")
}

fn text(status: StatusCode, body: String, content_type: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(sluice_core::full(body))
        .expect("valid response")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A small HTTP server for the operator endpoints (not the hot path).
async fn serve_http<F, Fut>(listener: TcpListener, mut shutdown: watch::Receiver<bool>, f: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(err) => {
                    tracing::warn!(%err, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let f = f.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let f = f.clone();
                async move { Ok::<_, Infallible>(f(req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes() {
        assert_eq!(percent_decode("a%20b%2Cc"), "a b,c");
        assert_eq!(percent_decode("pricing.default"), "pricing.default");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
