//! An endpoint change (an EndpointSlice, another node's pod metadata) redoes only the clusters of
//! the Services concerned. Checked against the full build: after every step of a seeded random
//! walk of slice and pod changes, the store's snapshot is the one a fresh store builds from the
//! same objects, and the clusters and Services it did not need to touch are the very same
//! objects as before (shared, so the proxy keeps what it built from them).

use serde_json::{json, Value};
use sluice_config::k8s::POD_METADATA_KIND;
use sluice_config::{parse_api_object, BuildOptions, Event, Store, Update};
use sluice_policy::Snapshot;
use std::collections::BTreeMap;
use std::sync::Arc;

fn update(v: Value) -> Update {
    let (mut updates, loose) = Update::from_parsed(parse_api_object(&v));
    assert!(loose.is_empty(), "{loose:?}");
    updates.pop().expect("one object")
}

/// A small deterministic generator (xorshift): the walk is the same on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const PODS: usize = 12;

/// The objects in force, by a key of kind and name, each with its own resourceVersion.
struct World {
    objects: BTreeMap<String, Value>,
    rv: u64,
    rng: Rng,
    /// The version label of each reviews pod, and whether its metadata is known.
    versions: Vec<Option<&'static str>>,
}

impl World {
    fn new() -> Self {
        let mut w = Self {
            objects: BTreeMap::new(),
            rv: 0,
            rng: Rng(0x5eed_1234_abcd_0001),
            versions: (0..PODS)
                .map(|i| Some(if i % 3 == 0 { "v2" } else { "v1" }))
                .collect(),
        };
        let ns = |name: &str| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        w.put("ns/shop", ns("shop"));
        w.put("ns/web", ns("web"));
        w.put(
            "svc/reviews",
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "reviews"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 9080},
                               {"name": "grpc-api", "port": 9090, "targetPort": 9091}]}}),
        );
        w.put(
            "svc/ratings",
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ratings", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 80, "targetPort": 8080}]}}),
        );
        // Endpoints from the pods it selects (no slice): only a full build makes those.
        w.put(
            "svc/details",
            json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "details", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.22", "selector": {"app": "details"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 9080}]}}),
        );
        w.put(
            "pod/details-0",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "details-0", "namespace": "shop", "labels": {"app": "details"}},
            "spec": {"nodeName": "node-a"}, "status": {"phase": "Running", "podIP": "10.1.9.1"}}),
        );
        // This node's reviews pod, known in full as well as by its metadata.
        w.put(
            "pod/reviews-0",
            json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "reviews-0", "namespace": "shop",
                         "labels": {"app": "reviews", "version": "v2"}},
            "spec": {"nodeName": "node-a"}, "status": {"phase": "Running", "podIP": "10.1.0.0"}}),
        );
        w.put("dr/shop", json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                     {"name": "v2", "labels": {"version": "v2"}}]}}));
        // Clients in `web` see their own rule for reviews: a namespace view with its own clusters.
        w.put(
            "dr/web",
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "reviews-for-web", "namespace": "web"},
            "spec": {"host": "reviews.shop.svc.cluster.local", "exportTo": ["."],
                     "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 7}}},
                     "subsets": [{"name": "v2", "labels": {"version": "v2"}}]}}),
        );
        w.vs(5);
        for i in 0..PODS {
            w.pod_metadata(i);
        }
        for slice in ["reviews-a", "reviews-b", "ratings-a"] {
            w.slice(slice);
        }
        w
    }

    fn put(&mut self, key: &str, mut v: Value) {
        self.rv += 1;
        v["metadata"]["resourceVersion"] = self.rv.to_string().into();
        self.objects.insert(key.to_string(), v);
    }

    fn vs(&mut self, timeout_s: u32) {
        self.put("vs/reviews", json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
            "metadata": {"name": "reviews", "namespace": "shop"},
            "spec": {"hosts": ["reviews"], "http": [{"route": [{"destination": {"host": "reviews", "subset": "v1"}}],
                                                     "timeout": format!("{timeout_s}s")}]}}));
    }

    fn pod_metadata(&mut self, i: usize) {
        let key = format!("meta/reviews-{i}");
        match self.versions[i] {
            Some(version) => self.put(
                &key,
                json!({"apiVersion": "v1", "kind": POD_METADATA_KIND,
                "metadata": {"name": format!("reviews-{i}"), "namespace": "shop",
                             "labels": {"app": "reviews", "version": version}}}),
            ),
            None => {
                self.objects.remove(&key);
            }
        }
    }

    /// A new version of slice `name` with a random choice of its endpoints, some not ready.
    fn slice(&mut self, name: &str) {
        let ratings = name.starts_with("ratings");
        let (first, ports) = if ratings {
            (0, json!([{"port": 8080}]))
        } else {
            (
                usize::from(name.ends_with('b')) * PODS / 2,
                json!([{"name": "http", "port": 9080}, {"name": "grpc-api", "port": 9091}]),
            )
        };
        let mut endpoints = Vec::new();
        for i in first..first + PODS / 2 {
            if self.rng.below(4) == 0 {
                continue;
            }
            let mut ep = json!({"addresses": [format!("10.1.{}.{i}", u8::from(ratings))],
                                "conditions": {"ready": self.rng.below(5) != 0}});
            if !ratings {
                ep["targetRef"] = json!({"kind": "Pod", "name": format!("reviews-{i}")});
            }
            endpoints.push(ep);
        }
        let service = name.split('-').next().expect("service-part");
        self.put(
            &format!("slice/{name}"),
            json!({"apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}),
        );
    }

    fn full_build(&self) -> Arc<Snapshot> {
        let mut fresh = Store::new(BuildOptions::default());
        for v in self.objects.values() {
            fresh.apply(Event::Upsert(update(v.clone())));
        }
        fresh.commit().snapshot
    }
}

fn delete(store: &mut Store, v: &Value) {
    store.apply(Event::Delete(update(v.clone()).id));
}

/// The hosts whose clusters an endpoint change of these Services may touch.
fn host(service: &str) -> String {
    format!("{service}.shop.svc.cluster.local")
}

#[test]
fn endpoint_changes_redo_only_their_services_and_match_a_full_build() {
    let mut world = World::new();
    let mut store = Store::new(BuildOptions::default());
    for v in world.objects.values() {
        store.apply(Event::Upsert(update(v.clone())));
    }
    let first = store.commit().snapshot;
    assert!(first.same_config(&world.full_build()));
    assert!(
        first
            .namespaces
            .get("web")
            .is_some_and(|v| !v.clusters.is_empty()),
        "the walk covers a namespace's own clusters"
    );
    let (mut shared, mut rebuilt, mut unchanged) = (0, 0, 0);
    for step in 0..300 {
        let before = store.snapshot();
        // What this step changes: endpoints of `touched` Services only, or anything (`None`).
        let touched: Option<Vec<&str>> = match world.rng.below(20) {
            0 => {
                world.vs(5 + step % 7);
                store.apply(Event::Upsert(update(world.objects["vs/reviews"].clone())));
                None
            }
            1 => {
                // A slice for the Service whose endpoints came from its selector, and back.
                let key = "slice/details-a";
                if let Some(v) = world.objects.remove(key) {
                    delete(&mut store, &v);
                } else {
                    world.put(
                        key,
                        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                        "metadata": {"name": "details-a", "namespace": "shop",
                                     "labels": {"kubernetes.io/service-name": "details"}},
                        "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}],
                        "endpoints": [{"addresses": ["10.1.9.2"]}]}),
                    );
                    store.apply(Event::Upsert(update(world.objects[key].clone())));
                }
                None
            }
            2..=4 => {
                let i = world.rng.below(PODS);
                world.versions[i] = match (world.versions[i], world.rng.below(3)) {
                    (None, _) => Some("v1"),
                    (Some(_), 0) => None,
                    (Some("v1"), _) => Some("v2"),
                    (Some(_), _) => Some("v1"),
                };
                let key = format!("meta/reviews-{i}");
                match world.versions[i] {
                    Some(_) => {
                        world.pod_metadata(i);
                        store.apply(Event::Upsert(update(world.objects[&key].clone())));
                    }
                    None => {
                        let v = world.objects[&key].clone();
                        world.pod_metadata(i);
                        delete(&mut store, &v);
                    }
                }
                Some(vec!["reviews"])
            }
            5 => {
                let key = "slice/reviews-b";
                if let Some(v) = world.objects.remove(key) {
                    delete(&mut store, &v);
                } else {
                    world.slice("reviews-b");
                    store.apply(Event::Upsert(update(world.objects[key].clone())));
                }
                Some(vec!["reviews"])
            }
            _ => {
                let name = ["reviews-a", "reviews-b", "ratings-a"][world.rng.below(3)];
                let key = format!("slice/{name}");
                if !world.objects.contains_key(&key) {
                    continue;
                }
                world.slice(name);
                store.apply(Event::Upsert(update(world.objects[&key].clone())));
                Some(vec![name.split('-').next().expect("service")])
            }
        };
        let after = store.commit().snapshot;
        let full = world.full_build();
        assert!(
            after.same_config(&full),
            "step {step}: the snapshot differs from a full build of the same objects\n\
             store: {:#?}\nfull: {:#?}",
            after.clusters,
            full.clusters
        );
        assert_eq!(after.warnings, full.warnings, "step {step}");
        assert_eq!(after.rejections, full.rejections, "step {step}");
        let changed = !after.same_config(&before);
        assert_eq!(
            after.generation,
            before.generation + u64::from(changed),
            "step {step}: the generation counts configuration changes"
        );
        if !changed {
            unchanged += 1;
            assert!(Arc::ptr_eq(&after, &before), "step {step}: nothing new");
            continue;
        }
        let Some(touched) = touched else {
            rebuilt += 1;
            continue;
        };
        shared += 1;
        let touched: Vec<String> = touched.into_iter().map(host).collect();
        for (key, cluster) in &after.clusters {
            if !touched.contains(&key.host) {
                assert!(
                    Arc::ptr_eq(cluster, &before.clusters[key]),
                    "step {step}: {key} was made again though its endpoints did not change"
                );
            }
        }
        for (name, svc) in &after.services {
            assert!(
                Arc::ptr_eq(svc, &before.services[name]),
                "step {step}: Service {name} was made again"
            );
        }
    }
    eprintln!("{shared} endpoint changes shared the rest, {rebuilt} full builds, {unchanged} steps changed nothing");
    assert!(
        shared >= 100 && rebuilt >= 10,
        "the walk covers both paths: {shared} endpoint changes, {rebuilt} full builds"
    );
}
