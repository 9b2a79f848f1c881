//! Problems found in configuration: where (the [`Origin`]: a file and document, or an API object
//! and its resourceVersion; the object; the field path) and why. Errors reject an object (its last
//! good version stays in force); warnings are reported and change nothing.

use serde::Serialize;
use sluice_policy::Rejection;
use std::fmt;

/// How bad a problem is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Severity {
    /// The object (or the whole file, for a syntax error) is not used.
    Error,
    /// Reported; the object is used.
    Warning,
}

/// Where a configuration object came from: what error messages name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Origin {
    /// Standalone mode: a file (as given, or relative to the config directory) and the 1-based
    /// index of the document in it (0: the file as a whole).
    File { path: String, document: usize },
    /// Kubernetes mode: an object read from the API server (its uid lets an Event about it show
    /// in `kubectl describe`).
    Api {
        kind: String,
        namespace: String,
        name: String,
        resource_version: Option<String>,
        uid: Option<String>,
    },
}

impl Origin {
    pub fn file(path: impl Into<String>, document: usize) -> Self {
        Origin::File {
            path: path.into(),
            document,
        }
    }

    /// What a person looks for: the file path, or `Kind namespace/name`.
    pub fn source(&self) -> String {
        match self {
            Origin::File { path, .. } => path.clone(),
            Origin::Api {
                kind,
                namespace,
                name,
                ..
            } if namespace.is_empty() => format!("{kind} {name}"),
            Origin::Api {
                kind,
                namespace,
                name,
                ..
            } => format!("{kind} {namespace}/{name}"),
        }
    }

    /// The document index in a file; 0 for API objects.
    pub fn document(&self) -> usize {
        match self {
            Origin::File { document, .. } => *document,
            Origin::Api { .. } => 0,
        }
    }

    pub fn resource_version(&self) -> Option<&str> {
        match self {
            Origin::File { .. } => None,
            Origin::Api {
                resource_version, ..
            } => resource_version.as_deref(),
        }
    }

    /// The same origin for another document of the same file.
    pub(crate) fn with_document(&self, index: usize) -> Self {
        match self {
            Origin::File { path, .. } => Origin::file(path.clone(), index),
            api => api.clone(),
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source())?;
        match self {
            Origin::File { document, .. } if *document > 0 => write!(f, " document {document}"),
            Origin::File { .. } => Ok(()),
            Origin::Api {
                resource_version: Some(rv),
                ..
            } => write!(f, " (resourceVersion {rv})"),
            Origin::Api { .. } => Ok(()),
        }
    }
}

/// One problem with a configuration document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    pub origin: Origin,
    /// `origin.source()`: the file, or `Kind namespace/name` (kept as a field: it is what
    /// standalone users and their tests match on).
    pub file: String,
    /// `origin.document()`: 1-based index of the document in the file (0 when the problem is about
    /// the whole file, or about an API object).
    pub document: usize,
    /// `VirtualService default/pricing`, when the document got far enough to have a name.
    pub object: Option<String>,
    /// Field path such as `spec.http[0].retries.perTryTimeout`; empty for the document as a whole.
    pub field: String,
    pub reason: String,
}

impl Problem {
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The form the snapshot carries (`Snapshot::rejections` / `Snapshot::warnings`).
    pub fn to_rejection(&self) -> Rejection {
        let object = match &self.object {
            Some(o) => o.clone(),
            None if self.document > 0 => format!("document {}", self.document),
            None => String::new(),
        };
        Rejection {
            source: self.file.clone(),
            resource_version: self.origin.resource_version().map(str::to_string),
            object,
            field: self.field.clone(),
            reason: self.reason.clone(),
        }
    }
}

impl From<&Problem> for Rejection {
    fn from(p: &Problem) -> Self {
        p.to_rejection()
    }
}

impl From<Problem> for Rejection {
    fn from(p: Problem) -> Self {
        p.to_rejection()
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(rv) = self.origin.resource_version() {
            write!(f, " (resourceVersion {rv})")?;
        }
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
            if let Some(object) = &self.object {
                write!(f, " ({object})")?;
            }
        } else if let Some(object) = self.object.as_ref().filter(|o| **o != self.file) {
            write!(f, ": {object}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// Where problems of one document go: the location is filled in once, callers give field and reason.
#[derive(Debug)]
pub(crate) struct Sink<'a> {
    pub origin: &'a Origin,
    pub object: Option<String>,
    pub problems: Vec<Problem>,
}

impl<'a> Sink<'a> {
    pub fn new(origin: &'a Origin, object: Option<String>) -> Self {
        Self {
            origin,
            object,
            problems: Vec::new(),
        }
    }

    pub fn push(
        &mut self,
        severity: Severity,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) {
        self.problems.push(Problem {
            severity,
            origin: self.origin.clone(),
            file: self.origin.source(),
            document: self.origin.document(),
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        });
    }

    pub fn error(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.push(Severity::Error, field, reason);
    }

    pub fn warn(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.push(Severity::Warning, field, reason);
    }

    /// Warns that a field Istio knows is not implemented by Sluice.
    pub fn unsupported(&mut self, field: impl Into<String>) {
        self.warn(field, "not supported by Sluice yet; ignored");
    }

    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(Problem::is_error)
    }
}

/// The warning about a later definition (at `origin`) of object `id`, already defined at `first`:
/// the first definition, by path and then document, is the one in force.
pub(crate) fn ignored_duplicate(
    origin: &Origin,
    id: &crate::parse::ObjectId,
    first: &dyn fmt::Display,
) -> Problem {
    let mut sink = Sink::new(origin, Some(id.to_string()));
    sink.warn(
        "metadata.name",
        format!("{id} is also defined in {first}; this one is ignored"),
    );
    sink.problems.remove(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_everything() {
        let p = Problem {
            severity: Severity::Error,
            origin: Origin::file("timeouts.yaml", 2),
            file: "timeouts.yaml".into(),
            document: 2,
            object: Some("VirtualService default/inventory".into()),
            field: "spec.http[0].timeout".into(),
            reason: "invalid duration \"5 s\": unknown unit \" s\"".into(),
        };
        assert_eq!(
            p.to_string(),
            "timeouts.yaml: document 2 (VirtualService default/inventory): spec.http[0].timeout: \
             invalid duration \"5 s\": unknown unit \" s\""
        );
        let r: Rejection = (&p).into();
        assert_eq!(r.source, "timeouts.yaml");
        assert_eq!(r.object, "VirtualService default/inventory");
        assert_eq!(r.field, "spec.http[0].timeout");
    }

    #[test]
    fn documents_without_a_name() {
        let p = Problem {
            severity: Severity::Warning,
            origin: Origin::file("a.yaml", 1),
            file: "a.yaml".into(),
            document: 1,
            object: None,
            field: "spec.x".into(),
            reason: "unknown field".into(),
        };
        assert_eq!(p.to_string(), "a.yaml: document 1: spec.x: unknown field");
        assert_eq!(p.to_rejection().object, "document 1");
    }

    #[test]
    fn api_objects_are_named_with_their_resource_version() {
        let origin = Origin::Api {
            kind: "VirtualService".into(),
            namespace: "shop".into(),
            name: "pricing".into(),
            resource_version: Some("42".into()),
            uid: None,
        };
        let mut sink = Sink::new(&origin, Some("VirtualService shop/pricing".into()));
        sink.error("spec.http[0].timeout", "negative");
        let p = &sink.problems[0];
        assert_eq!(
            p.to_string(),
            "VirtualService shop/pricing (resourceVersion 42): spec.http[0].timeout: negative"
        );
        let r = p.to_rejection();
        assert_eq!(r.source, "VirtualService shop/pricing");
        assert_eq!(r.resource_version.as_deref(), Some("42"));
    }
}
