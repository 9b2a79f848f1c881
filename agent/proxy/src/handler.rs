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

use crate::direct::{DirectReply, DIRECT_RESPONSE_DETAILS};
use crate::passthrough::Passthrough;
use crate::recorded::{Finish, RecordedBody};
use crate::route;
use crate::state::{RoutePlan, ServiceLabels, SourceLabels, State, Upstream};
use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use sluice_core::{Body, BoxError, Origin, ProxyError, RequestCtx, RequestInfo, ResponseFlags};
use sluice_policy::Service;
use sluice_resilience::{FaultLayer, RetryLayer, TimeoutLayer};
use sluice_telemetry::trace::{new_request_id, Tracer, X_REQUEST_ID};
use sluice_telemetry::{AccessLog, Exchange, HttpRequest, Metrics, Record, ServiceName, Telemetry};
use sluice_upstream::UpstreamProtocol;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// What the listener knows about the client connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The destination the client connected to before redirection (eBPF mode), if known.
    pub original_dst: Option<SocketAddr>,
    /// The connection's place in its pod's budget (`None` for connections not counted, as in
    /// tests that call the handler directly).
    pub(crate) slot: Option<Arc<crate::isolation::ConnSlot>>,
    /// The connection's timer for the route timeouts of its HTTP/1 requests (`None` for
    /// requests not served by a connection's task, as in tests that call the handler directly).
    pub(crate) timer: Option<Arc<sluice_core::ConnTimer>>,
}

/// Options that shape request handling.
#[derive(Clone, Debug)]
pub struct HandlerOptions {
    /// The namespace short host names resolve in when the client is not a known pod
    /// (explicit-proxy mode on a node or in tests).
    pub default_namespace: String,
    /// The cluster this node is in: Istio's `source_cluster` / `destination_cluster`.
    pub cluster_id: String,
    /// Finished requests kept for `sluice trace` (0: none).
    pub recent_requests: usize,
}

impl Default for HandlerOptions {
    fn default() -> Self {
        Self {
            default_namespace: "default".into(),
            cluster_id: sluice_telemetry::DEFAULT_CLUSTER_ID.into(),
            recent_requests: sluice_telemetry::recent::DEFAULT_CAPACITY,
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
    /// Serve a redirected connection only when its original destination is known and its client
    /// is an enrolled pod of this node, so the listener is no open relay (see `relay`). On by
    /// default; off only where tests stand in for the kernel from loopback clients that are no
    /// pod.
    pub enrolled_clients_only: bool,
}

impl Default for RedirectOptions {
    fn default() -> Self {
        Self {
            protocol_detection_timeout: Duration::from_secs(5),
            tcp_max_connect_attempts: 1,
            enrolled_clients_only: true,
        }
    }
}

/// The request handler shared by every connection.
pub struct Handler {
    state: ArcSwap<State>,
    pub(crate) telemetry: Telemetry,
    /// L4 connections the proxy closed itself, by cluster (`envoy_tcp_*`).
    pub(crate) tcp_timeouts: crate::metrics::TcpTimeouts,
    opts: HandlerOptions,
    pub(crate) redirect: RedirectOptions,
    pub(crate) passthrough: Passthrough,
    /// What each client connection may do, and the counts of what fired (`crate::limits`).
    pub(crate) limits: Arc<crate::DownstreamLimits>,
    pub(crate) downstream: Arc<crate::limits::DownstreamStats>,
    /// Who may use a redirecting listener, and the refusals so far.
    pub(crate) clients: crate::relay::ClientGuard,
    /// What each client pod may hold, and the proxy's own resource pressure.
    pub(crate) isolation: Arc<crate::Isolation>,
}

/// Where one request goes.
/// Borrowed from the generation in force (and the passthrough cluster), which the request holds
/// for its whole life: a request copies out only what outlives routing, not every `Arc` a route
/// and cluster are made of (each copy and drop an atomic read-modify-write).
struct Routed<'s> {
    plan: &'s Arc<RoutePlan>,
    /// The plan's `match` entry the request fitted (`None`: the route has no `match`).
    matched: Option<usize>,
    target: Target<'s>,
    /// `None` for the passthrough cluster.
    service: Option<&'s Arc<Service>>,
}

/// What answers a routed request.
enum Target<'s> {
    /// A cluster's endpoints, through the route's resilience stack (the passthrough cluster's is
    /// made per original destination).
    Cluster(std::borrow::Cow<'s, Upstream>),
    /// The route's `directResponse`: the proxy itself.
    Direct(&'s Arc<DirectReply>),
}

impl Handler {
    pub fn new(opts: HandlerOptions, access_log: AccessLog, metrics: Metrics) -> Self {
        Self {
            state: ArcSwap::from_pointee(State::empty()),
            telemetry: Telemetry::new(metrics, access_log, &opts.cluster_id)
                .with_recent(opts.recent_requests),
            tcp_timeouts: Default::default(),
            opts,
            redirect: RedirectOptions::default(),
            passthrough: Passthrough::new(),
            limits: Default::default(),
            downstream: Default::default(),
            clients: Default::default(),
            isolation: crate::Isolation::new(Default::default()),
        }
    }

    /// Sets how redirected connections are handled (defaults: [`RedirectOptions::default`]).
    pub fn with_redirect_options(mut self, redirect: RedirectOptions) -> Self {
        self.redirect = redirect;
        self
    }

    /// Traces requests with `tracer` (propagation, sampling, span export); the default traces
    /// nothing.
    /// Holds each client pod, and the proxy as a whole, to `limits`.
    pub fn with_isolation(mut self, limits: crate::IsolationLimits) -> Self {
        self.isolation = crate::Isolation::new(limits);
        self
    }

    /// The connections open now, both sides (what `sluice connections` lists).
    pub fn open_connections(&self) -> Vec<Arc<sluice_telemetry::recent::OpenConnection>> {
        self.telemetry.connections().list()
    }

    /// The per-pod budgets and the proxy's resource pressure.
    pub fn isolation(&self) -> &Arc<crate::Isolation> {
        &self.isolation
    }

    pub fn with_tracer(mut self, tracer: Tracer) -> Self {
        self.telemetry = self.telemetry.with_tracer(tracer);
        self
    }

    /// The tracer (its export counters).
    pub fn tracer(&self) -> &Tracer {
        self.telemetry.tracer()
    }

    /// The access log (tests and the admin API subscribe to it).
    /// The recent records and the live feed of each one as it finishes (what `/tap` streams).
    pub fn recent(&self) -> &sluice_telemetry::Recent {
        self.telemetry.recent()
    }

    pub fn access_log(&self) -> &AccessLog {
        self.telemetry.access_log()
    }

    /// Istio's metrics (the Prometheus endpoint encodes them).
    pub fn metrics(&self) -> &Metrics {
        self.telemetry.metrics()
    }

    /// What `/stats/prometheus` serves, in Prometheus' text format: Istio's families, Envoy's
    /// cluster and TCP proxy series.
    pub fn prometheus_text(&self) -> String {
        crate::metrics::encode(self, crate::metrics::Format::Prometheus)
    }

    /// The generation in force.
    pub fn state(&self) -> Arc<State> {
        self.state.load_full()
    }

    /// Makes `snapshot` the policy for new requests; requests under way keep theirs.
    pub fn apply(&self, snapshot: Arc<sluice_policy::Snapshot>) {
        let prev = self.state.load();
        let next = State::next(&prev, snapshot);
        // Each cluster's pooled connections are counted in Istio's TCP families.
        for (key, up) in next.upstreams.iter().chain(next.namespace_upstreams()) {
            up.handle.observe(|| {
                Arc::new(crate::conns::UpstreamConnections {
                    telemetry: self.telemetry.clone(),
                    service: next
                        .service_labels(&key.host)
                        .cloned()
                        .unwrap_or_else(ServiceName::unknown),
                })
            });
        }
        let snapshot = next.snapshot.clone();
        self.state.store(Arc::new(next));
        if self.redirect.enrolled_clients_only {
            self.clients.applied(&snapshot);
        }
    }

    /// Proxies `req`, which the connection got at `started` (the start of its record's duration
    /// and of the upstream's time in `x-envoy-upstream-service-time`).
    pub async fn handle<B>(
        &self,
        mut req: Request<B>,
        conn: &ConnInfo,
        started: Instant,
    ) -> Response<Body>
    where
        B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let state = self.state.load_full();
        let info = Arc::new(RequestInfo::new());
        // Envoy makes an `x-request-id` when the client sent none; the access log shows the one
        // sent upstream.
        let made_request_id = (!req.headers().contains_key(X_REQUEST_ID)).then(|| {
            let id = new_request_id();
            req.headers_mut().insert(X_REQUEST_ID, id.clone());
            id
        });
        // The request's place in a trace: the cluster writes it on every attempt; the record
        // keeps it only to make the spans of a sampled request (not one more reference count for
        // the others, most of them).
        let trace = self.telemetry.tracer().start(req.headers()).map(Arc::new);
        let spans = trace.as_ref().filter(|t| t.sampled()).cloned();
        let h1 = req.version() < http::Version::HTTP_2;
        let ctx = RequestCtx::of_mut(req.extensions_mut());
        ctx.info = Some(info.clone());
        if let Some(t) = trace {
            ctx.trace = Some(t);
        }
        // An HTTP/2 stream is a task of its own, which the connection's timer would not wake.
        if h1 {
            ctx.conn_timer = conn.timer.clone();
        }
        // Recorded however the request ends: when its response body has been sent, or (dropped by
        // hyper because the client went away first) with status 0 and `DC`, as Envoy does.
        let mut finish = Finish::new(
            self.telemetry.clone(),
            state.clone(),
            Record {
                start: SystemTime::now(),
                duration: Duration::ZERO,
                exchange: Exchange::Http(HttpRequest {
                    trace: spans,
                    ..HttpRequest::with_request_id(
                        &req,
                        route::authority_of(&req).to_owned(),
                        made_request_id,
                    )
                }),
                peer: Some(conn.peer),
                source: state.source_identity(conn.peer.ip()),
                service: ServiceName::unknown(),
                info: info.clone(),
                status: 0,
                grpc_status: None,
                response_bytes: 0,
            },
            started,
        );

        // The client went away while its request body was read: logged as Envoy logs it (status
        // 0, `DC`), never as an upstream failure.
        let mut downstream_gone = false;
        // The pod's budget: a request over it is shed before any work is done for it.
        if let Some(slot) = &conn.slot {
            match slot.admit_request() {
                Ok(held) => {
                    finish.hold(held);
                    RequestCtx::of_mut(req.extensions_mut()).quota = Some(slot.upstream_quota());
                }
                Err(why) => {
                    let err: BoxError = ProxyError::Overload(why).into();
                    return RecordedBody::wrap(local_reply(&err, &info), finish);
                }
            }
        }
        let rsp = match self.route(&state, &req, conn) {
            Ok(Routed {
                plan,
                matched,
                target: Target::Direct(reply),
                service,
            }) => {
                finish.record().service = self.service_labels(&state, service.map(|s| &**s));
                info.set_routed(plan.note(matched), None);
                debug_assert!(
                    plan.fault.is_none(),
                    "config refuses fault with directResponse"
                );
                let location = match &finish.record().exchange {
                    Exchange::Http(r) => reply
                        .wants_location
                        .then(|| {
                            HeaderValue::from_str(&format!("http://{}{}", r.authority, r.path)).ok()
                        })
                        .flatten(),
                    Exchange::Tcp { .. } => None,
                };
                info.set_details(DIRECT_RESPONSE_DETAILS);
                reply.respond(location.as_ref())
            }
            Ok(Routed {
                plan,
                matched,
                target: Target::Cluster(upstream),
                service,
            }) => {
                finish.record().service = self.service_labels(&state, service.map(|s| &**s));
                info.set_routed(plan.note(matched), Some(upstream.note.clone()));
                let req = prepare_request(req, &info);
                let had_body = !http_body::Body::is_end_stream(req.body());
                // Built inside out for this request alone: each layer moves what it holds into
                // its service (`Layer::layer` would copy it, one more reference count each).
                let per_try =
                    TimeoutLayer::per_try(plan.per_try_timeout).layer(upstream.handle.clone());
                let retry = RetryLayer::new(plan.retry.clone(), upstream.retry_budget.clone())
                    .into_service(per_try);
                let route = TimeoutLayer::route(plan.timeout).layer(retry);
                let stack = FaultLayer::new(plan.fault.clone()).into_service(route);
                // Boxed where created: rustc cannot otherwise prove the stack's future `Send` for
                // every lifetime in `BoxError` when hyper spawns the connection task.
                let fut: futures_util::future::BoxFuture<
                    'static,
                    Result<Response<Body>, BoxError>,
                > = Box::pin(stack.oneshot(req));
                let mut rsp = match fut.await {
                    Ok(rsp) => {
                        let mut rsp = prepare_response(rsp);
                        // Envoy's router stamps the responses it forwards (not its local replies
                        // nor the fault filter's aborts) with the time the upstream took, retries
                        // included: whole milliseconds from the request's completion, as Envoy
                        // counts them. That is when the connection got it (microseconds before
                        // the router; no clock read of its own), or later the end of its body or
                        // of an injected delay (the notes' lock only for those).
                        let flags = info.flags();
                        if !flags.contains(ResponseFlags::FAULT_INJECTED) {
                            let from = (had_body || flags.contains(ResponseFlags::DELAY_INJECTED))
                                .then(|| info.completed())
                                .flatten()
                                .map_or(started, Instant::from_std);
                            let ms = u64::try_from(from.elapsed().as_millis()).unwrap_or(u64::MAX);
                            rsp.headers_mut().insert(
                                X_ENVOY_UPSTREAM_SERVICE_TIME,
                                sluice_core::decimal_value(ms),
                            );
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
        if downstream_gone {
            // Nothing will be sent: recorded now, as the client left.
            finish.record().status = 0;
            finish.done();
            return rsp;
        }
        RecordedBody::wrap(rsp, finish)
    }

    /// The metric labels of the Service a request was routed to (or of the passthrough cluster).
    fn service_labels(&self, state: &State, service: Option<&Service>) -> ServiceLabels {
        self.labels_of(state, service)
            .cloned()
            .unwrap_or_else(ServiceName::unknown)
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
    pub(crate) fn refuse_loop<B>(
        &self,
        req: &Request<B>,
        conn: &ConnInfo,
        started: Instant,
    ) -> Response<Body> {
        let info = Arc::new(RequestInfo::new());
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
        let finish = Finish::new(
            self.telemetry.clone(),
            state.clone(),
            Record {
                start: SystemTime::now(),
                duration: Duration::ZERO,
                exchange: Exchange::Http(HttpRequest::of(req, route::authority_of(req).to_owned())),
                peer: Some(conn.peer),
                source: state.source_identity(conn.peer.ip()),
                service: ServiceName::unknown(),
                info,
                status: 0,
                grpc_status: None,
                response_bytes: 0,
            },
            started,
        );
        RecordedBody::wrap(rsp, finish)
    }

    /// The labels of a destination service in this generation, or of the passthrough cluster.
    pub(crate) fn labels_of<'s>(
        &'s self,
        state: &'s State,
        service: Option<&Service>,
    ) -> Option<&'s ServiceLabels> {
        match service {
            Some(svc) => state.service_labels(&svc.hostname),
            None => Some(&self.passthrough.labels),
        }
    }

    /// The namespace a client is in: its Pod's, else the default one (explicit-proxy clients
    /// that are not pods).
    pub(crate) fn client_namespace<'a>(&'a self, source: Option<&'a SourceLabels>) -> &'a str {
        source.map_or(self.opts.default_namespace.as_str(), |s| s.namespace())
    }

    /// Finds the destination service, route plan and cluster for `req`.
    fn route<'s, B>(
        &'s self,
        state: &'s State,
        req: &Request<B>,
        conn: &ConnInfo,
    ) -> Result<Routed<'s>, BoxError> {
        let snapshot = &state.snapshot;
        let authority = route::authority_of(req);
        let (host, explicit_port) = split_authority(authority);
        // The client pod (by peer address): its labels and namespace decide
        // `sourceLabels`/`sourceNamespace` matches. Its namespace (else the default one) completes
        // short names, as its DNS search path does, and decides which Services, VirtualServices
        // and DestinationRules it sees (`exportTo`).
        let source = state.source(conn.peer.ip());
        let namespace = self.client_namespace(source);
        let viewer = state.viewer(namespace);

        // The port the request came in on: destinations without `port` go to it.
        let (service, port) = match conn.original_dst {
            // Redirected: the original destination decides; a Service the client does not see
            // has no listener in Istio's sidecar either, so it passes through.
            Some(dst) => match state
                .service_by_vip(dst.ip(), dst.port())
                .filter(|svc| state.sees(viewer, &svc.hostname))
            {
                Some(svc) => (svc, dst.port()),
                None => {
                    let protocol = if req.version() == http::Version::HTTP_2 {
                        UpstreamProtocol::H2c
                    } else {
                        UpstreamProtocol::Http1
                    };
                    return Ok(Routed {
                        plan: self.passthrough.plan(),
                        matched: None,
                        target: Target::Cluster(std::borrow::Cow::Owned(
                            self.passthrough.upstream(dst, protocol),
                        )),
                        service: None,
                    });
                }
            },
            // Explicit proxy: the authority decides.
            None => {
                let svc = snapshot
                    .resolve_host(host, namespace)
                    .filter(|svc| state.sees(viewer, &svc.hostname))
                    .ok_or_else(|| ProxyError::NoCluster(authority.to_owned()))?;
                (svc, explicit_port.unwrap_or(80))
            }
        };
        if !service.ports.iter().any(|p| p.port == port) {
            return Err(ProxyError::NoCluster(format!("{}:{port}", service.hostname)).into());
        }

        let (plan, matched) = match state.routes(viewer, &service.hostname, port) {
            Some((vh, plans)) => {
                let (idx, matched, _) = route::select(vh, req, port, source.map(|s| &*s.pod))
                    .ok_or_else(|| ProxyError::NoRoute)?;
                (&plans[idx], matched)
            }
            None => (
                state
                    .implicit_plan(&service.hostname, port)
                    .ok_or_else(|| ProxyError::NoCluster(format!("{}:{port}", service.hostname)))?,
                None,
            ),
        };
        if let Some(reply) = &plan.direct {
            return Ok(Routed {
                target: Target::Direct(reply),
                matched,
                plan,
                service: Some(service),
            });
        }
        let dest = route::pick_destination(&plan.destinations, |total| fastrand::u32(0..total))
            .ok_or_else(|| ProxyError::NoRoute)?;
        let upstream = state
            .upstream(viewer, &dest.cluster)
            .ok_or_else(|| ProxyError::NoCluster(dest.cluster.to_string()))?;
        Ok(Routed {
            plan,
            matched,
            target: Target::Cluster(std::borrow::Cow::Borrowed(upstream)),
            service: Some(service),
        })
    }
}

const X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");
const X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");

/// Headers that describe one hop and are not forwarded (RFC 9110 7.6.1); `Connection` first.
const HOP_BY_HOP_COUNT: usize = 7;
static HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// `name`'s place in [`HOP_BY_HOP`]. One match on the name's text (its length first) where
/// comparing it with each entry in turn cost seven comparisons per header, twice per request.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "proxy-connection" => 1,
        "keep-alive" => 2,
        "proxy-authorization" => 3,
        "te" => 4,
        "upgrade" => 5,
        "transfer-encoding" => 6,
        _ => return None,
    })
}

/// Removes the hop-by-hop headers and the headers `Connection` names. One pass over the names
/// finds which are there (most messages carry none, or only `Connection`): each removal by name
/// hashes it and probes the map, which is worth doing only for what is present.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP_COUNT];
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present[i] = true;
        }
    }
    if present[0] {
        // The usual values name no other header: nothing to parse.
        let plain = |v: &HeaderValue| {
            let v = v.as_bytes();
            v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
        };
        if let Some(conn) = headers
            .get(header::CONNECTION)
            .filter(|v| !plain(v))
            .cloned()
        {
            if let Ok(conn) = conn.to_str() {
                for name in conn.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    // `keep-alive` (the usual one) and the other hop-by-hop names go below
                    // when present: not parsed and looked up twice.
                    if HOP_BY_HOP
                        .iter()
                        .any(|h| h.as_str().eq_ignore_ascii_case(name))
                    {
                        continue;
                    }
                    if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                        headers.remove(name);
                    }
                }
            }
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        headers.remove(name);
    }
}

/// Makes the client's request an upstream request: authority in `Host`, hop-by-hop headers gone,
/// its body counted into the request's record as it is read.
fn prepare_request<B>(req: Request<B>, info: &Arc<RequestInfo>) -> Request<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // `Host` is the request's authority: the URI's (absolute form, HTTP/2) when it has one. The
    // usual origin-form request already carries it, and is left as it is.
    let host = parts.headers.get(header::HOST);
    let set = match parts.uri.authority() {
        Some(a) if host.is_none_or(|h| h.as_bytes() != a.as_str().as_bytes()) => {
            HeaderValue::from_str(a.as_str()).ok()
        }
        Some(_) => None,
        None if host.is_none_or(|h| h.to_str().is_err()) => Some(HeaderValue::from_static("")),
        None => None,
    };
    if let Some(host) = set {
        parts.headers.insert(header::HOST, host);
    }
    // The URI stays as the client sent it: the cluster writes what its protocol needs (HTTP/1
    // the origin form, `Host` being set above; h2 `:authority` from the URI or `Host`).
    parts.version = http::Version::HTTP_11;
    // A request without a body (most GETs) has no bytes to count.
    if body.is_end_stream() {
        return Request::from_parts(parts, sluice_core::boxed(body));
    }
    let body = crate::recorded::CountedBody::new(body, info.clone());
    Request::from_parts(parts, sluice_core::boxed(body))
}

fn prepare_response(mut rsp: Response<Body>) -> Response<Body> {
    strip_hop_by_hop(rsp.headers_mut());
    rsp
}

/// The response Envoy sends when the proxy itself ends the request.
fn local_reply(err: &BoxError, info: &RequestInfo) -> Response<Body> {
    let (status, flag, body) = match ProxyError::find(err) {
        // Envoy says "retried and the latest reset reason" once an earlier attempt was made.
        Some(pe) => {
            if let Some(details) = pe.details(false) {
                info.set_details(details);
            }
            (pe.status(), pe.flag(), pe.body(info.attempts() > 1))
        }
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
    if flag.contains(ResponseFlags::UPSTREAM_OVERFLOW)
        || flag.contains(ResponseFlags::OVERLOAD_MANAGER)
    {
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
    match sluice_policy::split_at_only_colon(authority) {
        Some((host, port)) => (host, port.parse().ok()),
        None => (authority, None),
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
        // What `Connection` names goes, whatever its case, hop-by-hop names included.
        for connection in ["keep-alive, x-secret", "Keep-Alive, X-Secret"] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(connection));
            h.insert("x-secret", HeaderValue::from_static("1"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "{connection}");
        }

        // Each hop-by-hop header alone, without `Connection`, is found in its place and removed.
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
            let mut h = HeaderMap::new();
            h.insert(name, HeaderValue::from_static("x"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name} was kept");
        }
        // The usual values, whatever their case, take the connection header and keep-alive only.
        for connection in ["keep-alive", "Close"] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(connection));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().collect::<Vec<_>>(), ["x-kept"], "{connection}");
        }
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("pricing"));
        h.append("x-kept", HeaderValue::from_static("1"));
        h.append("x-kept", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
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
