//! Serde types for the Kubernetes kinds Sluice reads: `Service`, `discovery.k8s.io/v1
//! EndpointSlice`, `Pod` and `Namespace`, and (Kubernetes mode only) [`PodMetadata`], the Pods of
//! every node as a metadata-only watch lists them. Only the fields Sluice uses are described; the
//! rest of these large objects is accepted without warnings (unknown-field warnings are for Istio
//! kinds, where a typo silently changes policy).

use crate::istio::{nullable, ObjectMeta};
use serde::Deserialize;
use serde_yaml::Value;
use sluice_policy::Owner;
use std::collections::{BTreeMap, HashMap};

/// `targetPort`: a number or a container port name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: ServiceSpec,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceSpec {
    #[serde(rename = "clusterIP", default)]
    pub cluster_ip: Option<String>,
    #[serde(rename = "clusterIPs", default, deserialize_with = "nullable")]
    pub cluster_ips: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<ServicePortSpec>,
    /// `None` (or empty): endpoints are managed by hand (EndpointSlices only).
    #[serde(default)]
    pub selector: Option<BTreeMap<String, String>>,
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    /// `IPv4`, `IPv6` (the families of the Service's cluster IPs and of its selected endpoints).
    #[serde(rename = "ipFamilies", default, deserialize_with = "nullable")]
    pub ip_families: Vec<String>,
    /// `SingleStack`, `PreferDualStack` or `RequireDualStack`.
    #[serde(rename = "ipFamilyPolicy", default)]
    pub ip_family_policy: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSpec {
    pub name: Option<String>,
    pub port: i64,
    pub target_port: Option<IntOrString>,
    pub app_protocol: Option<String>,
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub address_type: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<EndpointPort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct EndpointConditions {
    /// Absent means ready (Kubernetes: "nil should be interpreted as true").
    pub ready: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ObjectReference {
    pub kind: Option<String>,
    pub name: Option<String>,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    pub name: Option<String>,
    pub port: Option<i64>,
    pub protocol: Option<String>,
    pub app_protocol: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: PodSpec,
    #[serde(default, deserialize_with = "nullable")]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub containers: Vec<Container>,
    pub node_name: Option<String>,
    /// The pod uses the node's network namespace: never redirected.
    #[serde(default)]
    pub host_network: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Container {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<ContainerPort>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    pub name: Option<String>,
    pub container_port: i64,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodStatus {
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs", default, deserialize_with = "nullable")]
    pub pod_ips: Vec<PodIp>,
    pub phase: Option<String>,
    /// `Guaranteed`, `Burstable` or `BestEffort`: where kubelet puts the pod's cgroup.
    #[serde(rename = "qosClass", default)]
    pub qos_class: Option<String>,
    #[serde(rename = "containerStatuses", default, deserialize_with = "nullable")]
    pub container_statuses: Vec<ContainerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ContainerStatus {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    /// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`; absent until the container starts.
    #[serde(rename = "containerID", default)]
    pub container_id: Option<String>,
}

impl Pod {
    /// `metadata.uid` (kept with the metadata Sluice does not otherwise read).
    pub fn uid(&self) -> Option<&str> {
        self.metadata
            .other
            .get("uid")
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
    }
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<Value>,
}

/// The store kind of [`PodMetadata`] (`Kind namespace/name` in messages, `sluice status`' kinds).
pub const POD_METADATA_KIND: &str = "PodMetadata";

/// A Pod of any node as Kubernetes mode's cluster-wide metadata-only watch
/// (`PartialObjectMetadata`) lists it, cut down to what an endpoint needs from a pod that is not
/// this node's: name, namespace, labels (DestinationRule subsets select on them; they feed the
/// telemetry identity) and its controller (the identity's workload). Never a workload of this
/// node: enrollment and client lookup see only full [`Pod`]s.
#[derive(Clone, Debug)]
pub struct PodMetadata {
    /// Name, namespace and labels only (annotations and the rest are dropped on arrival).
    pub metadata: ObjectMeta,
    /// Its controller as Istio's workload rule sees it ([`pod_controller`]).
    pub owner: Option<Owner>,
}

impl PodMetadata {
    /// Keeps what endpoints need from a Pod's metadata.
    pub fn from_meta(meta: ObjectMeta) -> Self {
        let owner = pod_controller(&meta);
        Self {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                labels: meta.labels,
                ..ObjectMeta::default()
            },
            owner,
        }
    }

    /// What the store keeps of it.
    pub(crate) fn facts(self) -> PodFacts {
        PodFacts {
            // A map's order: sorted by key, so a lookup is a binary search.
            labels: self.metadata.labels.into_iter().collect(),
            owner: self.owner,
        }
    }
}

/// What the store keeps of a [`PodMetadata`] (under its namespace and name): a large cluster has
/// 100,000s of pods, so nothing else, and labels as a sorted slice (a map's node is several times
/// the size of a pod's few labels).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodFacts {
    pub labels: Box<[(String, String)]>,
    pub owner: Option<Owner>,
}

impl PodFacts {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.labels[i].1.as_str())
    }
}

/// Every node's pods: namespace, then name (looked up by `&str`, no key to build).
pub(crate) type PodIndex = HashMap<String, HashMap<String, PodFacts>>;

/// A pod's controller for its telemetry identity, as Istio takes it: the first
/// `metadata.ownerReferences` entry with `controller: true`, only when the pod's name was generated
/// (`metadata.generateName` set, as for every pod a controller makes); a pod named by hand is its
/// own workload whatever owns it.
pub fn pod_controller(meta: &ObjectMeta) -> Option<Owner> {
    let generated = meta
        .other
        .get("generateName")
        .and_then(Value::as_str)
        .is_some_and(|g| !g.is_empty());
    if !generated {
        return None;
    }
    let refs = meta.other.get("ownerReferences")?.as_sequence()?;
    let text = |r: &Value, k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default().into();
    refs.iter()
        .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        .map(|r| Owner {
            kind: text(r, "kind"),
            name: text(r, "name"),
        })
}
