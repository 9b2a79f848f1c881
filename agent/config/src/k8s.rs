//! Serde types for the Kubernetes kinds Sluice reads in standalone mode: `Service`,
//! `discovery.k8s.io/v1 EndpointSlice`, `Pod` and `Namespace`. Only the fields Sluice uses are
//! described; the rest of these large objects is accepted without warnings (unknown-field warnings
//! are for Istio kinds, where a typo silently changes policy).

use crate::istio::{nullable, ObjectMeta};
use serde::Deserialize;
use serde_yaml::Value;
use std::collections::BTreeMap;

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
