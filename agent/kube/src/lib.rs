//! Kubernetes mode: kube-rs watchers feed the object store ([`sluice_config::Store`]) the same way
//! the directory source does in standalone mode, and the store publishes policy snapshots.
//!
//! * [`watch`]: one `kube::runtime::watcher` per kind (this node's Pods, every node's Pods as
//!   metadata, Namespaces as metadata, Services, EndpointSlices, VirtualServices,
//!   DestinationRules), each object converted to JSON and read through the same serde types and
//!   checks as files ([`sluice_config::parse_api_object`]). A relist is applied as one atomic
//!   resync at `InitDone` (every node's pods: streamed, then a retain of the listed set): an object
//!   present before and after never disappears. Errors are retried with kube's default back-off; a
//!   `403` names the missing permission.
//! * [`status`]: what `sluice status` shows under `kubernetes` (per-kind sync, errors, forbidden).
//! * [`events`]: Kubernetes Events (`SluiceRejected`) on rejected Istio objects.
//! * [`Kubernetes::start`]: wires them to one store task, which publishes a snapshot only once every
//!   kind has been listed completely (until then readiness stays false and whatever the agent held
//!   before stays in force), and after that on every effective change.
#![forbid(unsafe_code)]

pub mod events;
pub mod status;
pub mod watch;

use kube::Client;
use serde::Serialize;
use sluice_config::{BuildOptions, Event, Problem, Store};
use sluice_policy::Snapshot;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, watch as tokio_watch};

pub use status::{Forbidden, KindStatus, KubeStatus, StatusHandle};

/// One RBAC rule: what the agent asks the API server for, for the ClusterRole in `deploy/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RbacRule {
    /// API group (`""` is the core group).
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Exactly what this crate requests: list and watch for each watched kind (the watcher lists, then
/// watches; this node's Pods and every node's Pod metadata are both `pods`: RBAC grants a resource,
/// not a field selector or a representation), and create/patch of `events.k8s.io` Events (the Recorder creates an Event, then
/// patches its series when the same one recurs). API discovery (`GET /apis`, to pick the Istio
/// version) is a non-resource URL every authenticated client may read (`system:discovery`).
pub const RBAC_RULES: &[RbacRule] = &[
    RbacRule {
        group: "",
        resource: "pods",
        verbs: &["list", "watch"],
    },
    RbacRule {
        group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
    },
    RbacRule {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    RbacRule {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    RbacRule {
        group: "networking.istio.io",
        resource: "virtualservices",
        verbs: &["list", "watch"],
    },
    RbacRule {
        group: "networking.istio.io",
        resource: "destinationrules",
        verbs: &["list", "watch"],
    },
    RbacRule {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// Errors starting Kubernetes mode.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot use the in-cluster service account: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("cannot create a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from a kubeconfig file, or the pod's in-cluster service account when `None`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| Error::Kubeconfig {
                path: path.display().to_string(),
                source,
            };
            let kc = kube::config::Kubeconfig::read_from(path).map_err(err)?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None => kube::Config::incluster()?,
    };
    Ok(Client::try_from(config)?)
}

/// Settings of Kubernetes mode.
#[derive(Clone, Debug)]
pub struct Options {
    /// This node: only its Pods are watched in full (the rest by their metadata).
    pub node_name: String,
    /// How objects are interpreted (cluster domain, enrollment label).
    pub build: BuildOptions,
    /// `reportingInstance` of the Events the agent posts (the pod or node name).
    pub instance: String,
}

/// What the running Kubernetes mode offers the rest of the agent.
pub struct Kubernetes {
    /// Every published snapshot (the first once every kind is listed).
    pub snapshots: tokio_watch::Receiver<Arc<Snapshot>>,
    /// True once every kind's first complete list is in the store; set just before that
    /// snapshot is published, so it is true for whoever receives it. It stays true through later
    /// outages (the last good state keeps serving).
    pub ready: tokio_watch::Receiver<bool>,
    /// For `sluice status`.
    pub status: StatusHandle,
}

/// What watchers send the store task.
// Moved once through the channel: boxing would only add an allocation per event.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Message {
    Event(Event),
    /// A kind's first complete list has been sent.
    Synced(usize),
}

impl Kubernetes {
    /// Starts the watchers, the store task and the Event reporter on the current runtime.
    /// `initial` is what the agent serves until the first complete state is published.
    pub fn start(client: Client, opts: Options, initial: Arc<Snapshot>) -> Self {
        let kinds = watch::kinds();
        let status = StatusHandle::new(&kinds);
        let (tx, rx) = mpsc::unbounded_channel();
        let (snap_tx, snapshots) = tokio_watch::channel(initial);
        let (ready_tx, ready) = tokio_watch::channel(false);
        let (problems_tx, problems_rx) = tokio_watch::channel(Vec::new());
        for (index, kind) in kinds.into_iter().enumerate() {
            tokio::spawn(watch::run(
                client.clone(),
                kind,
                index,
                opts.node_name.clone(),
                tx.clone(),
                status.clone(),
            ));
        }
        tokio::spawn(events::report(
            client,
            opts.instance.clone(),
            status.clone(),
            problems_rx,
        ));
        // Checking objects and building snapshots is CPU work (tens of ms at a thousand
        // Services): on its own thread, never on the proxy's runtime.
        let store_status = status.clone();
        let store = Store::new(opts.build);
        std::thread::Builder::new()
            .name("sluice-store".into())
            .spawn(move || run_store(store, rx, store_status, snap_tx, ready_tx, problems_tx))
            .expect("spawn the store thread");
        Self {
            snapshots,
            ready,
            status,
        }
    }
}

/// Applies events in batches (everything queued, then one commit) and publishes snapshots once
/// every kind has been listed. Ends when every watcher has gone (the runtime shut down).
fn run_store(
    mut store: Store,
    mut rx: mpsc::UnboundedReceiver<Message>,
    status: StatusHandle,
    snapshots: tokio_watch::Sender<Arc<Snapshot>>,
    ready: tokio_watch::Sender<bool>,
    problems: tokio_watch::Sender<Vec<Problem>>,
) {
    let kinds = status.kinds();
    let mut synced = vec![false; kinds.len()];
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Event(event) => store.apply(event),
                Message::Synced(index) => synced[index] = true,
            }
            next = rx.try_recv().ok();
        }
        if !synced.iter().all(|s| *s) {
            // A partial view (say, Services but no Pods yet) would un-enroll pods and drop routes:
            // keep the previous state until every kind is complete.
            continue;
        }
        let reload = store.commit();
        status.set_objects(|kind| store.count(kind));
        let first = !*ready.borrow();
        if first {
            // Before the snapshot: whoever sees the first snapshot also sees that it is complete.
            status.set_synced();
            tracing::info!("every kind listed from the API server");
            let _ = ready.send(true);
        }
        if reload.changed || first {
            tracing::debug!(
                generation = reload.snapshot.generation,
                "publishing a Kubernetes snapshot"
            );
            let _ = snapshots.send(reload.snapshot);
            let _ = problems.send(reload.problems);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rbac_rules_cover_exactly_what_is_requested() {
        // Every watched kind: list, then watch.
        for kind in watch::kinds() {
            let rule = RBAC_RULES
                .iter()
                .find(|r| r.group == kind.group && r.resource == kind.resource)
                .unwrap_or_else(|| panic!("no rule for {}", kind.kind));
            assert_eq!(rule.verbs, ["list", "watch"], "{}", kind.kind);
        }
        // And the Events of rejected objects: created, then patched when they recur.
        let events = RBAC_RULES
            .iter()
            .find(|r| r.resource == "events")
            .expect("events");
        assert_eq!(
            (events.group, events.verbs),
            ("events.k8s.io", &["create", "patch"][..])
        );
        // Nothing else. Two watches read pods (this node's in full, every node's metadata), under
        // one rule: RBAC cannot tell them apart.
        let resources: std::collections::BTreeSet<_> = watch::kinds()
            .iter()
            .map(|k| (k.group, k.resource))
            .collect();
        assert_eq!(RBAC_RULES.len(), resources.len() + 1, "nothing else");
    }
}
