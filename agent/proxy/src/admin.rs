//! The node-local operator endpoints: the admin API (15000, localhost only) that the `sluice` CLI
//! reads, Prometheus metrics (15020) and readiness (15021), on ports and paths Istio users know.

use crate::handler::Handler;
use crate::state::State;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::StreamBody;
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde::Serialize;
use serde_json::Value;
use sluice_admin_api as api;
use sluice_core::Body;
use sluice_telemetry::{Kept, Record};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;

/// Changes the agent's log filter; owned by the binary, which owns the subscriber.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The redirect's live state for `/status` and `/redirects` (proxy address, lease, enrolled pods,
/// exclusions, eBPF counters), read when asked; owned by the binary, which owns the redirect.
pub type RedirectStatus = Arc<dyn Fn() -> api::EbpfStatus + Send + Sync>;

/// Kubernetes mode's sync state for `/status` (`kubernetes`), read when asked; `None` in
/// standalone mode.
pub type KubernetesStatus = Arc<dyn Fn() -> api::KubeStatus + Send + Sync>;

/// What the admin API serves.
pub struct AdminState {
    pub handler: Arc<Handler>,
    pub set_log_level: SetLogLevel,
    /// The agent's own configuration (version, mode, node, listeners, flags), shown by `/status`
    /// and `/config_dump` under `agent`.
    pub agent: api::Agent,
    /// `None` in explicit-proxy mode (`--redirect none`): `/status` shows `{"mode": "none"}`.
    pub redirect: Option<RedirectStatus>,
    /// `None` in standalone mode: `/status` shows `"kubernetes": null`.
    pub kubernetes: Option<KubernetesStatus>,
}

impl AdminState {
    fn redirect(&self) -> api::RedirectStatus {
        match &self.redirect {
            Some(f) => api::RedirectStatus::Ebpf(Box::new(f())),
            None => api::RedirectStatus::None,
        }
    }
}

/// Serves the admin API on a loopback TCP listener.
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

/// Serves the admin API on a Unix socket (its file mode is who may use it).
pub async fn serve_admin_unix(
    listener: UnixListener,
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
                    let format =
                        crate::metrics::Format::negotiate(req.headers().get(http::header::ACCEPT));
                    let out = crate::metrics::encode(&handler, format);
                    text(StatusCode::OK, out, format.content_type())
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
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, api::paths::UI) => text(
            StatusCode::OK,
            include_str!("ui/index.html").to_owned(),
            "text/html; charset=utf-8",
        ),
        (&Method::GET, api::paths::STATUS) => json_reply(&api::Status {
            agent: state.agent.clone(),
            generation: snapshot.generation,
            services: snapshot.services.len(),
            clusters: snapshot.clusters.len(),
            virtual_hosts: snapshot.virtual_hosts.len() + snapshot.wildcard_hosts.len(),
            workloads: snapshot.workloads.len(),
            rejections: snapshot.rejections.iter().map(problem).collect(),
            warnings: snapshot.warnings.iter().map(problem).collect(),
            access_log_dropped: state.handler.access_log().dropped(),
            redirect: state.redirect(),
            kubernetes: state.kubernetes.as_ref().map(|f| f()),
        }),
        (&Method::GET, api::paths::CONFIG_DUMP) => {
            // The snapshot's fields at the top (scripts point into them), plus the agent's own.
            let mut dump = serde_json::to_value(&**snapshot).unwrap_or(Value::Null);
            if let Some(map) = dump.as_object_mut() {
                map.insert(
                    "agent".into(),
                    serde_json::to_value(&state.agent).unwrap_or(Value::Null),
                );
            }
            json_reply(&dump)
        }
        (&Method::GET, api::paths::CLUSTERS) => {
            json_reply(&crate::cluster_stats::clusters(&current))
        }
        (&Method::GET, api::paths::ENDPOINTS) => {
            let service = param("service");
            let wanted = match service.as_deref() {
                None | Some("") => None,
                Some(name) => match snapshot.resolve_host(name, "default") {
                    Some(svc) => Some(svc.hostname.clone()),
                    None => return no_service(name),
                },
            };
            let rows: Vec<api::Endpoint> = crate::cluster_stats::endpoints(&current)
                .into_iter()
                .filter(|e| wanted.as_ref().is_none_or(|h| &e.service == h))
                .collect();
            json_reply(&rows)
        }
        (&Method::GET, api::paths::WORKLOADS) => json_reply(&workloads(state, &current)),
        (&Method::GET, api::paths::SERVICES) => {
            let list: Vec<api::Service> = snapshot
                .services
                .values()
                .map(|s| api::Service {
                    hostname: s.hostname.clone(),
                    name: s.name.clone(),
                    namespace: s.namespace.clone(),
                    cluster_ips: s.cluster_ips.iter().map(ToString::to_string).collect(),
                    ports: s.ports.iter().map(|p| p.port).collect(),
                })
                .collect();
            json_reply(&list)
        }
        (&Method::GET, api::paths::REDIRECTS) => json_reply(&state.redirect()),
        (&Method::GET, api::paths::CONNECTIONS) => {
            let now = std::time::SystemTime::now();
            let list: Vec<api::Connection> = state
                .handler
                .telemetry
                .connections()
                .list()
                .iter()
                .map(|c| api::Connection {
                    side: match c.side {
                        sluice_telemetry::recent::Side::Downstream => "downstream",
                        sluice_telemetry::recent::Side::Upstream => "upstream",
                    }
                    .into(),
                    peer: c.peer.map(|p| p.to_string()),
                    pod: c.pod.clone(),
                    workload: format!("{}/{}", c.workload.namespace, c.workload.workload),
                    service: c.service.hostname.clone(),
                    protocol: match c.protocol {
                        sluice_telemetry::Protocol::Tcp => "TCP",
                        _ => "HTTP",
                    }
                    .into(),
                    age_ms: now
                        .duration_since(c.opened)
                        .map_or(0, |d| d.as_millis() as u64),
                    bytes_received: c.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
                    bytes_sent: c.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
                })
                .collect();
            json_reply(&list)
        }
        (&Method::GET, api::paths::POLICY) => {
            let Some(service) = param("service") else {
                return text(StatusCode::BAD_REQUEST, "usage: /policy?service=NAME\n".into(), "text/plain");
            };
            match snapshot.resolve_host(&service, "default") {
                Some(svc) => {
                    let vh = snapshot.virtual_host(&svc.hostname);
                    let clusters = snapshot
                        .clusters
                        .values()
                        .filter(|c| c.key.host == svc.hostname)
                        .map(|c| api::PolicyCluster {
                            name: c.key.to_string(),
                            endpoints: c
                                .endpoints
                                .iter()
                                .map(|e| api::PolicyEndpoint {
                                    addr: e.addr.to_string(),
                                    pod: e.pod.clone(),
                                    labels: e.labels.clone(),
                                    identity: e.identity.as_deref().map(identity),
                                })
                                .collect(),
                            traffic_policy: serde_json::to_value(&c.policy).unwrap_or(Value::Null),
                        })
                        .collect();
                    json_reply(&api::Policy {
                        service: serde_json::to_value(&**svc).unwrap_or(Value::Null),
                        routes: vh.map_or_else(
                            || serde_json::json!({"name": "default (no VirtualService: Istio's implicit route, default retries)"}),
                            |vh| serde_json::to_value(&**vh).unwrap_or(Value::Null),
                        ),
                        clusters,
                    })
                }
                None => no_service(&service),
            }
        }
        (&Method::GET, api::paths::REQUESTS) => {
            let limit = param("limit").and_then(|l| l.parse().ok()).unwrap_or(100usize);
            let records = state.handler.telemetry.recent().records(limit);
            let list: Vec<api::Request> = records
                .iter()
                .map(|r| request(&current, r))
                .collect();
            json_reply(&list)
        }
        (&Method::GET, p) if p.starts_with(api::paths::REQUEST) => {
            let id = percent_decode(&p[api::paths::REQUEST.len()..]);
            let recent = state.handler.telemetry.recent();
            match recent.find(&id) {
                Some(r) => json_reply(&request(&current, &r)),
                None => text(
                    StatusCode::NOT_FOUND,
                    match recent.capacity() {
                        0 => format!("no request {id:?}: the agent keeps none (--recent-requests 0)\n"),
                        n => format!("no request {id:?} among the last {n} the agent keeps (it may be older, or not have finished yet)\n"),
                    },
                    "text/plain",
                ),
            }
        }
        (&Method::GET, api::paths::TOP) => {
            let window = param("window")
                .and_then(|w| w.parse::<f64>().ok())
                .filter(|w| w.is_finite() && *w > 0.0)
                .unwrap_or(10.0);
            json_reply(&top(
                state.handler.telemetry.edges(),
                Duration::from_secs_f64(window),
            ))
        }
        (&Method::GET, api::paths::TAP) => {
            let rx = state.handler.telemetry.recent().subscribe();
            let handler = state.handler.clone();
            let stream = futures_util::stream::unfold(rx, move |mut rx| {
                let handler = handler.clone();
                async move {
                    loop {
                        match rx.recv().await {
                            Ok(record) => {
                                let kept = Kept::of(&record);
                                let line = serde_json::to_string(&request(&handler.state(), &kept))
                                    .unwrap_or_default();
                                let frame = Frame::data(Bytes::from(line + "\n"));
                                return Some((Ok::<_, Infallible>(frame), rx));
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                        }
                    }
                }
            });
            Response::builder()
                .header(http::header::CONTENT_TYPE, "application/x-ndjson")
                .body(sluice_core::boxed(StreamBody::new(stream)))
                .expect("valid response")
        }
        (&Method::POST, api::paths::LOGGING) => match param("level") {
            Some(level) => match (state.set_log_level)(&level) {
                Ok(()) => text(StatusCode::OK, format!("log level: {level}\n"), "text/plain"),
                Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n"), "text/plain"),
            },
            None => text(StatusCode::BAD_REQUEST, "usage: POST /logging?level=debug\n".into(), "text/plain"),
        },
        (&Method::GET, api::paths::ACCESS_LOG) => {
            let rx = state.handler.access_log().subscribe();
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
            "endpoints: GET /status /config_dump /clusters /endpoints?service= /workloads /services /redirects /connections /policy?service= /requests /requests/ID /top?window= /tap /ui /access_log, POST /logging?level=\n".into(),
            "text/plain",
        ),
    }
}

fn no_service(name: &str) -> Response<Body> {
    text(
        StatusCode::NOT_FOUND,
        format!("no service {name:?} in the registry (try the FQDN, or `sluice config`)\n"),
        "text/plain",
    )
}

fn problem(r: &sluice_policy::Rejection) -> api::Problem {
    api::Problem {
        source: r.source.clone(),
        resource_version: r.resource_version.clone(),
        object: r.object.clone(),
        field: r.field.clone(),
        reason: r.reason.clone(),
    }
}

fn identity(i: &sluice_policy::Identity) -> api::Identity {
    api::Identity {
        workload: i.workload.clone(),
        namespace: i.namespace.clone(),
        canonical_service: i.canonical_service.clone(),
        canonical_revision: i.canonical_revision.clone(),
        app: i.app.clone(),
        version: i.version.clone(),
        principal: i.principal.clone(),
    }
}

/// The registry's pods, with what the redirect knows of each.
fn workloads(state: &AdminState, current: &State) -> Vec<api::Workload> {
    let redirect = state.redirect.as_ref().map(|f| f());
    current
        .snapshot
        .workloads
        .values()
        .map(|w| {
            let key = format!("{}/{}", w.namespace, w.name);
            let enrolled_pod = redirect
                .as_ref()
                .and_then(|r| r.enrolled.iter().find(|p| p.pod == key));
            let not_redirected = if !w.enrolled {
                Some("not enrolled: no istio.io/dataplane-mode=ambient label on the pod or its namespace".to_owned())
            } else if let Some(why) = w.not_redirectable() {
                Some(why.to_owned())
            } else {
                match &redirect {
                    None => Some("--redirect none: only clients that use the outbound listener explicitly".to_owned()),
                    Some(r) => match enrolled_pod {
                        Some(_) => None,
                        None => Some(
                            r.not_redirected
                                .iter()
                                .find(|p| p.pod == key)
                                .and_then(|p| p.reason.clone())
                                .unwrap_or_else(|| "its cgroup is not enrolled yet".to_owned()),
                        ),
                    },
                }
            };
            let id = w.identity();
            api::Workload {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                ips: w.ips.iter().map(ToString::to_string).collect(),
                labels: w.labels.clone(),
                enrolled: w.enrolled,
                not_redirected,
                cgroup: enrolled_pod
                    .and_then(|p| p.cgroup.clone())
                    .or_else(|| w.cgroup.as_ref().map(|c| c.display().to_string())),
                cgroup_id: enrolled_pod.and_then(|p| p.cgroup_id),
                phase: w.phase.clone(),
                host_network: w.host_network,
                owner: w.owner.as_ref().map(|o| api::Owner {
                    kind: o.kind.clone(),
                    name: o.name.clone(),
                }),
                workload: format!("{}/{}", id.namespace, id.workload),
            }
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn flags_text(flags: sluice_core::ResponseFlags) -> String {
    let s = flags.to_string();
    if s.is_empty() {
        "-".into()
    } else {
        s
    }
}

/// A record as the admin API shows it.
/// A finished request (or L4 connection) as `/requests` and `/tap` show it: for in-process readers
/// of the telemetry's live feed ([`Handler::recent`]), such as tests.
pub fn describe(handler: &Handler, record: &Record) -> api::Request {
    request(&handler.state(), &Kept::of(record))
}

fn request(current: &State, r: &Kept) -> api::Request {
    let snapshot = &current.snapshot;
    let pod_of = |ip: std::net::IpAddr| {
        snapshot
            .workload_by_ip(ip)
            .map(|w| format!("{}/{}", w.namespace, w.name))
    };
    // An endpoint's pod as its EndpointSlice names it (its address may be shared, on loopback).
    let endpoint_pod = |addr: std::net::SocketAddr| {
        snapshot
            .clusters
            .values()
            .flat_map(|c| c.endpoints.iter())
            .find(|e| e.addr == addr)
            .and_then(|e| e.pod.clone())
            .or_else(|| pod_of(addr.ip()))
    };
    let (protocol, method) = match &r.http {
        Some((method, version)) => (
            format!("{version:?}").replace("HTTP/2.0", "HTTP/2"),
            Some(method.to_string()),
        ),
        None => ("TCP".into(), None),
    };
    let attempts = &r.attempts;
    let first = attempts.first().map(|a| a.started);
    // The record's start is wall-clock; attempts carry monotonic instants: offsets are taken
    // from the end back, which both clocks agree on.
    let end = first.map(|f| {
        let since_first = attempts
            .iter()
            .map(|a| a.started.saturating_duration_since(f) + a.duration)
            .max()
            .unwrap_or_default();
        (f, r.duration.saturating_sub(since_first))
    });
    let policy = r.routed.policy();
    api::Request {
        request_id: r.request_id().map(str::to_owned),
        start_unix_ms: r
            .start
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        duration_ms: ms(r.duration),
        protocol,
        method,
        authority: r.authority().map(str::to_owned),
        path: r.path().map(str::to_owned),
        peer: r.peer.map(|p| p.to_string()),
        source: r
            .peer
            .and_then(|p| pod_of(p.ip()))
            .unwrap_or_else(|| "unknown".into()),
        source_workload: format!("{}/{}", r.source.namespace, r.source.workload),
        service: r.service.hostname.clone(),
        cluster: r.routed.cluster_name().map(str::to_owned),
        route: policy.and_then(|(route, _)| route.get::<api::RoutePolicy>().cloned()),
        destination: policy
            .and_then(|(_, cluster)| cluster?.get::<api::DestinationPolicy>().cloned()),
        status: r.status,
        flags: flags_text(r.flags),
        details: r.details.map(str::to_owned),
        request_bytes: r.request_bytes,
        response_bytes: r.response_bytes,
        attempt_count: r.attempt_count,
        upstream: r.upstream.map(|a| a.to_string()),
        attempts: attempts
            .iter()
            .map(|a| api::Attempt {
                attempt: a.attempt,
                endpoint: a.endpoint.to_string(),
                pod: endpoint_pod(a.endpoint),
                start_offset_ms: end.map_or(0.0, |(f, lead)| {
                    ms(lead + a.started.saturating_duration_since(f))
                }),
                duration_ms: ms(a.duration),
                reached: a.reached,
                status: a.status,
                flags: flags_text(a.flags),
                timeout: a.timeout.map(|t| match t {
                    sluice_core::Deadline::PerTry => "per_try".to_owned(),
                    sluice_core::Deadline::Route => "route".to_owned(),
                }),
            })
            .collect(),
    }
}

/// Traffic per edge over the last `window` (at most a minute), from the edges' per-second counts.
fn top(edges: &sluice_telemetry::Edges, window: Duration) -> api::Top {
    let (totals, secs) = edges.totals(window);
    api::Top {
        window_s: secs,
        requests: totals.iter().map(|t| t.requests).sum(),
        edges: totals
            .into_iter()
            .map(|t| api::Edge {
                requests_per_s: t.requests as f64 / secs,
                success_pct: 100.0 * t.ok as f64 / t.requests.max(1) as f64,
                p50_ms: ms(t.quantile(0.5)),
                p99_ms: ms(t.quantile(0.99)),
                retries_per_s: t.retries as f64 / secs,
                flags: t.flags.iter().map(|(f, n)| (f.to_string(), *n)).collect(),
                source: t.source,
                service: t.service,
                requests: t.requests,
                retries: t.retries,
            })
            .collect(),
    }
}

fn json_reply(v: &impl Serialize) -> Response<Body> {
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

/// What the operator endpoints accept connections on: loopback TCP, or a Unix socket.
trait Listen: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listen for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        TcpListener::accept(self).await.map(|(s, _)| s)
    }
}

impl Listen for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        UnixListener::accept(self).await.map(|(s, _)| s)
    }
}

/// A small HTTP server for the operator endpoints (not the hot path).
async fn serve_http<L, F, Fut>(listener: L, mut shutdown: watch::Receiver<bool>, f: F)
where
    L: Listen,
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        let stream = tokio::select! {
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
