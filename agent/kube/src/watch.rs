//! One `kube::runtime::watcher` per kind, turned into store events. The watcher lists (pages of
//! 500), then watches with bookmarks, resumes from the last resourceVersion after a dropped watch
//! and relists after `410 Gone`; each (re)list arrives as `Init`, `InitApply`..., `InitDone`, which
//! is sent to the store as one [`Event::Resync`] of the kind, so objects present before and after a
//! relist never vanish from a snapshot. Every object is converted to JSON (with its `apiVersion`
//! and `kind`, without `managedFields`) and read by [`sluice_config::parse_api_object`]: the same
//! types, checks and field paths as files.
//!
//! Pods are watched twice: this node's in full (`spec.nodeName` field selector: enrollment and
//! client identity need their status and containers), and every node's as metadata only
//! ([`POD_METADATA_KIND`]: the labels and controller of the pod behind any endpoint, for
//! DestinationRule subsets and the telemetry identity of a destination on another node). The
//! second is a cluster's worth of pods: each is cut down to those fields on arrival, and a
//! (re)list is streamed into the store and ended by the set to keep rather than buffered.
//!
//! Istio kinds are watched in one version, chosen by discovery: `v1` when the API server serves it,
//! else `v1beta1`, else `v1alpha3`. All versions of a CRD are views of the same stored objects (the
//! API server converts between them), so one watch sees every object whichever version it was
//! written in; watching all three would triple the traffic and report every object three times.

use crate::status::{Forbidden, StatusHandle};
use crate::Message;
use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::core::PartialObjectMeta;
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;
use serde::Serialize;
use serde_json::Value;
use sluice_config::k8s::POD_METADATA_KIND;
use sluice_config::{parse_api_object, Event, ObjectId, Update};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// The Istio group and the versions Sluice reads, most preferred first.
pub const ISTIO_GROUP: &str = "networking.istio.io";
pub const ISTIO_VERSIONS: &[&str] = &["v1", "v1beta1", "v1alpha3"];
/// How a refused discovery request shows in `forbidden` (it is a URL, not a resource).
const DISCOVERY: &str = "/apis (nonResourceURL; granted by system:discovery)";
/// How often discovery is asked again while the Istio group is not served.
const ISTIO_RECHECK: Duration = Duration::from_secs(30);

/// A watched kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kind {
    pub kind: &'static str,
    pub group: &'static str,
    /// Plural resource name, as RBAC and URLs spell it.
    pub resource: &'static str,
    /// The version of a built-in kind; `None` for Istio kinds (chosen by discovery).
    pub version: Option<&'static str>,
}

impl Kind {
    /// `v1`, `discovery.k8s.io/v1`; empty for an Istio kind before discovery.
    pub fn api_version(&self) -> String {
        match (self.group, self.version) {
            (_, None) => String::new(),
            ("", Some(v)) => v.to_string(),
            (g, Some(v)) => format!("{g}/{v}"),
        }
    }
}

/// The kinds Kubernetes mode watches.
pub fn kinds() -> Vec<Kind> {
    let k = |kind, group, resource, version| Kind {
        kind,
        group,
        resource,
        version,
    };
    vec![
        k("Pod", "", "pods", Some("v1")),
        k(POD_METADATA_KIND, "", "pods", Some("v1")),
        k("Namespace", "", "namespaces", Some("v1")),
        k("Service", "", "services", Some("v1")),
        k(
            "EndpointSlice",
            "discovery.k8s.io",
            "endpointslices",
            Some("v1"),
        ),
        k("VirtualService", ISTIO_GROUP, "virtualservices", None),
        k("DestinationRule", ISTIO_GROUP, "destinationrules", None),
    ]
}

/// Watches one kind for as long as the agent runs.
pub(crate) async fn run(
    client: Client,
    kind: Kind,
    index: usize,
    node_name: String,
    tx: UnboundedSender<Message>,
    status: StatusHandle,
) {
    let sink = Sink {
        kind: kind.clone(),
        index,
        tx,
        status,
    };
    let config = watcher::Config::default();
    match kind.kind {
        "Pod" => {
            // Only this node's pods in full: a node agent must never fetch the whole cluster's
            // specs and statuses (every node's pods come as metadata only, below).
            let config = config.fields(&format!("spec.nodeName={node_name}"));
            let stream = watcher(Api::<Pod>::all(client), config);
            drive(&sink, stream, |p| typed_json(&p)).await
        }
        POD_METADATA_KIND => {
            // Every node's pods, metadata only: who the pod behind an endpoint is (its labels for
            // subsets, its controller for telemetry). A cluster can hold 100,000s: each is cut
            // down on arrival and a list is streamed to the store, never held twice.
            let api = Api::<PartialObjectMeta<Pod>>::all(client);
            drive_streamed(&sink, watcher(api, config), |m| {
                pod_metadata_json(m.metadata)
            })
            .await
        }
        "Namespace" => {
            // Labels are all Sluice reads: metadata only.
            // An `Api` of `PartialObjectMeta` makes metadata-only requests.
            let api = Api::<PartialObjectMeta<Namespace>>::all(client);
            let stream = watcher(api, config);
            drive(&sink, stream, |m| {
                let mut v = serde_json::json!({"metadata": m.metadata});
                finish_json(&mut v, "v1", "Namespace");
                v
            })
            .await
        }
        "Service" => {
            let stream = watcher(Api::<Service>::all(client), config);
            drive(&sink, stream, |s| typed_json(&s)).await
        }
        "EndpointSlice" => {
            let stream = watcher(Api::<EndpointSlice>::all(client), config);
            drive(&sink, stream, |s| typed_json(&s)).await
        }
        _ => {
            let version = istio_version(&client, &sink).await;
            let gvk = GroupVersionKind::gvk(kind.group, &version, kind.kind);
            let resource = ApiResource::from_gvk_with_plural(&gvk, kind.resource);
            sink.status
                .update_kind(index, |k| k.api_version = resource.api_version.clone());
            tracing::info!(kind = kind.kind, api_version = %resource.api_version, "watching");
            let api_version = resource.api_version.clone();
            let stream = watcher(Api::<DynamicObject>::all_with(client, &resource), config);
            drive(&sink, stream, move |o| {
                let mut v = serde_json::to_value(&o).unwrap_or(Value::Null);
                finish_json(&mut v, &api_version, kind.kind);
                v
            })
            .await
        }
    }
}

/// Where a kind's events go.
struct Sink {
    kind: Kind,
    index: usize,
    tx: UnboundedSender<Message>,
    status: StatusHandle,
}

impl Sink {
    fn send(&self, event: Event) {
        // The store task lives as long as the runtime: a closed channel means shutting down.
        let _ = self.tx.send(Message::Event(event));
    }

    fn recovered(&self) {
        self.status.update_kind(self.index, |k| k.last_error = None);
        self.status
            .allow(self.kind.group, self.kind.resource, &["list", "watch"]);
    }

    fn failed(&self, verb: &str, err: &dyn std::fmt::Display, status: Option<&kube::core::Status>) {
        let message = err.to_string();
        self.status
            .update_kind(self.index, |k| k.last_error = Some(message.clone()));
        match status {
            Some(s) if s.code == 403 => {
                let group = if self.kind.group.is_empty() {
                    "\"\" (core)"
                } else {
                    self.kind.group
                };
                tracing::error!(
                    kind = self.kind.kind,
                    "forbidden: the agent may not {verb} {} in API group {group}; add verb {verb:?} \
                     on resource {:?} of apiGroup {:?} to its ClusterRole ({})",
                    self.kind.resource,
                    self.kind.resource,
                    self.kind.group,
                    s.message
                );
                self.status.forbid(Forbidden {
                    verb: verb.to_string(),
                    group: self.kind.group.to_string(),
                    resource: self.kind.resource.to_string(),
                    message: s.message.clone(),
                });
            }
            Some(s) if s.code == 410 => {
                tracing::debug!(kind = self.kind.kind, "watch expired (410 Gone); relisting")
            }
            _ => tracing::warn!(
                kind = self.kind.kind,
                "watch failed, retrying with back-off; the last good state stays in force: {message}"
            ),
        }
    }
}

/// The verb a watcher error came from, and the API server's Status when it sent one.
fn classify(err: &watcher::Error) -> (&'static str, Option<&kube::core::Status>) {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => ("list", Some(s)),
        watcher::Error::InitialListFailed(_) => ("list", None),
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => ("watch", Some(s)),
        watcher::Error::WatchError(s) => ("watch", Some(s)),
        _ => ("watch", None),
    }
}

/// Feeds one watcher stream to the store until it ends (it does not, while the agent runs).
async fn drive<T, S, F>(sink: &Sink, stream: S, to_json: F)
where
    S: Stream<Item = Result<watcher::Event<T>, watcher::Error>> + Send,
    F: Fn(T) -> Value,
{
    let stream = stream.default_backoff();
    futures_util::pin_mut!(stream);
    // A (re)list is converted in one go off the runtime: thousands of objects at start-up.
    let mut listed: Vec<Value> = Vec::new();
    let mut synced = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::Init) => listed.clear(),
            Ok(watcher::Event::InitApply(o)) => listed.push(to_json(o)),
            Ok(watcher::Event::InitDone) => {
                tracing::debug!(
                    kind = sink.kind.kind,
                    objects = listed.len(),
                    "complete list"
                );
                let values = std::mem::take(&mut listed);
                let converted = tokio::task::spawn_blocking(move || {
                    values.into_iter().flat_map(updates).collect::<Vec<_>>()
                })
                .await;
                let Ok(converted) = converted else {
                    // Only when the runtime shuts down.
                    return;
                };
                sink.send(Event::Resync {
                    kind: sink.kind.kind.to_string(),
                    updates: converted,
                });
                if !synced {
                    synced = true;
                    let _ = sink.tx.send(Message::Synced(sink.index));
                    sink.status.update_kind(sink.index, |k| k.synced = true);
                }
                sink.recovered();
            }
            Ok(watcher::Event::Apply(o)) => {
                for u in updates(to_json(o)) {
                    sink.send(Event::Upsert(u));
                }
                sink.recovered();
            }
            Ok(watcher::Event::Delete(o)) => {
                if let Some(id) = object_id(&to_json(o)) {
                    sink.send(Event::Delete(id));
                }
            }
            Err(err) => {
                let (verb, status) = classify(&err);
                sink.failed(verb, &err, status);
            }
        }
    }
}

/// [`drive`] for a kind too large to hold twice: each listed object is converted and sent to the
/// store as it arrives, and the end of a list says which objects remain ([`Event::Retain`]).
async fn drive_streamed<T, S, F>(sink: &Sink, stream: S, to_json: F)
where
    S: Stream<Item = Result<watcher::Event<T>, watcher::Error>> + Send,
    F: Fn(T) -> Value,
{
    let stream = stream.default_backoff();
    futures_util::pin_mut!(stream);
    let mut keep: Vec<(String, String)> = Vec::new();
    let mut synced = false;
    while let Some(item) = stream.next().await {
        match item {
            Ok(watcher::Event::Init) => keep.clear(),
            Ok(watcher::Event::InitApply(o)) => {
                for u in updates(to_json(o)) {
                    keep.push((u.id.namespace.clone(), u.id.name.clone()));
                    sink.send(Event::Upsert(u));
                }
            }
            Ok(watcher::Event::InitDone) => {
                tracing::debug!(kind = sink.kind.kind, objects = keep.len(), "complete list");
                sink.send(Event::Retain {
                    kind: sink.kind.kind.to_string(),
                    keep: std::mem::take(&mut keep),
                });
                if !synced {
                    synced = true;
                    let _ = sink.tx.send(Message::Synced(sink.index));
                    sink.status.update_kind(sink.index, |k| k.synced = true);
                }
                sink.recovered();
            }
            Ok(watcher::Event::Apply(o)) => {
                for u in updates(to_json(o)) {
                    sink.send(Event::Upsert(u));
                }
                sink.recovered();
            }
            Ok(watcher::Event::Delete(o)) => {
                if let Some(id) = object_id(&to_json(o)) {
                    sink.send(Event::Delete(id));
                }
            }
            Err(err) => {
                let (verb, status) = classify(&err);
                sink.failed(verb, &err, status);
            }
        }
    }
}

/// A pod's metadata as the store reads it ([`POD_METADATA_KIND`]): name, namespace,
/// resourceVersion, labels, and what Istio's workload rule reads (`generateName`, the controller's
/// kind and name); annotations, managedFields and the rest are dropped here.
fn pod_metadata_json(meta: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Value {
    let controller = meta
        .owner_references
        .unwrap_or_default()
        .into_iter()
        .find(|r| r.controller == Some(true))
        .map(|r| vec![serde_json::json!({"kind": r.kind, "name": r.name, "controller": true})]);
    serde_json::json!({
        "apiVersion": "v1",
        "kind": POD_METADATA_KIND,
        "metadata": {
            "name": meta.name,
            "namespace": meta.namespace,
            "resourceVersion": meta.resource_version,
            "generateName": meta.generate_name,
            "labels": meta.labels,
            "ownerReferences": controller,
        },
    })
}

/// Picks the Istio version to watch, retrying discovery with back-off while it fails. While the
/// group is not served at all (Istio's CRDs are not installed), the kind counts as listed and
/// empty, so the agent can become ready; discovery is asked again every 30 s.
async fn istio_version(client: &Client, sink: &Sink) -> String {
    let mut backoff = Duration::from_millis(500);
    let mut reported_empty = false;
    loop {
        match client.list_api_groups().await {
            Ok(list) => {
                sink.status.allow("", DISCOVERY, &["get"]);
                let served: Vec<String> = list
                    .groups
                    .iter()
                    .filter(|g| g.name == ISTIO_GROUP)
                    .flat_map(|g| g.versions.iter().map(|v| v.version.clone()))
                    .collect();
                if let Some(v) = ISTIO_VERSIONS
                    .iter()
                    .find(|v| served.iter().any(|s| s == *v))
                {
                    return v.to_string();
                }
                let message = format!(
                    "the API server does not serve {ISTIO_GROUP} {} (served: {served:?}); are \
                     Istio's CRDs installed? No {}s until they are",
                    ISTIO_VERSIONS.join(", "),
                    sink.kind.kind
                );
                sink.status
                    .update_kind(sink.index, |k| k.last_error = Some(message.clone()));
                if !reported_empty {
                    reported_empty = true;
                    tracing::warn!("{message}");
                    sink.send(Event::Resync {
                        kind: sink.kind.kind.to_string(),
                        updates: Vec::new(),
                    });
                    let _ = sink.tx.send(Message::Synced(sink.index));
                }
                tokio::time::sleep(ISTIO_RECHECK).await;
            }
            Err(err) => {
                // Discovery is a non-resource URL: a 403 here names the URL, not a resource.
                let message = format!("API discovery (GET /apis) failed: {err}");
                sink.status
                    .update_kind(sink.index, |k| k.last_error = Some(message.clone()));
                if let kube::Error::Api(s) = &err {
                    if s.code == 403 {
                        sink.status.forbid(Forbidden {
                            verb: "get".into(),
                            group: String::new(),
                            resource: DISCOVERY.into(),
                            message: s.message.clone(),
                        });
                    }
                }
                tracing::warn!(kind = sink.kind.kind, "{message}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// A built-in object as JSON (k8s-openapi writes `apiVersion` and `kind` itself).
fn typed_json<T: Serialize>(object: &T) -> Value {
    let mut v = serde_json::to_value(object).unwrap_or(Value::Null);
    strip(&mut v);
    v
}

/// Sets `apiVersion` and `kind` (list items of some servers carry neither) and strips what Sluice
/// never reads.
pub(crate) fn finish_json(v: &mut Value, api_version: &str, kind: &str) {
    if let Some(map) = v.as_object_mut() {
        map.insert("apiVersion".into(), api_version.into());
        map.insert("kind".into(), kind.into());
    }
    strip(v);
}

fn strip(v: &mut Value) {
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
}

/// The store updates of one API object.
pub(crate) fn updates(v: Value) -> Vec<Update> {
    let (updates, loose) = Update::from_parsed(parse_api_object(&v));
    for p in loose {
        tracing::warn!("{p}");
    }
    updates
}

fn object_id(v: &Value) -> Option<ObjectId> {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let kind = s(v.get("kind"));
    let meta = v.get("metadata");
    let namespace = if kind == "Namespace" {
        String::new()
    } else {
        s(meta.and_then(|m| m.get("namespace")))
    };
    let name = s(meta.and_then(|m| m.get("name")));
    (!name.is_empty()).then_some(ObjectId {
        kind,
        namespace,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus, ServicePort, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use sluice_config::{BuildOptions, Origin, Store};
    use std::path::Path;

    /// Every Istio document of the seed examples, as (file, YAML text of the document).
    fn seed_documents() -> Vec<(String, serde_yaml::Value)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        let (files, _) = sluice_config::collect_files(&root);
        let mut out = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value = serde_yaml::Value::deserialize(doc).unwrap();
                let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
                if kind == "VirtualService" || kind == "DestinationRule" {
                    out.push((file.display().to_string(), value));
                }
            }
        }
        out
    }

    use serde::Deserialize;

    fn field_reasons(problems: &[sluice_config::Problem]) -> Vec<(String, String)> {
        problems
            .iter()
            .map(|p| (p.field.clone(), p.reason.clone()))
            .collect()
    }

    #[test]
    fn seed_istio_objects_read_the_same_from_the_api_in_every_version() {
        let docs = seed_documents();
        assert!(docs.len() >= 10, "found only {} seed documents", docs.len());
        let opts = BuildOptions::default();
        for (file, yaml) in docs {
            let text = serde_yaml::to_string(&yaml).unwrap();
            let from_file = sluice_config::parse_str(&file, &text);
            assert_eq!(
                from_file.objects.len(),
                1,
                "{file}: {:?}",
                from_file.problems
            );
            let file_problems = sluice_config::check_object(&from_file.objects[0], &opts);
            for version in ISTIO_VERSIONS {
                let mut json: Value = serde_json::to_value(&yaml).unwrap();
                json["metadata"]["namespace"] = "default".into();
                json["metadata"]["resourceVersion"] = "17".into();
                json["metadata"]["uid"] = "u-1".into();
                json["metadata"]["managedFields"] = serde_json::json!([{"manager": "kubectl"}]);
                let kind = json["kind"].as_str().unwrap().to_string();
                json.as_object_mut().unwrap().remove("kind");
                finish_json(&mut json, &format!("{ISTIO_GROUP}/{version}"), &kind);
                let mut ups = updates(json);
                assert_eq!(ups.len(), 1);
                let u = ups.pop().unwrap();
                assert!(u.problems.is_empty(), "{file} {version}: {:?}", u.problems);
                let obj = u.object.expect("parsed");
                assert_eq!(obj.kind(), kind);
                assert!(matches!(
                    &obj.origin,
                    Origin::Api { resource_version: Some(rv), uid: Some(uid), .. } if rv == "17" && uid == "u-1"
                ));
                let api_problems = sluice_config::check_object(&obj, &opts);
                assert_eq!(
                    field_reasons(&api_problems),
                    field_reasons(&file_problems),
                    "{file} {version}"
                );
            }
        }
    }

    #[test]
    fn an_invalid_api_object_names_itself_its_version_and_field() {
        let json = serde_json::json!({
            "apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
            "metadata": {"name": "pricing", "namespace": "shop", "resourceVersion": "9"},
            "spec": {"hosts": ["pricing"], "http": [{"timeout": 5, "route": [{"destination": {"host": "pricing"}}]}]}
        });
        let mut store = Store::new(BuildOptions::default());
        for u in updates(json) {
            store.apply(Event::Upsert(u));
        }
        let r = store.commit();
        let err = r.problems.iter().find(|p| p.is_error()).expect("rejected");
        assert_eq!(err.file, "VirtualService shop/pricing");
        assert_eq!(err.field, "spec.http[0].timeout");
        assert!(!err.reason.contains("line"), "{}", err.reason);
        assert_eq!(
            r.snapshot.rejections[0].resource_version.as_deref(),
            Some("9")
        );
    }

    #[test]
    fn built_in_kinds_convert_into_the_registry() {
        let meta = |name: &str, ns: Option<&str>| ObjectMeta {
            name: Some(name.into()),
            namespace: ns.map(Into::into),
            resource_version: Some("5".into()),
            ..ObjectMeta::default()
        };
        let pod = Pod {
            metadata: ObjectMeta {
                labels: Some([("app".to_string(), "pricing".to_string())].into()),
                uid: Some("uid-1".into()),
                ..meta("pricing-1", Some("shop"))
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.0.0.5".into()),
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        };
        let svc = Service {
            metadata: meta("pricing", Some("shop")),
            spec: Some(ServiceSpec {
                cluster_ip: Some("10.96.0.10".into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: None,
        };
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                labels: Some(
                    [(
                        "kubernetes.io/service-name".to_string(),
                        "pricing".to_string(),
                    )]
                    .into(),
                ),
                ..meta("pricing-abc", Some("shop"))
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["10.0.0.5".into()],
                ..Endpoint::default()
            }],
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(9090),
                ..EndpointPort::default()
            }]),
        };
        let ns = PartialObjectMeta::<Namespace> {
            types: None,
            metadata: ObjectMeta {
                labels: Some(
                    [("istio.io/dataplane-mode".to_string(), "ambient".to_string())].into(),
                ),
                ..meta("shop", None)
            },
            _phantom: Default::default(),
        };
        let mut ns_json = serde_json::json!({"metadata": ns.metadata});
        finish_json(&mut ns_json, "v1", "Namespace");
        let mut store = Store::new(BuildOptions::default());
        for json in [
            typed_json(&pod),
            typed_json(&svc),
            typed_json(&slice),
            ns_json,
        ] {
            let ups = updates(json);
            assert_eq!(ups.len(), 1);
            assert!(ups[0].object.is_some(), "{:?}", ups[0].problems);
            store.apply(Event::Upsert(ups.into_iter().next().unwrap()));
        }
        let snap = store.commit().snapshot;
        let pod = &snap.workloads["shop/pricing-1"];
        assert!(pod.enrolled, "enrolled through its namespace's label");
        let cluster = snap.clusters.values().next().expect("a cluster");
        assert_eq!(cluster.key.host, "pricing.shop.svc.cluster.local");
        assert_eq!(cluster.endpoints[0].addr, "10.0.0.5:9090".parse().unwrap());
        assert_eq!(cluster.endpoints[0].pod.as_deref(), Some("shop/pricing-1"));
        assert_eq!(
            object_id(&typed_json(&svc))
                .map(|id| id.to_string())
                .as_deref(),
            Some("Service shop/pricing")
        );
    }
}

#[cfg(test)]
mod pod_metadata {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        ManagedFieldsEntry, ObjectMeta, OwnerReference,
    };
    use sluice_config::{BuildOptions, Store};

    /// A Deployment's pod as the API server returns it, with what Sluice must not keep.
    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("reviews-v1-5d9c7-x2x8q".into()),
                generate_name: Some("reviews-v1-5d9c7-".into()),
                namespace: Some("shop".into()),
                resource_version: Some("41".into()),
                uid: Some("u-1".into()),
                labels: Some(
                    [
                        ("app", "reviews"),
                        ("version", "v1"),
                        ("pod-template-hash", "5d9c7"),
                    ]
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .into(),
                ),
                annotations: Some(
                    [(
                        "kubectl.kubernetes.io/restartedAt".to_string(),
                        "x".repeat(2000),
                    )]
                    .into(),
                ),
                managed_fields: Some(vec![ManagedFieldsEntry {
                    manager: Some("kube-controller-manager".into()),
                    ..ManagedFieldsEntry::default()
                }]),
                owner_references: Some(vec![
                    OwnerReference {
                        api_version: "v1".into(),
                        kind: "ConfigMap".into(),
                        name: "not-the-controller".into(),
                        uid: "u-2".into(),
                        ..OwnerReference::default()
                    },
                    OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "ReplicaSet".into(),
                        name: "reviews-v1-5d9c7".into(),
                        uid: "u-3".into(),
                        controller: Some(true),
                        block_owner_deletion: Some(true),
                    },
                ]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("node-a".into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                pod_ip: Some("10.1.0.7".into()),
                phase: Some("Running".into()),
                ..PodStatus::default()
            }),
        }
    }

    fn registry() -> Vec<Value> {
        vec![
            serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "reviews", "namespace": "shop", "resourceVersion": "1"},
                "spec": {"clusterIP": "10.96.0.9", "ports": [{"name": "http", "port": 80}]}}),
            serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": "reviews-a", "namespace": "shop", "resourceVersion": "2",
                             "labels": {"kubernetes.io/service-name": "reviews"}},
                "addressType": "IPv4", "ports": [{"name": "http", "port": 9080}],
                "endpoints": [{"addresses": ["10.1.0.7"],
                               "targetRef": {"kind": "Pod", "namespace": "shop", "name": "reviews-v1-5d9c7-x2x8q"}}]}),
        ]
    }

    fn snapshot(objects: Vec<Value>) -> std::sync::Arc<sluice_policy::Snapshot> {
        let mut store = Store::new(BuildOptions::default());
        for v in objects {
            for u in updates(v) {
                store.apply(Event::Upsert(u));
            }
        }
        store.commit().snapshot
    }

    #[test]
    fn a_pod_known_in_full_or_by_its_metadata_has_one_identity() {
        let json = pod_metadata_json(pod().metadata);
        // Only what identity and subsets need travels on.
        let meta = json["metadata"].as_object().unwrap();
        assert!(
            !meta.contains_key("annotations")
                && !meta.contains_key("managedFields")
                && !meta.contains_key("uid")
        );
        assert_eq!(
            json["metadata"]["ownerReferences"].as_array().map(Vec::len),
            Some(1)
        );

        // This node's view: the full Pod (its workload) and its metadata (the endpoint).
        let mut objects = registry();
        objects.push(typed_json(&pod()));
        objects.push(json.clone());
        let both = snapshot(objects);
        let workload_side = both.workloads["shop/reviews-v1-5d9c7-x2x8q"].identity();
        assert_eq!(workload_side.workload, "reviews-v1");
        let endpoint = &both.clusters.values().next().unwrap().endpoints[0];
        assert_eq!(endpoint.identity.as_deref(), Some(&workload_side));

        // Another node's view: the metadata alone, the same identity and labels; no workload.
        let mut objects = registry();
        objects.push(json);
        let remote = snapshot(objects);
        assert!(remote.workloads.is_empty());
        let endpoint = &remote.clusters.values().next().unwrap().endpoints[0];
        assert_eq!(endpoint.identity.as_deref(), Some(&workload_side));
        assert_eq!(endpoint.labels["version"], "v1");
    }
}

#[cfg(test)]
mod scale {
    use super::*;
    use sluice_config::{BuildOptions, Store};

    /// Start-up work at the size of a busy cluster (1,000 Services, 1,000 EndpointSlices of 5
    /// endpoints, 500 VirtualServices): converting every listed object, and the first snapshot.
    #[test]
    fn converting_and_building_a_large_cluster_is_quick() {
        let mut objects = Vec::new();
        for i in 0..1000 {
            let name = format!("svc-{i:04}");
            objects.push(serde_json::json!({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
                "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}], "selector": {"app": name}}}));
            let endpoints: Vec<Value> = (0..5)
                .map(|j| serde_json::json!({"addresses": [format!("10.{}.{}.{}", 1 + i / 250, i % 250, 1 + j)]}))
                .collect();
            objects.push(serde_json::json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-x"), "namespace": "default", "resourceVersion": "1",
                    "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": 8080}]}));
            if i < 500 {
                objects.push(serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                    "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
                    "spec": {"hosts": [name], "http": [{"timeout": "3s", "retries": {"attempts": 2, "perTryTimeout": "1s"},
                        "route": [{"destination": {"host": name}}]}]}}));
            }
        }
        let start = std::time::SystemTime::now();
        let ups: Vec<Update> = objects.into_iter().flat_map(updates).collect();
        let converted = start.elapsed().unwrap_or_default();
        let mut store = Store::new(BuildOptions::default());
        let start = std::time::SystemTime::now();
        for u in ups {
            store.apply(Event::Upsert(u));
        }
        let applied = start.elapsed().unwrap_or_default();
        let start = std::time::SystemTime::now();
        let r = store.commit();
        let built = start.elapsed().unwrap_or_default();
        assert_eq!(r.snapshot.services.len(), 1000);
        eprintln!("2,500 objects: converted in {converted:?}, checked in {applied:?}, first snapshot in {built:?}");
        // The start-up target is ready in under 2 s, listing included; this is most of the rest.
        assert!(
            converted + applied + built < std::time::Duration::from_secs(2),
            "{converted:?} + {applied:?} + {built:?}"
        );
    }
}
