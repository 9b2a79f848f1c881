//! One generation of what the proxy runs: the checked snapshot, the live clusters it names, and each
//! route's resilience plan. Swapped atomically on reload; a request loads it once and keeps it, so a
//! request finishes under the policy it started with while new requests see the new one.

use crate::direct::{DirectReply, ResponseHeaders};
use sluice_policy::{
    Cluster, ClusterKey, Fault, RetryPolicy, Route, Service, Snapshot, VirtualHost,
    WeightedDestination,
};
use sluice_resilience::RetryBudget;
use sluice_upstream::{ClusterHandle, UpstreamProtocol};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// A live cluster: its connection pools and outlier state, and its `maxRetries` budget.
#[derive(Clone)]
pub struct Upstream {
    /// Envoy's name for it (`outbound|80||pricing.default.svc.cluster.local`), made once.
    pub name: Arc<str>,
    pub spec: Arc<Cluster>,
    pub handle: ClusterHandle,
    pub retry_budget: Arc<RetryBudget>,
}

/// A route compiled for the hot path: the layers' settings are shared, not rebuilt per request.
pub struct RoutePlan {
    pub name: String,
    pub destinations: Vec<WeightedDestination>,
    pub timeout: Option<Duration>,
    pub retry: Arc<RetryPolicy>,
    pub per_try_timeout: Option<Duration>,
    pub fault: Option<Arc<Fault>>,
    /// `directResponse`, prebuilt: the proxy answers, no destination is used.
    pub(crate) direct: Option<Arc<DirectReply>>,
    /// `headers.response`, applied to the route's responses (already in `direct`'s headers).
    pub(crate) response_headers: Option<Arc<ResponseHeaders>>,
}

impl RoutePlan {
    fn compile(route: &Route) -> Self {
        let response_headers = route
            .response_headers
            .as_ref()
            .map(|ops| Arc::new(ResponseHeaders::compile(ops)));
        Self {
            name: route.name.clone(),
            destinations: route.destinations.clone(),
            timeout: route.timeout,
            per_try_timeout: route.retry.per_try_timeout,
            retry: Arc::new(route.retry.clone()),
            fault: route.fault.clone().map(Arc::new),
            direct: route
                .direct_response
                .as_ref()
                .map(|d| Arc::new(DirectReply::new(d, response_headers.as_deref()))),
            response_headers,
        }
    }

    /// Istio's implicit route for a service with no VirtualService: everything to the service port,
    /// no timeout, the default retry policy.
    fn implicit(service: &Service, port: u16) -> Self {
        Self {
            name: "default".into(),
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
        }
    }
}

/// Everything one request needs, consistent with one config generation.
pub struct State {
    pub snapshot: Arc<Snapshot>,
    pub upstreams: HashMap<ClusterKey, Upstream>,
    /// Compiled routes by VirtualHost name (`namespace/name` of the VirtualService).
    plans: HashMap<String, Vec<Arc<RoutePlan>>>,
    /// Implicit routes by cluster key (service port without VirtualService).
    implicit: HashMap<ClusterKey, Arc<RoutePlan>>,
    /// Istio metric labels per destination service, made once per generation.
    pub(crate) labels: HashMap<String, ServiceLabels>,
    /// Services by cluster IP and service port, for redirected connections (one hash lookup per
    /// request instead of a scan of every Service).
    vips: HashMap<(IpAddr, u16), Arc<Service>>,
    /// Known pods by IP: who a client is (metrics' `source_workload`, the namespace its short host
    /// names resolve in).
    sources: HashMap<IpAddr, SourceLabels>,
}

/// A client pod's identity as Istio's `source_workload` / `source_workload_namespace` labels.
#[derive(Clone, Debug)]
pub(crate) struct SourceLabels {
    pub workload: Arc<String>,
    pub namespace: Arc<String>,
    /// The pod itself (its labels and namespace feed `tcp[].match` source conditions).
    pub pod: Arc<sluice_policy::Workload>,
}

impl SourceLabels {
    /// The workload name of a pod: Istio takes its owner (the Deployment); standalone Pod objects
    /// carry no owner, so the canonical-name labels stand in (`service.istio.io/canonical-name`,
    /// `app.kubernetes.io/name`, `app`), else the pod's name.
    fn of(w: &Arc<sluice_policy::Workload>) -> Self {
        let name = [
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ]
        .iter()
        .find_map(|k| w.labels.get(*k))
        .unwrap_or(&w.name);
        SourceLabels {
            workload: Arc::new(name.clone()),
            namespace: Arc::new(w.namespace.clone()),
            pod: w.clone(),
        }
    }
}

/// A service's metric label values, shared by every sample of every request to it.
#[derive(Clone)]
pub(crate) struct ServiceLabels {
    pub hostname: Arc<String>,
    pub name: Arc<String>,
    pub namespace: Arc<String>,
}

impl State {
    pub fn empty() -> Self {
        Self {
            snapshot: Arc::new(Snapshot::default()),
            upstreams: HashMap::new(),
            plans: HashMap::new(),
            implicit: HashMap::new(),
            labels: HashMap::new(),
            vips: HashMap::new(),
            sources: HashMap::new(),
        }
    }

    /// The known pod with address `ip`, if any.
    pub(crate) fn source(&self, ip: IpAddr) -> Option<&SourceLabels> {
        self.sources.get(&ip)
    }

    /// The Service whose cluster IP is `ip`, exposing `port`.
    pub fn service_by_vip(&self, ip: IpAddr, port: u16) -> Option<&Arc<Service>> {
        self.vips.get(&(ip, port))
    }

    /// Builds the next generation from `snapshot`, reusing the live clusters of `prev` so connection
    /// pools and outlier state survive a reload.
    pub fn next(prev: &State, snapshot: Arc<Snapshot>) -> Self {
        let mut upstreams = HashMap::with_capacity(snapshot.clusters.len());
        for (key, spec) in &snapshot.clusters {
            let upstream = match prev.upstreams.get(key) {
                Some(up) if Arc::ptr_eq(&up.spec, spec) || *up.spec == **spec => up.clone(),
                Some(up) => {
                    up.handle.update(spec.clone());
                    Upstream {
                        name: up.name.clone(),
                        spec: spec.clone(),
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
                    let handle =
                        sluice_upstream::Cluster::new(spec.clone(), protocol_of(&snapshot, key));
                    Upstream {
                        name: Arc::from(key.to_string()),
                        spec: spec.clone(),
                        retry_budget: retry_budget(spec, &handle),
                        handle,
                    }
                }
            };
            upstreams.insert(key.clone(), upstream);
        }

        let mut plans = HashMap::new();
        let vhosts = snapshot
            .virtual_hosts
            .values()
            .chain(snapshot.wildcard_hosts.iter().map(|(_, vh)| vh));
        for vh in vhosts {
            plans.entry(vh.name.clone()).or_insert_with(|| {
                vh.routes
                    .iter()
                    .map(|r| Arc::new(RoutePlan::compile(r)))
                    .collect()
            });
        }

        let mut implicit = HashMap::new();
        let mut labels = HashMap::new();
        let mut vips = HashMap::new();
        for svc in snapshot.services.values() {
            labels.insert(
                svc.hostname.clone(),
                ServiceLabels {
                    hostname: Arc::new(svc.hostname.clone()),
                    name: Arc::new(svc.name.clone()),
                    namespace: Arc::new(svc.namespace.clone()),
                },
            );
            for port in &svc.ports {
                let plan = RoutePlan::implicit(svc, port.port);
                implicit.insert(plan.destinations[0].cluster.clone(), Arc::new(plan));
                // The first Service by host name wins a shared address, as Snapshot::service_by_vip.
                for ip in &svc.cluster_ips {
                    vips.entry((*ip, port.port)).or_insert_with(|| svc.clone());
                }
            }
        }

        let mut sources = HashMap::new();
        for w in snapshot.workloads.values() {
            let source = SourceLabels::of(w);
            for ip in &w.ips {
                sources.entry(*ip).or_insert_with(|| source.clone());
            }
        }

        Self {
            snapshot,
            upstreams,
            plans,
            implicit,
            labels,
            vips,
            sources,
        }
    }

    /// The route plans for a destination service: its VirtualService's routes, if any.
    pub fn vhost(&self, hostname: &str) -> Option<(&Arc<VirtualHost>, &[Arc<RoutePlan>])> {
        let vh = self.snapshot.virtual_host(hostname)?;
        let plans = self.plans.get(&vh.name)?;
        Some((vh, plans))
    }

    pub fn implicit_plan(&self, key: &ClusterKey) -> Option<&Arc<RoutePlan>> {
        self.implicit.get(key)
    }
}

/// HTTP/2 to the upstream when the service port says so (`appProtocol`/port name `http2`, `grpc`,
/// `h2c`) or the DestinationRule asks for an upgrade; HTTP/1.1 otherwise, as Istio decides.
fn protocol_of(snapshot: &Snapshot, key: &ClusterKey) -> UpstreamProtocol {
    let port_proto = snapshot
        .services
        .get(&key.host)
        .and_then(|s| s.ports.iter().find(|p| p.port == key.port))
        .and_then(|p| p.app_protocol.as_deref())
        .unwrap_or("");
    let h2_port = ["http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c"]
        .iter()
        .any(|p| port_proto.eq_ignore_ascii_case(p));
    let upgrade = snapshot.clusters.get(key).is_some_and(|c| {
        c.policy.connection_pool.h2_upgrade == sluice_policy::H2UpgradePolicy::Upgrade
    });
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
