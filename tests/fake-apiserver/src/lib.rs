//! A stateful fake Kubernetes API server for tests, on plain HTTP/1.1 at `127.0.0.1:0`.
//!
//! No API server can run on the machines these tests run on, so this one copies the wire behaviour
//! kube-rs's client, `watcher` and `reflector` depend on: one global resourceVersion, lists with
//! `limit`/`continue` pages that are consistent snapshots, label and field selectors (an unsupported
//! field is a 400), watches that replay history and stream newline-delimited events with bookmarks,
//! an expired version answered as `200` + one `ERROR` event carrying a 410 `Expired` Status, the
//! metadata-only (`PartialObjectMetadata`) forms, 403 `Forbidden` Status bodies, discovery, and one
//! CRD object served under every version of its group. Tests drive it through [`FakeApiServer`]:
//! write objects, compact the history, forbid verbs, slow a verb down, drop every watch, simulate an
//! outage, and read back the requests it served and the Events clients posted.
//!
//! What it does not copy is listed in `tests/README.md` (authentication, admission, defaulting beyond
//! a few fields, finalizers and cascading deletes, protobuf, strategic-merge list semantics).
#![forbid(unsafe_code)]

mod resources;
mod selector;
mod server;
mod store;
mod time;

pub use resources::{ResourceType, RESOURCES};
pub use server::RequestRecord;

use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A failed request as the real server answers it: the HTTP code and a `Status` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> Self {
        Self {
            code,
            reason,
            message,
            details: None,
        }
    }

    fn with_details(mut self, rt: &ResourceType, name: &str) -> Self {
        let mut d = json!({"kind": rt.plural});
        if !rt.group.is_empty() {
            d["group"] = rt.group.into();
        }
        if !name.is_empty() {
            d["name"] = name.into();
        }
        self.details = Some(d);
        self
    }

    /// The `metav1.Status` body.
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            s["details"] = d.clone();
        }
        s
    }

    pub(crate) fn bad_request(message: String) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn invalid(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} {name:?} is invalid: {why}", qualified(rt)),
        )
        .with_details(rt, name)
    }

    pub(crate) fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} {name:?} not found", qualified(rt)),
        )
        .with_details(rt, name)
    }

    pub(crate) fn not_found_ns(namespace: &str) -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            format!("namespaces {namespace:?} not found"),
        );
        e.details = Some(json!({"name": namespace, "kind": "namespaces"}));
        e
    }

    pub(crate) fn not_found_path() -> Self {
        let mut e = Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".into(),
        );
        e.details = Some(json!({}));
        e
    }

    pub(crate) fn already_exists(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} {name:?} already exists", qualified(rt)),
        )
        .with_details(rt, name)
    }

    pub(crate) fn conflict(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {name:?}: the object has been modified; \
                 please apply your changes to the latest version and try again",
                qualified(rt)
            ),
        )
        .with_details(rt, name)
    }

    pub(crate) fn expired(message: &str) -> Self {
        Self::new(410, "Expired", message.to_string())
    }

    pub(crate) fn too_large(asked: u64, current: u64) -> Self {
        let mut e = Self::new(
            504,
            "Timeout",
            format!("Too large resource version: {asked}, current: {current}"),
        );
        e.details = Some(json!({"causes": [{"reason": "ResourceVersionTooLarge",
            "message": "Too large resource version"}], "retryAfterSeconds": 1}));
        e
    }

    pub(crate) fn forbidden(
        user: &str,
        verb: &str,
        rt: &ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Self {
        let subject = if name.is_empty() {
            qualified(rt)
        } else {
            format!("{} {name:?}", qualified(rt))
        };
        let scope = match namespace {
            Some(ns) if rt.namespaced => format!("in the namespace {ns:?}"),
            _ => "at the cluster scope".to_string(),
        };
        Self::new(
            403,
            "Forbidden",
            format!(
                "{subject} is forbidden: User {user:?} cannot {verb} resource {:?} in API group {:?} {scope}",
                rt.plural, rt.group
            ),
        )
        .with_details(rt, name)
    }

    pub(crate) fn method_not_allowed(message: String) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub(crate) fn unsupported_media(content_type: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!("the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {content_type:?}"),
        )
    }

    pub(crate) fn not_acceptable(accept: &str) -> Self {
        Self::new(
            406,
            "NotAcceptable",
            format!("only the following media types are accepted: application/json, application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1; got {accept:?}"),
        )
    }
}

/// `pods`, or `virtualservices.networking.istio.io`, as the real server names a resource.
fn qualified(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.plural.to_string()
    } else {
        format!("{}.{}", rt.plural, rt.group)
    }
}

/// Counters of what the fake served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub requests: u64,
    pub lists: u64,
    pub watches_started: u64,
    /// Watch streams open right now.
    pub watches_open: u64,
    /// ADDED/MODIFIED/DELETED events written to watch streams.
    pub watch_events: u64,
    pub bookmarks: u64,
    /// Watches answered with an `ERROR` event carrying a 410 `Expired` Status.
    pub expired: u64,
    pub forbidden: u64,
    /// Writes through the HTTP API (create, update, patch, delete).
    pub writes: u64,
    /// Connections refused or cut by an outage.
    pub outage_cuts: u64,
    pub resource_version: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub requests: AtomicU64,
    pub lists: AtomicU64,
    pub watches_started: AtomicU64,
    pub watches_open: AtomicU64,
    pub watch_events: AtomicU64,
    pub bookmarks: AtomicU64,
    pub expired: AtomicU64,
    pub forbidden: AtomicU64,
    pub writes: AtomicU64,
    pub outage_cuts: AtomicU64,
}

/// (verb, group, resource), e.g. `("list", "", "pods")`.
type Rule = (String, String, String);

pub(crate) struct Shared {
    pub store: Mutex<Store>,
    pub forbidden: Mutex<HashSet<Rule>>,
    pub delays: Mutex<HashMap<Rule, Duration>>,
    pub requests: Mutex<Vec<RequestRecord>>,
    pub counters: Counters,
    pub bookmark_interval: Mutex<Duration>,
    /// Bumped to end every open watch stream abruptly.
    pub kill_watches: watch::Sender<u64>,
    /// Bumped to close every connection (outage, shutdown).
    pub kill_conns: watch::Sender<u64>,
    pub outage: watch::Sender<bool>,
    /// The user named in `Forbidden` messages (the fake does no authentication).
    pub user: String,
    pub started: tokio::time::Instant,
}

impl Shared {
    pub fn rule_matches(set: &HashSet<Rule>, verb: &str, group: &str, resource: &str) -> bool {
        ["*", verb].iter().any(|v| {
            ["*", resource]
                .iter()
                .any(|r| set.contains(&(v.to_string(), group.to_string(), r.to_string())))
        })
    }
}

/// The fake API server. Dropping it closes the listener and every connection.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl FakeApiServer {
    /// Binds `127.0.0.1:0` and serves. Bookmarks go out every second on watches that ask for them
    /// (the real server sends them about once a minute; tests want them sooner).
    pub async fn start() -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            forbidden: Mutex::default(),
            delays: Mutex::default(),
            requests: Mutex::default(),
            counters: Counters::default(),
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
            kill_watches: watch::channel(0).0,
            kill_conns: watch::channel(0).0,
            outage: watch::channel(false).0,
            user: "system:serviceaccount:sluice-system:sluice".into(),
            started: tokio::time::Instant::now(),
        });
        let accept = tokio::spawn(server::accept_loop(shared.clone(), listener, addr));
        Ok(Self {
            shared,
            addr,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig for this server: plain http, no credentials, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        )
    }

    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.kubeconfig())
    }

    /// Creates an object (its `apiVersion` and `kind` pick the resource), as a POST would.
    pub fn create(&self, obj: Value) -> Result<Value, ApiError> {
        self.shared.store.lock().create(obj, None)
    }

    /// Replaces an object, as a PUT would: a `metadata.resourceVersion` in `obj` must be current.
    pub fn replace(&self, obj: Value) -> Result<Value, ApiError> {
        self.shared.store.lock().update(obj, None, true)
    }

    /// Creates or unconditionally replaces an object. Replacing it with identical content writes
    /// nothing (no new resourceVersion, no watch event), as on the real server.
    pub fn apply(&self, obj: Value) -> Result<Value, ApiError> {
        let mut store = self.shared.store.lock();
        let rt = store::resource_of(&obj)?;
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if store.get(rt, ns, name).is_some() {
            store.update(obj, None, false)
        } else {
            store.create(obj, None)
        }
    }

    /// Deletes `Kind/namespace/name` or `Kind/name` (cluster-scoped). `Kind` may carry its group
    /// (`Event.events.k8s.io`); without one the core group is preferred.
    pub fn delete(&self, target: &str) -> Result<Value, ApiError> {
        let (rt, ns, name) = parse_target(target)?;
        self.shared.store.lock().delete(rt, &ns, &name)
    }

    /// The stored object `Kind/namespace/name`, if it exists.
    pub fn get(&self, target: &str) -> Option<Value> {
        let (rt, ns, name) = parse_target(target).ok()?;
        self.shared
            .store
            .lock()
            .get(rt, &ns, &name)
            .map(|v| (*v).clone())
    }

    /// Every stored object of `Kind` (optionally `Kind.group`).
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let Ok(rt) = resource_by_kind(kind) else {
            return Vec::new();
        };
        self.shared
            .store
            .lock()
            .all(rt)
            .into_iter()
            .map(|v| (*v).clone())
            .collect()
    }

    /// Time since the fake started (the clock of [`RequestRecord::received`]).
    pub fn uptime(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().resource_version()
    }

    /// Expires everything older than now: a watch or continue token from an older version gets 410
    /// `Expired` (open watches keep streaming, as on the real server; see [`Self::drop_watches`]).
    pub fn compact(&self) {
        self.shared.store.lock().compact();
    }

    /// Answers `verb` (`list`, `watch`, `get`, `create`, `update`, `patch`, `delete`, or `*`) on
    /// `resource` (plural, or `*`) of `group` with 403 Forbidden. Open watches are not cut.
    pub fn forbid(&self, verb: &str, group: &str, resource: &str) {
        self.shared
            .forbidden
            .lock()
            .insert((verb.into(), group.into(), resource.into()));
    }

    pub fn allow(&self, verb: &str, group: &str, resource: &str) {
        self.shared.forbidden.lock().remove(&(
            verb.to_string(),
            group.to_string(),
            resource.to_string(),
        ));
    }

    /// Holds every `verb` request on `resource` for `delay` before answering (a slow list).
    pub fn delay(&self, verb: &str, group: &str, resource: &str, delay: Duration) {
        let key = (verb.to_string(), group.to_string(), resource.to_string());
        if delay.is_zero() {
            self.shared.delays.lock().remove(&key);
        } else {
            self.shared.delays.lock().insert(key, delay);
        }
    }

    /// Ends every open watch stream abruptly (the connection is cut mid-body).
    pub fn drop_watches(&self) {
        self.shared.kill_watches.send_modify(|n| *n += 1);
    }

    /// `true`: the listener closes (new connections are refused) and every open connection and
    /// watch is cut. `false`: the same address serves again.
    pub fn set_outage(&self, down: bool) {
        self.shared.outage.send_replace(down);
        if down {
            self.shared.kill_conns.send_modify(|n| *n += 1);
        }
    }

    /// How often watches that allow bookmarks get one.
    pub fn set_bookmark_interval(&self, every: Duration) {
        *self.shared.bookmark_interval.lock() = every;
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.requests.lock().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.requests.lock().clear();
    }

    /// Events clients posted (core `v1` and `events.k8s.io/v1`), as stored.
    pub fn events(&self) -> Vec<Value> {
        let store = self.shared.store.lock();
        RESOURCES
            .iter()
            .filter(|r| r.kind == "Event")
            .flat_map(|r| store.all(r))
            .map(|v| (*v).clone())
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            requests: get(&c.requests),
            lists: get(&c.lists),
            watches_started: get(&c.watches_started),
            watches_open: get(&c.watches_open),
            watch_events: get(&c.watch_events),
            bookmarks: get(&c.bookmarks),
            expired: get(&c.expired),
            forbidden: get(&c.forbidden),
            writes: get(&c.writes),
            outage_cuts: get(&c.outage_cuts),
            resource_version: self.resource_version(),
        }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.kill_conns.send_modify(|n| *n += 1);
    }
}

fn resource_by_kind(kind: &str) -> Result<&'static ResourceType, ApiError> {
    let (kind, group) = kind.split_once('.').unwrap_or((kind, ""));
    RESOURCES
        .iter()
        .filter(|r| r.kind == kind && (group.is_empty() || r.group == group))
        // The core group first when the kind is ambiguous (Event).
        .min_by_key(|r| !r.group.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("unknown kind {kind:?}")))
}

fn parse_target(target: &str) -> Result<(&'static ResourceType, String, String), ApiError> {
    let parts: Vec<&str> = target.split('/').collect();
    let rt = resource_by_kind(parts[0])?;
    match (rt.namespaced, parts.as_slice()) {
        (true, [_, ns, name]) => Ok((rt, ns.to_string(), name.to_string())),
        (false, [_, name]) => Ok((rt, String::new(), name.to_string())),
        _ => Err(ApiError::bad_request(format!(
            "{target:?}: expected Kind/namespace/name or Kind/name for a cluster-scoped kind"
        ))),
    }
}
