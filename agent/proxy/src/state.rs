//! One generation of what the proxy runs: the checked snapshot, the live clusters it names, and each
//! route's resilience plan. Swapped atomically on reload; a request loads it once and keeps it, so a
//! request finishes under the policy it started with while new requests see the new one.
//!
//! Everything a request looks up is made here once per generation, so routing allocates nothing:
//! a VirtualService's route plans per incoming port (a destination without `port` goes to the port
//! the request came in on), and for each client namespace that sees other VirtualServices or
//! DestinationRules than the rest (`exportTo`) its own table of them and of their live clusters.

use crate::direct::{DirectReply, ResponseHeaders};
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use sluice_core::{ClusterNote, PolicyNote};
use sluice_policy::Identity;
use sluice_policy::{
    Cluster, ClusterKey, Fault, RetryPolicy, Route, Service, ServiceExportTo, Snapshot,
    VirtualHost, WeightedDestination,
};
use sluice_resilience::RetryBudget;
use sluice_telemetry::{Interned, Peer, ServiceName};
use sluice_upstream::{ClusterHandle, UpstreamProtocol};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// A live cluster: its connection pools and outlier state, and its `maxRetries` budget.
#[derive(Clone)]
pub struct Upstream {
    /// Envoy's name for it (`outbound|80||pricing.default.svc.cluster.local`), made once.
    pub name: Arc<str>,
    pub spec: Arc<Cluster>,
    /// Its name, DestinationRule and limits as a request's record shows them, made with `spec`.
    pub note: Arc<ClusterNote>,
    pub handle: ClusterHandle,
    pub retry_budget: Arc<RetryBudget>,
}

/// A route compiled for the hot path: the layers' settings are shared, not rebuilt per request.
pub struct RoutePlan {
    pub destinations: Vec<WeightedDestination>,
    pub timeout: Option<Duration>,
    pub retry: Arc<RetryPolicy>,
    pub per_try_timeout: Option<Duration>,
    pub fault: Option<Arc<Fault>>,
    /// `directResponse`, prebuilt: the proxy answers, no destination is used.
    pub(crate) direct: Option<Arc<DirectReply>>,
    /// `headers.response`, applied to the route's responses (already in `direct`'s headers).
    pub(crate) response_headers: Option<Arc<ResponseHeaders>>,
    /// What a trace shows of the route: `[0]` without a match, then one per `match` entry.
    pub(crate) notes: Arc<[PolicyNote]>,
}

impl RoutePlan {
    /// The route's note for a request that fitted `match` entry `matched` (`None`: the route
    /// has no `match`).
    pub fn note(&self, matched: Option<usize>) -> PolicyNote {
        let i = matched.map_or(0, |m| m + 1);
        self.notes.get(i).unwrap_or(&self.notes[0]).clone()
    }

    /// `route` of VirtualService `virtual_service` for requests that came in on `port` (its
    /// destinations without `port` take it).
    fn compile(virtual_service: &str, route: &Route, port: u16) -> Self {
        let response_headers = route
            .response_headers
            .as_ref()
            .map(|ops| Arc::new(ResponseHeaders::compile(ops)));
        Self {
            destinations: route
                .destinations
                .iter()
                .map(|d| WeightedDestination {
                    cluster: d.cluster_for(port),
                    weight: d.weight,
                })
                .collect(),
            timeout: route.timeout,
            per_try_timeout: route.retry.per_try_timeout,
            retry: Arc::new(route.retry.clone()),
            fault: route.fault.clone().map(Arc::new),
            direct: route
                .direct_response
                .as_ref()
                .map(|d| Arc::new(DirectReply::new(d, response_headers.as_deref()))),
            response_headers,
            notes: crate::notes::route_notes(virtual_service, route),
        }
    }

    /// Istio's implicit route for a service with no VirtualService: everything to the service port,
    /// no timeout, the default retry policy.
    fn implicit(service: &Service, port: u16) -> Self {
        Self {
            destinations: vec![WeightedDestination {
                cluster: ClusterKey {
                    host: service.hostname.clone(),
                    port,
                    subset: None,
                },
                weight: 100,
            }],
            timeout: None,
            retry: Arc::new(RetryPolicy::istio_default()),
            per_try_timeout: None,
            fault: None,
            direct: None,
            response_headers: None,
            notes: Arc::new([PolicyNote::new(Arc::new(sluice_admin_api::RoutePolicy {
                virtual_service: "default".into(),
                route: "default".into(),
                retries: RetryPolicy::istio_default().num_retries,
                ..Default::default()
            }))]),
        }
    }
}

/// Everything one request needs, consistent with one config generation.
pub struct State {
    pub snapshot: Arc<Snapshot>,
    /// Live clusters as a client sees them whose namespace no object singles out (every cluster
    /// of the snapshot's [`Snapshot::clusters`]).
    pub upstreams: HashMap<ClusterKey, Upstream>,
    // The tables below are shared with the previous generation when what they are made from is
    // (the same `Arc`s in the snapshot): an endpoint change in a large cluster redoes only the
    // clusters it touched.
    /// Compiled routes by VirtualHost name (`namespace/name` of the VirtualService), per port.
    plans: Arc<HashMap<String, PortPlans>>,
    /// What the snapshot's Services give: implicit routes, visibility, metric labels, addresses.
    services: Arc<ServiceTables>,
    /// What clients of a namespace see differently (see [`Snapshot::namespaces`]).
    views: HashMap<String, View>,
    /// Known pods by IP: who a client is (metrics' `source_workload`, the namespace its short host
    /// names resolve in).
    sources: Arc<HashMap<IpAddr, SourceLabels>>,
    /// Who each endpoint is (`destination_*` labels), by address, with the number of clusters of
    /// [`Snapshot::clusters`] that list it (so a cluster's change can be applied alone).
    endpoints: Arc<HashMap<std::net::SocketAddr, (Peer, u32)>>,
}

/// What a generation's Services give, made once for them.
#[derive(Default)]
struct ServiceTables {
    /// Implicit routes (Service port without VirtualService) by host name, then port.
    implicit: HashMap<String, Vec<(u16, Arc<RoutePlan>)>>,
    /// Services some namespaces do not see (`networking.istio.io/exportTo`), by host name; usually
    /// none, so routing only looks here when there are some.
    restricted: HashMap<String, Arc<Service>>,
    /// Istio metric labels per destination service, made once per generation.
    labels: HashMap<String, ServiceLabels>,
    /// Services by cluster IP and service port, for redirected connections (one hash lookup per
    /// request instead of a scan of every Service).
    vips: HashMap<(IpAddr, u16), Arc<Service>>,
}

/// A VirtualService's compiled routes: one list for every port when no destination takes the
/// incoming port, else one list per port the VirtualService can see requests on.
pub enum PortPlans {
    Any(Arc<[Arc<RoutePlan>]>),
    ByPort(Vec<(u16, Arc<[Arc<RoutePlan>]>)>),
}

impl PortPlans {
    /// The routes for requests that came in on `port` (in the VirtualService's order).
    pub fn for_port(&self, port: u16) -> Option<&[Arc<RoutePlan>]> {
        match self {
            Self::Any(plans) => Some(plans),
            Self::ByPort(by_port) => by_port
                .binary_search_by_key(&port, |(p, _)| *p)
                .ok()
                .map(|i| &*by_port[i].1),
        }
    }
}

/// What clients of one namespace see differently from the rest.
#[derive(Default)]
pub struct View {
    /// The VirtualService for a Service host name (`None`: none, the implicit route).
    vhosts: HashMap<String, Option<Arc<VirtualHost>>>,
    /// Every live cluster of a Service host name whose DestinationRule differs.
    clusters: HashMap<String, HashMap<ClusterKey, Upstream>>,
}

/// The client of a request as routing sees it: its namespace and what that namespace sees.
#[derive(Clone, Copy)]
pub struct Viewer<'a> {
    pub namespace: &'a str,
    view: Option<&'a View>,
}

/// A client pod: its telemetry identity (`source_*` labels) and the pod itself.
#[derive(Clone, Debug)]
pub(crate) struct SourceLabels {
    pub identity: Peer,
    /// The pod itself (its labels and namespace feed `sourceLabels`/`sourceNamespace` matches and
    /// the namespace its short host names resolve in).
    pub pod: Arc<sluice_policy::Workload>,
}

impl SourceLabels {
    fn of(w: &Arc<sluice_policy::Workload>, identity: Peer) -> Self {
        SourceLabels {
            identity,
            pod: w.clone(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.pod.namespace
    }
}

/// A service's metric label values, shared by every sample of every request to it.
pub(crate) type ServiceLabels = Interned<ServiceName>;

impl State {
    pub fn empty() -> Self {
        Self {
            snapshot: Arc::new(Snapshot::default()),
            upstreams: HashMap::new(),
            plans: Arc::default(),
            services: Arc::default(),
            views: HashMap::new(),
            sources: Arc::default(),
            endpoints: Arc::default(),
        }
    }

    /// The known pod with address `ip`, if any.
    pub(crate) fn source(&self, ip: IpAddr) -> Option<&SourceLabels> {
        self.sources.get(&ip)
    }

    /// The client's telemetry identity (`unknown` when it is not a known pod).
    pub(crate) fn source_identity(&self, ip: IpAddr) -> Peer {
        self.sources
            .get(&ip)
            .map_or_else(sluice_telemetry::unknown_identity, |s| s.identity.clone())
    }

    /// Who the endpoint at `addr` is, if its pod is known.
    pub(crate) fn endpoint_identity(&self, addr: std::net::SocketAddr) -> Option<Peer> {
        self.endpoints.get(&addr).map(|(peer, _)| peer.clone())
    }

    /// The metric labels of the Service `hostname`.
    pub(crate) fn service_labels(&self, hostname: &str) -> Option<&ServiceLabels> {
        self.services.labels.get(hostname)
    }

    /// The Service whose cluster IP is `ip`, exposing `port`.
    pub fn service_by_vip(&self, ip: IpAddr, port: u16) -> Option<&Arc<Service>> {
        self.services.vips.get(&(ip, port))
    }

    /// A client in `namespace`: what it sees (one hash lookup, no allocation).
    pub fn viewer<'a>(&'a self, namespace: &'a str) -> Viewer<'a> {
        Viewer {
            namespace,
            view: self.views.get(namespace),
        }
    }

    /// Whether `viewer` sees the Service `host` (`networking.istio.io/exportTo`).
    pub fn sees(&self, viewer: Viewer<'_>, host: &str) -> bool {
        self.services.restricted.is_empty()
            || self
                .services
                .restricted
                .get(host)
                .is_none_or(|svc| svc.visible_to(viewer.namespace))
    }

    /// The VirtualService routing the Service `hostname` for `viewer`, with its route plans for
    /// requests that came in on `port`; `None`: Istio's implicit route applies.
    pub fn routes<'a>(
        &'a self,
        viewer: Viewer<'a>,
        hostname: &str,
        port: u16,
    ) -> Option<(&'a Arc<VirtualHost>, &'a [Arc<RoutePlan>])> {
        let vh = match viewer.view.and_then(|v| v.vhosts.get(hostname)) {
            Some(choice) => choice.as_ref()?,
            None => self.snapshot.virtual_host(hostname)?,
        };
        let plans = self.plans.get(&vh.name)?.for_port(port)?;
        Some((vh, plans))
    }

    /// The live cluster `key` for `viewer`: the one its DestinationRule shapes; `None` when it
    /// has none (unknown port or subset, or a Service it does not see).
    pub fn upstream<'a>(&'a self, viewer: Viewer<'a>, key: &ClusterKey) -> Option<&'a Upstream> {
        if !self.sees(viewer, &key.host) {
            return None;
        }
        match viewer.view.and_then(|v| v.clusters.get(&key.host)) {
            Some(clusters) => clusters.get(key),
            None => self.upstreams.get(key),
        }
    }

    /// Builds the next generation from `snapshot`, reusing the live clusters of `prev` so connection
    /// pools and outlier state survive a reload.
    pub fn next(prev: &State, snapshot: Arc<Snapshot>) -> Self {
        let old = &prev.snapshot;
        // The clusters that are not the very ones of the previous generation: after an endpoint
        // change in a large cluster, a handful of thousands.
        let changed = changed_clusters(old, &snapshot);
        let patch = changed.len() <= snapshot.clusters.len() / 4;
        // Each live cluster is claimed once per generation (by its name's allocation), so two
        // namespaces' clusters of one key never share one whose policy the other changed. (The
        // view's live clusters and these are never the same: each is kept in its own place.)
        let mut claimed = HashSet::new();
        let upstreams = if patch {
            let mut upstreams = prev.upstreams.clone();
            for (before, after) in &changed {
                match (before, after) {
                    (_, Some(spec)) => {
                        let up = live(&snapshot, spec, prev.upstreams.get(&spec.key), &mut claimed);
                        upstreams.insert(spec.key.clone(), up);
                    }
                    (Some(gone), None) => {
                        upstreams.remove(&gone.key);
                    }
                    (None, None) => {}
                }
            }
            upstreams
        } else {
            let mut upstreams = HashMap::with_capacity(snapshot.clusters.len());
            for (key, spec) in &snapshot.clusters {
                let up = live(&snapshot, spec, prev.upstreams.get(key), &mut claimed);
                upstreams.insert(key.clone(), up);
            }
            upstreams
        };
        let mut claimed = HashSet::new();
        // Clusters of namespaces that see another DestinationRule: one live cluster per distinct
        // cluster of the snapshot (namespaces seeing the same rule share it).
        let mut shared: HashMap<*const Cluster, Upstream> = HashMap::new();
        let mut views: HashMap<String, View> = HashMap::new();
        for (ns, nv) in &snapshot.namespaces {
            let view = views.entry(ns.clone()).or_default();
            for (host, vh) in &nv.virtual_hosts {
                view.vhosts.insert(host.clone(), vh.clone());
            }
            for (host, clusters) in &nv.clusters {
                let mut live_clusters = HashMap::with_capacity(clusters.len());
                for (key, spec) in clusters {
                    let up = match shared.get(&Arc::as_ptr(spec)) {
                        Some(up) => up.clone(),
                        None => {
                            let before = prev
                                .views
                                .get(ns)
                                .and_then(|v| v.clusters.get(host))
                                .and_then(|c| c.get(key));
                            let up = live(&snapshot, spec, before, &mut claimed);
                            shared.insert(Arc::as_ptr(spec), up.clone());
                            up
                        }
                    };
                    live_clusters.insert(key.clone(), up);
                }
                view.clusters.insert(host.clone(), live_clusters);
            }
        }

        let same_services = same_entries(&old.services, &snapshot.services);
        let same_routes = same_services
            && same_entries(&old.virtual_hosts, &snapshot.virtual_hosts)
            && old.wildcard_hosts.len() == snapshot.wildcard_hosts.len()
            && old
                .wildcard_hosts
                .iter()
                .zip(&snapshot.wildcard_hosts)
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y))
            && old.namespaces.len() == snapshot.namespaces.len()
            && old
                .namespaces
                .iter()
                .zip(&snapshot.namespaces)
                .all(|((a, x), (b, y))| {
                    a == b
                        && x.virtual_hosts.len() == y.virtual_hosts.len()
                        && x.virtual_hosts
                            .iter()
                            .zip(&y.virtual_hosts)
                            .all(|((a, x), (b, y))| {
                                a == b
                                    && match (x, y) {
                                        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                                        (x, y) => x.is_none() && y.is_none(),
                                    }
                            })
                });
        let plans = if same_routes {
            prev.plans.clone()
        } else {
            Arc::new(plans_of(&snapshot))
        };
        let services = if same_services {
            prev.services.clone()
        } else {
            Arc::new(ServiceTables::of(&snapshot))
        };
        let sources = if same_entries(&old.workloads, &snapshot.workloads) {
            prev.sources.clone()
        } else {
            let mut sources = HashMap::new();
            for w in snapshot.workloads.values() {
                let source = SourceLabels::of(w, Interned::new(w.identity()));
                for ip in &w.ips {
                    sources.entry(*ip).or_insert_with(|| source.clone());
                }
            }
            Arc::new(sources)
        };
        let endpoints = endpoint_identities(&prev.endpoints, &changed, &snapshot);

        Self {
            snapshot,
            upstreams,
            plans,
            services,
            views,
            sources,
            endpoints,
        }
    }

    /// The live clusters only some namespaces use (their own DestinationRules'), each once; with
    /// [`State::upstreams`], every live cluster of the generation.
    pub fn namespace_upstreams(&self) -> impl Iterator<Item = (&ClusterKey, &Upstream)> {
        let mut seen = HashSet::new();
        self.views
            .values()
            .flat_map(|v| v.clusters.values().flatten())
            .filter(move |(_, up)| seen.insert(Arc::as_ptr(&up.name).cast::<u8>()))
    }

    /// The VirtualService routing `hostname` for a client whose namespace no object singles out,
    /// with its route plans per port. (HTTP routing uses [`State::routes`].)
    pub fn vhost(&self, hostname: &str) -> Option<(&Arc<VirtualHost>, &PortPlans)> {
        let vh = self.snapshot.virtual_host(hostname)?;
        let plans = self.plans.get(&vh.name)?;
        Some((vh, plans))
    }

    /// Istio's implicit route for port `port` of the Service `host` (when no VirtualService
    /// routes it).
    pub fn implicit_plan(&self, host: &str, port: u16) -> Option<&Arc<RoutePlan>> {
        self.services
            .implicit
            .get(host)?
            .iter()
            .find_map(|(p, plan)| (*p == port).then_some(plan))
    }
}

/// Whether two maps hold the very same values (by pointer) under the same keys.
fn same_entries<K: PartialEq, V>(a: &BTreeMap<K, Arc<V>>, b: &BTreeMap<K, Arc<V>>) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((ka, va), (kb, vb))| ka == kb && Arc::ptr_eq(va, vb))
}

/// Route plans per VirtualService and incoming port: the ports of every Service it routes for
/// some namespace.
fn plans_of(snapshot: &Snapshot) -> HashMap<String, PortPlans> {
    let generic = snapshot
        .services
        .values()
        .filter_map(|svc| Some((snapshot.virtual_host(&svc.hostname)?, svc)));
    let by_namespace = snapshot.namespaces.values().flat_map(|nv| {
        nv.virtual_hosts
            .iter()
            .filter_map(|(host, vh)| Some((vh.as_ref()?, snapshot.services.get(host)?)))
    });
    let mut routed: HashMap<&str, (&Arc<VirtualHost>, BTreeSet<u16>)> = HashMap::new();
    for (vh, svc) in generic.chain(by_namespace) {
        let entry = routed
            .entry(vh.name.as_str())
            .or_insert_with(|| (vh, BTreeSet::new()));
        entry.1.extend(svc.ports.iter().map(|p| p.port));
    }
    routed
        .into_iter()
        .map(|(name, (vh, ports))| (name.to_string(), compile(vh, &ports)))
        .collect()
}

impl ServiceTables {
    fn of(snapshot: &Snapshot) -> Self {
        let mut t = Self::default();
        for svc in snapshot.services.values() {
            t.labels.insert(
                svc.hostname.clone(),
                ServiceName::new(&svc.hostname, &svc.name, &svc.namespace),
            );
            if svc.export_to != ServiceExportTo::Public {
                t.restricted.insert(svc.hostname.clone(), svc.clone());
            }
            let plans: &mut Vec<_> = t.implicit.entry(svc.hostname.clone()).or_default();
            for port in &svc.ports {
                plans.push((port.port, Arc::new(RoutePlan::implicit(svc, port.port))));
                // The first Service by host name wins a shared address, as Snapshot::service_by_vip.
                for ip in &svc.cluster_ips {
                    t.vips
                        .entry((*ip, port.port))
                        .or_insert_with(|| svc.clone());
                }
            }
        }
        t
    }
}

/// The clusters of `new` that are not the very ones of `old` (by pointer), with what they
/// replace, and those of `old` that are gone: one merge of the two sorted maps.
type ClusterChange<'a> = (Option<&'a Arc<Cluster>>, Option<&'a Arc<Cluster>>);

fn changed_clusters<'a>(old: &'a Snapshot, new: &'a Snapshot) -> Vec<ClusterChange<'a>> {
    let mut changed = Vec::new();
    let (mut a, mut b) = (
        old.clusters.iter().peekable(),
        new.clusters.iter().peekable(),
    );
    loop {
        let order = match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some((ka, _)), Some((kb, _))) => ka.cmp(kb),
        };
        match order {
            std::cmp::Ordering::Equal => {
                if let (Some((_, va)), Some((_, vb))) = (a.next(), b.next()) {
                    if !Arc::ptr_eq(va, vb) {
                        changed.push((Some(va), Some(vb)));
                    }
                }
            }
            std::cmp::Ordering::Less => changed.extend(a.next().map(|(_, va)| (Some(va), None))),
            std::cmp::Ordering::Greater => changed.extend(b.next().map(|(_, vb)| (None, Some(vb)))),
        }
    }
    changed
}

/// Who each endpoint of `new`'s clusters is. Made from `prev` (the previous generation's table)
/// when few clusters `changed`, counting each cluster that lists an address in or out; else made
/// anew. Either way an address's identity is interned once per pod (endpoints of one pod share
/// their `Identity`), not once per endpoint.
fn endpoint_identities(
    prev: &Arc<HashMap<std::net::SocketAddr, (Peer, u32)>>,
    changed: &[ClusterChange<'_>],
    new: &Snapshot,
) -> Arc<HashMap<std::net::SocketAddr, (Peer, u32)>> {
    if changed.is_empty() {
        return prev.clone();
    }
    // One interned identity per pod (its endpoints share one `Arc<Identity>`).
    let mut interned: HashMap<*const Identity, Peer> = HashMap::new();
    let mut add = |table: &mut HashMap<std::net::SocketAddr, (Peer, u32)>, c: &Cluster| {
        for ep in &c.endpoints {
            if let Some(id) = &ep.identity {
                let p = interned
                    .entry(Arc::as_ptr(id))
                    .or_insert_with(|| Interned::new(Identity::clone(id)))
                    .clone();
                let e = table.entry(ep.addr).or_insert_with(|| (p.clone(), 0));
                e.0 = p;
                e.1 += 1;
            }
        }
    };
    // Patching costs a copy of the table; past a quarter of the clusters, making it anew is as
    // cheap.
    if changed.len() > new.clusters.len() / 4 {
        let mut table = HashMap::new();
        for c in new.clusters.values() {
            add(&mut table, c);
        }
        return Arc::new(table);
    }
    let mut table = HashMap::clone(prev);
    for &(before, after) in changed {
        for ep in before.into_iter().flat_map(|c| &c.endpoints) {
            if ep.identity.is_none() {
                continue;
            }
            if let std::collections::hash_map::Entry::Occupied(mut e) = table.entry(ep.addr) {
                e.get_mut().1 -= 1;
                if e.get().1 == 0 {
                    e.remove();
                }
            }
        }
        if let Some(c) = after {
            add(&mut table, c);
        }
    }
    Arc::new(table)
}

/// A VirtualService's route plans for requests on each of `ports`.
fn compile(vh: &VirtualHost, ports: &BTreeSet<u16>) -> PortPlans {
    let per_port = vh
        .routes
        .iter()
        .any(|r| r.destinations.iter().any(|d| d.takes_incoming_port()));
    let plans = |port: u16| -> Arc<[Arc<RoutePlan>]> {
        vh.routes
            .iter()
            .map(|r| Arc::new(RoutePlan::compile(&vh.name, r, port)))
            .collect()
    };
    if per_port {
        PortPlans::ByPort(ports.iter().map(|&p| (p, plans(p))).collect())
    } else {
        PortPlans::Any(plans(sluice_policy::INCOMING_PORT))
    }
}

/// The live cluster for `spec`: `before` (the previous generation's for the same key, unless
/// already claimed) kept, or updated when its policy changed, else a new one.
fn live(
    snapshot: &Snapshot,
    spec: &Arc<Cluster>,
    before: Option<&Upstream>,
    claimed: &mut HashSet<*const u8>,
) -> Upstream {
    let before = before.filter(|up| claimed.insert(Arc::as_ptr(&up.name).cast::<u8>()));
    match before {
        Some(up) if Arc::ptr_eq(&up.spec, spec) || *up.spec == **spec => up.clone(),
        Some(up) => {
            up.handle.update(spec.clone());
            Upstream {
                name: up.name.clone(),
                spec: spec.clone(),
                note: crate::notes::cluster_note(&up.name, spec),
                handle: up.handle.clone(),
                retry_budget: if up.spec.policy.connection_pool.max_retries
                    == spec.policy.connection_pool.max_retries
                    && up.spec.policy.retry_budget == spec.policy.retry_budget
                {
                    up.retry_budget.clone()
                } else {
                    retry_budget(spec, &up.handle)
                },
            }
        }
        None => {
            let handle = sluice_upstream::Cluster::new(spec.clone(), protocol_of(snapshot, spec));
            let name = Arc::from(spec.key.to_string());
            let up = Upstream {
                note: crate::notes::cluster_note(&name, spec),
                name,
                spec: spec.clone(),
                retry_budget: retry_budget(spec, &handle),
                handle,
            };
            claimed.insert(Arc::as_ptr(&up.name).cast::<u8>());
            up
        }
    }
}

/// HTTP/2 to the upstream when the service port says so (`appProtocol`/port name `http2`, `grpc`,
/// `h2c`) or the DestinationRule asks for an upgrade; HTTP/1.1 otherwise, as Istio decides.
fn protocol_of(snapshot: &Snapshot, spec: &Cluster) -> UpstreamProtocol {
    let key = &spec.key;
    let port_proto = snapshot
        .services
        .get(&key.host)
        .and_then(|s| s.ports.iter().find(|p| p.port == key.port))
        .and_then(|p| p.app_protocol.as_deref())
        .unwrap_or("");
    let h2_port = ["http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c"]
        .iter()
        .any(|p| port_proto.eq_ignore_ascii_case(p));
    let upgrade = spec.policy.connection_pool.h2_upgrade == sluice_policy::H2UpgradePolicy::Upgrade;
    if h2_port || upgrade {
        UpstreamProtocol::H2c
    } else {
        UpstreamProtocol::Http1
    }
}

/// The cluster's retry limit: its `retryBudget` (a share of its active and pending requests) when
/// the DestinationRule has one, else `maxRetries`, as Envoy's circuit breakers choose.
fn retry_budget(spec: &sluice_policy::Cluster, handle: &ClusterHandle) -> Arc<RetryBudget> {
    Arc::new(match spec.policy.retry_budget {
        None => RetryBudget::new(spec.policy.connection_pool.max_retries),
        Some(b) => {
            let handle = handle.clone();
            RetryBudget::with_budget(
                b.percent,
                b.min_retry_concurrency,
                Arc::new(move || handle.requests_active_and_pending()),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::{NamespaceView, RetryPolicy, ServicePort, TrafficPolicy, INCOMING_PORT};
    use std::collections::BTreeMap;

    const HOST: &str = "pricing.default.svc.cluster.local";

    fn key(port: u16) -> ClusterKey {
        ClusterKey {
            host: HOST.into(),
            port,
            subset: None,
        }
    }

    fn cluster(port: u16, max_connections: u32) -> Arc<Cluster> {
        let mut policy = TrafficPolicy::default();
        policy.connection_pool.max_connections = max_connections;
        Arc::new(Cluster {
            key: key(port),
            endpoints: vec![],
            policy,
            destination_rule: None,
            subset_labels: Default::default(),
        })
    }

    fn vhost(name: &str, port: u16) -> Arc<VirtualHost> {
        Arc::new(VirtualHost {
            name: name.into(),
            routes: vec![Route {
                name: name.into(),
                matches: vec![],
                destinations: vec![WeightedDestination {
                    cluster: key(port),
                    weight: 100,
                }],
                timeout: None,
                retry: RetryPolicy::istio_default(),
                fault: None,
                direct_response: None,
                response_headers: None,
            }],
            tcp_routes: vec![],
        })
    }

    /// `pricing` on ports 80 and 8080, routed by a VirtualService without destination port; the
    /// namespace `shop` sees its own VirtualService (to port 80) and DestinationRule.
    fn snapshot(shop_limit: u32) -> Snapshot {
        let mut snap = Snapshot::default();
        snap.services.insert(
            HOST.into(),
            Arc::new(Service {
                name: "pricing".into(),
                namespace: "default".into(),
                hostname: HOST.into(),
                cluster_ips: vec![],
                ports: [80, 8080]
                    .map(|port| ServicePort {
                        name: None,
                        port,
                        app_protocol: None,
                    })
                    .to_vec(),
                export_to: ServiceExportTo::Public,
            }),
        );
        for port in [80, 8080] {
            snap.clusters.insert(key(port), cluster(port, 1));
        }
        snap.virtual_hosts
            .insert(HOST.into(), vhost("default/all", INCOMING_PORT));
        let shop = NamespaceView {
            virtual_hosts: BTreeMap::from([(HOST.to_string(), Some(vhost("shop/own", 80)))]),
            clusters: BTreeMap::from([(
                HOST.to_string(),
                [80, 8080]
                    .map(|p| (key(p), cluster(p, shop_limit)))
                    .into_iter()
                    .collect(),
            )]),
        };
        snap.namespaces.insert("shop".into(), shop);
        snap
    }

    fn cluster_of(state: &State, ns: &str, port: u16) -> (String, ClusterKey, u32) {
        let viewer = state.viewer(ns);
        let (vh, plans) = state.routes(viewer, HOST, port).unwrap();
        let dest = plans[0].destinations[0].cluster.clone();
        let up = state.upstream(viewer, &dest).unwrap();
        (
            vh.name.clone(),
            dest,
            up.spec.policy.connection_pool.max_connections,
        )
    }

    #[test]
    fn a_destination_without_port_goes_to_the_incoming_port() {
        let state = State::next(&State::empty(), Arc::new(snapshot(7)));
        assert_eq!(
            cluster_of(&state, "web", 80),
            ("default/all".into(), key(80), 1)
        );
        assert_eq!(
            cluster_of(&state, "web", 8080),
            ("default/all".into(), key(8080), 1)
        );
        // A port the routed Service lacks has no plan.
        assert!(state.routes(state.viewer("web"), HOST, 9999).is_none());
    }

    #[test]
    fn a_namespace_sees_its_own_virtual_service_and_clusters() {
        let state = State::next(&State::empty(), Arc::new(snapshot(7)));
        assert_eq!(
            cluster_of(&state, "shop", 8080),
            ("shop/own".into(), key(80), 7)
        );
        // Two live clusters for one key: shop's pools and breakers are its own.
        let web = state.upstream(state.viewer("web"), &key(80)).unwrap();
        let shop = state.upstream(state.viewer("shop"), &key(80)).unwrap();
        assert!(!Arc::ptr_eq(&web.name, &shop.name));
        let own: Vec<ClusterKey> = state
            .namespace_upstreams()
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(own.len(), 2);
        assert_eq!(
            own.into_iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([key(80), key(8080)])
        );
    }

    #[test]
    fn live_clusters_of_a_namespace_survive_a_reload() {
        let first = State::next(&State::empty(), Arc::new(snapshot(7)));
        let second = State::next(&first, Arc::new(snapshot(9)));
        let before = first.upstream(first.viewer("shop"), &key(80)).unwrap();
        let after = second.upstream(second.viewer("shop"), &key(80)).unwrap();
        assert!(Arc::ptr_eq(&before.name, &after.name), "same live cluster");
        assert_eq!(after.spec.policy.connection_pool.max_connections, 9);
        let generic = second.upstream(second.viewer("web"), &key(80)).unwrap();
        assert!(Arc::ptr_eq(&first.upstreams[&key(80)].name, &generic.name));
    }

    #[test]
    fn a_service_is_hidden_from_namespaces_it_is_not_exported_to() {
        let mut snap = snapshot(7);
        let mut svc = (*snap.services[HOST]).clone();
        svc.export_to = ServiceExportTo::Namespaces(vec!["shop".into()]);
        snap.services.insert(HOST.into(), Arc::new(svc));
        let state = State::next(&State::empty(), Arc::new(snap));
        assert!(state.sees(state.viewer("shop"), HOST));
        assert!(!state.sees(state.viewer("web"), HOST));
        assert!(state.upstream(state.viewer("web"), &key(80)).is_none());
        assert!(state.upstream(state.viewer("shop"), &key(80)).is_some());
    }

    fn endpoint(last: u8, pod: &str) -> sluice_policy::Endpoint {
        sluice_policy::Endpoint {
            addr: std::net::SocketAddr::from(([10, 1, 0, last], 9080)),
            pod: Some(format!("default/{pod}")),
            labels: BTreeMap::new(),
            identity: Some(Arc::new(Identity::of_pod(
                pod,
                "default",
                &BTreeMap::new(),
                None,
            ))),
        }
    }

    fn with_endpoints(snap: &Snapshot, port: u16, eps: Vec<sluice_policy::Endpoint>) -> Snapshot {
        let mut next = snap.clone();
        let old = &snap.clusters[&key(port)];
        next.clusters.insert(
            key(port),
            Arc::new(Cluster {
                endpoints: eps,
                ..Cluster::clone(old)
            }),
        );
        next
    }

    #[test]
    fn an_endpoint_change_redoes_only_what_it_touches() {
        let mut base = snapshot(7);
        // Enough other clusters that one change is patched into the table, not a new one made.
        for port in 9001..9007 {
            base.clusters.insert(key(port), cluster(port, 1));
        }
        let one = with_endpoints(&base, 80, vec![endpoint(1, "a"), endpoint(2, "b")]);
        let both = with_endpoints(&one, 8080, vec![endpoint(2, "b"), endpoint(3, "c")]);
        let first = State::next(&State::empty(), Arc::new(both.clone()));
        let addr = |last: u8| std::net::SocketAddr::from(([10, 1, 0, last], 9080));
        let who = |s: &State, last: u8| s.endpoint_identity(addr(last)).map(|p| p.workload.clone());
        assert_eq!(who(&first, 2).as_deref(), Some("b"));

        // `b` leaves port 80 but stays on 8080; `a` leaves; `d` comes.
        let changed = with_endpoints(&both, 80, vec![endpoint(4, "d")]);
        let next = State::next(&first, Arc::new(changed.clone()));
        assert_eq!(who(&next, 1), None, "a is gone");
        assert_eq!(
            who(&next, 2).as_deref(),
            Some("b"),
            "still listed by port 8080"
        );
        assert_eq!(who(&next, 4).as_deref(), Some("d"));
        // The same table a generation made from nothing has.
        let fresh = State::next(&State::empty(), Arc::new(changed));
        let mut a: Vec<_> = next.endpoints.iter().map(|(k, v)| (*k, v.1)).collect();
        let mut b: Vec<_> = fresh.endpoints.iter().map(|(k, v)| (*k, v.1)).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        // What the endpoints do not feed is shared, not made again.
        assert!(Arc::ptr_eq(&next.plans, &first.plans));
        assert!(Arc::ptr_eq(&next.services, &first.services));
        assert!(Arc::ptr_eq(&next.sources, &first.sources));
        assert!(Arc::ptr_eq(
            &next.upstreams[&key(8080)].spec,
            &first.upstreams[&key(8080)].spec
        ));
    }
}
