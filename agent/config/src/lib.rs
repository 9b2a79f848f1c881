//! Reads Istio and Kubernetes YAML, validates it with field paths, and builds the checked
//! [`sluice_policy::Snapshot`] the proxy runs on.
//!
//! * [`parse`]: files and documents -> typed objects ([`istio`], [`k8s`]); YAML and type errors with
//!   line and column, unknown Istio fields as warnings with their full path.
//! * [`build()`]: objects -> snapshot, following Istio's translation (see `vs`, `dr`, `build`).
//! * [`validate_paths`]: what `sluice validate FILE|DIR...` runs.
//! * [`Store`]: the object store both modes feed with [`Event`]s (last good version per object,
//!   each version checked once, a new generation only on effective change).
//! * [`DirSource`] / [`ConfigDir`]: the standalone-mode source (a watched directory of YAML).
//!
//! # Standalone-mode conventions
//! Pods in standalone mode are plain `Pod` documents. Besides labels and `status.podIP(s)`, Sluice
//! reads two annotations: `sluice.io/netns` (the path of the pod's network namespace, e.g.
//! `/var/run/netns/pricing-1`) and `sluice.io/cgroup` (its cgroup v2 directory). A Service without an
//! EndpointSlice gets the endpoints Kubernetes' controller would derive from Pods matching its
//! selector. Enrollment: a pod labelled `istio.io/dataplane-mode=ambient` is enrolled, `=none` is
//! not, otherwise its `Namespace` document's label decides (label name and value configurable).
//!
//! # Where Sluice knowingly differs from Istio
//! * Unsupported Istio fields are warned about and ignored, never silently dropped.
//! * `fault` with `directResponse` is an error, as in Istio's validation.
#![forbid(unsafe_code)]

mod build;
mod dir;
mod dr;
pub mod duration;
pub mod istio;
pub mod k8s;
pub mod parse;
mod problem;
mod response;
mod store;
mod views;
mod vs;

pub use build::{build, check_object, CGROUP_ANNOTATION, NETNS_ANNOTATION};
pub use dir::{ConfigDir, DirSource};
pub use parse::{
    collect_files, parse_api_object, parse_path, parse_str, Object, ObjectId, ParsedFile, Resource,
};
pub use problem::{Origin, Problem, Severity};
pub use store::{Event, Reload, Store, Update};

use std::path::PathBuf;

/// Settings that change how objects are interpreted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOptions {
    /// Kubernetes cluster domain (`cluster.local`).
    pub cluster_domain: String,
    /// Label that enrolls a pod or namespace (`istio.io/dataplane-mode`).
    pub enrollment_label: String,
    /// Its value that means enrolled (`ambient`).
    pub enrollment_value: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            cluster_domain: sluice_policy::DEFAULT_CLUSTER_DOMAIN.to_string(),
            enrollment_label: "istio.io/dataplane-mode".to_string(),
            enrollment_value: "ambient".to_string(),
        }
    }
}

/// Qualifies a host written in a resource of `namespace` as Istio does: a name without a dot is a
/// short name (`pricing` -> `pricing.NS.svc.DOMAIN`); anything with a dot (`pricing.shop`), a
/// wildcard or an IP address is taken as written (lower-cased).
pub fn resolve_host(host: &str, namespace: &str, cluster_domain: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "*" || host.contains('.') || host.contains(':') {
        return host;
    }
    format!("{host}.{namespace}.svc.{cluster_domain}")
}

/// `sluice validate`: parses every file (directories recursively), converts, and runs the
/// cross-object checks. Returns every problem, errors and warnings; the caller fails on any error.
pub fn validate_paths(paths: &[PathBuf], opts: &BuildOptions) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut objects = Vec::new();
    let mut first: std::collections::HashMap<ObjectId, String> = Default::default();
    for path in paths {
        let files = if path.is_dir() {
            let (files, found) = collect_files(path);
            problems.extend(found);
            files
        } else {
            vec![path.clone()]
        };
        for file in files {
            let parsed = parse_path(&file, &file.display().to_string());
            // The agent's rule for an object defined twice: the first definition (by path, then
            // document) is the one in force, parsed or not; a later one is ignored, with a
            // warning and what is wrong with it.
            let (updates, loose) = Update::from_parsed(parsed);
            problems.extend(loose);
            for u in updates {
                problems.extend(u.problems.iter().cloned());
                match first.get(&u.id) {
                    Some(at) => problems.push(problem::ignored_duplicate(&u.origin, &u.id, at)),
                    None => {
                        first.insert(u.id.clone(), u.origin.to_string());
                        objects.extend(u.object);
                    }
                }
            }
        }
    }
    problems.extend(build(&objects, opts).1);
    // Stable: within a document, problems stay in field order.
    problems.sort_by(|a, b| (&a.file, a.document).cmp(&(&b.file, b.document)));
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_resolve_relative_to_the_namespace() {
        let r = |h: &str| resolve_host(h, "default", "cluster.local");
        assert_eq!(r("pricing"), "pricing.default.svc.cluster.local");
        // Only dot-less names are short: Istio takes these as fully qualified.
        assert_eq!(r("pricing.shop"), "pricing.shop");
        assert_eq!(r("pricing.shop.svc"), "pricing.shop.svc");
        assert_eq!(
            r("pricing.shop.svc.cluster.local"),
            "pricing.shop.svc.cluster.local"
        );
        assert_eq!(r("Pricing"), "pricing.default.svc.cluster.local");
        assert_eq!(r("*"), "*");
        assert_eq!(r("*.example.com"), "*.example.com");
        assert_eq!(r("api.example.com"), "api.example.com");
    }
}
