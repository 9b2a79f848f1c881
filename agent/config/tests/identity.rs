//! Pods' telemetry identities as the snapshot carries them: on each workload (the client side) and on
//! each endpoint (the server side), from the pod's labels and controller, whichever way the pod is
//! known: a full Pod (standalone mode, or this node's in Kubernetes mode) or the metadata-only form
//! Kubernetes mode keeps for every node's pods.

use serde_json::{json, Value};
use sluice_config::k8s::POD_METADATA_KIND;
use sluice_config::{build, parse_api_object, parse_str, BuildOptions, Event, Store, Update};
use sluice_policy::{Identity, Snapshot, UNKNOWN};
use std::sync::Arc;

/// A Deployment's pod as the ReplicaSet controller creates it.
fn deployment_pod(name: &str, deployment: &str, hash: &str, ip: &str, version: &str) -> String {
    format!(
        r#"---
apiVersion: v1
kind: Pod
metadata:
  name: {deployment}-{hash}-{name}
  generateName: {deployment}-{hash}-
  namespace: shop
  labels: {{app: reviews, version: {version}, pod-template-hash: "{hash}"}}
  ownerReferences:
  - {{apiVersion: apps/v1, kind: ReplicaSet, name: {deployment}-{hash}, uid: 7, controller: true, blockOwnerDeletion: true}}
status: {{phase: Running, podIP: {ip}}}
"#
    )
}

const SERVICE: &str = r#"---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 80, targetPort: 9080}]
"#;

fn snapshot(yaml: &str) -> Snapshot {
    let parsed = parse_str("pods.yaml", yaml);
    let (snap, problems) = build(&parsed.objects, &BuildOptions::default());
    assert!(
        problems.iter().all(|p| !p.is_error()),
        "{problems:#?}\n{:#?}",
        parsed.problems
    );
    snap
}

fn endpoint_identities(snap: &Snapshot, host: &str) -> Vec<(String, Arc<Identity>)> {
    let cluster = snap
        .clusters
        .values()
        .find(|c| c.key.host == host && c.key.subset.is_none())
        .unwrap_or_else(|| panic!("no cluster for {host}"));
    cluster
        .endpoints
        .iter()
        .map(|e| {
            (
                e.addr.to_string(),
                e.identity
                    .clone()
                    .unwrap_or_else(|| panic!("{} has no identity", e.addr)),
            )
        })
        .collect()
}

#[test]
fn standalone_pods_get_their_controllers_identity_on_both_sides() {
    let yaml = [
        SERVICE.to_string(),
        deployment_pod("x2x8q", "reviews-v1", "5d9c7", "10.0.0.1", "v1"),
        deployment_pod("k7d2m", "reviews-v2", "66b8f", "10.0.0.2", "v2"),
    ]
    .concat();
    let snap = snapshot(&yaml);
    let eps = endpoint_identities(&snap, "reviews.shop.svc.cluster.local");
    assert_eq!(eps.len(), 2);
    for (addr, id) in &eps {
        let (workload, version) = if addr.starts_with("10.0.0.1") {
            ("reviews-v1", "v1")
        } else {
            ("reviews-v2", "v2")
        };
        assert_eq!(id.workload, workload, "{addr}");
        assert_eq!(id.namespace, "shop");
        assert_eq!(
            (
                id.canonical_service.as_str(),
                id.canonical_revision.as_str()
            ),
            ("reviews", version)
        );
        // The client side (a workload looked up by its address) says the same.
        let w = snap
            .workloads
            .values()
            .find(|w| w.ips.iter().any(|ip| addr.starts_with(&ip.to_string())))
            .unwrap();
        assert_eq!(w.identity(), **id, "{addr}");
    }
}

#[test]
fn owners_count_only_for_generated_names_and_other_controllers_name_themselves() {
    // A pod named by hand keeps its name even with a controller (Istio looks at the controller
    // only when the name was generated); a StatefulSet's pod is the StatefulSet; a CronJob's Job's
    // pod is the CronJob; a ReplicaSet's pod without the hash label is the ReplicaSet.
    let yaml = r#"---
apiVersion: v1
kind: Pod
metadata:
  name: adopted
  namespace: shop
  labels: {pod-template-hash: abc}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-abc, uid: 1, controller: true}]
---
apiVersion: v1
kind: Pod
metadata:
  name: db-0
  generateName: db-
  namespace: shop
  ownerReferences: [{apiVersion: apps/v1, kind: StatefulSet, name: db, uid: 2, controller: true}]
---
apiVersion: v1
kind: Pod
metadata:
  name: backup-28345678-q9x2z
  generateName: backup-28345678-
  namespace: shop
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: not-a-controller, uid: 3}
  - {apiVersion: batch/v1, kind: Job, name: backup-28345678, uid: 4, controller: true}
---
apiVersion: v1
kind: Pod
metadata:
  name: bare-rs-x1
  generateName: bare-rs-
  namespace: shop
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: bare-rs, uid: 5, controller: true}]
---
apiVersion: v1
kind: Pod
metadata:
  name: orphan-x1
  generateName: orphan-
  namespace: shop
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: gone, uid: 6}]
"#;
    let snap = snapshot(yaml);
    let workload = |pod: &str| snap.workloads[&format!("shop/{pod}")].identity().workload;
    assert_eq!(workload("adopted"), "adopted");
    assert!(snap.workloads["shop/adopted"].owner.is_none());
    assert_eq!(workload("db-0"), "db");
    assert_eq!(workload("backup-28345678-q9x2z"), "backup");
    assert_eq!(workload("bare-rs-x1"), "bare-rs");
    // An owner that is not the controller does not count.
    assert_eq!(workload("orphan-x1"), "orphan-x1");
    let id = snap.workloads["shop/db-0"].identity();
    assert_eq!(
        (
            id.canonical_service.as_str(),
            id.canonical_revision.as_str()
        ),
        ("db", "latest")
    );
    assert_eq!(id.principal, UNKNOWN);
}

#[test]
fn endpoint_slices_name_their_pods_by_target_ref() {
    // Two pods with the same address in different namespaces: the slice's targetRef decides (a
    // targetRef without a namespace means the slice's own); an endpoint naming no known pod has
    // no identity.
    let yaml = [
        SERVICE.replace("  selector: {app: reviews}\n", ""),
        deployment_pod("x2x8q", "reviews-v1", "5d9c7", "10.0.0.1", "v1"),
        deployment_pod("x2x8q", "reviews-v1", "5d9c7", "10.0.0.1", "v1")
            .replace("namespace: shop", "namespace: other")
            .replace("app: reviews", "app: impostor"),
        r#"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-a, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: 9080}]
endpoints:
- addresses: [10.0.0.1]
  targetRef: {kind: Pod, name: reviews-v1-5d9c7-x2x8q}
- addresses: [10.0.0.9]
  targetRef: {kind: Pod, namespace: shop, name: not-known}
"#
        .to_string(),
    ]
    .concat();
    let snap = snapshot(&yaml);
    let cluster = snap
        .clusters
        .values()
        .find(|c| c.key.host == "reviews.shop.svc.cluster.local")
        .unwrap();
    let known = &cluster.endpoints[0];
    assert_eq!(known.pod.as_deref(), Some("shop/reviews-v1-5d9c7-x2x8q"));
    let id = known.identity.as_ref().expect("identity");
    assert_eq!(
        (id.workload.as_str(), id.canonical_service.as_str()),
        ("reviews-v1", "reviews")
    );
    let unknown = &cluster.endpoints[1];
    assert_eq!(
        (unknown.pod.as_deref(), unknown.identity.as_ref()),
        (None, None)
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes mode: the store fed as the watchers feed it.

fn api(value: Value) -> Update {
    let (mut updates, loose) = Update::from_parsed(parse_api_object(&value));
    assert!(loose.is_empty(), "{loose:?}");
    assert_eq!(updates.len(), 1, "{value}");
    updates.pop().unwrap()
}

/// A pod's metadata as the cluster-wide watch sends it to the store.
fn pod_metadata(name: &str, rv: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": POD_METADATA_KIND, "metadata": {
        "name": name, "namespace": "shop", "resourceVersion": rv,
        "generateName": "reviews-v1-5d9c7-",
        "labels": {"app": "reviews", "version": version, "pod-template-hash": "5d9c7"},
        "ownerReferences": [{"kind": "ReplicaSet", "name": "reviews-v1-5d9c7", "controller": true}]}})
}

fn full_pod(name: &str, ip: &str) -> Value {
    let mut meta = pod_metadata(name, "3", "v1")["metadata"].clone();
    meta["resourceVersion"] = "30".into();
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": {"nodeName": "node-a"}, "status": {"phase": "Running", "podIP": ip}})
}

fn kube_objects() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "reviews", "namespace": "shop", "resourceVersion": "1"},
               "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "reviews"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 9080}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "reviews-a", "namespace": "shop", "resourceVersion": "2",
                            "labels": {"kubernetes.io/service-name": "reviews"}},
               "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}],
               "endpoints": [
                   {"addresses": ["10.1.0.1"], "targetRef": {"kind": "Pod", "namespace": "shop", "name": "reviews-v1-5d9c7-local"}},
                   {"addresses": ["10.2.0.1"], "targetRef": {"kind": "Pod", "namespace": "shop", "name": "reviews-v1-5d9c7-remote"}}]}),
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
               "metadata": {"name": "reviews", "namespace": "shop", "resourceVersion": "4"},
               "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}}),
    ]
}

fn kube_store() -> Store {
    let mut store = Store::new(BuildOptions::default());
    for v in kube_objects() {
        store.apply(Event::Upsert(api(v)));
    }
    // This node's pod, known in full and by its metadata; another node's, by its metadata only.
    store.apply(Event::Upsert(api(full_pod(
        "reviews-v1-5d9c7-local",
        "10.1.0.1",
    ))));
    for name in ["reviews-v1-5d9c7-local", "reviews-v1-5d9c7-remote"] {
        store.apply(Event::Upsert(api(pod_metadata(name, "3", "v1"))));
    }
    store
}

fn endpoints(snap: &Snapshot, subset: Option<&str>) -> Vec<sluice_policy::Endpoint> {
    snap.clusters
        .values()
        .find(|c| c.key.port == 80 && c.key.subset.as_deref() == subset)
        .map(|c| c.endpoints.clone())
        .unwrap_or_default()
}

#[test]
fn another_nodes_endpoint_gets_its_identity_and_labels_from_pod_metadata() {
    let mut store = kube_store();
    let snap = store.commit().snapshot;
    let eps = endpoints(&snap, None);
    assert_eq!(eps.len(), 2);
    let remote = eps.iter().find(|e| e.addr.ip().to_string() == "10.2.0.1");
    let remote = remote.expect("the remote endpoint");
    assert_eq!(remote.pod.as_deref(), Some("shop/reviews-v1-5d9c7-remote"));
    let id = remote.identity.as_ref().expect("identity");
    assert_eq!(
        (
            id.workload.as_str(),
            id.namespace.as_str(),
            id.canonical_service.as_str(),
            id.canonical_revision.as_str()
        ),
        ("reviews-v1", "shop", "reviews", "v1")
    );
    // Its labels reach the subset cluster (without them a subset would have no endpoint there).
    assert_eq!(endpoints(&snap, Some("v1")).len(), 2);
    // Metadata never makes a workload of this node: only the full Pod is one.
    let names: Vec<&str> = snap.workloads.values().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["reviews-v1-5d9c7-local"]);

    // A pod known both ways: the same identity on its endpoint as on its workload, and as the
    // metadata alone gives.
    let local = eps
        .iter()
        .find(|e| e.addr.ip().to_string() == "10.1.0.1")
        .unwrap();
    let workload_side = snap.workloads["shop/reviews-v1-5d9c7-local"].identity();
    assert_eq!(**local.identity.as_ref().unwrap(), workload_side);
    let mut metadata_only = Store::new(BuildOptions::default());
    for v in kube_objects() {
        metadata_only.apply(Event::Upsert(api(v)));
    }
    metadata_only.apply(Event::Upsert(api(pod_metadata(
        "reviews-v1-5d9c7-local",
        "3",
        "v1",
    ))));
    let alone = endpoints(&metadata_only.commit().snapshot, None);
    assert_eq!(alone[0].identity.as_deref(), Some(&workload_side));
}

#[test]
fn pod_metadata_churn_rebuilds_only_when_labels_or_owner_move() {
    let mut store = kube_store();
    let generation = store.commit().snapshot.generation;
    // A new resourceVersion with the same labels and owner (the pod's status changed): nothing to
    // rebuild.
    store.apply(Event::Upsert(api(pod_metadata(
        "reviews-v1-5d9c7-remote",
        "9",
        "v1",
    ))));
    let r = store.commit();
    assert!(!r.changed);
    assert_eq!(r.snapshot.generation, generation);
    // A relabel moves the endpoint out of the subset and changes its identity.
    store.apply(Event::Upsert(api(pod_metadata(
        "reviews-v1-5d9c7-remote",
        "10",
        "v2",
    ))));
    let r = store.commit();
    assert!(r.changed);
    assert_eq!(r.snapshot.generation, generation + 1);
    assert_eq!(endpoints(&r.snapshot, Some("v1")).len(), 1);
    let remote = endpoints(&r.snapshot, None)
        .into_iter()
        .find(|e| e.addr.ip().to_string() == "10.2.0.1")
        .unwrap();
    assert_eq!(remote.identity.unwrap().canonical_revision, "v2");
    // A relist streamed as upserts and ended by a Retain: a pod sent again stays (and, unchanged,
    // is no news), one missing from it goes and its endpoint has no identity left.
    store.apply(Event::Upsert(api(pod_metadata(
        "reviews-v1-5d9c7-local",
        "3",
        "v1",
    ))));
    assert!(!store.commit().changed);
    store.apply(Event::Retain {
        kind: POD_METADATA_KIND.into(),
        keep: vec![("shop".into(), "reviews-v1-5d9c7-local".into())],
    });
    let snap = store.commit().snapshot;
    assert_eq!(store.count(POD_METADATA_KIND), 1);
    let remote = endpoints(&snap, None)
        .into_iter()
        .find(|e| e.addr.ip().to_string() == "10.2.0.1")
        .unwrap();
    assert_eq!((remote.pod, remote.identity), (None, None));
    // The same with a Resync (the whole list in one event) brings it back.
    store.apply(Event::Resync {
        kind: POD_METADATA_KIND.into(),
        updates: vec![
            api(pod_metadata("reviews-v1-5d9c7-local", "3", "v1")),
            api(pod_metadata("reviews-v1-5d9c7-remote", "11", "v1")),
        ],
    });
    assert_eq!(endpoints(&store.commit().snapshot, Some("v1")).len(), 2);
}

#[test]
fn pod_metadata_is_never_read_from_files() {
    // Standalone mode knows every Pod in full: a PodMetadata document is no kind of its.
    let parsed = parse_str(
        "x.yaml",
        "apiVersion: v1\nkind: PodMetadata\nmetadata: {name: p, namespace: shop}\n",
    );
    assert!(parsed.objects.is_empty());
    assert!(parsed.problems.is_empty(), "{:#?}", parsed.problems);
}
