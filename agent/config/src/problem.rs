//! Problems found in configuration: where (file, document, object, field path) and why. Errors reject
//! an object (its last good version stays in force); warnings are reported and change nothing.

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

/// One problem with a configuration document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub severity: Severity,
    /// The file, as given (or relative to the config directory).
    pub file: String,
    /// 1-based index of the document in the file (0 when the problem is about the whole file).
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
        if self.document > 0 {
            write!(f, ": document {}", self.document)?;
            if let Some(object) = &self.object {
                write!(f, " ({object})")?;
            }
        } else if let Some(object) = &self.object {
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
    pub file: &'a str,
    pub document: usize,
    pub object: Option<String>,
    pub problems: Vec<Problem>,
}

impl<'a> Sink<'a> {
    pub fn new(file: &'a str, document: usize, object: Option<String>) -> Self {
        Self {
            file,
            document,
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
            file: self.file.to_string(),
            document: self.document,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_everything() {
        let p = Problem {
            severity: Severity::Error,
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
            file: "a.yaml".into(),
            document: 1,
            object: None,
            field: "spec.x".into(),
            reason: "unknown field".into(),
        };
        assert_eq!(p.to_string(), "a.yaml: document 1: spec.x: unknown field");
        assert_eq!(p.to_rejection().object, "document 1");
    }
}
