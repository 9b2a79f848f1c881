//! Assembly: the service registry (Services, EndpointSlices or selector-matched Pods, enrollment),
//! DestinationRules merged per host, clusters per service port and subset, and VirtualServices bound
//! to clusters. Only cross-object problems are found here, and they are warnings: a route to an
//! unknown host or subset is accepted (Istio answers 503 NC at run time).

use crate::dr::{self, CheckedDr, CheckedSubset};
use crate::k8s::{IntOrString, Pod, ServiceSpec};
use crate::parse::{Object, Resource};
use crate::problem::{Problem, Sink};
use crate::vs::{self, CheckedVs};
use crate::BuildOptions;
use sluice_policy::{
    Cluster, ClusterKey, Endpoint, Route, Service, ServicePort, Snapshot, TcpRoute, VirtualHost,
    WeightedDestination, Workload,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

/// Annotation naming a pod's network namespace (standalone mode), e.g. `/var/run/netns/pricing-1`.
pub const NETNS_ANNOTATION: &str = "sluice.io/netns";
/// Annotation naming a pod's cgroup v2 directory (standalone mode).
pub const CGROUP_ANNOTATION: &str = "sluice.io/cgroup";
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

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
    let mut seen = BTreeMap::new();
    for obj in objects {
        let id = obj.id();
        if let Some(first) = seen.get(&id) {
            warn_at(
                &mut problems,
                obj,
                "metadata.name",
                format!("{id} is also defined in {first}; this one is ignored"),
            );
            continue;
        }
        seen.insert(id, obj.origin.clone());
        let (checked, found) = check(obj, opts);
        problems.extend(found);
        if let Some(checked) = checked {
            accepted.push((obj, checked));
        }
    }
    assemble(accepted, problems, opts)
}

/// Builds a snapshot from objects already checked one by one (each exactly once, by [`check`]),
/// adding the cross-object problems to `problems`.
pub(crate) fn assemble<'a>(
    accepted: impl IntoIterator<Item = (&'a Object, Checked)>,
    mut problems: Vec<Problem>,
    opts: &BuildOptions,
) -> (Snapshot, Vec<Problem>) {
    let mut vss: Vec<(&Object, CheckedVs)> = Vec::new();
    let mut drs: Vec<(&Object, CheckedDr)> = Vec::new();
    let mut namespaces: BTreeMap<String, &BTreeMap<String, String>> = BTreeMap::new();
    let mut pods: BTreeMap<(String, String), (&Object, &Pod)> = BTreeMap::new();
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
                pods.insert(
                    (p.metadata.namespace().to_string(), p.metadata.name.clone()),
                    (obj, p),
                );
            }
            (Some(Checked::Other), Resource::Service(s)) => services.push((obj, s)),
            (Some(Checked::Other), Resource::EndpointSlice(s)) => slices.push((obj, s)),
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
            }),
        );
    }

    // Services and their endpoints per service port.
    let allocated = allocate_cluster_ips(&services);
    // Indexed once: a cluster has as many slices as Services, and each Service looks up its own.
    let mut slices_by_service: BTreeMap<(&str, &str), Vec<_>> = BTreeMap::new();
    for entry in &slices {
        let (_, s) = entry;
        if let Some(service) = s.metadata.labels.get(SERVICE_NAME_LABEL) {
            slices_by_service
                .entry((s.metadata.namespace(), service.as_str()))
                .or_default()
                .push(entry);
        }
    }
    let mut endpoints_by_port: BTreeMap<(String, u16), Vec<Endpoint>> = BTreeMap::new();
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
                let want = name.clone().unwrap_or_default();
                for (_, slice) in my_slices {
                    let Some(sp) = slice
                        .ports
                        .iter()
                        .find(|sp| sp.name.clone().unwrap_or_default() == want)
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
                            let pod =
                                ep.target_ref
                                    .as_ref()
                                    .filter(|r| r.kind.as_deref().unwrap_or("Pod") == "Pod")
                                    .and_then(|r| {
                                        let pns = r.namespace.clone().unwrap_or_else(|| {
                                            slice.metadata.namespace().to_string()
                                        });
                                        pods.get(&(pns, r.name.clone().unwrap_or_default()))
                                    })
                                    .or_else(|| {
                                        pods.values().find(|(_, p)| {
                                            p.metadata.namespace() == ns && pod_ips(p).contains(&ip)
                                        })
                                    });
                            eps.push(Endpoint {
                                addr: SocketAddr::new(ip, target),
                                pod: pod.map(|(_, p)| {
                                    format!("{}/{}", p.metadata.namespace(), p.metadata.name)
                                }),
                                labels: pod
                                    .map(|(_, p)| p.metadata.labels.clone())
                                    .unwrap_or_default(),
                            });
                        }
                    }
                }
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
                        eps.push(Endpoint {
                            addr: SocketAddr::new(ip, target),
                            pod: Some(format!("{ns}/{}", pod.metadata.name)),
                            labels: pod.metadata.labels.clone(),
                        });
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
            }),
        );
    }

    // DestinationRules merged per host as Istio does: the oldest one's trafficPolicy (else the first
    // that has one), subsets appended unless their name is taken.
    drs.sort_by(|a, b| {
        istio_order(
            (&a.1.creation, &a.1.name, &a.1.namespace),
            (&b.1.creation, &b.1.name, &b.1.namespace),
        )
    });
    let mut merged: BTreeMap<String, (CheckedDr, String)> = BTreeMap::new();
    for (obj, d) in drs {
        match merged.get_mut(&d.host) {
            None => {
                merged.insert(d.host.clone(), (d, obj.describe()));
            }
            Some((first, first_name)) => {
                warn_at(&mut problems, obj, "spec.host", format!("{first_name} also configures host {}; merged as Istio does (subsets added, the first trafficPolicy wins)", d.host));
                if first.policy.is_none() {
                    first.policy = d.policy;
                }
                for s in d.subsets {
                    if first.subsets.iter().any(|f| f.name == s.name) {
                        warn_at(
                            &mut problems,
                            obj,
                            "spec.subsets",
                            format!("duplicate subset {:?} for host {} ignored", s.name, d.host),
                        );
                    } else {
                        first.subsets.push(s);
                    }
                }
            }
        }
    }
    let dr_for = |host: &str| -> Option<&CheckedDr> {
        merged.get(host).map(|(d, _)| d).or_else(|| {
            merged
                .iter()
                .filter(|(h, _)| {
                    h.starts_with('*') && host.len() > h.len() - 1 && host.ends_with(&h[1..])
                })
                .max_by_key(|(h, _)| h.len())
                .map(|(_, (d, _))| d)
        })
    };

    // Clusters: one per service port, plus one per subset.
    for svc in snap.services.values() {
        let dr = dr_for(&svc.hostname);
        for p in &svc.ports {
            let eps = endpoints_by_port
                .get(&(svc.hostname.clone(), p.port))
                .cloned()
                .unwrap_or_default();
            let top = dr.and_then(|d| d.policy.as_ref());
            let key = ClusterKey {
                host: svc.hostname.clone(),
                port: p.port,
                subset: None,
            };
            snap.clusters.insert(
                key.clone(),
                Arc::new(Cluster {
                    key,
                    endpoints: eps.clone(),
                    policy: dr::effective(top, None, p.port),
                }),
            );
            for s in dr.map(|d| d.subsets.as_slice()).unwrap_or_default() {
                let CheckedSubset {
                    name,
                    labels,
                    policy,
                } = s;
                let key = ClusterKey {
                    host: svc.hostname.clone(),
                    port: p.port,
                    subset: Some(name.clone()),
                };
                let endpoints = eps
                    .iter()
                    .filter(|e| labels_match(labels, &e.labels))
                    .cloned()
                    .collect();
                snap.clusters.insert(
                    key.clone(),
                    Arc::new(Cluster {
                        key,
                        endpoints,
                        policy: dr::effective(top, policy.as_ref(), p.port),
                    }),
                );
            }
        }
    }
    for (host, (_, name)) in &merged {
        if !host.starts_with('*') && !snap.services.contains_key(host) {
            tracing::debug!(%host, dr = %name, "DestinationRule for a host with no Service");
        }
    }

    // VirtualServices: the oldest one for a host wins, as for Istio sidecars.
    vss.sort_by(|a, b| {
        istio_order(
            (&a.1.creation, &a.1.name, &a.1.namespace),
            (&b.1.creation, &b.1.name, &b.1.namespace),
        )
    });
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    let mut wildcards = Vec::new();
    for (obj, v) in &vss {
        if !v.mesh {
            warn_at(&mut problems, obj, "spec.gateways", "bound only to gateways (not \"mesh\"): does not apply to mesh traffic, so Sluice ignores it".to_string());
            continue;
        }
        let mut routes = Vec::new();
        for r in &v.routes {
            let destinations = r
                .destinations
                .iter()
                .map(|d| bind_destination(&snap, &mut problems, obj, d))
                .collect();
            routes.push(Route {
                name: r.name.clone(),
                matches: r.matches.clone(),
                destinations,
                timeout: r.timeout,
                retry: r.retry.clone(),
                fault: r.fault.clone(),
                direct_response: r.direct_response.clone(),
                response_headers: r.response_headers.clone(),
            });
        }
        let tcp_routes = v
            .tcp_routes
            .iter()
            .map(|t| TcpRoute {
                matches: t.matches.clone(),
                destinations: t
                    .destinations
                    .iter()
                    .map(|d| bind_destination(&snap, &mut problems, obj, d))
                    .collect(),
            })
            .collect();
        let vh = Arc::new(VirtualHost {
            name: format!("{}/{}", v.namespace, v.name),
            routes,
            tcp_routes,
        });
        for h in &v.hosts {
            if let Some(owner) = owners.get(h) {
                warn_at(&mut problems, obj, "spec.hosts", format!("host {h} is already routed by {owner} (older, or first by name); Istio uses only that one, so this one is ignored for {h}"));
                continue;
            }
            owners.insert(h.clone(), obj.describe());
            if h.starts_with('*') {
                wildcards.push((h.clone(), vh.clone()));
            } else {
                snap.virtual_hosts.insert(h.clone(), vh.clone());
            }
        }
    }
    // Most specific first: longer suffixes before shorter ones, `*` last.
    wildcards.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    snap.wildcard_hosts = wildcards;
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

/// Binds a route destination to its cluster (`outbound|PORT|SUBSET|HOST`); an unknown host, port
/// or subset is a warning (Istio answers 503 NC at run time).
fn bind_destination(
    snap: &Snapshot,
    problems: &mut Vec<Problem>,
    obj: &Object,
    d: &vs::DestinationDraft,
) -> WeightedDestination {
    let svc = snap.services.get(&d.host);
    let port = match (d.port, svc) {
        (Some(p), _) => p,
        (None, Some(s)) if s.ports.len() == 1 => s.ports[0].port,
        (None, Some(s)) if !s.ports.is_empty() => {
            warn_at(
                problems,
                obj,
                &format!("{}.destination.port", d.field),
                format!(
                    "service {} has several ports; set port.number (using {})",
                    d.host, s.ports[0].port
                ),
            );
            s.ports[0].port
        }
        _ => 0,
    };
    let key = ClusterKey {
        host: d.host.clone(),
        port,
        subset: d.subset.clone(),
    };
    if svc.is_none() {
        warn_at(
            problems,
            obj,
            &format!("{}.destination.host", d.field),
            format!(
                "unknown host {}: no Service in the configuration; requests will get 503 (NC)",
                d.host
            ),
        );
    } else if !snap.clusters.contains_key(&key) {
        let what = match &d.subset {
            Some(s)
                if snap.clusters.contains_key(&ClusterKey {
                    subset: None,
                    ..key.clone()
                }) =>
            {
                format!(
                    "unknown subset {s:?} (no DestinationRule for {} defines it)",
                    d.host
                )
            }
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
