//! Who a pod is in Istio's telemetry: the values of the `source_*` / `destination_*` labels that
//! Istio's metrics carry and Kiali's graph and Istio's dashboards group by. Computed once per pod
//! per generation; every metric sample of a request shares it by `Arc`.

use serde::Serialize;
use std::collections::BTreeMap;

/// Istio's word for a value nobody knows.
pub const UNKNOWN: &str = "unknown";

/// A pod's telemetry identity, computed as Istio's ambient mesh computes it (istiod's workload
/// index, which ztunnel and waypoints report from).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Identity {
    /// The workload: the `service.istio.io/workload-name` label, else the owning controller of a
    /// pod whose name was generated (a Deployment through its ReplicaSet, a CronJob through its
    /// Job, a StatefulSet, ...), else the pod's own name.
    pub workload: String,
    pub namespace: String,
    /// `service.istio.io/canonical-name`, `app.kubernetes.io/name`, `app`, else the workload.
    pub canonical_service: String,
    /// `service.istio.io/canonical-revision`, `app.kubernetes.io/version`, `version`, else `latest`.
    pub canonical_revision: String,
    /// Istio's `source_app`/`destination_app`. In an ambient mesh (ztunnel, and a waypoint about a
    /// peer it learned from istiod) this is the canonical service, not the bare `app` label a
    /// sidecar reports; the two agree whenever `app` is what names the canonical service.
    pub app: String,
    /// Istio's `source_version`/`destination_version`: the canonical revision, likewise.
    pub version: String,
    /// The SPIFFE identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>` when
    /// the connection is authenticated; Sluice does not terminate mTLS, so `unknown`.
    pub principal: String,
}

/// A pod's controller as Istio's workload rule sees it: the `metadata.ownerReferences` entry with
/// `controller: true`, of a pod whose name was generated (`metadata.generateName` set). Istio
/// ignores the owner of a pod that was named by hand, so such a pod has no `Owner` here.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

/// The label that overrides the workload name (Istio's `service.istio.io/workload-name`).
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

impl Identity {
    /// Nobody: the labels of a peer Sluice does not know (every value `unknown`).
    pub fn unknown() -> Self {
        Self {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            principal: UNKNOWN.into(),
        }
    }

    /// The identity of pod `name` in `namespace` with these labels and controller (see [`Owner`]:
    /// `None` for a pod whose name was not generated). Empty values are reported as `unknown`, as
    /// ztunnel does.
    pub fn of_pod(
        name: &str,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        owner: Option<&Owner>,
    ) -> Self {
        Self::of_pod_with(
            name,
            namespace,
            |k| labels.get(k).map(String::as_str),
            owner,
        )
    }

    /// [`Identity::of_pod`] with the pod's labels behind a lookup (for labels kept in another
    /// shape than a map).
    pub fn of_pod_with<'l>(
        name: &str,
        namespace: &str,
        label: impl Fn(&str) -> Option<&'l str>,
        owner: Option<&Owner>,
    ) -> Self {
        let workload = label(WORKLOAD_NAME_LABEL)
            .map(str::to_string)
            .unwrap_or_else(|| workload_name(name, &label, owner));
        // A label that is present wins even when empty (Istio looks keys up, not values).
        let first = |keys: &[&str]| keys.iter().find_map(|k| label(k)).map(str::to_string);
        let canonical_service = first(&[
            "service.istio.io/canonical-name",
            "app.kubernetes.io/name",
            "app",
        ])
        .unwrap_or_else(|| workload.clone());
        let canonical_revision = first(&[
            "service.istio.io/canonical-revision",
            "app.kubernetes.io/version",
            "version",
        ])
        .unwrap_or_else(|| "latest".into());
        let known = |v: String| if v.is_empty() { UNKNOWN.into() } else { v };
        Self {
            app: known(canonical_service.clone()),
            version: known(canonical_revision.clone()),
            canonical_service: known(canonical_service),
            canonical_revision: known(canonical_revision),
            principal: UNKNOWN.into(),
            namespace: known(namespace.into()),
            workload: known(workload),
        }
    }
}

/// Istio's workload name from a pod's controller (its "deploy meta" heuristics): a ReplicaSet
/// whose name ends with the pod's `pod-template-hash` (or Argo's `rollouts-pod-template-hash`)
/// stands for its Deployment (Rollout), named without `-<hash>`; a ReplicationController of an
/// OpenShift DeploymentConfig for the `deploymentconfig` label's value; a Job named
/// `<name>-<8 to 10 digits>` for its CronJob `<name>`; any other controller for itself. A pod
/// without one (or a controller without a name) is its own workload.
fn workload_name<'l>(
    name: &str,
    labels: &impl Fn(&str) -> Option<&'l str>,
    owner: Option<&Owner>,
) -> String {
    let Some(owner) = owner.filter(|o| !o.name.is_empty()) else {
        return name.into();
    };
    let label = |k: &str| labels(k).filter(|v| !v.is_empty());
    // `<rs>` without `-<hash>`; a name that merely ends with the hash (no dash) is kept whole.
    let trim_hash = |hash: &str| {
        let rs = owner.name.as_str();
        rs.strip_suffix(hash)
            .and_then(|n| n.strip_suffix('-'))
            .unwrap_or(rs)
            .to_string()
    };
    let workload = match owner.kind.as_str() {
        "ReplicaSet" => match (
            label("pod-template-hash"),
            label("rollouts-pod-template-hash"),
        ) {
            (Some(hash), _) if owner.name.ends_with(hash) => trim_hash(hash),
            (_, Some(hash)) if owner.name.ends_with(hash) => trim_hash(hash),
            _ => owner.name.clone(),
        },
        "ReplicationController" => label("deploymentconfig").unwrap_or(&owner.name).to_string(),
        "Job" => cron_job_of(&owner.name).unwrap_or(&owner.name).to_string(),
        _ => owner.name.clone(),
    };
    if workload.is_empty() {
        name.into()
    } else {
        workload
    }
}

/// The CronJob a Job was made by, from its name: `<cronjob>-<scheduled time>`, the time being 8 to
/// 10 ASCII digits (Istio's pattern `(.+)-\d{8,10}$`).
fn cron_job_of(job: &str) -> Option<&str> {
    let (cron, stamp) = job.rsplit_once('-')?;
    let digits = (8..=10).contains(&stamp.len()) && stamp.bytes().all(|b| b.is_ascii_digit());
    (digits && !cron.is_empty()).then_some(cron)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn owner(kind: &str, name: &str) -> Owner {
        Owner {
            kind: kind.into(),
            name: name.into(),
        }
    }

    fn workload(labels_: &[(&str, &str)], kind: &str, name: &str) -> String {
        Identity::of_pod("pod-x", "ns", &labels(labels_), Some(&owner(kind, name))).workload
    }

    #[test]
    fn deployment_pod() {
        // Istio: a ReplicaSet whose name ends with the pod's pod-template-hash is a Deployment's,
        // named without "-<hash>"; canonical service/revision from app/version; in ambient,
        // app/version are the canonical service/revision.
        let l = labels(&[
            ("app", "reviews"),
            ("version", "v2"),
            ("pod-template-hash", "5d9c7"),
        ]);
        let id = Identity::of_pod(
            "reviews-v2-5d9c7-x2x8q",
            "shop",
            &l,
            Some(&owner("ReplicaSet", "reviews-v2-5d9c7")),
        );
        assert_eq!(
            id,
            Identity {
                workload: "reviews-v2".into(),
                namespace: "shop".into(),
                canonical_service: "reviews".into(),
                canonical_revision: "v2".into(),
                app: "reviews".into(),
                version: "v2".into(),
                principal: UNKNOWN.into(),
            }
        );
    }

    #[test]
    fn replica_sets_without_their_hash_are_their_own_workload() {
        // Istio: a bare ReplicaSet (no pod-template-hash label), or one whose name does not end
        // with the hash, is the workload under its own name.
        assert_eq!(workload(&[], "ReplicaSet", "web-abc12"), "web-abc12");
        assert_eq!(
            workload(&[("pod-template-hash", "zzz")], "ReplicaSet", "web-abc12"),
            "web-abc12"
        );
        // An empty hash label counts as absent.
        assert_eq!(
            workload(&[("pod-template-hash", "")], "ReplicaSet", "web-"),
            "web-"
        );
        // Ends with the hash but without the dash: nothing to trim ("-<hash>" is what is removed).
        assert_eq!(
            workload(&[("pod-template-hash", "abc12")], "ReplicaSet", "webabc12"),
            "webabc12"
        );
        // Argo Rollouts' ReplicaSets carry rollouts-pod-template-hash instead.
        assert_eq!(
            workload(
                &[("rollouts-pod-template-hash", "7f8d")],
                "ReplicaSet",
                "canary-7f8d"
            ),
            "canary"
        );
    }

    #[test]
    fn deployment_config_cron_job_and_other_controllers() {
        // Istio: a ReplicationController with the pod label `deploymentconfig` (OpenShift) is that
        // DeploymentConfig; without it, the ReplicationController itself.
        assert_eq!(
            workload(
                &[("deploymentconfig", "frontend")],
                "ReplicationController",
                "frontend-3"
            ),
            "frontend"
        );
        assert_eq!(
            workload(&[], "ReplicationController", "frontend-3"),
            "frontend-3"
        );
        // Istio: a Job named `(.+)-\d{8,10}$` is its CronJob's (the suffix is the scheduled
        // time in minutes); any other Job is itself.
        assert_eq!(workload(&[], "Job", "backup-28345678"), "backup");
        assert_eq!(workload(&[], "Job", "backup-2834567890"), "backup");
        assert_eq!(workload(&[], "Job", "a-b-28345678"), "a-b");
        assert_eq!(workload(&[], "Job", "backup-2834567"), "backup-2834567");
        assert_eq!(
            workload(&[], "Job", "backup-28345678901"),
            "backup-28345678901"
        );
        assert_eq!(workload(&[], "Job", "-28345678"), "-28345678");
        assert_eq!(workload(&[], "Job", "migrate"), "migrate");
        // Any other controller (StatefulSet, DaemonSet, a custom one) is the workload by its name.
        assert_eq!(workload(&[], "StatefulSet", "db"), "db");
        assert_eq!(workload(&[], "DaemonSet", "agent"), "agent");
        // A controller reference without a name: the pod's own name.
        assert_eq!(workload(&[], "StatefulSet", ""), "pod-x");
        // Trimming that leaves nothing: the pod's own name too.
        assert_eq!(
            workload(&[("pod-template-hash", "abc")], "ReplicaSet", "-abc"),
            "pod-x"
        );
    }

    #[test]
    fn the_workload_name_label_overrides_the_controller() {
        // Istio: `service.istio.io/workload-name` names the workload whatever the controller; the
        // canonical service falls back to that name.
        let l = labels(&[
            (WORKLOAD_NAME_LABEL, "checkout"),
            ("pod-template-hash", "h1"),
        ]);
        let id = Identity::of_pod("web-h1-x", "shop", &l, Some(&owner("ReplicaSet", "web-h1")));
        assert_eq!(
            (id.workload.as_str(), id.canonical_service.as_str()),
            ("checkout", "checkout")
        );
        let id = Identity::of_pod("standalone", "shop", &l, None);
        assert_eq!(id.workload, "checkout");
    }

    #[test]
    fn bare_pod_and_label_fallbacks() {
        // Istio: no controller (or a name not generated, so no Owner): the pod's name; canonical
        // service falls back to the workload, canonical revision to "latest".
        let id = Identity::of_pod("debug", "default", &BTreeMap::new(), None);
        assert_eq!(id.workload, "debug");
        assert_eq!(id.canonical_service, "debug");
        assert_eq!(id.canonical_revision, "latest");
        assert_eq!((id.app.as_str(), id.version.as_str()), ("debug", "latest"));
        // Istio: canonical-name, then app.kubernetes.io/name, then app (revision likewise).
        let l = labels(&[
            ("app.kubernetes.io/name", "web"),
            ("app.kubernetes.io/version", "1.2"),
            ("app", "ignored"),
            ("version", "ignored"),
        ]);
        let id = Identity::of_pod("web-0", "default", &l, None);
        assert_eq!(
            (
                id.canonical_service.as_str(),
                id.canonical_revision.as_str()
            ),
            ("web", "1.2")
        );
        assert_eq!((id.app.as_str(), id.version.as_str()), ("web", "1.2"));
        let l = labels(&[
            ("service.istio.io/canonical-name", "shop-web"),
            ("service.istio.io/canonical-revision", "canary"),
            ("app.kubernetes.io/name", "web"),
        ]);
        let id = Identity::of_pod("web-0", "default", &l, None);
        assert_eq!(
            (
                id.canonical_service.as_str(),
                id.canonical_revision.as_str()
            ),
            ("shop-web", "canary")
        );
    }

    #[test]
    fn a_present_empty_label_wins_and_reads_unknown() {
        // Istio looks label keys up (an empty `app` still wins over the workload name); ztunnel
        // reports an empty value as "unknown".
        let l = labels(&[("app", ""), ("version", "")]);
        let id = Identity::of_pod("web-0", "default", &l, None);
        assert_eq!(id.canonical_service, UNKNOWN);
        assert_eq!(id.canonical_revision, UNKNOWN);
        assert_eq!((id.app.as_str(), id.version.as_str()), (UNKNOWN, UNKNOWN));
        assert_eq!(id.workload, "web-0");
    }
}
