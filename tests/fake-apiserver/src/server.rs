//! The HTTP side: accepting connections (and refusing them during an outage), routing the real
//! server's paths to verbs, discovery documents, list and object responses in the requested version
//! or metadata-only form, and watch streams.

use crate::resources::{self, ResourceType, RESOURCES};
use crate::selector::{FieldSelector, LabelSelector};
use crate::store::{Filter, ListVersion, WatchFrom, WatchRefused};
use crate::{ApiError, Shared};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};

type Body = BoxBody<Bytes, std::io::Error>;

/// One request the fake served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string, still percent-encoded (`fieldSelector=spec.nodeName%3Dnode-a`).
    pub query: String,
    /// `list`, `watch`, `get`, `create`, `update`, `patch`, `delete`, or `discovery`.
    pub verb: String,
    pub status: u16,
    /// Whether the client asked for the metadata-only (`PartialObjectMetadata`) form.
    pub metadata_only: bool,
    /// When it arrived and when its answer (a watch: its headers) was ready, since the fake started.
    pub received: Duration,
    pub answered: Duration,
}

impl RequestRecord {
    /// The decoded value of query parameter `name`.
    pub fn param(&self, name: &str) -> Option<String> {
        parse_query(&self.query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }
}

pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr) {
    let mut listener = Some(listener);
    let mut outage = shared.outage.subscribe();
    loop {
        let down = *outage.borrow_and_update();
        if down {
            // Closing the listener makes new connections fail with ECONNREFUSED, as when the API
            // server is gone.
            listener = None;
        } else if listener.is_none() {
            match TcpListener::bind(addr).await {
                Ok(l) => listener = Some(l),
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        }
        match &listener {
            Some(l) => {
                tokio::select! {
                    accepted = l.accept() => {
                        if let Ok((stream, _)) = accepted {
                            let _ = stream.set_nodelay(true);
                            tokio::spawn(serve_connection(shared.clone(), stream));
                        }
                    }
                    _ = outage.changed() => {}
                }
            }
            None => {
                if outage.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn serve_connection(shared: Arc<Shared>, stream: tokio::net::TcpStream) {
    let mut kill = shared.kill_conns.subscribe();
    kill.borrow_and_update();
    let svc_shared = shared.clone();
    let service = hyper::service::service_fn(move |req| handle(svc_shared.clone(), req));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        _ = kill.changed() => {
            shared.counters.outage_cuts.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Percent-decodes a query string into pairs (`+` is a space).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a request addresses.
struct Target {
    rt: &'static ResourceType,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
}

enum Route {
    Discovery(Value),
    Resource(Target),
    NotFound,
}

fn route(path: &str, port: u16) -> Route {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api"] => {
            return Route::Discovery(json!({
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                    "serverAddress": format!("127.0.0.1:{port}")}]
            }))
        }
        ["apis"] => return Route::Discovery(group_list()),
        ["version"] => {
            return Route::Discovery(json!({
                "major": "1", "minor": "34", "gitVersion": "v1.34.0-fake",
                "gitCommit": "0000000000000000000000000000000000000000", "gitTreeState": "clean",
                "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc",
                "platform": "linux/amd64"
            }))
        }
        ["apis", g] => {
            return match group_list()["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|x| x["name"] == *g))
            {
                Some(x) => {
                    let mut x = x.clone();
                    x["kind"] = "APIGroup".into();
                    x["apiVersion"] = "v1".into();
                    Route::Discovery(x)
                }
                None => Route::NotFound,
            }
        }
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => return Route::NotFound,
    };
    if rest.is_empty() {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == group && r.serves(version))
            .map(|r| {
                json!({"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
                       "kind": r.kind, "shortNames": r.short_names,
                       "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]})
            })
            .collect();
        if list.is_empty() {
            return Route::NotFound;
        }
        return Route::Discovery(json!({
            "kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": if group.is_empty() { version.to_string() } else { format!("{group}/{version}") },
            "resources": list
        }));
    }
    let target = |plural: &str, namespace: Option<&str>, name: Option<&str>| {
        let rt = resources::by_plural(group, version, plural)?;
        if namespace.is_some() && !rt.namespaced {
            return None;
        }
        Some(Route::Resource(Target {
            rt,
            version: version.to_string(),
            namespace: namespace.map(str::to_string),
            name: name.map(str::to_string),
        }))
    };
    let found = match rest {
        [plural] => target(plural, None, None),
        ["namespaces", ns, plural] => target(plural, Some(ns), None),
        ["namespaces", ns, plural, name] => target(plural, Some(ns), Some(name)),
        [plural, name] => target(plural, None, Some(name)).filter(|r| match r {
            Route::Resource(t) => !t.rt.namespaced,
            _ => false,
        }),
        _ => None,
    };
    found.unwrap_or(Route::NotFound)
}

fn group_list() -> Value {
    let groups: Vec<Value> = resources::groups()
        .into_iter()
        .map(|(g, versions)| {
            let vs: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            json!({"name": g, "versions": vs, "preferredVersion": vs[0]})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).expect("serialize");
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            Full::new(Bytes::from(bytes))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    json_response(e.code, &e.status())
}

/// An object as a client of `version` sees it: `apiVersion` rewritten (one stored object serves
/// every version of its group), or only its metadata.
fn render(obj: &Value, rt: &ResourceType, version: &str, metadata_only: bool) -> Value {
    if metadata_only {
        return json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                      "metadata": obj.get("metadata").cloned().unwrap_or_else(|| json!({}))});
    }
    let mut o = obj.clone();
    o["apiVersion"] = rt.api_version(version).into();
    o["kind"] = rt.kind.into();
    o
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    let received = shared.started.elapsed();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let params = parse_query(&query);
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let accept = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    let metadata_only = accept.contains("as=PartialObjectMetadata");
    let port = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.rsplit_once(':'))
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0);
    let watch = matches!(param("watch"), Some("true" | "1"));
    let mut record = RequestRecord {
        method: method.to_string(),
        path: path.clone(),
        query: query.clone(),
        verb: "discovery".into(),
        status: 200,
        metadata_only,
        received,
        answered: received,
    };
    let response = match route(&path, port) {
        Route::Discovery(doc) if method == Method::GET => json_response(200, &doc),
        Route::Discovery(_) => error_response(&ApiError::method_not_allowed(format!(
            "{method} is not supported on {path}"
        ))),
        Route::NotFound => error_response(&ApiError::not_found_path()),
        Route::Resource(t) => {
            let verb = match (&method, t.name.is_some()) {
                (&Method::GET, true) => "get",
                (&Method::GET, false) if watch => "watch",
                (&Method::GET, false) => "list",
                (&Method::POST, false) => "create",
                (&Method::PUT, true) => "update",
                (&Method::PATCH, true) => "patch",
                (&Method::DELETE, true) => "delete",
                (&Method::DELETE, false) => "deletecollection",
                _ => "unsupported",
            };
            record.verb = verb.into();
            let rule_key = (
                verb.to_string(),
                t.rt.group.to_string(),
                t.rt.plural.to_string(),
            );
            let delay = shared.delays.lock().get(&rule_key).copied();
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let forbidden = crate::Shared::rule_matches(
                &shared.forbidden.lock(),
                verb,
                t.rt.group,
                t.rt.plural,
            );
            if forbidden {
                shared.counters.forbidden.fetch_add(1, Ordering::Relaxed);
                error_response(&ApiError::forbidden(
                    &shared.user,
                    verb,
                    t.rt,
                    t.namespace.as_deref(),
                    t.name.as_deref().unwrap_or_default(),
                ))
            } else if (metadata_only && !matches!(verb, "get" | "list" | "watch"))
                || accept.contains("as=Table")
            {
                error_response(&ApiError::not_acceptable(&accept))
            } else {
                let content_type = req
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/json")
                    .to_string();
                let body = match req.into_body().collect().await {
                    Ok(b) => b.to_bytes(),
                    Err(_) => Bytes::new(),
                };
                match verb {
                    "list" => list(&shared, &t, &params, metadata_only),
                    "watch" => watch_stream(&shared, &t, &params, metadata_only),
                    "get" => get(&shared, &t, metadata_only),
                    "create" | "update" | "patch" | "delete" => {
                        let r = write(&shared, verb, &t, &body, &content_type, &params);
                        if r.status().is_success() {
                            shared.counters.writes.fetch_add(1, Ordering::Relaxed);
                        }
                        r
                    }
                    _ => error_response(&ApiError::method_not_allowed(format!(
                        "{method} is not supported on {path} by this fake"
                    ))),
                }
            }
        }
    };
    record.status = response.status().as_u16();
    record.answered = shared.started.elapsed();
    shared.requests.lock().push(record);
    Ok(response)
}

fn filter_of(t: &Target, params: &[(String, String)]) -> Result<Filter, ApiError> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let labels = LabelSelector::parse(param("labelSelector").unwrap_or_default())
        .map_err(ApiError::bad_request)?;
    let fields = FieldSelector::parse(param("fieldSelector").unwrap_or_default(), t.rt)
        .map_err(ApiError::bad_request)?;
    Ok(Filter {
        rt: t.rt,
        namespace: t.namespace.clone(),
        labels,
        fields,
    })
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version: {s:?}")))
}

fn list(
    shared: &Shared,
    t: &Target,
    params: &[(String, String)],
    metadata_only: bool,
) -> Response<Body> {
    shared.counters.lists.fetch_add(1, Ordering::Relaxed);
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let result = (|| {
        let filter = filter_of(t, params)?;
        let version = match (
            param("resourceVersion").unwrap_or_default(),
            param("resourceVersionMatch"),
        ) {
            ("", None) => ListVersion::MostRecent,
            ("", Some(_)) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
                ))
            }
            ("0", Some("Exact")) => {
                return Err(ApiError::bad_request(
                    "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"".into(),
                ))
            }
            ("0", _) => ListVersion::Any,
            (rv, Some("Exact")) => ListVersion::Exact(parse_rv(rv)?),
            (rv, None | Some("NotOlderThan")) => ListVersion::NotOlderThan(parse_rv(rv)?),
            (_, Some(other)) => {
                return Err(ApiError::bad_request(format!(
                    "unsupported resourceVersionMatch {other:?}"
                )))
            }
        };
        let limit = match param("limit") {
            Some(l) => Some(
                l.parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?,
            ),
            None => None,
        };
        shared.store.lock().list(
            &filter,
            version,
            limit,
            param("continue").filter(|c| !c.is_empty()),
        )
    })();
    let page = match result {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|o| {
            let mut v = render(o, t.rt, &t.version, metadata_only);
            // Items of built-in lists carry no type; CRD lists and metadata-only lists keep it.
            if !t.rt.crd && !metadata_only {
                if let Some(m) = v.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
            }
            v
        })
        .collect();
    let mut meta = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(c) = page.continue_token {
        meta["continue"] = c.into();
    }
    if let Some(r) = page.remaining {
        meta["remainingItemCount"] = r.into();
    }
    let (kind, api_version) = if metadata_only {
        (
            "PartialObjectMetadataList".to_string(),
            "meta.k8s.io/v1".to_string(),
        )
    } else {
        (t.rt.list_kind(), t.rt.api_version(&t.version))
    };
    json_response(
        200,
        &json!({"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}),
    )
}

fn get(shared: &Shared, t: &Target, metadata_only: bool) -> Response<Body> {
    let name = t.name.as_deref().unwrap_or_default();
    let ns = t.namespace.as_deref().unwrap_or_default();
    match shared.store.lock().get(t.rt, ns, name) {
        Some(o) => json_response(200, &render(&o, t.rt, &t.version, metadata_only)),
        None => error_response(&ApiError::not_found(t.rt, name)),
    }
}

fn write(
    shared: &Shared,
    verb: &str,
    t: &Target,
    body: &[u8],
    content_type: &str,
    params: &[(String, String)],
) -> Response<Body> {
    let name = t.name.as_deref().unwrap_or_default();
    let ns = t.namespace.as_deref();
    let result = (|| {
        if verb == "delete" {
            return shared
                .store
                .lock()
                .delete(t.rt, ns.unwrap_or_default(), name)
                .map(|o| (200, o));
        }
        let mut obj: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body of the request could not be decoded as JSON: {e}"
            ))
        })?;
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body is not a JSON object".into(),
            ));
        }
        if verb == "patch" {
            let media = content_type.split(';').next().unwrap_or_default().trim();
            let apply = match media {
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => false,
                "application/apply-patch+yaml" => {
                    let manager = params
                        .iter()
                        .any(|(k, v)| k == "fieldManager" && !v.is_empty());
                    if !manager {
                        return Err(ApiError::new(
                            422,
                            "Invalid",
                            "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch".into(),
                        ));
                    }
                    true
                }
                other => return Err(ApiError::unsupported_media(other)),
            };
            return shared
                .store
                .lock()
                .merge_patch(t.rt, &t.version, ns.unwrap_or_default(), name, &obj, apply)
                .map(|o| (200, o));
        }
        // The body's type must be the URL's (a missing one defaults to it).
        let want = t.rt.api_version(&t.version);
        let map = obj.as_object_mut().expect("checked");
        let got_version = map
            .entry("apiVersion")
            .or_insert_with(|| want.clone().into())
            .as_str()
            .unwrap_or_default()
            .to_string();
        let got_kind = map
            .entry("kind")
            .or_insert_with(|| t.rt.kind.into())
            .as_str()
            .unwrap_or_default()
            .to_string();
        if got_version != want || got_kind != t.rt.kind {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({got_version}) does not match the expected API version ({want})"
            )));
        }
        let mut store = shared.store.lock();
        if verb == "create" {
            store.create(obj, ns).map(|o| (201, o))
        } else {
            store
                .update(obj, Some((ns.unwrap_or_default(), name)), true)
                .map(|o| (200, o))
        }
    })();
    match result {
        Ok((code, o)) => json_response(code, &render(&o, t.rt, &t.version, false)),
        Err(e) => error_response(&e),
    }
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": ty, "object": object})).expect("serialize");
    line.push(b'\n');
    Bytes::from(line)
}

fn watch_stream(
    shared: &Arc<Shared>,
    t: &Target,
    params: &[(String, String)],
    metadata_only: bool,
) -> Response<Body> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let filter = match filter_of(t, params) {
        Ok(f) => f,
        Err(e) => return error_response(&e),
    };
    let from = match param("resourceVersion").unwrap_or_default() {
        "" | "0" => WatchFrom::Current,
        rv => match parse_rv(rv) {
            Ok(n) => WatchFrom::After(n),
            Err(e) => return error_response(&e),
        },
    };
    let bookmarks = matches!(param("allowWatchBookmarks"), Some("true" | "1"));
    let initial_events = matches!(param("sendInitialEvents"), Some("true" | "1"));
    if initial_events && (!bookmarks || param("resourceVersionMatch") != Some("NotOlderThan")) {
        return error_response(&ApiError::bad_request(
            "sendInitialEvents requires allowWatchBookmarks=true and resourceVersionMatch=NotOlderThan".into(),
        ));
    }
    let timeout = match param("timeoutSeconds") {
        Some(s) => match s.parse::<u64>() {
            Ok(n) => Duration::from_secs(n),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid timeoutSeconds {s:?}"
                )))
            }
        },
        // The real server's default is its minimum request timeout (1800 s), randomised up to 2x.
        None => Duration::from_secs(1800),
    };
    shared
        .counters
        .watches_started
        .fetch_add(1, Ordering::Relaxed);
    let started = shared.store.lock().watch(&filter, from);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(256);
    let body = BodyExt::boxed(StreamBody::new(rx_stream(rx).map(|r| r.map(Frame::data))));
    let response = |body: Body| {
        Response::builder()
            .status(200)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::TRANSFER_ENCODING, "chunked")
            .body(body)
            .expect("response")
    };
    let start = match started {
        Ok(s) => s,
        Err(WatchRefused::Expired(e) | WatchRefused::TooLarge(e)) => {
            // Not an HTTP error: clients treat that as a failed watch start and retry the same
            // version forever. The real server streams one ERROR event and ends.
            if e.code == 410 {
                shared.counters.expired.fetch_add(1, Ordering::Relaxed);
            }
            let line = event_line("ERROR", &e.status());
            let body = Full::new(line).map_err(|e| match e {}).boxed();
            return response(body);
        }
    };
    let shared = shared.clone();
    let rt = t.rt;
    let version = t.version.clone();
    tokio::spawn(async move {
        shared.counters.watches_open.fetch_add(1, Ordering::Relaxed);
        run_watch(
            &shared,
            tx,
            start,
            filter,
            rt,
            &version,
            metadata_only,
            bookmarks,
            initial_events,
            timeout,
        )
        .await;
        shared.counters.watches_open.fetch_sub(1, Ordering::Relaxed);
    });
    response(body)
}

fn rx_stream(
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

#[allow(clippy::too_many_arguments)]
async fn run_watch(
    shared: &Shared,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    start: crate::store::WatchStart,
    filter: Filter,
    rt: &'static ResourceType,
    version: &str,
    metadata_only: bool,
    bookmarks: bool,
    initial_events: bool,
    timeout: Duration,
) {
    let mut kill = shared.kill_watches.subscribe();
    kill.borrow_and_update();
    let counters = &shared.counters;
    let bookmark = |rv: u64, initial_end: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let (kind, api_version) = if metadata_only {
            (
                "PartialObjectMetadata".to_string(),
                "meta.k8s.io/v1".to_string(),
            )
        } else {
            (rt.kind.to_string(), rt.api_version(version))
        };
        event_line(
            "BOOKMARK",
            &json!({"kind": kind, "apiVersion": api_version, "metadata": meta}),
        )
    };
    // The highest version this stream has accounted for: bookmarks never run ahead of events it
    // has not yet written.
    let mut seen = start.resource_version;
    for (ty, obj) in &start.initial {
        if tx
            .send(Ok(event_line(ty, &render(obj, rt, version, metadata_only))))
            .await
            .is_err()
        {
            return;
        }
        counters.watch_events.fetch_add(1, Ordering::Relaxed);
    }
    if initial_events {
        if tx.send(Ok(bookmark(seen, true))).await.is_err() {
            return;
        }
        counters.bookmarks.fetch_add(1, Ordering::Relaxed);
    }
    let mut feed = start.feed;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let every = *shared.bookmark_interval.lock();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        let line = tokio::select! {
            _ = &mut deadline => {
                // The real server ends a timed-out watch cleanly, with a last bookmark if allowed.
                if bookmarks && tx.send(Ok(bookmark(seen, false))).await.is_ok() {
                    counters.bookmarks.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            _ = kill.changed() => {
                // An error frame makes hyper cut the connection without the final chunk.
                let _ = tx.send(Err(std::io::Error::other("watch dropped by the test"))).await;
                return;
            }
            _ = tx.closed() => return,
            _ = tick.tick(), if bookmarks => {
                counters.bookmarks.fetch_add(1, Ordering::Relaxed);
                bookmark(seen, false)
            }
            change = feed.recv() => match change {
                Ok(change) => {
                    seen = change.rv;
                    match filter.classify(&change) {
                        Some((ty, obj)) => {
                            counters.watch_events.fetch_add(1, Ordering::Relaxed);
                            event_line(ty, &render(&obj, rt, version, metadata_only))
                        }
                        None => continue,
                    }
                }
                // Fell too far behind, or the store is gone: end the stream; the client resumes.
                Err(broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed) => return,
            },
        };
        if tx.send(Ok(line)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let q = parse_query(
            "fieldSelector=spec.nodeName%3Dnode-a&labelSelector=a+in+%28x%2Cy%29&watch=true",
        );
        assert_eq!(
            q[0],
            ("fieldSelector".into(), "spec.nodeName=node-a".into())
        );
        assert_eq!(q[1].1, "a in (x,y)");
        assert_eq!(decode("100%"), "100%");
    }

    #[test]
    fn paths_route_as_on_the_real_server() {
        let r = |p: &str| match route(p, 1) {
            Route::Resource(t) => format!(
                "{}/{} ns={:?} name={:?}",
                t.rt.group, t.rt.plural, t.namespace, t.name
            ),
            Route::Discovery(_) => "discovery".into(),
            Route::NotFound => "404".into(),
        };
        assert_eq!(r("/api/v1/pods"), "/pods ns=None name=None");
        assert_eq!(
            r("/api/v1/namespaces/default/pods"),
            "/pods ns=Some(\"default\") name=None"
        );
        assert_eq!(
            r("/api/v1/namespaces/default"),
            "/namespaces ns=None name=Some(\"default\")"
        );
        assert_eq!(r("/api/v1/namespaces"), "/namespaces ns=None name=None");
        assert_eq!(r("/api/v1/pods/x"), "404");
        assert_eq!(
            r("/apis/networking.istio.io/v1alpha3/namespaces/a/virtualservices/b"),
            "networking.istio.io/virtualservices ns=Some(\"a\") name=Some(\"b\")"
        );
        assert_eq!(r("/apis/networking.istio.io/v2/virtualservices"), "404");
        assert_eq!(r("/apis/discovery.k8s.io/v1"), "discovery");
        assert_eq!(r("/apis"), "discovery");
    }
}
