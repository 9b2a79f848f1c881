//! The configuration targets: one input is the text of a config file, read through every entry
//! point the agent reads configuration through, with what must hold whatever the text says.
//! Two targets ([`check_file`]: `config`, [`check_api`]: `config_api`), so that each input costs
//! one path's work and the fuzzer runs twice as many of each.
//!
//! * Standalone mode: the text as `config.yaml` in a directory read by [`ConfigDir`] (the
//!   directory source and the object store `sluice run --config-dir` uses); then, when the input
//!   has an [`EDIT`] line, the text after it replaces the file, as an edit would.
//! * `sluice validate`: [`validate_paths`] on the same file.
//! * Kubernetes mode: every YAML document (and the whole input, when it is one JSON value) as an
//!   API object through [`parse_api_object`] into a [`Store`] as one relist per kind, as the
//!   watchers deliver them.
//! * The data plane: every snapshot made is applied to a [`Handler`] (route compilation, clusters,
//!   the source index), the previous generation's state reused as on a reload.
//!
//! Invariants (a panic when broken): nothing panics; every error names its file or object and
//! says why; a snapshot always serialises (it is what `/config_dump` shows); a reload with nothing
//! changed publishes nothing, and a relist of the same objects changes nothing; an edit that is
//! not valid YAML leaves the configuration in force as it was; `sluice validate` rejects the file
//! exactly when the running agent would reject something in it.

use sluice_config::{
    parse_api_object, validate_paths, BuildOptions, ConfigDir, Event, Origin, Problem, Reload,
    Store, Update,
};
use sluice_policy::Snapshot;
use sluice_proxy::{AccessLog, Handler, HandlerOptions, Metrics};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// A line that splits an input into a file and its edited version (a YAML comment, so a seed
/// with it is still a valid file).
pub const EDIT: &str = "#~edit~";

/// The name the file has in the directory (and in every problem about it).
const FILE: &str = "config.yaml";

/// API objects read from one input, at most: a relist is bounded by the input's size anyway; this
/// keeps one input's work bounded when it is made of thousands of empty documents.
const MAX_API_OBJECTS: usize = 256;

/// Standalone mode and `sluice validate`: the input is a file (and, after an [`EDIT`] line, its
/// next version); panics when an invariant is broken.
pub fn check_file(data: &[u8]) {
    // The directory source reads files the same way (invalid UTF-8 replaced, not refused).
    let text = String::from_utf8_lossy(data);
    let (first, edit) = match text.split_once(EDIT) {
        Some((first, edit)) => (first, Some(edit)),
        None => (&*text, None),
    };
    standalone(first, edit);
}

/// Kubernetes mode: every YAML document of the input (or the whole input, when it is one JSON
/// value) is an object read from the API server; panics when an invariant is broken.
pub fn check_api(data: &[u8]) {
    kubernetes(&String::from_utf8_lossy(data));
}

/// A directory of this process's own, emptied for each input.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        // tmpfs when there is one: an input costs a write and a read of one small file.
        let base = Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::Builder::new()
                .prefix("sluice-fuzz-")
                .tempdir_in(base)
        } else {
            tempfile::Builder::new().prefix("sluice-fuzz-").tempdir()
        };
        dir.expect("a scratch directory")
    })
    .path()
}

fn write(path: &Path, text: &str, mtime: SystemTime) {
    std::fs::write(path, text).expect("write the config file");
    // Distinct modification times: the directory source rereads a file whose size and mtime
    // changed, so an edit of the same size within one clock tick must not look unchanged.
    let file = std::fs::File::options()
        .write(true)
        .open(path)
        .expect("open the config file");
    file.set_modified(mtime).expect("set its mtime");
}

fn standalone(first: &str, edit: Option<&str>) {
    let dir = scratch();
    let path = dir.join(FILE);
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
    write(&path, first, t0);
    let opts = BuildOptions::default();
    let mut config = ConfigDir::new(dir.to_path_buf(), opts.clone());
    let handler = handler();

    let loaded = config.reload();
    check_reload(&loaded, "the file");
    agrees_with_validate(&path, &loaded, &opts);
    handler.apply(loaded.snapshot.clone());
    let again = config.reload();
    assert!(
        !again.changed,
        "a reload with the file unchanged published a new snapshot"
    );

    if let Some(edit) = edit {
        write(&path, edit, t0 + Duration::from_secs(1));
        let edited = config.reload();
        check_reload(&edited, "the edited file");
        if sluice_config::parse_str(FILE, edit).unreadable {
            assert_eq!(
                effective(&loaded.snapshot),
                effective(&edited.snapshot),
                "an edit that is not valid YAML changed the configuration in force"
            );
        }
        agrees_with_validate(&path, &edited, &opts);
        handler.apply(edited.snapshot.clone());
    }
    std::fs::remove_file(&path).expect("remove the config file");
}

/// `sluice validate FILE` fails exactly when the agent reading the file alone rejects something.
fn agrees_with_validate(path: &PathBuf, reload: &Reload, opts: &BuildOptions) {
    let problems = validate_paths(std::slice::from_ref(path), opts);
    let validate_errors: Vec<&Problem> = problems.iter().filter(|p| p.is_error()).collect();
    let agent_errors = &reload.snapshot.rejections;
    assert_eq!(
        validate_errors.is_empty(),
        agent_errors.is_empty(),
        "sluice validate and the agent disagree about the file:\nvalidate: {validate_errors:#?}\nagent: {agent_errors:#?}"
    );
}

fn kubernetes(text: &str) {
    let mut objects: Vec<serde_json::Value> = Vec::new();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        objects.push(v);
    }
    for doc in serde_yaml::Deserializer::from_str(text).take(MAX_API_OBJECTS) {
        match <serde_json::Value as serde::Deserialize>::deserialize(doc) {
            Ok(v) => objects.push(v),
            // The rest of a stream after a syntax error is not reliably readable.
            Err(_) => break,
        }
    }
    // What the API server hands the watchers: objects (a watcher never sees anything else), each
    // with a resourceVersion (so a relist checks only what changed, as in the agent).
    objects.retain(serde_json::Value::is_object);
    for (n, object) in objects.iter_mut().enumerate() {
        if let Some(meta) = object
            .get_mut("metadata")
            .and_then(serde_json::Value::as_object_mut)
        {
            meta.entry("resourceVersion")
                .or_insert_with(|| serde_json::Value::from((n + 1).to_string()));
        }
    }
    if objects.is_empty() {
        return;
    }
    let mut by_kind: BTreeMap<String, Vec<Update>> = BTreeMap::new();
    for object in objects.iter().take(MAX_API_OBJECTS) {
        let kind = object
            .get("kind")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("")
            .to_string();
        let parsed = parse_api_object(object);
        for p in &parsed.problems {
            check_problem(p);
        }
        let (updates, _loose) = Update::from_parsed(parsed);
        by_kind.entry(kind).or_default().extend(updates);
    }
    let relist = |store: &mut Store| {
        for (kind, updates) in &by_kind {
            store.apply(Event::Resync {
                kind: kind.clone(),
                updates: updates.clone(),
            });
        }
        store.commit()
    };
    let mut store = Store::new(BuildOptions::default());
    let listed = relist(&mut store);
    check_reload(&listed, "the API objects");
    let handler = handler();
    handler.apply(listed.snapshot.clone());
    let relisted = relist(&mut store);
    assert!(
        !relisted.changed,
        "a relist of the same objects published a new snapshot"
    );
}

/// A handler of its own per input (so one input's result never depends on an earlier one's).
fn handler() -> Handler {
    Handler::new(
        HandlerOptions::default(),
        AccessLog::new(false),
        Metrics::new(),
    )
}

fn check_reload(reload: &Reload, what: &str) {
    for p in &reload.problems {
        check_problem(p);
    }
    if let Err(e) = serde_json::to_string(&*reload.snapshot) {
        panic!("{what}: the snapshot does not serialise for /config_dump: {e}");
    }
}

/// A problem tells a person where to look and why.
fn check_problem(p: &Problem) {
    assert!(
        !p.reason.trim().is_empty(),
        "a problem without a reason: {p:?}"
    );
    if let Origin::File { path, .. } = &p.origin {
        assert_eq!(path, FILE, "a problem names another file: {p:?}");
    }
    assert_eq!(p.file, p.origin.source(), "{p:?}");
}

/// The configuration a snapshot puts in force: everything but its generation and problems.
fn effective(snapshot: &Arc<Snapshot>) -> serde_json::Value {
    let mut v = serde_json::to_value(&**snapshot).expect("a snapshot serialises");
    if let Some(map) = v.as_object_mut() {
        for key in ["generation", "rejections", "warnings"] {
            map.remove(key);
        }
    }
    v
}
