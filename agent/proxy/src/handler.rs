//! One outbound request, from the client's request to the response it gets: find the destination
//! service, pick the route and destination cluster, run the route's resilience stack, and turn a
//! failure into the local reply Envoy would send. Every request ends in exactly one access-log line and
//! one metrics sample.
//!
//! The destination service: on a redirected connection (eBPF mode) the original destination decides,
//! as a waypoint does. A Service cluster IP and port selects that service whatever the `Host` header
//! says (the header still feeds VirtualService `authority` matches); any other address is Istio's
//! `PassthroughCluster` (forwarded unchanged, no route policy). In explicit-proxy mode the request's
//! authority decides, resolved like Kubernetes DNS.
//!
//! The stack per attempt, outermost first (Istio's order, which is Envoy's filter chain then router):
//! fault injection -> route timeout -> retries (with the cluster's retry budget) -> per-try timeout ->
//! the cluster (circuit breakers, load balancing, outlier detection, connection pools). A route with
//! `directResponse` has none of them: its prebuilt reply is the answer (see `direct`).

use crate::access_log::AccessLog;
use crate::direct::{DirectReply, DIRECT_RESPONSE_DETAILS};
use crate::metrics::Metrics;
use crate::passthrough::Passthrough;
use crate::route;
use crate::state::{RoutePlan, ServiceLabels, State, Upstream};
use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use sluice_core::{Body, BoxError, Origin, ProxyError, RequestInfo, ResponseFlags};
use sluice_policy::{ClusterKey, Service};
use sluice_resilience::{FaultLayer, RetryLayer, TimeoutLayer};
use sluice_upstream::UpstreamProtocol;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};

/// What the listener knows about the client connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The destination the client connected to before redirection (eBPF mode), if known.
    pub original_dst: Option<SocketAddr>,
}

/// Options that shape request handling.
#[derive(Clone, Debug)]
pub struct HandlerOptions {
    /// The namespace short host names resolve in when the client is not a known pod
    /// (explicit-proxy mode on a node or in tests).
    pub default_namespace: String,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            default_namespace: "default".into(),
        }
    }
}

/// How redirected connections (those with an original destination) are handled.
#[derive(Clone, Debug)]
pub struct RedirectOptions {
    /// How long to wait for a client's first bytes when the Service port declares no protocol.
    /// A client silent that long speaks a server-first protocol and is proxied at L4. Istio tried
    /// 100 ms (1.3), found slow HTTP clients silently losing their L7 policy, raised it to 5 s
    /// (1.6/1.7) and since 1.8 waits forever (0), so an undeclared server-first protocol hangs.
    /// Sluice waits 5 s: no HTTP client loses its policy to a slow first write, and a server-first
    /// protocol on an undeclared port still works, after a visible delay that declaring the port
    /// (`tcp-...` or `appProtocol: tcp`) removes, as Istio documents.
    pub protocol_detection_timeout: Duration,
    /// Connect attempts of an L4 connection before it fails (Envoy's TCP proxy
    /// `max_connect_attempts`, 1 when unset as under Istio); each further attempt avoids the hosts
    /// already tried.
    pub tcp_max_connect_attempts: u32,
}

impl Default for RedirectOptions {
    fn default() -> Self {
        Self {
            protocol_detection_timeout: Duration::from_secs(5),
            tcp_max_connect_attempts: 1,
        }
    }
}

/// The request handler shared by every connection.
pub struct Handler {
    state: ArcSwap<State>,
    pub(crate) access_log: AccessLog,
    pub(crate) metrics: Metrics,
    opts: HandlerOptions,
    pub(crate) redirect: RedirectOptions,
    pub(crate) passthrough: Passthrough,
}

/// How one request ended, recorded once (metrics and access log) when it is finished or dropped.
struct Outcome<'a> {
    handler: &'a Handler,
    state: &'a State,
    /// The client's address (its pod gives the source labels).
    peer: std::net::IpAddr,
    summary: RequestSummary,
    info: Arc<RequestInfo>,
    start: Instant,
    /// `None` before routing (or when routing failed); `Some(None)` for the passthrough cluster.
    service: Option<Option<Arc<Service>>>,
    done: bool,
}

impl Outcome<'_> {
    fn finish(&mut self, status: u16) {
        self.done = true;
        let elapsed = self.start.elapsed();
        let (labels, service) = match &self.service {
            Some(Some(svc)) => (self.state.labels.get(&svc.hostname), Some(&**svc)),
            Some(None) => (Some(&self.handler.passthrough.labels), None),
            None => (None, None),
        };
        let source = self.state.source(self.peer);
        self.handler
            .metrics
            .record(source, labels, status, self.info.flags(), elapsed);
        self.handler
            .access_log
            .log(&self.summary, status, &self.info, elapsed, service);
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.info
                .add_flags(ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION);
            self.finish(0);
        }
    }
}

/// Where one request goes.
struct Routed {
    plan: Arc<RoutePlan>,
    target: Target,
    /// `None` for the passthrough cluster.
    service: Option<Arc<Service>>,
}

/// What answers a routed request.
enum Target {
    /// A cluster's endpoints, through the route's resilience stack.
    Cluster(Upstream),
    /// The route's `directResponse`: the proxy itself.
    Direct(Arc<DirectReply>),
}

impl Handler {
    pub fn new(opts: HandlerOptions, access_log: AccessLog, metrics: Metrics) -> Self {
        Self {
            state: ArcSwap::from_pointee(State::empty()),
            access_log,
            metrics,
            opts,
            redirect: RedirectOptions::default(),
            passthrough: Passthrough::new(),
        }
    }

    /// Sets how redirected connections are handled (defaults: [`RedirectOptions::default`]).
    pub fn with_redirect_options(mut self, redirect: RedirectOptions) -> Self {
        self.redirect = redirect;
        self
    }

    /// The access log (tests and the admin API subscribe to it).
    pub fn access_log(&self) -> &AccessLog {
        &self.access_log
    }

    /// The generation in force.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// Makes `snapshot` the policy for new requests; requests under way keep theirs.
    pub fn apply(&self, snapshot: Arc<sluice_policy::Snapshot>) {
        let prev = self.state.load();
        let next = State::next(&prev, snapshot);
        self.state.store(Arc::new(next));
    }

    pub async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let state = self.state.load_full();
        let info = Arc::new(RequestInfo::new());
        // Logs the request however it ends: with its response, or (dropped by hyper because the
        // client went away first) with status 0 and `DC`, as Envoy does.
        let mut outcome = Outcome {
            handler: self,
            state: &state,
            peer: conn.peer.ip(),
            summary: RequestSummary::of(&req),
            info: info.clone(),
            start: Instant::now(),
            service: None,
            done: false,
        };

        // The client went away while its request body was read: logged as Envoy logs it (status
        // 0, `DC`), never as an upstream failure.
        let mut downstream_gone = false;
        let rsp = match self.route(&state, &req, conn) {
            Ok(Routed {
                plan,
                target: Target::Direct(reply),
                service,
            }) => {
                outcome.service = Some(service);
                debug_assert!(
                    plan.fault.is_none(),
                    "config refuses fault with directResponse"
                );
                respond_direct(&reply, &info, &outcome.summary)
            }
            Ok(Routed {
                plan,
                target: Target::Cluster(upstream),
                service,
            }) => {
                outcome.service = Some(service);
                info.set_cluster(upstream.name.clone());
                let req = prepare_request(req, &info);
                let stack = ServiceBuilder::new()
                    .layer(FaultLayer::new(plan.fault.clone()))
                    .layer(TimeoutLayer::route(plan.timeout))
                    .layer(RetryLayer::new(
                        plan.retry.clone(),
                        upstream.retry_budget.clone(),
                    ))
                    .layer(TimeoutLayer::per_try(plan.per_try_timeout))
                    .service(upstream.handle.clone());
                // Boxed where created: rustc cannot otherwise prove the stack's future `Send` for
                // every lifetime in `BoxError` when hyper spawns the connection task.
                let fut: futures_util::future::BoxFuture<
                    'static,
                    Result<Response<Body>, BoxError>,
                > = Box::pin(stack.oneshot(req));
                let sent = Instant::now();
                let mut rsp = match fut.await {
                    Ok(rsp) => {
                        let mut rsp = prepare_response(rsp);
                        // Envoy's router stamps the responses it forwards (not its local replies
                        // nor the fault filter's aborts) with the time the upstream took, retries
                        // included.
                        if !info.flags().contains(ResponseFlags::FAULT_INJECTED) {
                            let ms = u64::try_from(sent.elapsed().as_millis()).unwrap_or(u64::MAX);
                            rsp.headers_mut()
                                .insert(X_ENVOY_UPSTREAM_SERVICE_TIME, HeaderValue::from(ms));
                        }
                        rsp
                    }
                    Err(err) => {
                        downstream_gone = ProxyError::find(&err)
                            .is_some_and(|e| e.origin() == Origin::Downstream);
                        local_reply(&err, &info)
                    }
                };
                // The route's header operations apply to what the router answers (upstream
                // responses and its local replies), not to the fault filter's aborts.
                if let Some(ops) = &plan.response_headers {
                    if !info.flags().contains(ResponseFlags::FAULT_INJECTED) {
                        ops.apply(rsp.headers_mut());
                    }
                }
                rsp
            }
            Err(err) => local_reply(&err, &info),
        };
        outcome.finish(if downstream_gone {
            0
        } else {
            rsp.status().as_u16()
        });
        rsp
    }

    /// The protocol the Service port at `dst` declares, if `dst` is a cluster IP and port.
    pub(crate) fn declared_protocol(&self, dst: SocketAddr) -> Option<crate::detect::Protocol> {
        let state = self.state.load();
        let svc = state.service_by_vip(dst.ip(), dst.port())?;
        let port = svc.ports.iter().find(|p| p.port == dst.port())?;
        crate::detect::declared(port.app_protocol.as_deref())
    }

    /// Refuses a request whose original destination is this proxy's own listener: forwarding it
    /// would loop back here. 502, logged under Istio's `BlackHoleCluster`.
    pub(crate) fn refuse_loop<B>(&self, req: &Request<B>, conn: &ConnInfo) -> Response<Body> {
        let summary = RequestSummary::of(req);
        let info = RequestInfo::new();
        info.set_cluster(Arc::from(crate::BLACK_HOLE_CLUSTER));
        tracing::warn!(
            peer = %conn.peer,
            original_dst = ?conn.original_dst,
            "refused a redirected request addressed to the proxy's own listener (it would loop); \
             exclude this address or port from redirection"
        );
        let body = "proxy loop: the original destination is this proxy's own listener";
        let rsp = Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .header(header::CONTENT_TYPE, "text/plain")
            .header(header::CONTENT_LENGTH, body.len())
            .body(sluice_core::full(body))
            .expect("valid local reply");
        let state = self.state();
        self.metrics.record(
            state.source(conn.peer.ip()),
            None,
            rsp.status().as_u16(),
            info.flags(),
            Duration::ZERO,
        );
        self.access_log
            .log(&summary, rsp.status().as_u16(), &info, Duration::ZERO, None);
        rsp
    }

    /// The labels of a destination service in this generation, or of the passthrough cluster.
    pub(crate) fn labels_of<'s>(
        &'s self,
        state: &'s State,
        service: Option<&Service>,
    ) -> Option<&'s ServiceLabels> {
        match service {
            Some(svc) => state.labels.get(&svc.hostname),
            None => Some(&self.passthrough.labels),
        }
    }

    /// Finds the destination service, route plan and cluster for `req`.
    fn route<B>(
        &self,
        state: &State,
        req: &Request<B>,
        conn: &ConnInfo,
    ) -> Result<Routed, BoxError> {
        let snapshot = &state.snapshot;
        let authority = route::authority_of(req);
        let (host, explicit_port) = split_authority(&authority);
        // The client pod (by peer address): its namespace completes short names, its labels and
        // namespace decide `sourceLabels`/`sourceNamespace` matches.
        let source = state.source(conn.peer.ip());

        let (service, port) = match conn.original_dst {
            // Redirected: the original destination decides.
            Some(dst) => match state.service_by_vip(dst.ip(), dst.port()) {
                Some(svc) => (svc, dst.port()),
                None => {
                    let protocol = if req.version() == http::Version::HTTP_2 {
                        UpstreamProtocol::H2c
                    } else {
                        UpstreamProtocol::Http1
                    };
                    return Ok(Routed {
                        plan: self.passthrough.plan().clone(),
                        target: Target::Cluster(self.passthrough.upstream(dst, protocol)),
                        service: None,
                    });
                }
            },
            // Explicit proxy: the authority decides.
            None => {
                // Short names resolve in the client pod's namespace, as its DNS search path does.
                let namespace = source.map_or(self.opts.default_namespace.as_str(), |s| {
                    s.namespace.as_str()
                });
                let svc = snapshot
                    .resolve_host(host, namespace)
                    .ok_or_else(|| ProxyError::NoCluster(authority.clone()))?;
                (svc, explicit_port.unwrap_or(80))
            }
        };
        if !service.ports.iter().any(|p| p.port == port) {
            return Err(ProxyError::NoCluster(format!("{}:{port}", service.hostname)).into());
        }

        let plan = match state.vhost(&service.hostname) {
            Some((vh, plans)) => {
                let (idx, _) = route::select(vh, req, port, source.map(|s| &*s.pod))
                    .ok_or(ProxyError::NoRoute)?;
                plans[idx].clone()
            }
            None => {
                let key = ClusterKey {
                    host: service.hostname.clone(),
                    port,
                    subset: None,
                };
                state
                    .implicit_plan(&key)
                    .cloned()
                    .ok_or_else(|| ProxyError::NoCluster(key.to_string()))?
            }
        };
        if let Some(reply) = &plan.direct {
            return Ok(Routed {
                target: Target::Direct(reply.clone()),
                plan,
                service: Some(service.clone()),
            });
        }
        let dest = route::pick_destination(&plan.destinations, |total| fastrand::u32(0..total))
            .ok_or(ProxyError::NoRoute)?;
        let upstream = state
            .upstreams
            .get(&dest.cluster)
            .ok_or_else(|| ProxyError::NoCluster(dest.cluster.to_string()))?
            .clone();
        Ok(Routed {
            plan,
            target: Target::Cluster(upstream),
            service: Some(service.clone()),
        })
    }
}

/// What the access log needs of the request, taken before the request moves on.
pub struct RequestSummary {
    pub method: http::Method,
    pub path: String,
    pub version: http::Version,
    pub authority: String,
    pub request_id: Option<HeaderValue>,
}

impl RequestSummary {
    fn of<B>(req: &Request<B>) -> Self {
        Self {
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            version: req.version(),
            authority: route::authority_of(req),
            request_id: req.headers().get(X_REQUEST_ID).cloned(),
        }
    }
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");

/// Headers that describe one hop and are not forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(header::CONNECTION).cloned() {
        if let Ok(conn) = conn.to_str() {
            for name in conn.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.remove(name);
                }
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// Makes the client's request an upstream request: authority in `Host`, hop-by-hop headers gone,
/// an `x-request-id` (Envoy generates one when the client sent none), the request record attached.
fn prepare_request<B>(req: Request<B>, info: &Arc<RequestInfo>) -> Request<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let authority = route::authority_of(&req);
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, host);
    }
    if !parts.headers.contains_key(X_REQUEST_ID) {
        let id = format!("{:032x}", fastrand::u128(..));
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &id[0..8],
            &id[8..12],
            &id[12..16],
            &id[16..20],
            &id[20..32]
        );
        parts.headers.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&uuid).expect("hex is a valid header"),
        );
    }
    // Absolute form with the client's authority; the upstream pool writes what its protocol needs.
    let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(pq)
        .build()
    {
        parts.uri = uri;
    }
    parts.version = http::Version::HTTP_11;
    parts.extensions.insert(info.clone());
    Request::from_parts(parts, sluice_core::boxed(body))
}

/// A route's `directResponse`: the prebuilt reply; no upstream, no retries, no timeout.
fn respond_direct(
    reply: &DirectReply,
    info: &RequestInfo,
    summary: &RequestSummary,
) -> Response<Body> {
    let location = if reply.wants_location {
        HeaderValue::from_str(&format!("http://{}{}", summary.authority, summary.path)).ok()
    } else {
        None
    };
    info.set_details(DIRECT_RESPONSE_DETAILS);
    reply.respond(location.as_ref())
}

fn prepare_response(mut rsp: Response<Body>) -> Response<Body> {
    strip_hop_by_hop(rsp.headers_mut());
    rsp
}

/// The response Envoy sends when the proxy itself ends the request.
fn local_reply(err: &BoxError, info: &RequestInfo) -> Response<Body> {
    let (status, flag, body) = match ProxyError::find(err) {
        // Envoy says "retried and the latest reset reason" once an earlier attempt was made.
        Some(pe) => (pe.status(), pe.flag(), pe.body(info.attempts() > 1)),
        None => {
            tracing::debug!(error = %err, "request failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
                "upstream connect error or disconnect/reset before headers".into(),
            )
        }
    };
    info.add_flags(flag);
    let mut rsp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain")
        .header(header::CONTENT_LENGTH, body.len());
    if flag.contains(ResponseFlags::UPSTREAM_OVERFLOW) {
        rsp = rsp.header(X_ENVOY_OVERLOADED, "true");
    }
    rsp.body(sluice_core::full(body.into_owned()))
        .expect("valid local reply")
}

/// Splits `host[:port]` (IPv6 in brackets).
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, after)) = rest.split_once(']') {
            return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => (host, port.parse().ok()),
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_parts() {
        assert_eq!(split_authority("pricing"), ("pricing", None));
        assert_eq!(split_authority("pricing:9090"), ("pricing", Some(9090)));
        assert_eq!(split_authority("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_authority("10.0.0.1:80"), ("10.0.0.1", Some(80)));
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn overflow_reply_is_envoys() {
        let info = RequestInfo::new();
        let err: BoxError = Box::new(ProxyError::Overflow(sluice_core::OverflowKind::Pending));
        let rsp = local_reply(&err, &info);
        assert_eq!(rsp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rsp.headers()[X_ENVOY_OVERLOADED], "true");
        assert_eq!(info.flags().to_string(), "UO");
    }
}
