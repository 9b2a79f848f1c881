//! One consistent generation of configuration: the service registry, routing and clusters, plus the
//! problems found while building it. The proxy holds an `Arc<Snapshot>` per request, so a reload never
//! changes the policy of a request already under way.

use crate::{Cluster, ClusterKey, VirtualHost, DEFAULT_CLUSTER_DOMAIN};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// A Kubernetes Service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`.
    pub hostname: String,
    /// `spec.clusterIP(s)`; empty for headless services.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// The `networking.istio.io/exportTo` annotation: which client namespaces see the Service.
    pub export_to: ServiceExportTo,
}

/// Which client namespaces see a Service (Istio's `IsServiceVisible`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceExportTo {
    /// `*` (the default): every namespace.
    #[default]
    Public,
    /// `~`: no namespace.
    Nobody,
    /// `.` (as the Service's own namespace) and namespace names.
    Namespaces(Vec<String>),
}

impl Service {
    /// Whether a client in `namespace` sees this Service.
    pub fn visible_to(&self, namespace: &str) -> bool {
        match &self.export_to {
            ServiceExportTo::Public => true,
            ServiceExportTo::Nobody => false,
            ServiceExportTo::Namespaces(names) => names.iter().any(|n| n == namespace),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    /// `appProtocol`, or the protocol implied by the port name (`http`, `http2`, `grpc`, `tcp`...).
    pub app_protocol: Option<String>,
}

/// A pod known to the registry (its labels select subsets; its enrollment is decided from labels).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub ips: Vec<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Enrolled in the mesh (its own or its namespace's dataplane-mode label).
    pub enrolled: bool,
    /// Where its network namespace is (standalone mode convention), if given.
    pub netns: Option<PathBuf>,
    /// Its cgroup v2 directory, if given (`sluice.io/cgroup`: overrides finding it from `uid`).
    pub cgroup: Option<PathBuf>,
    /// `metadata.uid`: names its cgroup (kubelet's pod-level cgroup is `pod<uid>`).
    pub uid: Option<String>,
    /// `status.qosClass` (`Guaranteed`, `Burstable`, `BestEffort`): the level its cgroup is under.
    pub qos_class: Option<String>,
    /// `spec.hostNetwork`: the node's network namespace; never redirected.
    pub host_network: bool,
    /// `status.phase` (`Pending`, `Running`, `Succeeded`, `Failed`, `Unknown`), if given.
    pub phase: Option<String>,
    /// `status.containerStatuses[].containerID` (`containerd://<id>`), those that are set.
    pub container_ids: Vec<String>,
    /// Its controller as Istio's workload rule sees it (see [`crate::Owner`]: none for a pod
    /// named by hand), if any.
    pub owner: Option<crate::Owner>,
}

impl Workload {
    /// Istio's telemetry identity of this pod.
    pub fn identity(&self) -> crate::Identity {
        crate::Identity::of_pod(
            &self.name,
            &self.namespace,
            &self.labels,
            self.owner.as_ref(),
        )
    }
}

impl Workload {
    /// Why this pod's connections must not be redirected even when it is enrolled: it shares the
    /// node's network namespace, has finished or not started, or has no address yet. A Pod
    /// without `status.phase` (hand-written standalone YAML) counts as running.
    pub fn not_redirectable(&self) -> Option<&'static str> {
        if self.host_network {
            return Some("hostNetwork pod (shares the node's network namespace)");
        }
        match self.phase.as_deref() {
            None | Some("Running") => {}
            Some("Pending") => return Some("not running yet (phase Pending)"),
            Some(_) => return Some("not running (phase is not Running)"),
        }
        if self.ips.is_empty() {
            return Some("no pod IP yet");
        }
        None
    }
}

/// A configuration object that was not accepted, with where and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// File path (standalone) or `Kind namespace/name` (Kubernetes).
    pub source: String,
    /// The rejected version of an API object (Kubernetes mode).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// `Kind namespace/name` of the document, or its index in the file when it has none.
    pub object: String,
    /// Field path, e.g. `spec.http[0].retries.perTryTimeout`.
    pub field: String,
    pub reason: String,
}

/// A complete, checked configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// Increases by one for every accepted change.
    pub generation: u64,
    /// The Kubernetes cluster domain short names are completed with (`cluster.local`).
    pub cluster_domain: String,
    /// Services by host name.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Routing by exact destination host name (from VirtualServices bound to the mesh), as a
    /// client sees it whose namespace no object singles out (see [`Snapshot::namespaces`]).
    pub virtual_hosts: BTreeMap<String, Arc<VirtualHost>>,
    /// Routing by wildcard host (`*.example.com`, `*`), most specific first; the same view.
    pub wildcard_hosts: Vec<(String, Arc<VirtualHost>)>,
    /// Clusters by key (serialized as a list: JSON keys must be strings), with the
    /// DestinationRules that same client sees.
    #[serde(serialize_with = "values")]
    pub clusters: BTreeMap<ClusterKey, Arc<Cluster>>,
    /// Client namespaces that see other VirtualServices or DestinationRules than the view above
    /// (`exportTo`, a namespace's own DestinationRules first), with what differs. A namespace not
    /// listed sees the view above.
    pub namespaces: BTreeMap<String, NamespaceView>,
    /// Pods by `namespace/name`.
    pub workloads: BTreeMap<String, Arc<Workload>>,
    /// Objects skipped in this generation (they keep their last good version where they had one).
    pub rejections: Vec<Rejection>,
    /// Non-fatal problems (unknown fields, ignored VirtualServices, ...).
    pub warnings: Vec<Rejection>,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            generation: 0,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_string(),
            services: BTreeMap::new(),
            virtual_hosts: BTreeMap::new(),
            wildcard_hosts: Vec::new(),
            clusters: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            workloads: BTreeMap::new(),
            rejections: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

/// Equal keys with equal values in the same order, values by pointer first (`Arc`'s own `==` skips
/// the pointer test for types that are not `Eq`, as clusters and routes are not: they hold
/// floating-point numbers).
fn same_entries<'a, K, T>(
    a: impl IntoIterator<Item = (&'a K, &'a Arc<T>)>,
    b: impl IntoIterator<Item = (&'a K, &'a Arc<T>)>,
) -> bool
where
    K: PartialEq + 'a,
    T: PartialEq + 'a,
{
    let (mut a, mut b) = (a.into_iter(), b.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some((ka, x)), Some((kb, y))) if ka == kb && (Arc::ptr_eq(x, y) || **x == **y) => {}
            _ => return false,
        }
    }
}

/// What clients of one namespace see differently from the view of [`Snapshot::virtual_hosts`] and
/// [`Snapshot::clusters`]; hosts not listed are as there.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NamespaceView {
    /// The VirtualService routing each Service host name (`None`: none does, Istio's implicit
    /// route applies).
    pub virtual_hosts: BTreeMap<String, Option<Arc<VirtualHost>>>,
    /// Every cluster of each Service host name whose DestinationRule differs (an empty set: the
    /// Service is not visible to the namespace).
    #[serde(serialize_with = "nested_values")]
    pub clusters: BTreeMap<String, BTreeMap<ClusterKey, Arc<Cluster>>>,
}

impl NamespaceView {
    pub fn is_empty(&self) -> bool {
        self.virtual_hosts.is_empty() && self.clusters.is_empty()
    }
}

impl Snapshot {
    /// Whether `other` configures the proxy the same way: everything but the generation and the
    /// problems reported. Shared parts compare by pointer first, so comparing a snapshot with
    /// one made from it by replacing a few entries costs little.
    pub fn same_config(&self, other: &Snapshot) -> bool {
        self.cluster_domain == other.cluster_domain
            && self.services == other.services
            && same_entries(&self.virtual_hosts, &other.virtual_hosts)
            && same_entries(
                self.wildcard_hosts.iter().map(|(k, v)| (k, v)),
                other.wildcard_hosts.iter().map(|(k, v)| (k, v)),
            )
            && same_entries(&self.clusters, &other.clusters)
            && self.namespaces == other.namespaces
            && self.workloads == other.workloads
    }

    /// The service whose cluster IP is `ip`, exposing `port`.
    pub fn service_by_vip(&self, ip: IpAddr, port: u16) -> Option<&Arc<Service>> {
        self.services
            .values()
            .find(|s| s.cluster_ips.contains(&ip) && s.ports.iter().any(|p| p.port == port))
    }

    /// Resolves a host as a client in `namespace` would through Kubernetes DNS: `pricing`,
    /// `pricing.default`, `pricing.default.svc`, `pricing.default.svc.cluster.local`. A trailing
    /// port or dot is ignored.
    pub fn resolve_host(&self, host: &str, namespace: &str) -> Option<&Arc<Service>> {
        let host = strip_port(host).trim_end_matches('.');
        if host.len() > MAX_NAME {
            return None;
        }
        // A lower-case host (nearly every one) is looked up as it is.
        let lower = !host.bytes().any(|b| b.is_ascii_uppercase());
        if lower {
            if let Some(svc) = self.services.get(host) {
                return Some(svc);
            }
        }
        let b = host.as_bytes();
        let domain = self.cluster_domain.as_str();
        let completion = match b.iter().filter(|&&c| c == b'.').count() {
            0 => Some([".", namespace, ".svc.", domain]),
            1 => Some([".svc.", domain, "", ""]),
            2 if b.len() >= 4 && b[b.len() - 4..].eq_ignore_ascii_case(b".svc") => {
                Some([".", domain, "", ""])
            }
            _ if lower => return None,
            _ => None,
        };
        // Every request resolves its host: the names are put together in one buffer per thread,
        // lower-cased in place, not allocated.
        NAME.with_borrow_mut(|name| {
            name.clear();
            name.push_str(host);
            if !lower {
                name.make_ascii_lowercase();
                if let Some(svc) = self.services.get(name.as_str()) {
                    return Some(svc);
                }
            }
            for part in completion? {
                name.push_str(part);
            }
            if name.len() > MAX_NAME {
                return None;
            }
            self.services.get(name.as_str())
        })
    }

    /// The routing for a destination host name: its VirtualService, or the most specific wildcard one.
    pub fn virtual_host(&self, hostname: &str) -> Option<&Arc<VirtualHost>> {
        self.virtual_hosts.get(hostname).or_else(|| {
            self.wildcard_hosts
                .iter()
                .find(|(pattern, _)| wildcard_matches(pattern, hostname))
                .map(|(_, vh)| vh)
        })
    }

    pub fn cluster(&self, key: &ClusterKey) -> Option<&Arc<Cluster>> {
        self.clusters.get(key)
    }

    /// The routing for a Service host name as a client in `namespace` sees it.
    pub fn virtual_host_in(&self, namespace: &str, hostname: &str) -> Option<&Arc<VirtualHost>> {
        match self
            .namespaces
            .get(namespace)
            .and_then(|v| v.virtual_hosts.get(hostname))
        {
            Some(choice) => choice.as_ref(),
            None => self.virtual_host(hostname),
        }
    }

    /// The cluster `key` as a client in `namespace` sees it (its DestinationRule).
    pub fn cluster_in(&self, namespace: &str, key: &ClusterKey) -> Option<&Arc<Cluster>> {
        match self
            .namespaces
            .get(namespace)
            .and_then(|v| v.clusters.get(&key.host))
        {
            Some(clusters) => clusters.get(key),
            None => self.clusters.get(key),
        }
    }

    /// The pod that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.workloads.values().find(|w| w.ips.contains(&ip))
    }
}

fn values<S: serde::Serializer, K, V: Serialize>(
    map: &BTreeMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(map.values())
}

fn nested_values<S: serde::Serializer, K: Serialize + Ord, K2, V: Serialize>(
    map: &BTreeMap<K, BTreeMap<K2, V>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(
        map.iter()
            .map(|(k, inner)| (k, inner.values().collect::<Vec<_>>())),
    )
}

/// Istio host wildcards: `*` matches everything, `*.foo.com` matches any name ending in `.foo.com`.
pub fn wildcard_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Longer than any DNS name (253 bytes), with room for a trailing dot and a port.
const MAX_NAME: usize = 256;

thread_local! {
    /// The name [`Snapshot::resolve_host`] puts together, reused by every lookup on the thread.
    static NAME: std::cell::RefCell<String> = std::cell::RefCell::new(String::with_capacity(MAX_NAME));
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split(']').next().map_or(host, |h| &h[1..]);
    }
    match split_at_only_colon(host) {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// `s` split around its colon when it has exactly one (`host:port`; an IPv6 address without
/// brackets has more). Every request's authority goes through here: one forward pass over a few
/// bytes, where `rsplit_once` and a second search cost several times that on short names.
pub fn split_at_only_colon(s: &str) -> Option<(&str, &str)> {
    let at = s.bytes().position(|b| b == b':')?;
    let (host, rest) = (&s[..at], &s[at + 1..]);
    (!rest.bytes().any(|b| b == b':')).then_some((host, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot_with(names: &[(&str, &str)]) -> Snapshot {
        let mut snap = Snapshot::default();
        for (name, ns) in names {
            let hostname = format!("{name}.{ns}.svc.cluster.local");
            snap.services.insert(
                hostname.clone(),
                Arc::new(Service {
                    name: name.to_string(),
                    namespace: ns.to_string(),
                    hostname,
                    cluster_ips: vec![],
                    ports: vec![],
                    export_to: ServiceExportTo::Public,
                }),
            );
        }
        snap
    }

    #[test]
    fn resolves_like_kubernetes_dns() {
        let snap = snapshot_with(&[("pricing", "default"), ("pricing", "shop")]);
        let ns = |h: &str, ns: &str| snap.resolve_host(h, ns).map(|s| s.namespace.clone());
        assert_eq!(ns("pricing", "default").as_deref(), Some("default"));
        assert_eq!(ns("pricing", "shop").as_deref(), Some("shop"));
        assert_eq!(ns("pricing:80", "shop").as_deref(), Some("shop"));
        assert_eq!(ns("pricing.shop", "default").as_deref(), Some("shop"));
        assert_eq!(ns("pricing.shop.svc", "default").as_deref(), Some("shop"));
        assert_eq!(
            ns("pricing.shop.svc.cluster.local.", "default").as_deref(),
            Some("shop")
        );
        assert_eq!(
            ns("Pricing.Default.svc.cluster.local:9090", "x").as_deref(),
            Some("default")
        );
        assert_eq!(ns("pricing", "other"), None);
        assert_eq!(ns("example.com", "default"), None);
        assert_eq!(ns("PRICING", "shop").as_deref(), Some("shop"));
        // Longer than a DNS name, alone or once completed: no Service, and no panic.
        assert_eq!(ns(&"p".repeat(300), "shop"), None);
        assert_eq!(ns(&"p".repeat(240), "shop"), None);
        assert_eq!(ns("prícing", "shop"), None);
    }

    #[test]
    fn host_and_port_split_at_the_only_colon() {
        assert_eq!(
            split_at_only_colon("pricing:9090"),
            Some(("pricing", "9090"))
        );
        assert_eq!(split_at_only_colon("pricing:"), Some(("pricing", "")));
        assert_eq!(split_at_only_colon("pricing"), None);
        assert_eq!(split_at_only_colon("fe80::1"), None);
        assert_eq!(strip_port("[fe80::1]:80"), "fe80::1");
        assert_eq!(strip_port("fe80::1"), "fe80::1");
        assert_eq!(strip_port("pricing:http"), "pricing:http");
        assert_eq!(strip_port("pricing:80"), "pricing");
    }

    #[test]
    fn resolves_in_the_snapshots_cluster_domain() {
        let mut snap = Snapshot {
            cluster_domain: "corp.example".into(),
            ..Snapshot::default()
        };
        let hostname = "pricing.shop.svc.corp.example".to_string();
        snap.services.insert(
            hostname.clone(),
            Arc::new(Service {
                name: "pricing".into(),
                namespace: "shop".into(),
                hostname,
                cluster_ips: vec![],
                ports: vec![],
                export_to: ServiceExportTo::Public,
            }),
        );
        assert!(snap.resolve_host("pricing", "shop").is_some());
        assert!(snap.resolve_host("pricing.shop.svc", "x").is_some());
        assert!(snap
            .resolve_host("pricing.shop.svc.cluster.local", "x")
            .is_none());
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_matches("*", "anything"));
        assert!(wildcard_matches("*.example.com", "a.example.com"));
        assert!(!wildcard_matches("*.example.com", "example.com"));
        assert!(wildcard_matches("a.b", "a.b"));
    }
}
