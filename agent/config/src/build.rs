//! Assembly: the service registry (Services, EndpointSlices or selector-matched Pods, enrollment),
//! DestinationRules merged per host, clusters per service port and subset, VirtualServices bound
//! to clusters, and what each client namespace sees of them (`views`). Only cross-object problems
//! are found here, and they are warnings: a route to an unknown host or subset is accepted (Istio
//! answers 503 NC at run time).

use crate::dr::{self, CheckedDr};
use crate::k8s::{
    pod_controller, EndpointSlice, IntOrString, Pod, PodFacts, PodIndex, ServiceSpec,
};
use crate::parse::{Object, Resource};
use crate::problem::{ignored_duplicate, Problem, Sink};
use crate::views::{self, DrIndex, DrPolicy, VsIndex};
use crate::vs::{self, CheckedVs};
use crate::BuildOptions;
use sluice_policy::{
    Cluster, ClusterKey, Endpoint, Identity, L4Match, NamespaceView, Route, Service,
    ServiceExportTo, ServicePort, Snapshot, TcpRoute, VirtualHost, WeightedDestination, Workload,
    INCOMING_PORT,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// Annotation naming a pod's network namespace (standalone mode), e.g. `/var/run/netns/pricing-1`.
pub const NETNS_ANNOTATION: &str = "sluice.io/netns";
/// Annotation naming a pod's cgroup v2 directory (standalone mode).
pub const CGROUP_ANNOTATION: &str = "sluice.io/cgroup";
pub(crate) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The per-object result of checking: a converted Istio object, or nothing to convert.
#[derive(Clone, Debug)]
pub(crate) enum Checked {
    Vs(CheckedVs),
    // Boxed: a DestinationRule's checked policy is several times the size of the rest.
    Dr(Box<CheckedDr>),
    Other,
}

pub(crate) fn check(obj: &Object, opts: &BuildOptions) -> (Option<Checked>, Vec<Problem>) {
    let mut sink = Sink::new(&obj.origin, Some(obj.describe()));
    let checked = match &obj.resource {
        Resource::VirtualService(v) => Checked::Vs(vs::convert(v, &mut sink, opts)),
        Resource::DestinationRule(d) => Checked::Dr(Box::new(dr::convert(d, &mut sink, opts))),
        _ => Checked::Other,
    };
    let ok = !sink.has_errors();
    (ok.then_some(checked), sink.problems)
}

/// Checks one object on its own (no other object is needed): its errors and warnings.
pub fn check_object(obj: &Object, opts: &BuildOptions) -> Vec<Problem> {
    check(obj, opts).1
}

/// Istio's order for conflicting resources: creation time, then name, then namespace.
fn istio_order(
    a: (&Option<String>, &str, &str),
    b: (&Option<String>, &str, &str),
) -> std::cmp::Ordering {
    a.0.as_deref()
        .unwrap_or("")
        .cmp(b.0.as_deref().unwrap_or(""))
        .then(a.1.cmp(b.1))
        .then(a.2.cmp(b.2))
}

fn warn_at(problems: &mut Vec<Problem>, obj: &Object, field: &str, reason: String) {
    let mut sink = Sink::new(&obj.origin, Some(obj.describe()));
    sink.warn(field, reason);
    problems.extend(sink.problems);
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A pod an endpoint names: a full Pod (this node's in Kubernetes mode, any in standalone mode),
/// or what Kubernetes mode keeps of any node's pod (its namespace, name and facts).
#[derive(Clone, Copy)]
enum PodRef<'a> {
    Full(&'a Pod),
    Meta(&'a str, &'a str, &'a PodFacts),
}

impl<'a> PodRef<'a> {
    /// Namespace and name.
    fn key(self) -> (&'a str, &'a str) {
        match self {
            PodRef::Full(p) => (p.metadata.namespace(), p.metadata.name.as_str()),
            PodRef::Meta(ns, name, _) => (ns, name),
        }
    }

    /// Its labels, as an endpoint carries them (subsets select on them).
    fn labels(self) -> BTreeMap<String, String> {
        match self {
            PodRef::Full(p) => p.metadata.labels.clone(),
            PodRef::Meta(_, _, f) => f.labels.iter().cloned().collect(),
        }
    }

    /// Its telemetry identity: one per pod and snapshot, shared by all its endpoints. A pod known
    /// both ways gets the same one (the same metadata, read by the same rule).
    fn identity(self, cache: &mut HashMap<(&'a str, &'a str), Arc<Identity>>) -> Arc<Identity> {
        cache
            .entry(self.key())
            .or_insert_with(|| {
                let (ns, name) = self.key();
                Arc::new(match self {
                    PodRef::Full(p) => Identity::of_pod(
                        name,
                        ns,
                        &p.metadata.labels,
                        pod_controller(&p.metadata).as_ref(),
                    ),
                    PodRef::Meta(_, _, f) => {
                        Identity::of_pod_with(name, ns, |k| f.label(k), f.owner.as_ref())
                    }
                })
            })
            .clone()
    }

    /// The endpoint at `addr` of this pod.
    fn endpoint(
        self,
        addr: SocketAddr,
        cache: &mut HashMap<(&'a str, &'a str), Arc<Identity>>,
    ) -> Endpoint {
        let (ns, name) = self.key();
        Endpoint {
            addr,
            pod: Some(format!("{ns}/{name}")),
            labels: self.labels(),
            identity: Some(self.identity(cache)),
        }
    }
}

/// The pods endpoints can name: the full Pods by namespace and name, and any node's Pod metadata.
struct PodLookup<'a> {
    pods: &'a BTreeMap<(&'a str, &'a str), (&'a Object, &'a Pod)>,
    metas: &'a PodIndex,
}

impl<'a> PodLookup<'a> {
    /// The pod an EndpointSlice endpoint names (`targetRef`): the full Pod when known, else its
    /// metadata.
    fn named(&self, namespace: &str, name: &str) -> Option<PodRef<'a>> {
        self.pods
            .get(&(namespace, name))
            .map(|(_, p)| PodRef::Full(p))
            .or_else(|| {
                let (ns, names) = self.metas.get_key_value(namespace)?;
                let (name, facts) = names.get_key_value(name)?;
                Some(PodRef::Meta(ns, name, facts))
            })
    }

    /// A full Pod of `namespace` with address `ip` (for a hand-made slice without `targetRef`).
    fn with_ip(&self, namespace: &str, ip: IpAddr) -> Option<PodRef<'a>> {
        self.pods
            .values()
            .find(|(_, p)| p.metadata.namespace() == namespace && pod_ips(p).contains(&ip))
            .map(|(_, p)| PodRef::Full(p))
    }
}

/// A Service port's endpoints from the Service's EndpointSlices (`slices`, of namespace `ns`):
/// the ready addresses of each slice's port named `want` (empty for an unnamed port), sorted by
/// address, each once.
fn slice_endpoints<'a>(
    ns: &str,
    want: &str,
    slices: &[&'a EndpointSlice],
    lookup: &PodLookup<'a>,
    identities: &mut HashMap<(&'a str, &'a str), Arc<Identity>>,
) -> Vec<Endpoint> {
    let mut eps = Vec::new();
    for slice in slices {
        let Some(sp) = slice
            .ports
            .iter()
            .find(|sp| sp.name.as_deref().unwrap_or_default() == want)
        else {
            continue;
        };
        let Some(target) = sp.port.and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        for ep in &slice.endpoints {
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref().unwrap_or("Pod") == "Pod")
                    .and_then(|r| {
                        let pns = r.namespace.as_deref().unwrap_or(slice.metadata.namespace());
                        lookup.named(pns, r.name.as_deref().unwrap_or_default())
                    })
                    .or_else(|| lookup.with_ip(ns, ip));
                let addr = SocketAddr::new(ip, target);
                eps.push(match pod {
                    Some(pod) => pod.endpoint(addr, identities),
                    None => Endpoint {
                        addr,
                        pod: None,
                        labels: BTreeMap::new(),
                        identity: None,
                    },
                });
            }
        }
    }
    eps.sort_by_key(|e| e.addr);
    eps.dedup_by(|a, b| a.addr == b.addr);
    eps
}

/// An endpoint-only change, without a full build: `prev` with the clusters of the Services
/// `changed` (namespace, name) given their endpoints again from their EndpointSlices, every other
/// part shared with `prev` (so the proxy keeps what it built from them). `objects` are the good
/// objects the endpoints come from: those Services, their slices and the full Pods.
///
/// `None` when one of them has no slice and a selector: its endpoints come from the pods it
/// selects, which a full build checks (and may warn about).
pub(crate) fn reassign_endpoints<'a>(
    prev: &Snapshot,
    changed: &BTreeSet<(String, String)>,
    objects: impl IntoIterator<Item = &'a Object>,
    pod_metas: &'a PodIndex,
) -> Option<Snapshot> {
    let mut pods = BTreeMap::new();
    let mut selects = BTreeSet::new();
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for obj in objects {
        match &obj.resource {
            Resource::Pod(p) => {
                pods.insert((p.metadata.namespace(), p.metadata.name.as_str()), (obj, p));
            }
            Resource::Service(s) if s.spec.selector.as_ref().is_some_and(|s| !s.is_empty()) => {
                selects.insert((s.metadata.namespace(), s.metadata.name.as_str()));
            }
            Resource::EndpointSlice(s) => {
                if let Some(service) = s.metadata.labels.get(SERVICE_NAME_LABEL) {
                    slices
                        .entry((s.metadata.namespace(), service.as_str()))
                        .or_default()
                        .push(s);
                }
            }
            _ => {}
        }
    }
    let lookup = PodLookup {
        pods: &pods,
        metas: pod_metas,
    };
    let mut identities = HashMap::new();
    let mut snap = prev.clone();
    // Old cluster -> new, so that namespaces sharing a cluster keep sharing its successor.
    let mut renewed: HashMap<*const Cluster, Arc<Cluster>> = HashMap::new();
    for (ns, name) in changed {
        let key = (ns.as_str(), name.as_str());
        let mine = slices.get(&key).map_or(&[][..], Vec::as_slice);
        if mine.is_empty() && selects.contains(&key) {
            return None;
        }
        let hostname = format!("{name}.{ns}.svc.{}", prev.cluster_domain);
        let Some(svc) = prev.services.get(&hostname) else {
            continue;
        };
        let by_port: HashMap<u16, Vec<Endpoint>> = svc
            .ports
            .iter()
            .map(|p| {
                let want = p.name.as_deref().unwrap_or_default();
                let eps = slice_endpoints(ns, want, mine, &lookup, &mut identities);
                (p.port, eps)
            })
            .collect();
        let mut renew = |old: &Arc<Cluster>| -> Arc<Cluster> {
            renewed
                .entry(Arc::as_ptr(old))
                .or_insert_with(|| {
                    let endpoints: Vec<Endpoint> = by_port
                        .get(&old.key.port)
                        .into_iter()
                        .flatten()
                        .filter(|e| labels_match(&old.subset_labels, &e.labels))
                        .cloned()
                        .collect();
                    if endpoints == old.endpoints {
                        return old.clone();
                    }
                    Arc::new(Cluster {
                        key: old.key.clone(),
                        endpoints,
                        policy: old.policy.clone(),
                        destination_rule: old.destination_rule.clone(),
                        subset_labels: old.subset_labels.clone(),
                    })
                })
                .clone()
        };
        let first = ClusterKey {
            host: hostname.clone(),
            port: 0,
            subset: None,
        };
        for (_, cluster) in snap
            .clusters
            .range_mut(first..)
            .take_while(|(k, _)| k.host == hostname)
        {
            *cluster = renew(cluster);
        }
        for view in snap.namespaces.values_mut() {
            for cluster in view.clusters.get_mut(&hostname).into_iter().flatten() {
                *cluster.1 = renew(cluster.1);
            }
        }
    }
    Some(snap)
}

fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = pod
        .status
        .pod_ips
        .iter()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if let Some(ip) = pod.status.pod_ip.as_deref().and_then(|s| s.parse().ok()) {
        if !ips.contains(&ip) {
            ips.insert(0, ip);
        }
    }
    ips
}

/// Which of a selected pod's addresses become a Service's endpoints, as the EndpointSlice
/// controller decides: one slice per family of `spec.ipFamilies`, which the API server defaults to
/// the families of the cluster IPs; a headless Service without `ipFamilies` is single-stack in the
/// cluster's primary family (a pod's first address), unless its `ipFamilyPolicy` asks for dual
/// stack. So a single-stack Service over dual-stack pods gets one endpoint per pod, not two.
fn endpoint_ips(spec: &ServiceSpec, cluster_ips: &[IpAddr], pod: &Pod) -> Vec<IpAddr> {
    let ips = pod_ips(pod);
    let named: Vec<bool> = spec
        .ip_families
        .iter()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(true),
            "IPv6" => Some(false),
            _ => None,
        })
        .collect();
    let is_v4: Vec<bool> = if !named.is_empty() {
        named
    } else if !cluster_ips.is_empty() {
        cluster_ips.iter().map(IpAddr::is_ipv4).collect()
    } else if matches!(
        spec.ip_family_policy.as_deref(),
        Some("PreferDualStack" | "RequireDualStack")
    ) {
        return ips;
    } else {
        ips.first().map(IpAddr::is_ipv4).into_iter().collect()
    };
    ips.into_iter()
        .filter(|ip| is_v4.contains(&ip.is_ipv4()))
        .collect()
}

/// Converts parsed objects into a snapshot (generation 0). Objects with errors are left out; all
/// problems found are returned (and also recorded in the snapshot).
pub fn build(objects: &[Object], opts: &BuildOptions) -> (Snapshot, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut accepted = Vec::new();
    let mut seen: BTreeMap<_, crate::problem::Origin> = BTreeMap::new();
    let mut pod_metas = PodIndex::new();
    for obj in objects {
        if let Resource::PodMetadata(p) = &obj.resource {
            pod_metas
                .entry(p.metadata.namespace().to_string())
                .or_default()
                .insert(p.metadata.name.clone(), p.clone().facts());
            continue;
        }
        let id = obj.id();
        if let Some(first) = seen.get(&id) {
            problems.push(ignored_duplicate(&obj.origin, &id, first));
            continue;
        }
        seen.insert(id, obj.origin.clone());
        let (checked, found) = check(obj, opts);
        problems.extend(found);
        if let Some(checked) = checked {
            accepted.push((obj, checked));
        }
    }
    assemble(accepted, &pod_metas, problems, opts)
}

/// Builds a snapshot from objects already checked one by one (each exactly once, by [`check`]),
/// adding the cross-object problems to `problems`.
pub(crate) fn assemble<'a>(
    accepted: impl IntoIterator<Item = (&'a Object, Checked)>,
    pod_metas: &'a PodIndex,
    mut problems: Vec<Problem>,
    opts: &BuildOptions,
) -> (Snapshot, Vec<Problem>) {
    let mut vss: Vec<(&Object, CheckedVs)> = Vec::new();
    let mut drs: Vec<(&Object, CheckedDr)> = Vec::new();
    let mut namespaces: BTreeMap<String, &BTreeMap<String, String>> = BTreeMap::new();
    let mut pods: BTreeMap<(&str, &str), (&Object, &Pod)> = BTreeMap::new();
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for (obj, checked) in accepted {
        match (Some(checked), &obj.resource) {
            (None, _) => {}
            (Some(Checked::Vs(v)), _) => vss.push((obj, v)),
            (Some(Checked::Dr(d)), _) => drs.push((obj, *d)),
            (Some(Checked::Other), Resource::Namespace(n)) => {
                namespaces.insert(n.metadata.name.clone(), &n.metadata.labels);
            }
            (Some(Checked::Other), Resource::Pod(p)) => {
                pods.insert((p.metadata.namespace(), p.metadata.name.as_str()), (obj, p));
            }
            (Some(Checked::Other), Resource::Service(s)) => services.push((obj, s)),
            (Some(Checked::Other), Resource::EndpointSlice(s)) => slices.push(s),
            (Some(Checked::Other), _) => {}
        }
    }
    let mut snap = Snapshot {
        cluster_domain: opts.cluster_domain.clone(),
        ..Snapshot::default()
    };

    // Workloads and enrollment: the pod's own label wins (`none` opts out), else its namespace's.
    for (obj, pod) in pods.values() {
        let ns = pod.metadata.namespace();
        let own = pod.metadata.labels.get(&opts.enrollment_label);
        let enrolled = match own.map(String::as_str) {
            Some(v) if v == opts.enrollment_value => true,
            Some("none") => false,
            _ => namespaces
                .get(ns)
                .and_then(|l| l.get(&opts.enrollment_label))
                .is_some_and(|v| *v == opts.enrollment_value),
        };
        if pod
            .status
            .pod_ip
            .as_deref()
            .is_some_and(|s| s.parse::<IpAddr>().is_err())
        {
            warn_at(
                &mut problems,
                obj,
                "status.podIP",
                "not an IP address; ignored".to_string(),
            );
        }
        let annotation = |k: &str| pod.metadata.annotations.get(k).map(PathBuf::from);
        snap.workloads.insert(
            format!("{ns}/{}", pod.metadata.name),
            Arc::new(Workload {
                name: pod.metadata.name.clone(),
                namespace: ns.to_string(),
                ips: pod_ips(pod),
                labels: pod.metadata.labels.clone(),
                enrolled,
                netns: annotation(NETNS_ANNOTATION),
                cgroup: annotation(CGROUP_ANNOTATION),
                uid: pod.uid().map(str::to_string),
                qos_class: pod.status.qos_class.clone(),
                host_network: pod.spec.host_network.unwrap_or(false),
                phase: pod.status.phase.clone(),
                container_ids: pod
                    .status
                    .container_statuses
                    .iter()
                    .filter_map(|c| c.container_id.clone())
                    .filter(|id| !id.is_empty())
                    .collect(),
                owner: pod_controller(&pod.metadata),
            }),
        );
    }

    // Services and their endpoints per service port.
    let allocated = allocate_cluster_ips(&services);
    // Indexed once: a cluster has as many slices as Services, and each Service looks up its own.
    let mut slices_by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &slices {
        if let Some(service) = s.metadata.labels.get(SERVICE_NAME_LABEL) {
            slices_by_service
                .entry((s.metadata.namespace(), service.as_str()))
                .or_default()
                .push(s);
        }
    }
    let mut endpoints_by_port: BTreeMap<(String, u16), Vec<Endpoint>> = BTreeMap::new();
    let mut identities = HashMap::new();
    let lookup = PodLookup {
        pods: &pods,
        metas: pod_metas,
    };
    for (obj, svc) in &services {
        let ns = svc.metadata.namespace();
        let hostname = format!("{}.{ns}.svc.{}", svc.metadata.name, opts.cluster_domain);
        let mut ips: Vec<IpAddr> = Vec::new();
        let raw: Vec<&String> = if svc.spec.cluster_ips.is_empty() {
            svc.spec.cluster_ip.iter().collect()
        } else {
            svc.spec.cluster_ips.iter().collect()
        };
        if raw.is_empty() {
            // No clusterIP at all: the API server would allocate one.
            ips.extend(allocated.get(&(ns.to_string(), svc.metadata.name.clone())));
        }
        for ip in raw {
            if ip == "None" || ip.is_empty() {
                continue;
            }
            match ip.parse() {
                Ok(ip) => ips.push(ip),
                Err(_) => warn_at(
                    &mut problems,
                    obj,
                    "spec.clusterIP",
                    format!("{ip:?} is not an IP address; ignored"),
                ),
            }
        }
        let mut ports = Vec::new();
        let my_slices: &[_] = slices_by_service
            .get(&(ns, svc.metadata.name.as_str()))
            .map_or(&[], Vec::as_slice);
        for (i, p) in svc.spec.ports.iter().enumerate() {
            let Ok(port) = u16::try_from(p.port) else {
                warn_at(
                    &mut problems,
                    obj,
                    &format!("spec.ports[{i}].port"),
                    format!("port {} out of range; ignored", p.port),
                );
                continue;
            };
            let name = p.name.clone().filter(|n| !n.is_empty());
            let implied = name.as_deref().and_then(|n| {
                let proto = n.split('-').next().unwrap_or(n).to_ascii_lowercase();
                [
                    "http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "redis",
                    "mysql", "udp",
                ]
                .contains(&proto.as_str())
                .then_some(proto)
            });
            ports.push(ServicePort {
                name: name.clone(),
                port,
                app_protocol: p.app_protocol.clone().or(implied),
            });
            let mut eps = Vec::new();
            if !my_slices.is_empty() {
                let want = name.as_deref().unwrap_or_default();
                eps = slice_endpoints(ns, want, my_slices, &lookup, &mut identities);
            } else if let Some(selector) = svc.spec.selector.as_ref().filter(|s| !s.is_empty()) {
                // What the EndpointSlice controller would produce from matching pods.
                for (_, pod) in pods.values() {
                    if pod.metadata.namespace() != ns
                        || !labels_match(selector, &pod.metadata.labels)
                    {
                        continue;
                    }
                    if matches!(pod.status.phase.as_deref(), Some("Failed" | "Succeeded")) {
                        continue;
                    }
                    let target = match &p.target_port {
                        None => Some(port),
                        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                        Some(IntOrString::Str(s)) => match s.parse::<u16>() {
                            Ok(n) => Some(n),
                            Err(_) => pod
                                .spec
                                .containers
                                .iter()
                                .flat_map(|c| &c.ports)
                                .find(|cp| cp.name.as_deref() == Some(s))
                                .and_then(|cp| u16::try_from(cp.container_port).ok()),
                        },
                    };
                    let Some(target) = target else {
                        warn_at(&mut problems, obj, &format!("spec.ports[{i}].targetPort"), format!("pod {}/{} has no container port named {:?}; it gets no endpoint for this port", ns, pod.metadata.name, p.target_port));
                        continue;
                    };
                    for ip in endpoint_ips(&svc.spec, &ips, pod) {
                        eps.push(
                            PodRef::Full(pod)
                                .endpoint(SocketAddr::new(ip, target), &mut identities),
                        );
                    }
                }
            }
            eps.sort_by_key(|e| e.addr);
            eps.dedup_by(|a, b| a.addr == b.addr);
            endpoints_by_port.insert((hostname.clone(), port), eps);
        }
        if snap.services.contains_key(&hostname) {
            continue;
        }
        snap.services.insert(
            hostname.clone(),
            Arc::new(Service {
                name: svc.metadata.name.clone(),
                namespace: ns.to_string(),
                hostname,
                cluster_ips: ips,
                ports,
                export_to: service_export_to(&svc.metadata.annotations, ns),
            }),
        );
    }

    // DestinationRules, indexed per namespace and merged per host as Istio does (oldest first).
    drs.sort_by(|a, b| {
        istio_order(
            (&a.1.creation, &a.1.name, &a.1.namespace),
            (&b.1.creation, &b.1.name, &b.1.namespace),
        )
    });
    let dr_list: Vec<&CheckedDr> = drs.iter().map(|(_, d)| d).collect();
    let dr_names: Vec<String> = drs.iter().map(|(o, _)| o.describe()).collect();
    let (dr_index, notes) = DrIndex::new(&dr_list, &dr_names);
    for (i, field, reason) in notes {
        warn_at(&mut problems, drs[i].0, field, reason);
    }
    for (obj, d) in &drs {
        if !d.host.starts_with('*') && !snap.services.contains_key(&d.host) {
            tracing::debug!(host = %d.host, dr = %obj.describe(), "DestinationRule for a host with no Service");
        }
    }

    // VirtualServices bound to the mesh, oldest first (Istio's order within each group).
    vss.sort_by(|a, b| {
        istio_order(
            (&a.1.creation, &a.1.name, &a.1.namespace),
            (&b.1.creation, &b.1.name, &b.1.namespace),
        )
    });
    let mut mesh = Vec::new();
    for (obj, v) in &vss {
        if v.mesh {
            mesh.push((*obj, v));
        } else {
            warn_at(&mut problems, obj, "spec.gateways", "bound only to gateways (not \"mesh\"): does not apply to mesh traffic, so Sluice ignores it".to_string());
        }
    }
    let vs_list: Vec<&CheckedVs> = mesh.iter().map(|(_, v)| *v).collect();
    let mut namespaces: BTreeMap<String, NamespaceView> = BTreeMap::new();

    // Clusters: one per service port, plus one per subset, with the DestinationRule the generic
    // view picks; a namespace that picks another rule gets that rule's clusters for the host.
    let mut made: BTreeMap<&str, Vec<(Option<&DrPolicy>, Clusters)>> = BTreeMap::new();
    let eps = |svc: &Service, port: u16| {
        endpoints_by_port
            .get(&(svc.hostname.clone(), port))
            .cloned()
            .unwrap_or_default()
    };
    for svc in snap.services.values() {
        let generic = dr_index.pick(None, &svc.hostname, &svc.namespace);
        let set = clusters_of(svc, generic, &|p| eps(svc, p));
        snap.clusters
            .extend(set.iter().map(|(k, c)| (k.clone(), c.clone())));
        made.insert(&svc.hostname, vec![(generic, set)]);
    }
    for ns in dr_index.namespaces() {
        // Only hosts the namespace's own rules or rules exported to it by name match can differ.
        let mut hosts = std::collections::BTreeSet::new();
        for pattern in dr_index.patterns_for(ns) {
            hosts.extend(services_matching(&snap.services, pattern).map(|s| &s.hostname));
        }
        for host in hosts {
            let svc = &snap.services[host];
            let mine = dr_index.pick(Some(ns), host, &svc.namespace);
            let sets = made
                .get_mut(host.as_str())
                .expect("every Service has its clusters");
            if mine == sets[0].0 {
                continue;
            }
            let set = match sets.iter().find(|(rule, _)| *rule == mine) {
                Some((_, set)) => set.clone(),
                None => {
                    let set = clusters_of(svc, mine, &|p| eps(svc, p));
                    sets.push((mine, set.clone()));
                    set
                }
            };
            namespaces
                .entry(ns.to_string())
                .or_default()
                .clusters
                .insert(host.clone(), set);
        }
    }

    // VirtualServices bound to clusters; each is built once, whichever namespaces see it.
    let known = Known::new(&snap, &namespaces);
    let vhosts: Vec<Arc<VirtualHost>> = mesh
        .iter()
        .map(|(obj, v)| bind_virtual_service(&known, &mut problems, obj, v))
        .collect();

    // Which VirtualService routes each host: the generic view takes the public ones; a namespace
    // that some are private or exported to takes those first.
    let public = views::vs_public(&vs_list);
    let generic = VsIndex::new(&vs_list, &public);
    for (loser, h, winner) in &generic.lost {
        warn_at(&mut problems, mesh[*loser].0, "spec.hosts", format!("host {h} is already routed by {} (older, or first by name); Istio uses only that one, so this one is ignored for {h}", mesh[*winner].0.describe()));
    }
    snap.virtual_hosts = generic
        .exact
        .iter()
        .map(|(h, &i)| (h.clone(), vhosts[i].clone()))
        .collect();
    snap.wildcard_hosts = generic
        .wildcard
        .iter()
        .map(|(h, i)| (h.clone(), vhosts[*i].clone()))
        .collect();
    let none = VsIndex::default();
    let mut warned = std::collections::BTreeSet::new();
    for (ns, first) in views::vs_before_public(&vs_list) {
        let index = VsIndex::new(&vs_list, &first);
        for (loser, h, winner) in &index.lost {
            if warned.insert((*loser, h.clone())) {
                warn_at(&mut problems, mesh[*loser].0, "spec.hosts", format!("host {h} is already routed by {} for clients in namespace {ns} (older, or first by name); Istio uses only that one there, so this one is ignored for {h} in {ns}", mesh[*winner].0.describe()));
            }
        }
        // Only the hosts these VirtualServices name can be routed otherwise.
        let mut hosts = std::collections::BTreeSet::new();
        for &i in &first {
            for pattern in &vs_list[i].hosts {
                hosts.extend(services_matching(&snap.services, pattern).map(|s| &s.hostname));
            }
        }
        for host in hosts {
            let mine = index.choose(&generic, host);
            if mine != generic.choose(&none, host) {
                namespaces
                    .entry(ns.clone())
                    .or_default()
                    .virtual_hosts
                    .insert(host.clone(), mine.map(|i| vhosts[i].clone()));
            }
        }
    }
    namespaces.retain(|_, v| !v.is_empty());
    snap.namespaces = namespaces;
    snap.rejections = problems
        .iter()
        .filter(|p| p.is_error())
        .map(Problem::to_rejection)
        .collect();
    snap.warnings = problems
        .iter()
        .filter(|p| !p.is_error())
        .map(Problem::to_rejection)
        .collect();
    (snap, problems)
}

/// The Services a host pattern (a name or a wildcard) names.
fn services_matching<'a>(
    services: &'a BTreeMap<String, Arc<Service>>,
    pattern: &'a str,
) -> Box<dyn Iterator<Item = &'a Arc<Service>> + 'a> {
    if pattern.starts_with('*') {
        Box::new(
            services
                .values()
                .filter(move |s| views::host_matches(pattern, &s.hostname)),
        )
    } else {
        Box::new(services.get(pattern).into_iter())
    }
}

/// A Service host's clusters under one DestinationRule.
type Clusters = BTreeMap<ClusterKey, Arc<Cluster>>;

/// Istio's annotation on a Service that limits the namespaces seeing it.
const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// A Service's `networking.istio.io/exportTo` (comma-separated `*`, `.`, `~` or names; taken as
/// written, as istiod's Service conversion does).
fn service_export_to(annotations: &BTreeMap<String, String>, ns: &str) -> ServiceExportTo {
    let Some(value) = annotations
        .get(EXPORT_TO_ANNOTATION)
        .filter(|v| !v.is_empty())
    else {
        return ServiceExportTo::Public;
    };
    let entries: Vec<&str> = value.split(',').map(str::trim).collect();
    if entries.contains(&"*") {
        return ServiceExportTo::Public;
    }
    let mut names: Vec<String> = entries
        .iter()
        .filter(|e| !e.is_empty() && **e != "~")
        .map(|e| if *e == "." { ns } else { *e }.to_string())
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        ServiceExportTo::Nobody
    } else {
        ServiceExportTo::Namespaces(names)
    }
}

/// The clusters of `svc` under DestinationRule `rule`: one per service port, plus one per subset
/// and port; `eps` gives a port's endpoints.
fn clusters_of(
    svc: &Service,
    rule: Option<&DrPolicy>,
    eps: &dyn Fn(u16) -> Vec<Endpoint>,
) -> Clusters {
    let mut out = BTreeMap::new();
    let top = rule.and_then(|d| d.policy.as_ref());
    for p in &svc.ports {
        let eps = eps(p.port);
        let key = ClusterKey {
            host: svc.hostname.clone(),
            port: p.port,
            subset: None,
        };
        for s in rule.map(|d| d.subsets.as_slice()).unwrap_or_default() {
            let key = ClusterKey {
                subset: Some(s.name.clone()),
                ..key.clone()
            };
            let endpoints = eps
                .iter()
                .filter(|e| labels_match(&s.labels, &e.labels))
                .cloned()
                .collect();
            out.insert(
                key.clone(),
                Arc::new(Cluster {
                    key,
                    endpoints,
                    policy: dr::effective(top, s.policy.as_ref(), p.port),
                    destination_rule: rule.map(|d| d.name.clone()),
                    subset_labels: s.labels.clone(),
                }),
            );
        }
        out.insert(
            key.clone(),
            Arc::new(Cluster {
                key,
                endpoints: eps,
                policy: dr::effective(top, None, p.port),
                destination_rule: rule.map(|d| d.name.clone()),
                subset_labels: BTreeMap::new(),
            }),
        );
    }
    out
}

/// What route destinations are checked against: the Services, and every cluster some namespace
/// sees.
struct Known<'a> {
    snap: &'a Snapshot,
    keys: std::collections::BTreeSet<ClusterKey>,
}

impl<'a> Known<'a> {
    fn new(snap: &'a Snapshot, namespaces: &BTreeMap<String, NamespaceView>) -> Self {
        let keys = snap
            .clusters
            .keys()
            .chain(
                namespaces
                    .values()
                    .flat_map(|v| v.clusters.values().flat_map(BTreeMap::keys)),
            )
            .cloned()
            .collect();
        Self { snap, keys }
    }

    fn service(&self, host: &str) -> Option<&'a Arc<Service>> {
        self.snap.services.get(host)
    }

    /// The Service ports requests for `hosts` (a VirtualService's) can come in on: those of every
    /// Service the hosts name or match; only the ports that may carry HTTP when `http`.
    fn incoming_ports(&self, hosts: &[String], http: bool) -> std::collections::BTreeSet<u16> {
        hosts
            .iter()
            .flat_map(|h| services_matching(&self.snap.services, h))
            .flat_map(|s| &s.ports)
            .filter(|p| !http || carries_http(p))
            .map(|p| p.port)
            .collect()
    }
}

/// Whether a Service port may carry HTTP: not declared as another protocol (as the proxy's
/// protocol detection decides).
fn carries_http(port: &ServicePort) -> bool {
    !port.app_protocol.as_deref().is_some_and(|p| {
        [
            "tcp",
            "tls",
            "https",
            "mongo",
            "mysql",
            "redis",
            "udp",
            "kubernetes.io/wss",
        ]
        .iter()
        .any(|o| p.eq_ignore_ascii_case(o))
    })
}

/// Whether a destination is an HTTP route's or a `tcp[]` rule's: they default a missing port
/// differently.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Http,
    Tcp,
}

/// A VirtualService's routes bound to clusters.
fn bind_virtual_service(
    known: &Known,
    problems: &mut Vec<Problem>,
    obj: &Object,
    v: &CheckedVs,
) -> Arc<VirtualHost> {
    let http_ports = known.incoming_ports(&v.hosts, true);
    let routes = v
        .routes
        .iter()
        .map(|r| Route {
            name: r.name.clone(),
            matches: r.matches.clone(),
            destinations: r
                .destinations
                .iter()
                .map(|d| bind_destination(known, problems, obj, d, Kind::Http, &http_ports))
                .collect(),
            timeout: r.timeout,
            retry: r.retry.clone(),
            fault: r.fault.clone(),
            direct_response: r.direct_response.clone(),
            response_headers: r.response_headers.clone(),
        })
        .collect();
    let tcp_ports = known.incoming_ports(&v.hosts, false);
    let mut tcp_routes = Vec::new();
    for t in &v.tcp_routes {
        let rule = TcpRoute {
            matches: t.matches.clone(),
            destinations: t
                .destinations
                .iter()
                .map(|d| bind_destination(known, problems, obj, d, Kind::Tcp, &tcp_ports))
                .collect(),
        };
        tcp_routes.extend(per_port(rule, &tcp_ports));
    }
    Arc::new(VirtualHost {
        name: format!("{}/{}", v.namespace, v.name),
        routes,
        tcp_routes,
    })
}

/// A `tcp[]` rule whose destinations take the incoming port, as one rule per port it can see
/// (istiod builds a listener's filter chain per port): each matches only its port and names it.
fn per_port(rule: TcpRoute, ports: &std::collections::BTreeSet<u16>) -> Vec<TcpRoute> {
    if !rule.destinations.iter().any(|d| d.takes_incoming_port()) || ports.is_empty() {
        return vec![rule];
    }
    let resolve = |p: u16| -> Vec<WeightedDestination> {
        rule.destinations
            .iter()
            .map(|d| WeightedDestination {
                cluster: d.cluster_for(p),
                weight: d.weight,
            })
            .collect()
    };
    if let [only] = ports.iter().copied().collect::<Vec<_>>()[..] {
        // Every connection this rule can see comes in on this port.
        return vec![TcpRoute {
            matches: rule.matches.clone(),
            destinations: resolve(only),
        }];
    }
    ports
        .iter()
        .filter_map(|&p| {
            let matches = if rule.matches.is_empty() {
                vec![L4Match {
                    port: Some(p),
                    ..L4Match::default()
                }]
            } else {
                let on_port: Vec<L4Match> = rule
                    .matches
                    .iter()
                    .filter(|m| m.port.is_none_or(|q| q == p))
                    .map(|m| L4Match {
                        port: Some(p),
                        ..m.clone()
                    })
                    .collect();
                if on_port.is_empty() {
                    return None;
                }
                on_port
            };
            Some(TcpRoute {
                matches,
                destinations: resolve(p),
            })
        })
        .collect()
}

/// Binds a route destination to its cluster (`outbound|PORT|SUBSET|HOST`) as istiod's
/// `GetDestinationCluster` does: without `port`, an HTTP route's destination goes to the Service
/// port the request came in on (the listener's: istiod builds HTTP routes per port and looks the
/// destination up among the Services of that port only), a `tcp[]` rule's to the Service's only
/// port, else to the incoming one. An unknown host, port or subset is a warning (Istio answers
/// 503 NC at run time); so is an incoming port (of `incoming`) the destination lacks.
fn bind_destination(
    known: &Known,
    problems: &mut Vec<Problem>,
    obj: &Object,
    d: &vs::DestinationDraft,
    kind: Kind,
    incoming: &std::collections::BTreeSet<u16>,
) -> WeightedDestination {
    let svc = known.service(&d.host);
    let port = match (d.port, kind, svc) {
        (Some(p), _, _) => p,
        (None, Kind::Tcp, Some(s)) if s.ports.len() == 1 => s.ports[0].port,
        (None, _, _) => INCOMING_PORT,
    };
    let key = ClusterKey {
        host: d.host.clone(),
        port,
        subset: d.subset.clone(),
    };
    let Some(svc) = svc else {
        // `pricing.shop` is a full name to Istio, not `pricing.shop.svc.cluster.local`.
        let prefix = format!("{}.", d.host);
        let hint = known
            .snap
            .services
            .keys()
            .find(|h| h.starts_with(&prefix))
            .map(|h| format!(" (Istio completes only names without a dot: did you mean {h}?)"))
            .unwrap_or_default();
        warn_at(
            problems,
            obj,
            &format!("{}.destination.host", d.field),
            format!(
                "unknown host {}: no Service in the configuration; requests will get 503 (NC){hint}",
                d.host
            ),
        );
        return WeightedDestination {
            cluster: key,
            weight: d.weight,
        };
    };
    let ports: Vec<u16> = if port == INCOMING_PORT {
        let missing: Vec<String> = incoming
            .iter()
            .filter(|p| !svc.ports.iter().any(|sp| sp.port == **p))
            .map(u16::to_string)
            .collect();
        if !missing.is_empty() {
            warn_at(
                problems,
                obj,
                &format!("{}.destination.port", d.field),
                format!(
                    "without port, a destination goes to the Service port the request came in on (as in Istio), and service {} has no port {}: requests on {} get 503 (NC); set port.number",
                    d.host,
                    missing.join(", "),
                    if missing.len() == 1 { "that port" } else { "those ports" }
                ),
            );
        }
        svc.ports.iter().map(|p| p.port).collect()
    } else {
        vec![port]
    };
    let exists = |subset: Option<String>| {
        ports.iter().any(|&port| {
            known.keys.contains(&ClusterKey {
                host: d.host.clone(),
                port,
                subset: subset.clone(),
            })
        })
    };
    if !exists(d.subset.clone()) {
        let what = match &d.subset {
            Some(s) if exists(None) => format!(
                "unknown subset {s:?} (no DestinationRule for {} defines it)",
                d.host
            ),
            _ => format!("service {} has no port {port}", d.host),
        };
        warn_at(
            problems,
            obj,
            &format!("{}.destination", d.field),
            format!("{what}; requests will get 503 (NC)"),
        );
    }
    WeightedDestination {
        cluster: key,
        weight: d.weight,
    }
}

/// The Service CIDR cluster IPs are allocated from in standalone mode (kubeadm's default).
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);

/// Cluster IPs for Services that set neither `clusterIP` nor `clusterIPs`, as the API server would
/// allocate them: from [`SERVICE_CIDR`], at an offset given by a stable hash (FNV-1a) of
/// `namespace/name`, probing past addresses already taken. Allocation runs in `namespace/name`
/// order, so a Service keeps its address across reloads unless another one takes it first.
fn allocate_cluster_ips(
    services: &[(&Object, &crate::k8s::Service)],
) -> BTreeMap<(String, String), IpAddr> {
    let (base, prefix) = SERVICE_CIDR;
    let size = 1u32 << (32 - prefix);
    let base = u32::from(base);
    let mut taken: std::collections::BTreeSet<IpAddr> = services
        .iter()
        .flat_map(|(_, s)| s.spec.cluster_ip.iter().chain(&s.spec.cluster_ips))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    let mut wanted: Vec<(String, String)> = services
        .iter()
        .filter(|(_, s)| s.spec.cluster_ip.is_none() && s.spec.cluster_ips.is_empty())
        .map(|(_, s)| (s.metadata.namespace().to_string(), s.metadata.name.clone()))
        .collect();
    wanted.sort();
    wanted.dedup();
    let mut out = BTreeMap::new();
    for key in wanted {
        let hash = format!("{}/{}", key.0, key.1)
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        // Offsets 16..size-1: leave the network address and the first few (10.96.0.1 is the
        // `kubernetes` Service by convention) alone.
        let span = size - 17;
        let start = (hash % u64::from(span)) as u32;
        for probe in 0..span {
            let ip = IpAddr::V4(Ipv4Addr::from(base + 16 + (start + probe) % span));
            if taken.insert(ip) {
                out.insert(key, ip);
                break;
            }
        }
    }
    out
}
