//! The real kube-rs 5 client, `watcher` and `reflector` against the fake: what a controller sees must
//! be what it would see from a real API server (initial list + watch, selectors, bookmarks, relist
//! after 410, 403 as an API error, outage and recovery, pagination, metadata-only watches, CRD
//! versions, discovery).

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams, WatchEvent,
    WatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use parking_lot::Mutex;
use serde_json::{json, Value};
use sluice_fake_apiserver::FakeApiServer;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A client configured the way an agent is: from a kubeconfig file naming the fake's plain-http URL.
async fn client(fake: &FakeApiServer) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&path).unwrap();
    let kubeconfig = Kubeconfig::read_from(&path).unwrap();
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    (Client::try_from(config).unwrap(), dir)
}

/// Polls `check` every 20 ms until it holds or `within` passes.
async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reflector draining its watcher on a task (with kube-rs's default back-off between errors), and
/// the errors the watcher reported.
struct Reflected<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: Store<K>,
    errors: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl<K: kube::Resource + Clone + 'static> Drop for Reflected<K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn reflect<K>(api: Api<K>, config: watcher::Config) -> Reflected<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                seen.lock().push(e.to_string());
            }
        }
    });
    Reflected {
        store,
        errors,
        task,
    }
}

fn pod(ns: &str, name: &str, node: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "labels": labels},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "i"}]}})
}

fn names<K: kube::Resource + Clone + 'static>(store: &Store<K>) -> Vec<String>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    let mut v: Vec<String> = store
        .state()
        .iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect();
    v.sort();
    v
}

fn vs(name: &str, host: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]}})
}

fn vs_api(client: &Client, version: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("networking.istio.io", version, "VirtualService");
    Api::namespaced_with(client.clone(), "default", &ApiResource::from_gvk(&gvk))
}

#[tokio::test]
async fn initial_list_then_watch_delivers_every_change_of_this_node_only() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create(pod("default", "a1", "node-a", json!({})))
        .unwrap();
    fake.create(pod("default", "b1", "node-b", json!({})))
        .unwrap();
    fake.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    fake.create(pod("shop", "a2", "node-a", json!({}))).unwrap();
    let (client, _dir) = client(&fake).await;
    let pods = reflect(
        Api::<Pod>::all(client),
        watcher::Config::default().fields("spec.nodeName=node-a"),
    );
    tokio::time::timeout(Duration::from_secs(5), pods.store.wait_until_ready())
        .await
        .expect("ready")
        .unwrap();
    assert_eq!(names(&pods.store), ["a1", "a2"]);

    fake.create(pod("default", "a3", "node-a", json!({})))
        .unwrap();
    fake.create(pod("default", "b2", "node-b", json!({})))
        .unwrap();
    let mut relabelled = fake.get("Pod/default/a1").unwrap();
    relabelled["metadata"]["labels"] = json!({"v": "2"});
    fake.replace(relabelled).unwrap();
    fake.delete("Pod/shop/a2").unwrap();
    eventually(
        "a3 added, a2 deleted, a1 relabelled",
        Duration::from_secs(5),
        || {
            let a1 = pods
                .store
                .state()
                .into_iter()
                .find(|p| p.metadata.name.as_deref() == Some("a1"));
            names(&pods.store) == ["a1", "a3"]
                && a1
                    .and_then(|p| p.metadata.labels.clone())
                    .is_some_and(|l| l.get("v").map(String::as_str) == Some("2"))
        },
    )
    .await;
    assert!(pods.errors.lock().is_empty(), "{:?}", pods.errors.lock());

    // Every pod request carried the node's field selector; the watcher paged its list by 500.
    let reqs: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/pods"))
        .collect();
    assert!(reqs
        .iter()
        .any(|r| r.verb == "list" && r.param("limit").as_deref() == Some("500")));
    assert!(reqs
        .iter()
        .any(|r| r.verb == "watch" && r.param("allowWatchBookmarks").as_deref() == Some("true")));
    assert!(
        reqs.iter()
            .all(|r| r.query.contains("fieldSelector=spec.nodeName%3Dnode-a")),
        "{reqs:#?}"
    );
}

#[tokio::test]
async fn label_and_field_selectors_apply_to_lists_and_watches() {
    let fake = FakeApiServer::start().await.unwrap();
    for (name, labels) in [
        ("web", json!({"app": "web", "tier": "front"})),
        ("api", json!({"app": "api"})),
        ("db", json!({"app": "db", "tier": "db"})),
        ("bare", json!({})),
    ] {
        fake.create(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"ports": [{"port": 80}]}}))
            .unwrap();
    }
    let (client, _dir) = client(&fake).await;
    let api = Api::<Service>::namespaced(client.clone(), "default");
    let list = |sel: &'static str| {
        let api = api.clone();
        async move {
            let mut v: Vec<String> = api
                .list(&ListParams::default().labels(sel))
                .await
                .unwrap()
                .items
                .into_iter()
                .map(|s| s.metadata.name.unwrap())
                .collect();
            v.sort();
            v
        }
    };
    assert_eq!(list("app in (web,api)").await, ["api", "web"]);
    assert_eq!(list("tier!=db").await, ["api", "bare", "web"]);
    assert_eq!(list("app notin (web),tier").await, ["db"]);
    assert_eq!(list("!app").await, ["bare"]);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=db"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    // A cluster IP was allocated, as the real server does.
    assert!(by_name.items[0]
        .spec
        .as_ref()
        .unwrap()
        .cluster_ip
        .as_ref()
        .unwrap()
        .starts_with("10.96."));
    // An unsupported field is a 400 naming it, as on the real server, not an empty list.
    match api
        .list(&ListParams::default().fields("spec.nodeName=x"))
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(
                (s.code, s.message.as_str()),
                (400, "field label not supported: spec.nodeName")
            )
        }
        other => panic!("expected a 400, got {other:?}"),
    }

    // A watch sees an object leave its selection as DELETED and enter it as ADDED.
    let svcs = reflect(api.clone(), watcher::Config::default().labels("tier"));
    tokio::time::timeout(Duration::from_secs(5), svcs.store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&svcs.store), ["db", "web"]);
    let mut db = fake.get("Service/default/db").unwrap();
    db["metadata"]["labels"] = json!({"app": "db"});
    fake.replace(db).unwrap();
    let mut bare = fake.get("Service/default/bare").unwrap();
    bare["metadata"]["labels"] = json!({"tier": "x"});
    fake.replace(bare).unwrap();
    eventually(
        "db left and bare entered the selection",
        Duration::from_secs(5),
        || names(&svcs.store) == ["bare", "web"],
    )
    .await;
}

#[tokio::test]
async fn bookmarks_arrive_and_timeouts_end_the_stream() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.set_bookmark_interval(Duration::from_millis(100));
    let (client, _dir) = client(&fake).await;
    let api = Api::<ConfigMap>::namespaced(client, "default");
    let rv = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    fake.create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}}))
        .unwrap();
    let started = Instant::now();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream ends")
    {
        seen.push(match ev.unwrap() {
            WatchEvent::Added(c) => format!("added {}", c.metadata.name.unwrap()),
            WatchEvent::Bookmark(b) => {
                assert_eq!(b.types.kind, "ConfigMap");
                assert_eq!(b.types.api_version, "v1");
                assert!(b.metadata.resource_version.parse::<u64>().unwrap() > rv.parse().unwrap());
                "bookmark".into()
            }
            other => format!("{other:?}"),
        });
    }
    let took = started.elapsed();
    assert_eq!(seen[0], "added c");
    assert!(
        seen.iter().filter(|s| *s == "bookmark").count() >= 5,
        "{seen:?}"
    );
    assert!(
        took >= Duration::from_millis(950) && took < Duration::from_secs(3),
        "timeoutSeconds=1 took {took:?}"
    );
    assert!(fake.stats().bookmarks >= 5);
}

#[tokio::test]
async fn an_expired_version_is_a_410_watch_event_not_an_http_error() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, _dir) = client(&fake).await;
    let api = Api::<Pod>::all(client);
    let old = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    fake.create(pod("default", "p", "n", json!({}))).unwrap();
    fake.compact();
    let mut stream = api
        .watch(&WatchParams::default(), &old)
        .await
        .expect("HTTP 200")
        .boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected an ERROR event, got {other:?}"),
    }
    assert!(stream.next().await.is_none());
    // The current version is still good.
    let now = fake.resource_version().to_string();
    let wp = WatchParams::default().timeout(1).disable_bookmarks();
    let mut ok = api.watch(&wp, &now).await.unwrap().boxed();
    assert!(
        ok.next().await.is_none(),
        "nothing happened, the stream just times out"
    );
    assert_eq!(fake.stats().expired, 1);
}

#[tokio::test]
async fn after_compaction_and_dropped_watches_the_reflector_relists_to_the_truth() {
    let fake = FakeApiServer::start().await.unwrap();
    for i in 0..5 {
        fake.create(vs(&format!("vs-{i}"), &format!("h{i}")))
            .unwrap();
    }
    let (client, _dir) = client(&fake).await;
    let api = vs_api(&client, "v1beta1");
    let gvk = GroupVersionKind::gvk("networking.istio.io", "v1beta1", "VirtualService");
    let writer = reflector::store::Writer::new(ApiResource::from_gvk(&gvk));
    let store = writer.as_reader();
    let errors = Arc::new(Mutex::new(Vec::new()));
    let seen = errors.clone();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if let Err(e) = item {
                seen.lock().push(e.to_string());
            }
        }
    });
    let names = |s: &Store<DynamicObject>| {
        let mut v: Vec<String> = s
            .state()
            .iter()
            .map(|o| o.metadata.name.clone().unwrap())
            .collect();
        v.sort();
        v
    };
    tokio::time::timeout(Duration::from_secs(5), store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(names(&store), ["vs-0", "vs-1", "vs-2", "vs-3", "vs-4"]);
    // Served under the version asked for.
    assert!(store
        .state()
        .iter()
        .all(|o| o.types.as_ref().unwrap().api_version == "networking.istio.io/v1beta1"));
    let lists_before = fake.stats().lists;

    // Hold the re-watch while changes the watcher never sees happen and get compacted away.
    fake.delay(
        "watch",
        "networking.istio.io",
        "virtualservices",
        Duration::from_millis(500),
    );
    fake.drop_watches();
    fake.delete("VirtualService/default/vs-1").unwrap();
    fake.create(vs("vs-9", "h9")).unwrap();
    fake.compact();
    eventually("the relist after 410", Duration::from_secs(10), || {
        names(&store) == ["vs-0", "vs-2", "vs-3", "vs-4", "vs-9"]
    })
    .await;
    let stats = fake.stats();
    assert!(stats.expired >= 1, "{stats:?}");
    assert!(stats.lists > lists_before, "{stats:?}");
    assert!(
        errors.lock().iter().any(|e| e.contains("Expired")),
        "{:?}",
        errors.lock()
    );
    task.abort();
}

#[tokio::test]
async fn forbidden_is_a_403_api_error_the_watcher_reports() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.forbid("list", "", "pods");
    let (client, _dir) = client(&fake).await;
    let mut stream = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .filter(|e| std::future::ready(!matches!(e, Ok(watcher::Event::Init))))
        .boxed();
    match stream.next().await {
        Some(Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))) => {
            assert_eq!((s.code, s.reason.as_str()), (403, "Forbidden"));
            assert_eq!(
                s.message,
                "pods is forbidden: User \"system:serviceaccount:sluice-system:sluice\" cannot list \
                 resource \"pods\" in API group \"\" at the cluster scope"
            );
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    // Namespaced wording, and other kinds unaffected.
    match Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert!(
            s.message.ends_with("in the namespace \"default\""),
            "{}",
            s.message
        ),
        other => panic!("expected a 403, got {other:?}"),
    }
    Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    fake.allow("list", "", "pods");
    Api::<Pod>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_outage_and_recovery_resume_the_watch() {
    let fake = FakeApiServer::start().await.unwrap();
    let svc = |name: &str| {
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
               "spec": {"ports": [{"port": 80}]}})
    };
    fake.create(svc("before")).unwrap();
    let (client, _dir) = client(&fake).await;
    let svcs = reflect(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    tokio::time::timeout(Duration::from_secs(5), svcs.store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    eventually("a watch open", Duration::from_secs(5), || {
        fake.stats().watches_open == 1
    })
    .await;

    fake.set_outage(true);
    // Connections are refused while it lasts.
    assert!(Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await
        .is_err());
    fake.create(svc("during")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        names(&svcs.store),
        ["before"],
        "the store keeps the last state it saw"
    );
    fake.set_outage(false);
    eventually(
        "the change made during the outage",
        Duration::from_secs(15),
        || names(&svcs.store) == ["before", "during"],
    )
    .await;
    assert!(!svcs.errors.lock().is_empty(), "the watcher saw the outage");
    assert!(fake.stats().outage_cuts >= 1);
}

#[tokio::test]
async fn pagination_over_more_than_500_objects() {
    let fake = FakeApiServer::start().await.unwrap();
    for i in 0..1203 {
        fake.create(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": format!("cm-{i:04}"), "namespace": "default"}}))
            .unwrap();
    }
    let (client, _dir) = client(&fake).await;
    let cms = reflect(Api::<ConfigMap>::all(client), watcher::Config::default());
    tokio::time::timeout(Duration::from_secs(10), cms.store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cms.store.state().len(), 1203);
    let lists: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.verb == "list")
        .collect();
    assert_eq!(lists.len(), 3, "{lists:#?}");
    assert!(lists[0].param("continue").is_none());
    assert!(lists[1].param("continue").is_some() && lists[2].param("continue").is_some());
}

#[tokio::test]
async fn metadata_watcher_follows_namespace_labels() {
    let fake = FakeApiServer::start().await.unwrap();
    fake.create(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    let (client, _dir) = client(&fake).await;
    let (store, writer) = reflector::store();
    // kube-rs 5's metadata-only watch (its deprecated `metadata_watcher` sends the same requests).
    let stream = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(writer);
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    tokio::time::timeout(Duration::from_secs(5), store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    let ambient = |s: &Store<PartialObjectMeta<Namespace>>| {
        s.state().iter().any(|n| {
            n.metadata.name.as_deref() == Some("shop")
                && n.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("istio.io/dataplane-mode"))
                    .map(String::as_str)
                    == Some("ambient")
        })
    };
    assert_eq!(store.state().len(), 5, "four built-in namespaces and shop");
    assert!(!ambient(&store));
    let mut ns = fake.get("Namespace/shop").unwrap();
    ns["metadata"]["labels"]["istio.io/dataplane-mode"] = "ambient".into();
    fake.replace(ns).unwrap();
    eventually("the label", Duration::from_secs(5), || ambient(&store)).await;
    let reqs = fake.requests();
    let ns_reqs: Vec<_> = reqs
        .iter()
        .filter(|r| r.path == "/api/v1/namespaces")
        .collect();
    assert!(ns_reqs.iter().any(|r| r.verb == "list") && ns_reqs.iter().any(|r| r.verb == "watch"));
    assert!(ns_reqs.iter().all(|r| r.metadata_only), "{ns_reqs:#?}");
    task.abort();
}

#[tokio::test]
async fn metadata_only_pods_of_every_node_carry_owners_not_specs_and_follow_changes() {
    let fake = FakeApiServer::start().await.unwrap();
    let mut owned = pod(
        "default",
        "web-5d9c7-x2x8q",
        "node-b",
        json!({"pod-template-hash": "5d9c7"}),
    );
    owned["metadata"]["generateName"] = "web-5d9c7-".into();
    owned["metadata"]["annotations"] = json!({"note": "kept by the server, sent by it too"});
    owned["metadata"]["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-5d9c7", "uid": "u1", "controller": true}]);
    owned["status"] = json!({"phase": "Running", "podIP": "10.1.0.7"});
    fake.create(owned).unwrap();
    fake.create(pod("default", "a1", "node-a", json!({"v": "1"})))
        .unwrap();
    let (client, _dir) = client(&fake).await;
    let pods = reflect(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default(),
    );
    tokio::time::timeout(Duration::from_secs(5), pods.store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        names(&pods.store),
        ["a1", "web-5d9c7-x2x8q"],
        "every node's"
    );
    let web = pods
        .store
        .state()
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some("web-5d9c7-x2x8q"))
        .unwrap();
    assert_eq!(web.metadata.generate_name.as_deref(), Some("web-5d9c7-"));
    let owner = &web.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("ReplicaSet", "web-5d9c7", Some(true))
    );
    // A status change is a new version of the metadata too (the real server's behaviour): the
    // watch reports it, with the new resourceVersion and nothing else different.
    let rv = web.metadata.resource_version.clone().unwrap();
    let mut changed = fake.get("Pod/default/web-5d9c7-x2x8q").unwrap();
    changed["status"]["phase"] = "Succeeded".into();
    fake.replace(changed).unwrap();
    eventually("the status change reported", Duration::from_secs(5), || {
        pods.store.state().iter().any(|p| {
            p.metadata.name.as_deref() == Some("web-5d9c7-x2x8q")
                && p.metadata.resource_version.as_deref() != Some(rv.as_str())
        })
    })
    .await;
    // The wire form: metadata only, in both the list and the watch.
    let reqs: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/api/v1/pods")
        .collect();
    assert!(reqs.iter().any(|r| r.verb == "list") && reqs.iter().any(|r| r.verb == "watch"));
    assert!(
        reqs.iter()
            .all(|r| r.metadata_only && r.param("fieldSelector").is_none()),
        "{reqs:#?}"
    );
    let raw = client
        .request_text(
            http::Request::get("/api/v1/pods")
                .header(
                    "Accept",
                    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
                )
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let raw: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(raw["kind"], "PartialObjectMetadataList");
    for item in raw["items"].as_array().unwrap() {
        assert!(
            item.get("spec").is_none() && item.get("status").is_none(),
            "{item}"
        );
    }
    // Forbidden like any other list: RBAC grants `pods`, whatever the representation.
    fake.forbid("list", "", "pods");
    match Api::<PartialObjectMeta<Pod>>::all(client)
        .list_metadata(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403),
        other => panic!("expected a 403, got {other:?}"),
    }
}

#[tokio::test]
async fn crds_are_served_under_every_version_and_discovery_finds_them() {
    let fake = FakeApiServer::start().await.unwrap();
    let (client, _dir) = client(&fake).await;
    let created = vs_api(&client, "v1alpha3")
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "networking.istio.io/v1alpha3", "kind": "VirtualService",
                "metadata": {"name": "r"}, "spec": {"hosts": ["r"]}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let list = vs_api(&client, version)
            .list(&ListParams::default())
            .await
            .unwrap();
        assert_eq!(list.items.len(), 1);
        assert_eq!(
            list.items[0].types.as_ref().unwrap().api_version,
            format!("networking.istio.io/{version}"),
            "CRD list items carry their type"
        );
    }
    // Built-in list items carry no type (k8s-openapi fills it in), as on the real server.
    fake.create(pod("default", "p", "n", json!({}))).unwrap();
    let raw = client
        .request_text(http::Request::get("/api/v1/pods").body(Vec::new()).unwrap())
        .await
        .unwrap();
    let raw: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(raw["kind"], "PodList");
    assert!(raw["items"][0].get("kind").is_none() && raw["items"][0].get("apiVersion").is_none());

    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let istio = discovery
        .groups()
        .find(|g| g.name() == "networking.istio.io")
        .expect("istio group");
    assert_eq!(istio.preferred_version_or_latest(), "v1");
    assert!(istio
        .recommended_resources()
        .iter()
        .any(|(r, _)| r.kind == "VirtualService"));
    assert_eq!(client.apiserver_version().await.unwrap().major, "1");
}

#[tokio::test]
async fn events_posted_by_kube_rs_recorder_are_stored_and_listable() {
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let fake = FakeApiServer::start().await.unwrap();
    let stored = fake.create(vs("bad", "h")).unwrap();
    let (client, _dir) = client(&fake).await;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "sluice".into(),
            instance: Some("node-a".into()),
        },
    );
    let reference = ObjectReference {
        api_version: Some("networking.istio.io/v1".into()),
        kind: Some("VirtualService".into()),
        namespace: Some("default".into()),
        name: Some("bad".into()),
        uid: stored["metadata"]["uid"].as_str().map(String::from),
        ..Default::default()
    };
    let event = Event {
        type_: EventType::Warning,
        reason: "SluiceRejected".into(),
        note: Some("spec.http[0].timeout: invalid duration".into()),
        action: "Validate".into(),
        secondary: None,
    };
    // The first publish creates, the second patches the series.
    recorder.publish(&event, &reference).await.unwrap();
    recorder.publish(&event, &reference).await.unwrap();
    let events = fake.events();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0]["apiVersion"], "events.k8s.io/v1");
    assert_eq!(events[0]["reason"], "SluiceRejected");
    assert_eq!(events[0]["regarding"]["name"], "bad");
    assert_eq!(events[0]["series"]["count"], 2);
    let writes: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| {
            r.path
                .starts_with("/apis/events.k8s.io/v1/namespaces/default/events")
        })
        .map(|r| (r.verb, r.status))
        .collect();
    assert_eq!(
        writes,
        [("create".to_string(), 201), ("patch".to_string(), 200)]
    );
    // Core v1 events are a separate resource here and listable by field.
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), "default");
    core.create(
        &PostParams::default(),
        &serde_json::from_value(
            json!({"metadata": {"name": "e1"}, "reason": "SluiceRejected",
            "involvedObject": {"kind": "VirtualService", "name": "bad", "namespace": "default"}}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    let listed = core
        .list(&ListParams::default().fields("reason=SluiceRejected"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(fake.events().len(), 2);
}

#[tokio::test]
async fn streaming_lists_end_their_initial_events_with_the_marked_bookmark() {
    let fake = FakeApiServer::start().await.unwrap();
    for i in 0..3 {
        fake.create(pod("default", &format!("p{i}"), "node-a", json!({})))
            .unwrap();
    }
    let (client, _dir) = client(&fake).await;
    let pods = reflect(
        Api::<Pod>::all(client),
        watcher::Config::default().streaming_lists(),
    );
    tokio::time::timeout(Duration::from_secs(5), pods.store.wait_until_ready())
        .await
        .expect("ready")
        .unwrap();
    assert_eq!(names(&pods.store), ["p0", "p1", "p2"]);
    // No list at all: the watch's initial events stood in for it.
    let reqs = fake.requests();
    assert!(reqs.iter().all(|r| r.verb != "list"), "{reqs:#?}");
    assert!(reqs
        .iter()
        .any(|r| r.param("sendInitialEvents").as_deref() == Some("true")));
    fake.create(pod("default", "p3", "node-a", json!({})))
        .unwrap();
    eventually("p3", Duration::from_secs(5), || {
        names(&pods.store).len() == 4
    })
    .await;
}
