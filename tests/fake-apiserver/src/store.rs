//! The object store: every object under one global, monotonically increasing resourceVersion, the
//! change history watches replay from (until compacted), consistent snapshots at an older
//! resourceVersion for paginated and `Exact` lists, and the write rules the real server applies
//! (server-set metadata, optimistic concurrency, no-op updates that change nothing).

use crate::resources::{self, ResourceType};
use crate::selector::{FieldSelector, LabelSelector};
use crate::ApiError;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Where an object lives; ordered as the real server's storage keys (namespace, then name).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    pub group: &'static str,
    pub plural: &'static str,
    pub namespace: String,
    pub name: String,
}

impl Key {
    fn of(rt: &ResourceType, namespace: &str, name: &str) -> Self {
        Self {
            group: rt.group,
            plural: rt.plural,
            namespace: if rt.namespaced {
                namespace.to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    fn is(&self, rt: &ResourceType) -> bool {
        self.group == rt.group && self.plural == rt.plural
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeType {
    Added,
    Modified,
    Deleted,
}

/// One write, as watches see it.
#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub ty: ChangeType,
    pub key: Key,
    /// The object before the write (`None` for a create).
    pub old: Option<Arc<Value>>,
    /// The object after the write; for a delete, the last state stamped with the delete's version.
    pub new: Arc<Value>,
}

/// Which objects a list or watch asks for.
#[derive(Debug, Clone)]
pub struct Filter {
    pub rt: &'static ResourceType,
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, key: &Key, obj: &Value) -> bool {
        key.is(self.rt)
            && self
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == key.namespace)
            && self.labels.matches(obj)
            && self.fields.matches(obj)
    }

    /// What a watch with this filter sees of `change`: selectors apply to the old and new state, so
    /// an object leaving the selection is a DELETED and one entering it an ADDED, as in the real
    /// server's watch cache.
    pub fn classify(&self, change: &Change) -> Option<(&'static str, Arc<Value>)> {
        if !change.key.is(self.rt) {
            return None;
        }
        let new = self.matches(&change.key, &change.new);
        let old = change
            .old
            .as_ref()
            .is_some_and(|o| self.matches(&change.key, o));
        let ty = match change.ty {
            ChangeType::Added => new.then_some("ADDED")?,
            ChangeType::Deleted => (old || new).then_some("DELETED")?,
            ChangeType::Modified => match (old, new) {
                (true, true) => "MODIFIED",
                (false, true) => "ADDED",
                (true, false) => "DELETED",
                (false, false) => return None,
            },
        };
        Some((ty, change.new.clone()))
    }
}

/// How a list chooses its resourceVersion (`resourceVersion` + `resourceVersionMatch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListVersion {
    /// Unset: the most recent state (a quorum read); pagination honoured.
    MostRecent,
    /// `0`: any state, served from the watch cache, which ignores `limit`.
    Any,
    /// `N` (or `N` + `NotOlderThan`): at least as new as N.
    NotOlderThan(u64),
    /// `N` + `Exact`: the state at N.
    Exact(u64),
}

/// One page of a list.
#[derive(Debug)]
pub struct Page {
    pub items: Vec<Arc<Value>>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// Unset or `0`: synthetic ADDED events for the current state, then changes.
    Current,
    /// After this resourceVersion: replay the history after it, then changes.
    After(u64),
}

/// What a new watch gets: its first events and the live feed after them.
pub struct WatchStart {
    pub initial: Vec<(&'static str, Arc<Value>)>,
    pub feed: broadcast::Receiver<Arc<Change>>,
    /// The store's version when the feed was joined (for bookmarks before the first change).
    pub resource_version: u64,
}

/// Why a watch cannot start.
pub enum WatchRefused {
    /// The version was compacted away: one `ERROR` event with a 410 `Expired` Status.
    Expired(ApiError),
    /// The version is in the future.
    TooLarge(ApiError),
}

pub struct Store {
    objects: BTreeMap<Key, Arc<Value>>,
    /// Changes after `compacted`, oldest first.
    log: VecDeque<Arc<Change>>,
    rv: u64,
    compacted: u64,
    feed: broadcast::Sender<Arc<Change>>,
    next_cluster_ip: u32,
    uid_seed: u64,
}

/// How many changes a slow watch may fall behind before it is ended (it then resumes).
const FEED_CAPACITY: usize = 1 << 16;

impl Store {
    pub fn new() -> Self {
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let mut store = Self {
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            rv: 1000,
            compacted: 1000,
            feed,
            next_cluster_ip: 1,
            uid_seed: fastrand::u64(..),
        };
        // A fresh cluster has these namespaces; namespaced objects need their namespace to exist.
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            store
                .create(
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                    None,
                )
                .expect("built-in namespace");
        }
        store
    }

    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// Everything older than now is expired: watches and continue tokens from an older version get
    /// 410 `Expired`, as after an etcd compaction.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.log.clear();
    }

    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Option<Arc<Value>> {
        self.objects.get(&Key::of(rt, namespace, name)).cloned()
    }

    /// All current objects of `rt`.
    pub fn all(&self, rt: &ResourceType) -> Vec<Arc<Value>> {
        self.objects
            .iter()
            .filter(|(k, _)| k.is(rt))
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn commit(&mut self, ty: ChangeType, key: Key, old: Option<Arc<Value>>, new: Arc<Value>) {
        match ty {
            ChangeType::Deleted => {
                self.objects.remove(&key);
            }
            _ => {
                self.objects.insert(key.clone(), new.clone());
            }
        }
        let change = Arc::new(Change {
            rv: self.rv,
            ty,
            key,
            old,
            new,
        });
        self.log.push_back(change.clone());
        // No receivers is fine: nobody is watching.
        let _ = self.feed.send(change);
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn uid(&mut self) -> String {
        self.uid_seed = self
            .uid_seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let a = self.uid_seed;
        let b = a.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15;
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            (a & 0xfff) as u16,
            0x8000 | ((b >> 48) as u16 & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// POST: `path_namespace` is the namespace in the URL (`None` for an all-namespace or
    /// cluster-scoped collection, or a create through the control API).
    pub fn create(
        &mut self,
        mut obj: Value,
        path_namespace: Option<&str>,
    ) -> Result<Value, ApiError> {
        let rt = resource_of(&obj)?;
        let meta = metadata_mut(&mut obj)?;
        let namespace = scope_namespace(rt, meta, path_namespace)?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let suffix: String = (0..5)
                        .map(|_| fastrand::choice(b"bcdfghjklmnpqrstvwxz2456789").unwrap_or(&b'x'))
                        .map(|b| *b as char)
                        .collect();
                    format!("{prefix}{suffix}")
                }
                _ => {
                    return Err(ApiError::invalid(
                        rt,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ))
                }
            },
        };
        if let Some(why) = invalid_name(&name) {
            return Err(ApiError::invalid(
                rt,
                &name,
                &format!("metadata.name: Invalid value: {name:?}: {why}"),
            ));
        }
        if rt.namespaced && !self.objects.contains_key(&namespace_key(&namespace)) {
            return Err(ApiError::not_found_ns(&namespace));
        }
        let key = Key::of(rt, &namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        let rv = self.next_rv();
        let uid = self.uid();
        let meta = metadata_mut(&mut obj)?;
        meta.insert("name".into(), name.clone().into());
        if rt.namespaced {
            meta.insert("namespace".into(), namespace.clone().into());
        }
        meta.insert("uid".into(), uid.into());
        meta.insert("resourceVersion".into(), rv.to_string().into());
        meta.insert(
            "creationTimestamp".into(),
            crate::time::now_rfc3339().into(),
        );
        meta.insert("generation".into(), 1.into());
        meta.remove("deletionTimestamp");
        meta.remove("managedFields");
        obj["apiVersion"] = rt.api_version(rt.versions[0]).into();
        self.defaults(rt, &mut obj, None);
        let obj = Arc::new(obj);
        self.commit(ChangeType::Added, key, None, obj.clone());
        Ok((*obj).clone())
    }

    /// PUT. `check_version`: a `metadata.resourceVersion` in the body must match (409 otherwise);
    /// the control API's `apply` skips that.
    pub fn update(
        &mut self,
        mut obj: Value,
        path: Option<(&str, &str)>,
        check_version: bool,
    ) -> Result<Value, ApiError> {
        let rt = resource_of(&obj)?;
        let meta = metadata_mut(&mut obj)?;
        let namespace = scope_namespace(rt, meta, path.map(|p| p.0))?;
        let name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some((_, path_name)) = path {
            if name != path_name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({name}) does not match the name on the URL ({path_name})"
                )));
            }
        }
        let key = Key::of(rt, &namespace, &name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(rt, &name));
        };
        let old_rv = old
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        match meta.get("resourceVersion").and_then(Value::as_str) {
            Some(v) if check_version && !v.is_empty() && v != old_rv => {
                return Err(ApiError::conflict(rt, &name));
            }
            _ => {}
        }
        // Server-owned metadata stays what it was.
        for field in ["uid", "creationTimestamp", "generation"] {
            match old.pointer(&format!("/metadata/{field}")) {
                Some(v) => meta.insert(field.into(), v.clone()),
                None => meta.remove(field),
            };
        }
        meta.insert("name".into(), name.clone().into());
        if rt.namespaced {
            meta.insert("namespace".into(), namespace.into());
        }
        meta.insert("resourceVersion".into(), old_rv.clone().into());
        meta.remove("managedFields");
        obj["apiVersion"] = rt.api_version(rt.versions[0]).into();
        self.defaults(rt, &mut obj, Some(&old));
        if obj == *old {
            // The real server does not write (nor bump the version) for an update that changes nothing.
            return Ok(obj);
        }
        if spec_of(&obj) != spec_of(&old) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata_mut(&mut obj)?.insert("generation".into(), (generation + 1).into());
        }
        let rv = self.next_rv();
        metadata_mut(&mut obj)?.insert("resourceVersion".into(), rv.to_string().into());
        let obj = Arc::new(obj);
        self.commit(ChangeType::Modified, key, Some(old), obj.clone());
        Ok((*obj).clone())
    }

    /// PATCH with a JSON merge patch (RFC 7386); `create_missing` for server-side apply.
    pub fn merge_patch(
        &mut self,
        rt: &'static ResourceType,
        version: &str,
        namespace: &str,
        name: &str,
        patch: &Value,
        create_missing: bool,
    ) -> Result<Value, ApiError> {
        let Some(old) = self.get(rt, namespace, name) else {
            if !create_missing {
                return Err(ApiError::not_found(rt, name));
            }
            let mut obj = patch.clone();
            let map = obj
                .as_object_mut()
                .ok_or_else(|| ApiError::bad_request("the patch is not a JSON object".into()))?;
            map.entry("apiVersion")
                .or_insert_with(|| rt.api_version(version).into());
            map.entry("kind").or_insert_with(|| rt.kind.into());
            let meta = metadata_mut(&mut obj)?;
            meta.entry("name").or_insert_with(|| name.into());
            return self.create(obj, rt.namespaced.then_some(namespace));
        };
        let mut obj = (*old).clone();
        merge(&mut obj, patch);
        // A patch without a resourceVersion is unconditional; one with it must match.
        let check = patch.pointer("/metadata/resourceVersion").is_some();
        if !check {
            metadata_mut(&mut obj)?.insert(
                "resourceVersion".into(),
                old.pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
        }
        obj["apiVersion"] = rt.api_version(rt.versions[0]).into();
        obj["kind"] = rt.kind.into();
        self.update(obj, Some((namespace, name)), check)
    }

    /// DELETE: the object goes at once (no finalizers, no cascade); the DELETED event carries the
    /// delete's resourceVersion, as the real server's does.
    pub fn delete(
        &mut self,
        rt: &'static ResourceType,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = Key::of(rt, namespace, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(rt, name));
        };
        let rv = self.next_rv();
        let mut gone = (*old).clone();
        if let Some(meta) = gone.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), rv.to_string().into());
        }
        let gone = Arc::new(gone);
        self.commit(ChangeType::Deleted, key, Some(old), gone.clone());
        Ok((*gone).clone())
    }

    /// Fields the real server fills in.
    fn defaults(&mut self, rt: &ResourceType, obj: &mut Value, old: Option<&Value>) {
        match (rt.group, rt.kind) {
            ("", "Namespace") => {
                let name = obj.pointer("/metadata/name").cloned().unwrap_or_default();
                let meta = obj["metadata"].as_object_mut().expect("metadata checked");
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if let Some(labels) = labels.as_object_mut() {
                    labels.insert("kubernetes.io/metadata.name".into(), name);
                }
                if obj.pointer("/spec/finalizers").is_none() {
                    obj["spec"] = json!({"finalizers": ["kubernetes"]});
                }
                obj["status"] = json!({"phase": "Active"});
            }
            ("", "Service") => {
                if !obj.get("spec").is_some_and(Value::is_object) {
                    obj["spec"] = json!({});
                }
                let external =
                    obj.pointer("/spec/type").and_then(Value::as_str) == Some("ExternalName");
                let spec = obj["spec"].as_object_mut().expect("spec set");
                spec.entry("type").or_insert_with(|| "ClusterIP".into());
                if external {
                    return;
                }
                let ip = match spec.get("clusterIP").and_then(Value::as_str) {
                    Some(ip) if !ip.is_empty() => ip.to_string(),
                    _ => match old
                        .and_then(|o| o.pointer("/spec/clusterIP"))
                        .and_then(Value::as_str)
                    {
                        Some(ip) => ip.to_string(),
                        None => {
                            let n = self.next_cluster_ip;
                            self.next_cluster_ip += 1;
                            format!("10.96.{}.{}", n / 250, 1 + n % 250)
                        }
                    },
                };
                spec.insert("clusterIP".into(), ip.clone().into());
                spec.entry("clusterIPs").or_insert_with(|| json!([ip]));
                if ip != "None" {
                    let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
                    spec.entry("ipFamilies").or_insert_with(|| json!([family]));
                    spec.entry("ipFamilyPolicy")
                        .or_insert_with(|| "SingleStack".into());
                }
                spec.entry("sessionAffinity")
                    .or_insert_with(|| "None".into());
            }
            _ => {}
        }
    }

    /// A list page, following the real server's resourceVersion and pagination rules.
    pub fn list(
        &self,
        filter: &Filter,
        version: ListVersion,
        limit: Option<usize>,
        continue_token: Option<&str>,
    ) -> Result<Page, ApiError> {
        let (at, start_after) = match continue_token {
            Some(token) => {
                let (rv, key) = decode_continue(token).ok_or_else(|| {
                    ApiError::bad_request(format!("continue key is not valid: {token}"))
                })?;
                if rv < self.compacted {
                    return Err(ApiError::expired(
                        "The provided continue parameter is too old to display a consistent list result. \
                         You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some(key))
            }
            None => match version {
                ListVersion::MostRecent | ListVersion::Any => (self.rv, None),
                ListVersion::NotOlderThan(n) | ListVersion::Exact(n) if n > self.rv => {
                    return Err(ApiError::too_large(n, self.rv));
                }
                ListVersion::NotOlderThan(_) => (self.rv, None),
                ListVersion::Exact(n) if n < self.compacted => {
                    return Err(ApiError::expired(&format!(
                        "The resourceVersion for the provided list is too old: {n}"
                    )));
                }
                ListVersion::Exact(n) => (n, None),
            },
        };
        let snapshot = self.snapshot_at(filter.rt, at);
        let mut matching = snapshot
            .into_iter()
            .filter(|(k, v)| filter.matches(k, v))
            .filter(|(k, _)| {
                start_after
                    .as_ref()
                    .is_none_or(|(ns, name)| (&k.namespace, &k.name) > (ns, name))
            });
        // The watch cache (resourceVersion=0) answers with everything and no continue token.
        let limit = match (version, continue_token) {
            (ListVersion::Any, None) => None,
            _ => limit.filter(|l| *l > 0),
        };
        let mut items = Vec::new();
        let mut last = None;
        for (k, v) in matching.by_ref() {
            if limit.is_some_and(|l| items.len() == l) {
                // There is at least one more.
                let rest = 1 + matching.count();
                let (ns, name): (String, String) = last.expect("a full page has a last key");
                let selectors = !filter.labels.is_empty() || !filter.fields.is_empty();
                return Ok(Page {
                    items,
                    resource_version: at,
                    continue_token: Some(encode_continue(at, &ns, &name)),
                    remaining: (!selectors).then_some(rest),
                });
            }
            last = Some((k.namespace.clone(), k.name.clone()));
            items.push(v);
        }
        Ok(Page {
            items,
            resource_version: at,
            continue_token: None,
            remaining: None,
        })
    }

    /// The objects of `rt` as they were at `rv` (>= the compaction point), by undoing later changes.
    fn snapshot_at(&self, rt: &ResourceType, rv: u64) -> BTreeMap<Key, Arc<Value>> {
        let mut snap: BTreeMap<Key, Arc<Value>> = self
            .objects
            .range(
                Key {
                    group: rt.group,
                    plural: rt.plural,
                    namespace: String::new(),
                    name: String::new(),
                }..,
            )
            .take_while(|(k, _)| k.is(rt))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for change in self.log.iter().rev().take_while(|c| c.rv > rv) {
            if !change.key.is(rt) {
                continue;
            }
            match (&change.ty, &change.old) {
                (ChangeType::Added, _) => {
                    snap.remove(&change.key);
                }
                (_, Some(old)) => {
                    snap.insert(change.key.clone(), old.clone());
                }
                (_, None) => {}
            }
        }
        snap
    }

    /// Starts a watch: the events before the live feed, joined under the store's lock so that no
    /// change falls between the two.
    pub fn watch(&self, filter: &Filter, from: WatchFrom) -> Result<WatchStart, WatchRefused> {
        let initial = match from {
            WatchFrom::Current => self
                .objects
                .iter()
                .filter(|(k, v)| filter.matches(k, v))
                .map(|(_, v)| ("ADDED", v.clone()))
                .collect(),
            WatchFrom::After(rv) if rv < self.compacted => {
                return Err(WatchRefused::Expired(ApiError::expired(&format!(
                    "too old resource version: {rv} ({})",
                    self.compacted
                ))));
            }
            WatchFrom::After(rv) if rv > self.rv => {
                return Err(WatchRefused::TooLarge(ApiError::too_large(rv, self.rv)));
            }
            WatchFrom::After(rv) => self
                .log
                .iter()
                .filter(|c| c.rv > rv)
                .filter_map(|c| filter.classify(c))
                .collect(),
        };
        Ok(WatchStart {
            initial,
            feed: self.feed.subscribe(),
            resource_version: self.rv,
        })
    }
}

fn namespace_key(name: &str) -> Key {
    Key {
        group: "",
        plural: "namespaces",
        namespace: String::new(),
        name: name.to_string(),
    }
}

/// What counts as a spec change for `metadata.generation`: everything but metadata and status.
fn spec_of(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    o
}

/// RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// The resource an object names by `apiVersion` and `kind`.
pub fn resource_of(obj: &Value) -> Result<&'static ResourceType, ApiError> {
    let api_version = obj
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = obj.get("kind").and_then(Value::as_str).unwrap_or_default();
    if kind.is_empty() {
        return Err(ApiError::bad_request("Object 'Kind' is missing".into()));
    }
    resources::by_kind(api_version, kind).ok_or_else(|| {
        ApiError::bad_request(format!(
            "no kind \"{kind}\" is registered for version \"{api_version}\""
        ))
    })
}

fn metadata_mut(obj: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = obj
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("the object is not a JSON object".into()))?;
    let meta = map.entry("metadata").or_insert_with(|| json!({}));
    if meta.is_null() {
        *meta = json!({});
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::bad_request("metadata is not an object".into()))
}

/// The namespace a write goes to: the object's, else the URL's; they must agree.
fn scope_namespace(
    rt: &ResourceType,
    meta: &mut Map<String, Value>,
    path_namespace: Option<&str>,
) -> Result<String, ApiError> {
    if !rt.namespaced {
        meta.remove("namespace");
        return Ok(String::new());
    }
    let body = meta
        .get("namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    match (body, path_namespace) {
        (Some(b), Some(p)) if b != p => Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
                .into(),
        )),
        (Some(b), _) => Ok(b.to_string()),
        (None, Some(p)) => Ok(p.to_string()),
        (None, None) => Ok("default".to_string()),
    }
}

/// A DNS-1123 subdomain check, as for most kinds.
fn invalid_name(name: &str) -> Option<&'static str> {
    let ok = name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    (!ok).then_some(
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
         and must start and end with an alphanumeric character",
    )
}

/// Opaque to clients, as the real server's: the list's version and the last key served.
fn encode_continue(rv: u64, namespace: &str, name: &str) -> String {
    format!("{rv}/{namespace}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(token: &str) -> Option<(u64, (String, String))> {
    if !token.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let text = String::from_utf8(bytes?).ok()?;
    let mut parts = text.splitn(3, '/');
    let rv = parts.next()?.parse().ok()?;
    Some((rv, (parts.next()?.to_string(), parts.next()?.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(name: &str, host: &str) -> Value {
        json!({"apiVersion": "networking.istio.io/v1beta1", "kind": "VirtualService",
               "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
               "spec": {"hosts": [host]}})
    }

    fn all_vs() -> Filter {
        Filter {
            rt: resources::by_plural("networking.istio.io", "v1", "virtualservices").unwrap(),
            namespace: None,
            labels: LabelSelector::default(),
            fields: FieldSelector::default(),
        }
    }

    #[test]
    fn writes_stamp_metadata_and_bump_one_global_version() {
        let mut s = Store::new();
        let start = s.resource_version();
        let a = s.create(vs("a", "x"), None).unwrap();
        assert_eq!(a["metadata"]["resourceVersion"], (start + 1).to_string());
        assert_eq!(a["metadata"]["generation"], 1);
        assert!(a["metadata"]["uid"].as_str().unwrap().len() == 36);
        // Stored once under the preferred version.
        assert_eq!(a["apiVersion"], "networking.istio.io/v1");
        // Same content again: no write, no new version.
        let same = s.update(vs("a", "x"), None, true).unwrap();
        assert_eq!(
            same["metadata"]["resourceVersion"],
            a["metadata"]["resourceVersion"]
        );
        assert_eq!(s.resource_version(), start + 1);
        // A label change bumps the version but not the generation; a spec change both.
        let mut relabelled = vs("a", "x");
        relabelled["metadata"]["labels"]["v"] = "2".into();
        let b = s.update(relabelled, None, true).unwrap();
        assert_eq!(
            (b["metadata"]["generation"].as_i64(), s.resource_version()),
            (Some(1), start + 2)
        );
        let c = s.update(vs("a", "y"), None, true).unwrap();
        assert_eq!(c["metadata"]["generation"], 2);
        // A stale resourceVersion conflicts.
        let mut stale = vs("a", "z");
        stale["metadata"]["resourceVersion"] = a["metadata"]["resourceVersion"].clone();
        assert_eq!(s.update(stale, None, true).unwrap_err().code, 409);
        assert_eq!(s.create(vs("a", "x"), None).unwrap_err().code, 409);
        let mut elsewhere = vs("b", "x");
        elsewhere["metadata"]["namespace"] = "nowhere".into();
        assert_eq!(s.create(elsewhere, None).unwrap_err().code, 404);
    }

    #[test]
    fn pages_are_a_consistent_snapshot_and_expire_with_compaction() {
        let mut s = Store::new();
        for i in 0..5 {
            s.create(vs(&format!("vs-{i}"), "h"), None).unwrap();
        }
        let f = all_vs();
        let p1 = s.list(&f, ListVersion::MostRecent, Some(2), None).unwrap();
        assert_eq!(p1.items.len(), 2);
        assert_eq!(p1.remaining, Some(3));
        // Changes after the first page do not show in later pages.
        s.delete(f.rt, "default", "vs-4").unwrap();
        s.create(vs("vs-5", "h"), None).unwrap();
        let token = p1.continue_token.unwrap();
        let p2 = s
            .list(&f, ListVersion::MostRecent, Some(2), Some(&token))
            .unwrap();
        let p3 = s
            .list(
                &f,
                ListVersion::MostRecent,
                Some(2),
                p2.continue_token.as_deref(),
            )
            .unwrap();
        let names: Vec<_> = p1_names(&p2).into_iter().chain(p1_names(&p3)).collect();
        assert_eq!(names, ["vs-2", "vs-3", "vs-4"]);
        assert!(p3.continue_token.is_none());
        assert_eq!(p2.resource_version, p1.resource_version);
        s.compact();
        assert_eq!(
            s.list(&f, ListVersion::MostRecent, Some(2), Some(&token))
                .unwrap_err()
                .code,
            410
        );
        // resourceVersion=0 ignores the limit.
        assert_eq!(
            s.list(&f, ListVersion::Any, Some(2), None)
                .unwrap()
                .items
                .len(),
            5
        );
    }

    fn p1_names(p: &Page) -> Vec<String> {
        p.items
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn watch_replays_history_and_reports_selection_changes() {
        let mut s = Store::new();
        let from = s.resource_version();
        s.create(vs("a", "x"), None).unwrap();
        let mut f = all_vs();
        f.labels = LabelSelector::parse("app=a").unwrap();
        let mut moved = vs("a", "x");
        moved["metadata"]["labels"]["app"] = "other".into();
        s.update(moved, None, true).unwrap();
        let start = s.watch(&f, WatchFrom::After(from)).ok().unwrap();
        let types: Vec<_> = start.initial.iter().map(|(t, _)| *t).collect();
        assert_eq!(types, ["ADDED", "DELETED"]);
        s.compact();
        assert!(matches!(
            s.watch(&f, WatchFrom::After(from)),
            Err(WatchRefused::Expired(_))
        ));
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut t, &json!({"a": {"b": null, "e": 3}, "d": [2]}));
        assert_eq!(t, json!({"a": {"c": 2, "e": 3}, "d": [2]}));
    }
}
