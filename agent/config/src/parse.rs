//! Reading files: finding `*.yaml`/`*.yml`/`*.json` under directories, splitting multi-document YAML,
//! and turning each document into a typed [`Object`] of a kind Sluice reads (other kinds are skipped).
//! Syntax and type errors carry the file's line and column; unknown fields of Istio kinds become
//! warnings naming their full path.

use crate::istio::{DestinationRule, VirtualService};
use crate::k8s::{EndpointSlice, Namespace, Pod, PodMetadata, Service, POD_METADATA_KIND};
use crate::problem::{Origin, Problem, Severity, Sink};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Istio networking API versions Sluice accepts (all serve the same schema).
pub const ISTIO_API_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// A typed configuration object and where it came from.
#[derive(Clone, Debug)]
pub struct Object {
    pub origin: Origin,
    pub resource: Resource,
}

/// The kinds Sluice reads. Istio's kinds are boxed: a cluster holds thousands of the small
/// built-in objects (a store entry each), and the largest variant sets every entry's size.
#[derive(Clone, Debug)]
pub enum Resource {
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Namespace(Namespace),
    /// Kubernetes mode only: a Pod of any node, metadata only.
    PodMetadata(PodMetadata),
}

/// Identity of an object: kind, namespace (empty for namespaces themselves) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match &self.resource {
            Resource::VirtualService(_) => "VirtualService",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::Service(_) => "Service",
            Resource::EndpointSlice(_) => "EndpointSlice",
            Resource::Pod(_) => "Pod",
            Resource::Namespace(_) => "Namespace",
            Resource::PodMetadata(_) => POD_METADATA_KIND,
        }
    }

    pub fn metadata(&self) -> &crate::istio::ObjectMeta {
        match &self.resource {
            Resource::VirtualService(o) => &o.metadata,
            Resource::DestinationRule(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::EndpointSlice(o) => &o.metadata,
            Resource::Pod(o) => &o.metadata,
            Resource::Namespace(o) => &o.metadata,
            Resource::PodMetadata(o) => &o.metadata,
        }
    }

    pub fn id(&self) -> ObjectId {
        let meta = self.metadata();
        let namespace = match self.resource {
            Resource::Namespace(_) => String::new(),
            _ => meta.namespace().to_string(),
        };
        ObjectId {
            kind: self.kind().to_string(),
            namespace,
            name: meta.name.clone(),
        }
    }

    /// `VirtualService default/pricing`.
    pub fn describe(&self) -> String {
        self.id().to_string()
    }
}

/// The outcome of parsing one file.
#[derive(Debug, Default)]
pub struct ParsedFile {
    /// Documents that parsed into a known kind.
    pub objects: Vec<Object>,
    /// Errors and warnings, with locations.
    pub problems: Vec<Problem>,
    /// Documents of a known kind that did not parse: their origin, and their identity when it
    /// could be read.
    pub failed: Vec<(Origin, Option<ObjectId>)>,
    /// The file is not valid YAML (or could not be read): nothing in it can be trusted.
    pub unreadable: bool,
}

/// Parses the text of one file (`file` is how problems name it).
pub fn parse_str(file: &str, text: &str) -> ParsedFile {
    parse_text(&Origin::file(file, 0), text)
}

/// Parses one object read from the Kubernetes API (a JSON object with `apiVersion` and `kind`),
/// through the same types and checks as files; problems name `Kind namespace/name` and its
/// resourceVersion.
pub fn parse_api_object(value: &serde_json::Value) -> ParsedFile {
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or("").to_string();
    let meta = value.get("metadata");
    let origin = Origin::Api {
        kind: text(value.get("kind")),
        namespace: text(meta.and_then(|m| m.get("namespace"))),
        name: text(meta.and_then(|m| m.get("name"))),
        resource_version: meta
            .and_then(|m| m.get("resourceVersion"))
            .and_then(|v| v.as_str())
            .map(str::to_string),
        uid: meta
            .and_then(|m| m.get("uid"))
            .and_then(|v| v.as_str())
            .map(str::to_string),
    };
    if let Some(parsed) = parse_built_in(&origin, value) {
        return parsed;
    }
    // JSON is YAML: one parser, so API objects get exactly the field paths and messages files get.
    match serde_json::to_string(value) {
        Ok(json) => {
            let mut parsed = parse_text(&origin, &json);
            // Lines of a JSON rendering mean nothing to the object's author: drop them.
            static LINES: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
            let re = LINES.get_or_init(|| {
                regex::Regex::new(r" \(line \d+, column \d+\)| at line \d+ column \d+")
                    .expect("valid regex")
            });
            for p in parsed
                .problems
                .iter_mut()
                .filter(|p| p.reason.contains("line "))
            {
                p.reason = re.replace_all(&p.reason, "").into_owned();
            }
            parsed
        }
        Err(e) => {
            let mut sink = Sink::new(&origin, None);
            sink.error("", format!("cannot serialize: {e}"));
            ParsedFile {
                problems: sink.problems,
                unreadable: true,
                ..ParsedFile::default()
            }
        }
    }
}

/// The fast path for the bulk of a cluster (Services, EndpointSlices, Pods, Namespaces, which the
/// API server has already validated against their schema): straight from the JSON value. `None`
/// when it is not one of them or does not deserialize, so the general path reports the problem
/// with its field path.
fn parse_built_in(origin: &Origin, value: &serde_json::Value) -> Option<ParsedFile> {
    let api_version = value.get("apiVersion")?.as_str()?;
    let kind = value.get("kind")?.as_str()?;
    let named = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_json::Value::as_str)
        .is_some_and(|n| !n.is_empty());
    if !named {
        return None;
    }
    let resource = match (api_version, kind) {
        ("v1", "Service") => Resource::Service(Deserialize::deserialize(value).ok()?),
        ("v1", "Pod") => Resource::Pod(Deserialize::deserialize(value).ok()?),
        ("v1", "Namespace") => Resource::Namespace(Deserialize::deserialize(value).ok()?),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Resource::EndpointSlice(Deserialize::deserialize(value).ok()?)
        }
        // Only ever made by Kubernetes mode's metadata-only Pod watch, never read from files.
        ("v1", POD_METADATA_KIND) => Resource::PodMetadata(PodMetadata::from_meta(
            Deserialize::deserialize(value.get("metadata")?).ok()?,
        )),
        _ => return None,
    };
    Some(ParsedFile {
        objects: vec![Object {
            origin: origin.clone(),
            resource,
        }],
        ..ParsedFile::default()
    })
}

fn parse_text(origin: &Origin, text: &str) -> ParsedFile {
    let mut out = ParsedFile::default();
    let mut index = 0;
    for (start_line, chunk) in split_documents(text) {
        if chunk.lines().all(|l| {
            let t = l.trim();
            t.is_empty() || t.starts_with('#')
        }) {
            continue;
        }
        index += 1;
        parse_document(&origin.with_document(index), start_line, chunk, &mut out);
    }
    out
}

/// Reads and parses a file.
pub fn parse_path(path: &Path, file: &str) -> ParsedFile {
    match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => parse_str(file, &text),
            Err(_) => unreadable(file, "not UTF-8 text".to_string()),
        },
        Err(e) => unreadable(file, format!("cannot read: {e}")),
    }
}

fn unreadable(file: &str, reason: String) -> ParsedFile {
    let origin = Origin::file(file, 0);
    let mut sink = Sink::new(&origin, None);
    sink.error("", reason);
    ParsedFile {
        problems: sink.problems,
        unreadable: true,
        ..ParsedFile::default()
    }
}

/// Splits at `---` lines, returning each document with the 0-based line it starts on.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 0;
    let mut offset = 0;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let l = line.trim_end_matches(['\n', '\r']);
        let is_separator = l == "---"
            || l.strip_prefix("---")
                .is_some_and(|rest| rest.starts_with([' ', '\t']));
        if is_separator {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = line_no + 1;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs
}

fn parse_document(origin: &Origin, start_line: usize, chunk: &str, out: &mut ParsedFile) {
    let mut sink = Sink::new(origin, None);
    let value: Value = match serde_yaml::from_str(chunk) {
        Ok(v) => v,
        Err(e) => {
            let (field, reason) = split_yaml_error(&e, start_line);
            sink.error(field, format!("YAML syntax error: {reason}"));
            out.problems.extend(sink.problems);
            out.unreadable = true;
            return;
        }
    };
    let map = match &value {
        Value::Null => return,
        Value::Mapping(m) => m,
        _ => {
            sink.error(
                "",
                "expected a Kubernetes object (a mapping with apiVersion and kind)",
            );
            out.problems.extend(sink.problems);
            return;
        }
    };
    let text_of = |key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let kind = text_of("kind");
    let api_version = text_of("apiVersion");
    let meta = map.get("metadata");
    let meta_str = |key: &str| {
        meta.and_then(|m| m.get(key))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let name = meta_str("name");
    let mut namespace = meta_str("namespace");
    if namespace.is_empty() && kind != "Namespace" {
        namespace = "default".to_string();
    }
    let id = ObjectId {
        kind: kind.clone(),
        namespace,
        name,
    };
    if kind == "List" && api_version == "v1" {
        // `kubectl get -o yaml` output: each item is read as part of this document (item line
        // numbers are relative to the item).
        if let Some(items) = map.get("items").and_then(Value::as_sequence) {
            for item in items {
                if let Ok(text) = serde_yaml::to_string(item) {
                    parse_document(origin, start_line, &text, out);
                }
            }
        }
        return;
    }
    if kind.is_empty() {
        sink.error(
            "kind",
            "missing kind; every document needs apiVersion and kind",
        );
        out.problems.extend(sink.problems);
        return;
    }
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    let known = match kind.as_str() {
        "VirtualService" | "DestinationRule" => group == "networking.istio.io",
        "Service" | "Pod" | "Namespace" => api_version == "v1",
        "EndpointSlice" => group == "discovery.k8s.io",
        _ => false,
    };
    if !known {
        tracing::debug!(source = %origin.source(), document = origin.document(), %kind, %api_version, "skipping a kind Sluice does not read");
        return;
    }
    sink.object = Some(id.to_string());
    if group == "networking.istio.io" && !ISTIO_API_VERSIONS.contains(&api_version.as_str()) {
        sink.error(
            "apiVersion",
            format!(
                "unsupported apiVersion {api_version:?}; use one of {}",
                ISTIO_API_VERSIONS.join(", ")
            ),
        );
    } else if kind == "EndpointSlice" && api_version != "discovery.k8s.io/v1" {
        sink.error(
            "apiVersion",
            format!("unsupported apiVersion {api_version:?}; use discovery.k8s.io/v1"),
        );
    }
    if id.name.is_empty() {
        sink.error("metadata.name", "missing; every object needs a name");
    }
    let resource = if sink.has_errors() {
        None
    } else {
        match kind.as_str() {
            "VirtualService" => typed(chunk, start_line, true, &mut sink)
                .map(|v| Resource::VirtualService(Box::new(v))),
            "DestinationRule" => typed(chunk, start_line, true, &mut sink)
                .map(|d| Resource::DestinationRule(Box::new(d))),
            "Service" => typed(chunk, start_line, false, &mut sink).map(Resource::Service),
            "EndpointSlice" => {
                typed(chunk, start_line, false, &mut sink).map(Resource::EndpointSlice)
            }
            "Pod" => typed(chunk, start_line, false, &mut sink).map(Resource::Pod),
            _ => typed(chunk, start_line, false, &mut sink).map(Resource::Namespace),
        }
    };
    if let Some(Resource::VirtualService(_) | Resource::DestinationRule(_)) = &resource {
        // metadata is flattened (so serde_ignored cannot see into it): check its keys here.
        let meta = match &resource {
            Some(Resource::VirtualService(v)) => &v.metadata,
            Some(Resource::DestinationRule(d)) => &d.metadata,
            _ => unreachable!("checked above"),
        };
        for key in meta.other.keys() {
            if !OBJECT_META_FIELDS.contains(&key.as_str()) {
                sink.warn(format!("metadata.{key}"), "unknown field");
            }
        }
    }
    match resource {
        Some(resource) if !sink.has_errors() => out.objects.push(Object {
            origin: origin.clone(),
            resource,
        }),
        _ => out
            .failed
            .push((origin.clone(), (!id.name.is_empty()).then_some(id))),
    }
    out.problems.extend(sink.problems);
}

/// Kubernetes `ObjectMeta` fields Sluice does not read (but which are not typos).
const OBJECT_META_FIELDS: &[&str] = &[
    "uid",
    "resourceVersion",
    "generation",
    "generateName",
    "selfLink",
    "managedFields",
    "ownerReferences",
    "finalizers",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "clusterName",
];

/// Deserializes a document, reporting unknown fields (when asked) as warnings with their paths.
fn typed<T: DeserializeOwned>(
    chunk: &str,
    start_line: usize,
    report_unknown: bool,
    sink: &mut Sink,
) -> Option<T> {
    let mut unknown = Vec::new();
    let result: Result<T, _> =
        serde_ignored::deserialize(serde_yaml::Deserializer::from_str(chunk), |path| {
            unknown.push(format_path(&path))
        });
    match result {
        Ok(v) => {
            if report_unknown {
                for field in unknown {
                    sink.warn(field, "unknown field");
                }
            }
            Some(v)
        }
        Err(e) => {
            let (field, reason) = split_yaml_error(&e, start_line);
            sink.error(field, reason);
            None
        }
    }
}

/// `spec.http[0].retries` from serde_ignored's path.
fn format_path(path: &serde_ignored::Path) -> String {
    fn walk(path: &serde_ignored::Path, out: &mut String) {
        use serde_ignored::Path as P;
        match path {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                let _ = write!(out, "[{index}]");
            }
            P::Map { parent, key } => {
                walk(parent, out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                walk(parent, out)
            }
        }
    }
    let mut out = String::new();
    walk(path, &mut out);
    out
}

/// Splits serde_yaml's message into the field path it names and the reason, with the location made
/// relative to the whole file rather than the document.
fn split_yaml_error(e: &serde_yaml::Error, start_line: usize) -> (String, String) {
    let mut msg = e.to_string();
    let mut location = String::new();
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = msg.strip_suffix(&suffix) {
            msg = stripped.to_string();
        }
        location = format!(
            " (line {}, column {})",
            loc.line() + start_line,
            loc.column()
        );
    }
    // libyaml's messages embed document-relative lines: make them file-relative.
    if msg.contains("line ") {
        let re = regex::Regex::new(r"line (\d+)").expect("valid regex");
        msg = re
            .replace_all(&msg, |c: &regex::Captures| {
                let n: usize = c[1].parse().unwrap_or(0);
                format!("line {}", n + start_line)
            })
            .into_owned();
        location.clear();
    }
    let (field, reason) = match msg.split_once(": ") {
        Some((path, rest)) if !path.is_empty() && !path.contains(' ') => {
            (path.to_string(), rest.to_string())
        }
        _ => (String::new(), msg),
    };
    (field, format!("{reason}{location}"))
}

/// Files to read under `dir`, recursively: `*.yaml`, `*.yml`, `*.json`, skipping names that start
/// with `.` (Kubernetes ConfigMap volumes expose each key as a top-level symlink into a hidden
/// `..data` directory, so skipping hidden names reads every file exactly once). Symlinks are followed.
pub fn collect_files(dir: &Path) -> (Vec<PathBuf>, Vec<Problem>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    walk_dir(dir, 0, &mut files, &mut problems);
    files.sort();
    (files, problems)
}

fn walk_dir(dir: &Path, depth: usize, files: &mut Vec<PathBuf>, problems: &mut Vec<Problem>) {
    const MAX_DEPTH: usize = 16;
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(Problem {
                severity: Severity::Error,
                origin: Origin::file(dir.display().to_string(), 0),
                file: dir.display().to_string(),
                document: 0,
                object: None,
                field: String::new(),
                reason: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // fs::metadata follows symlinks.
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk_dir(&path, depth + 1, files, problems);
            }
        } else if meta.is_file() && is_config_file(&path) {
            files.push(path);
        }
    }
}

/// `*.yaml`, `*.yml` or `*.json`.
pub fn is_config_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_skips_empty_ones() {
        let text = "---\n# just a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n--- # trailing\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\n---\n";
        let parsed = parse_str("a.yaml", text);
        assert!(parsed.problems.is_empty(), "{:?}", parsed.problems);
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(parsed.objects[0].origin, Origin::file("a.yaml", 1));
        assert_eq!(parsed.objects[0].describe(), "Namespace shop");
    }

    #[test]
    fn unknown_fields_are_warnings_with_paths() {
        let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: r\nspec:\n  host: pricing\n  trafficPolicy:\n    outlierDetection:\n      consecutive5xxError: 3\n";
        let parsed = parse_str("dr.yaml", text);
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(parsed.problems.len(), 1);
        let p = &parsed.problems[0];
        assert_eq!(p.severity, Severity::Warning);
        assert_eq!(
            p.field,
            "spec.trafficPolicy.outlierDetection.consecutive5xxError"
        );
        assert_eq!(p.reason, "unknown field");
        assert_eq!(p.object.as_deref(), Some("DestinationRule default/r"));
    }

    #[test]
    fn type_errors_have_paths_and_file_lines() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: a\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\nspec:\n  http:\n  - retries:\n      attempts: three\n";
        let parsed = parse_str("vs.yaml", text);
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(parsed.failed.len(), 1);
        let p = &parsed.problems[0];
        assert_eq!(p.severity, Severity::Error);
        assert_eq!(p.document, 2);
        assert_eq!(p.field, "spec.http[0].retries.attempts");
        assert!(p.reason.contains("line 13"), "{}", p.reason);
    }

    #[test]
    fn syntax_errors_make_the_file_unreadable() {
        let parsed = parse_str("bad.yaml", "apiVersion: v1\nkind: [Namespace\n");
        assert!(parsed.unreadable);
        assert!(parsed.problems[0].reason.starts_with("YAML syntax error"));
        // Lines are counted from the top of the file, not of the document.
        let parsed = parse_str(
            "bad.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: [Namespace\n",
        );
        let p = &parsed.problems[0];
        assert_eq!(p.document, 2);
        assert!(
            p.reason.contains("line 6") || p.reason.contains("line 7"),
            "{}",
            p.reason
        );
        assert!(!p.reason.contains("line 2 "), "{}", p.reason);
    }

    #[test]
    fn metadata_typos_are_warned() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n  namspace: shop\n  uid: x\nspec:\n  hosts: [a]\n";
        let parsed = parse_str("vs.yaml", text);
        assert_eq!(parsed.problems.len(), 1, "{:?}", parsed.problems);
        assert_eq!(parsed.problems[0].field, "metadata.namspace");
    }

    #[test]
    fn lists_and_json() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: a}\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: b}\n";
        assert_eq!(parse_str("l.yaml", list).objects.len(), 2);
        let json = r#"{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "j"}}"#;
        assert_eq!(
            parse_str("n.json", json).objects[0].describe(),
            "Namespace j"
        );
    }

    #[test]
    fn other_kinds_are_skipped() {
        let parsed = parse_str(
            "x.yaml",
            "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: g\nspec:\n  whatever: 1\n",
        );
        assert!(
            parsed.objects.is_empty() && parsed.problems.is_empty() && parsed.failed.is_empty()
        );
    }
}
