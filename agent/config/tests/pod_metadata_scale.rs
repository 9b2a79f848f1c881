//! What Kubernetes mode pays to know every pod of a large cluster (for the identity and labels of
//! endpoints on other nodes): the store's memory per pod and the time to build and update a
//! snapshot, at 100,000 pods behind 1,000 Services. Memory is counted by this test's allocator
//! (bytes allocated and not freed), not estimated.
// Wall-clock time of real work is what it measures.
#![allow(clippy::disallowed_methods)]

use serde_json::json;
use sluice_config::k8s::POD_METADATA_KIND;
use sluice_config::{parse_api_object, BuildOptions, Event, Store, Update};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed on to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PODS: usize = 100_000;
const SERVICES: usize = 1_000;

/// Pod `i` as the watcher hands it over: a Deployment's pod with the labels such pods carry.
fn pod(i: usize, rv: usize, version: &str) -> serde_json::Value {
    let app = format!("svc-{:04}", i % SERVICES);
    let rs = format!("{app}-6d4cf56db6");
    json!({"apiVersion": "v1", "kind": POD_METADATA_KIND, "metadata": {
        "name": format!("{rs}-{i:05x}"), "namespace": "default", "resourceVersion": rv.to_string(),
        "generateName": format!("{rs}-"),
        "labels": {"app": app, "version": version, "pod-template-hash": "6d4cf56db6",
                   "app.kubernetes.io/part-of": "shop", "team": "payments"},
        "ownerReferences": [{"kind": "ReplicaSet", "name": rs, "controller": true}]}})
}

fn update(v: serde_json::Value) -> Update {
    Update::from_parsed(parse_api_object(&v))
        .0
        .pop()
        .expect("one object")
}

#[test]
fn a_hundred_thousand_pods_cost_little_memory_and_rebuild_only_on_change() {
    let mut store = Store::new(BuildOptions::default());
    // The cluster's Services and their slices, 100 endpoints each, every one naming its pod.
    for s in 0..SERVICES {
        let name = format!("svc-{s:04}");
        store.apply(Event::Upsert(update(
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
            "spec": {"clusterIP": format!("10.96.{}.{}", s / 250, 1 + s % 250),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        )));
        let endpoints: Vec<serde_json::Value> = (0..PODS / SERVICES)
            .map(|k| {
                let i = k * SERVICES + s;
                json!({"addresses": [format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256)],
                       "targetRef": {"kind": "Pod", "name": format!("{name}-6d4cf56db6-{i:05x}")}})
            })
            .collect();
        store.apply(Event::Upsert(update(json!({"apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": format!("{name}-x"), "namespace": "default", "resourceVersion": "1",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080}]}))));
    }
    let start = Instant::now();
    store.commit();
    let bare = start.elapsed();

    // As the watcher sends a list: one upsert per pod as it arrives, then the set to keep.
    let before = LIVE.load(Ordering::Relaxed);
    let start = Instant::now();
    let mut keep = Vec::new();
    for i in 0..PODS {
        let u = update(pod(i, 10 + i, "v1"));
        keep.push((u.id.namespace.clone(), u.id.name.clone()));
        store.apply(Event::Upsert(u));
    }
    store.apply(Event::Retain {
        kind: POD_METADATA_KIND.into(),
        keep,
    });
    let applied = start.elapsed();
    let held = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(store.count(POD_METADATA_KIND), PODS);
    let start = Instant::now();
    let before_snapshot = LIVE.load(Ordering::Relaxed);
    let r = store.commit();
    let built = start.elapsed();
    let snapshot = LIVE.load(Ordering::Relaxed) - before_snapshot;
    let with_identity = r
        .snapshot
        .clusters
        .values()
        .flat_map(|c| &c.endpoints)
        .filter(|e| e.identity.is_some())
        .count();
    assert_eq!(with_identity, PODS, "every endpoint names a known pod");
    let id = r.snapshot.clusters.values().next().unwrap().endpoints[0]
        .identity
        .clone()
        .unwrap();
    assert_eq!(
        (id.workload.as_str(), id.canonical_revision.as_str()),
        ("svc-0000", "v1")
    );

    // A status-only change (new resourceVersion, same metadata) and a relabel.
    let start = Instant::now();
    store.apply(Event::Upsert(update(pod(7, 1_000_000, "v1"))));
    let unchanged = store.commit();
    let churn = start.elapsed();
    assert!(!unchanged.changed);
    let start = Instant::now();
    store.apply(Event::Upsert(update(pod(7, 1_000_001, "v2"))));
    let relabelled = store.commit();
    let relabel = start.elapsed();
    assert!(relabelled.changed);

    let per_pod = held as f64 / PODS as f64;
    eprintln!(
        "{PODS} pods' metadata behind {SERVICES} Services: {:.1} MiB held by the store ({per_pod:.0} B per pod); \
         converted and stored in {applied:?}, snapshot built in {built:?} \
         ({bare:?} with no pod known); \
         a status-only change committed in {churn:?}, a relabel in {relabel:?}; \
         the snapshot grew by {:.1} MiB with their labels and identities on its {PODS} endpoints",
        held as f64 / (1024.0 * 1024.0),
        snapshot as f64 / (1024.0 * 1024.0)
    );
    // A full Pod as the API server returns it is several KiB (spec, status, managedFields); what
    // is kept is name, namespace, labels and controller.
    assert!(per_pod < 768.0, "{per_pod:.0} B per pod");
    assert!(
        churn < built / 10 + Duration::from_millis(5),
        "{churn:?} vs {built:?}"
    );
}
