//! `/status`, `/redirects` and `/workloads`: what the agent runs and whom it redirects.

use crate::Problem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `/status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub agent: Agent,
    /// The configuration generation in force.
    pub generation: u64,
    pub services: usize,
    pub clusters: usize,
    /// VirtualService hosts (exact and wildcard).
    pub virtual_hosts: usize,
    /// Pods known to the registry.
    pub workloads: usize,
    pub rejections: Vec<Problem>,
    pub warnings: Vec<Problem>,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: u64,
    pub redirect: RedirectStatus,
    /// `None` in standalone mode.
    pub kubernetes: Option<KubeStatus>,
}

/// The agent's own configuration, as `sluice run` resolved it from flags and environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    pub version: String,
    /// `standalone` (a config directory) or `kubernetes`.
    pub mode: String,
    /// Standalone: the directory of YAML files, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_dir: Option<String>,
    /// Kubernetes: the kubeconfig used; `None` is the pod's in-cluster service account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    /// Kubernetes: this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    pub cluster_domain: String,
    pub cluster_id: String,
    /// `none` or `ebpf`.
    pub redirect: String,
    pub listeners: Listeners,
    /// Every other setting (workers, timeouts, limits, eBPF options), under its flag's name.
    #[serde(flatten)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listeners {
    pub outbound: String,
    pub admin: String,
    /// The admin API's Unix socket, if it serves one.
    #[serde(default)]
    pub admin_socket: Option<String>,
    pub metrics: String,
    pub ready: String,
}

/// Kubernetes mode's sync state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeStatus {
    /// Every kind has been listed and a snapshot published from it.
    pub synced: bool,
    pub kinds: Vec<KindStatus>,
    pub forbidden: Vec<Forbidden>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStatus {
    pub kind: String,
    pub api_version: String,
    pub synced: bool,
    pub objects: usize,
    pub last_error: Option<String>,
}

/// A permission the API server refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forbidden {
    pub verb: String,
    /// `""` is the core group.
    pub group: String,
    pub resource: String,
    pub message: String,
}

/// The redirect (`/redirects`, and `redirect` in `/status`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum RedirectStatus {
    /// Explicit proxy: clients use the outbound listener themselves.
    None,
    Ebpf(Box<EbpfStatus>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EbpfStatus {
    /// The eBPF object loaded.
    pub object: String,
    /// The cgroup the programs are attached to.
    pub cgroup: String,
    pub pin_dir: String,
    pub programs: Programs,
    pub proxy: ProxyAddrs,
    /// Redirecting at all (cleared on shutdown: fail open).
    pub enabled: bool,
    /// The `sk_msg` fast path.
    pub sockmap: bool,
    /// The outbound listener is registered with the programs: they redirect only while it is
    /// open.
    #[serde(default)]
    pub listener_registered: bool,
    pub lease: Lease,
    pub enrolled: Vec<EnrolledPod>,
    pub not_redirected: Vec<NotRedirected>,
    pub enrollment_error: Option<String>,
    pub enrollment: Enrollment,
    pub exclusions: Exclusions,
    /// The programs' counters by name.
    pub counters: BTreeMap<String, u64>,
    pub original_dst: OriginalDstCounts,
}

/// What installing the programs did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Programs {
    pub attached: Vec<String>,
    pub reused: Vec<String>,
    pub upgraded: Vec<String>,
    pub replaced_maps: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyAddrs {
    pub ipv4: Option<String>,
    pub ipv6: Option<String>,
}

/// The lease the programs redirect under (they fail open once it lapses).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    #[serde(flatten)]
    pub state: LeaseState,
    pub duration_ms: u64,
    pub renew_every_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LeaseState {
    Valid {
        remaining_ms: u64,
    },
    Expired {
        expired_ms_ago: u64,
    },
    /// Never renewed.
    None,
    Unknown {
        error: String,
    },
}

/// An enrolled pod's cgroup in the enrollment map.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EnrolledPod {
    /// `namespace/name`.
    pub pod: String,
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    /// `annotation`, `kubelet-name`, `container-id` or `proc`.
    pub found_by: Option<String>,
    pub enrolled_since_unix_ms: Option<u64>,
    pub last_verified_unix_ms: Option<u64>,
    pub enroll_delay_ms: Option<f64>,
    pub problem: Option<String>,
}

/// An enrolled pod that is not redirected, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotRedirected {
    pub pod: String,
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    pub cgroup_root: String,
    /// Repairs so far by kind.
    pub repairs: BTreeMap<String, u64>,
    pub reconciliations: u64,
    pub last_reconcile_unix_ms: Option<u64>,
    pub last_reconcile_cpu_us: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusions {
    pub ports: Vec<u16>,
    pub cidrs: Vec<String>,
}

/// How the proxy learnt redirected connections' original destinations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginalDstCounts {
    pub from_map: u64,
    pub from_sockopt: u64,
    pub unknown: u64,
}

/// `/workloads`: the pods the agent knows, and whether each is in the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Enrolled by its own or its namespace's `istio.io/dataplane-mode` label.
    pub enrolled: bool,
    /// Why it is not (or not yet) redirected, if it is not.
    pub not_redirected: Option<String>,
    /// Its pod-level cgroup (from the Pod, or as the enroller found it).
    pub cgroup: Option<String>,
    pub cgroup_id: Option<u64>,
    pub phase: Option<String>,
    pub host_network: bool,
    /// Its controller as Istio's workload rule sees it, if any.
    pub owner: Option<Owner>,
    /// Istio's telemetry identity (`destination_workload`, `app`, ...).
    pub workload: String,
}

/// A pod's controller (`ReplicaSet` `pricing-7c9d8f5b4`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}
