//! The kinds the fake serves and how each is addressed: group, versions, plural, scope, and which
//! field selectors the real API server accepts for it. One table drives routing, discovery, list
//! shapes (built-in lists carry no item `kind`, CRD lists do) and the `Forbidden` messages.

/// One resource type (a plural under a group), served under every version in `versions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; `""` for the core group (`/api/v1`).
    pub group: &'static str,
    /// Served versions, preferred first. A CRD's one stored object is served under all of them with
    /// `apiVersion` rewritten, as the real server does for CRDs whose versions share one schema.
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Defined by a CustomResourceDefinition: list items keep `kind`/`apiVersion` and only
    /// `metadata.name`/`metadata.namespace` are selectable fields.
    pub crd: bool,
    /// Field selectors beyond `metadata.name`/`metadata.namespace` (from the real server's
    /// per-kind field label conversion functions).
    pub extra_fields: &'static [&'static str],
    pub short_names: &'static [&'static str],
}

impl ResourceType {
    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{}", self.group, version)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    pub fn serves(&self, version: &str) -> bool {
        self.versions.contains(&version)
    }

    pub fn supports_field(&self, field: &str) -> bool {
        matches!(field, "metadata.name" | "metadata.namespace")
            || self.extra_fields.contains(&field)
    }
}

const ISTIO_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];

/// Every kind the fake knows. Unknown paths get the real server's 404.
pub const RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        crd: false,
        extra_fields: &["status.phase"],
        short_names: &["ns"],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        crd: false,
        extra_fields: &["spec.unschedulable"],
        short_names: &["no"],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        crd: false,
        extra_fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        short_names: &["po"],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "services",
        singular: "service",
        kind: "Service",
        namespaced: true,
        crd: false,
        extra_fields: &["spec.clusterIP", "spec.type"],
        short_names: &["svc"],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "endpoints",
        singular: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        crd: false,
        extra_fields: &[],
        short_names: &["ep"],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        crd: false,
        extra_fields: &[],
        short_names: &["cm"],
    },
    ResourceType {
        group: "",
        versions: &["v1"],
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        crd: false,
        extra_fields: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
        ],
        short_names: &["ev"],
    },
    ResourceType {
        group: "discovery.k8s.io",
        versions: &["v1"],
        plural: "endpointslices",
        singular: "endpointslice",
        kind: "EndpointSlice",
        namespaced: true,
        crd: false,
        extra_fields: &["addressType"],
        short_names: &[],
    },
    ResourceType {
        group: "events.k8s.io",
        versions: &["v1"],
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        crd: false,
        extra_fields: &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
            "reason",
            "reportingController",
            "type",
        ],
        short_names: &["ev"],
    },
    ResourceType {
        group: "networking.istio.io",
        versions: ISTIO_VERSIONS,
        plural: "virtualservices",
        singular: "virtualservice",
        kind: "VirtualService",
        namespaced: true,
        crd: true,
        extra_fields: &[],
        short_names: &["vs"],
    },
    ResourceType {
        group: "networking.istio.io",
        versions: ISTIO_VERSIONS,
        plural: "destinationrules",
        singular: "destinationrule",
        kind: "DestinationRule",
        namespaced: true,
        crd: true,
        extra_fields: &[],
        short_names: &["dr"],
    },
    ResourceType {
        group: "networking.istio.io",
        versions: ISTIO_VERSIONS,
        plural: "serviceentries",
        singular: "serviceentry",
        kind: "ServiceEntry",
        namespaced: true,
        crd: true,
        extra_fields: &[],
        short_names: &["se"],
    },
    ResourceType {
        group: "networking.istio.io",
        versions: ISTIO_VERSIONS,
        plural: "gateways",
        singular: "gateway",
        kind: "Gateway",
        namespaced: true,
        crd: true,
        extra_fields: &[],
        short_names: &["gw"],
    },
];

/// The resource served at `group`/`version` under `plural`.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural && r.serves(version))
}

/// The resource for an object's `apiVersion` and `kind`.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    let (group, version) = split_api_version(api_version);
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.kind == kind && r.serves(version))
}

/// `"group/version"` -> (group, version); `"v1"` -> ("", "v1").
pub fn split_api_version(api_version: &str) -> (&str, &str) {
    match api_version.rsplit_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    }
}

/// Groups in discovery order, each with its versions (preferred first).
pub fn groups() -> Vec<(&'static str, &'static [&'static str])> {
    let mut out: Vec<(&'static str, &'static [&'static str])> = Vec::new();
    for r in RESOURCES {
        if !r.group.is_empty() && !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.versions));
        }
    }
    out
}
