//! Label and field selectors with the real server's grammar and matching rules: `!=` and `notin`
//! also match objects without the label; an unsupported field is a 400, not an empty list.

use crate::resources::ResourceType;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed `labelSelector`; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            reqs.push(parse_label_req(part)?);
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Splits on commas outside parentheses (`a in (x,y),b` is two requirements).
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn valid_value(v: &str) -> bool {
    v.len() <= 63
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

fn parse_label_req(part: &str) -> Result<LabelReq, String> {
    let bad = |why: &str| Err(format!("unable to parse requirement: {part:?}: {why}"));
    if let Some(k) = part.strip_prefix('!') {
        let k = k.trim();
        return if valid_key(k) {
            Ok(LabelReq::NotExists(k.into()))
        } else {
            bad("invalid label key")
        };
    }
    for (op, ne) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((k, v)) = part.split_once(op) {
            let (k, v) = (k.trim(), v.trim());
            if !valid_key(k) {
                return bad("invalid label key");
            }
            if !valid_value(v) {
                return bad("invalid label value");
            }
            return Ok(if ne {
                LabelReq::NotEq(k.into(), v.into())
            } else {
                LabelReq::Eq(k.into(), v.into())
            });
        }
    }
    let words: Vec<&str> = part.splitn(2, char::is_whitespace).collect();
    if words.len() == 2 {
        let key = words[0].trim();
        let rest = words[1].trim();
        for (op, not) in [("notin", true), ("in", false)] {
            if let Some(set) = rest.strip_prefix(op) {
                let set = set.trim();
                let Some(inner) = set.strip_prefix('(').and_then(|s| s.strip_suffix(')')) else {
                    return bad("expected a parenthesised set of values");
                };
                let values: Vec<String> = inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect();
                if !valid_key(key) || values.iter().any(|v| !valid_value(v)) {
                    return bad("invalid label key or value");
                }
                if values.is_empty() {
                    return bad("for 'in', 'notin' operators, values set can't be empty");
                }
                return Ok(if not {
                    LabelReq::NotIn(key.into(), values)
                } else {
                    LabelReq::In(key.into(), values)
                });
            }
        }
        return bad("unknown operator");
    }
    if valid_key(part) {
        Ok(LabelReq::Exists(part.into()))
    } else {
        bad("invalid label key")
    }
}

/// A parsed `fieldSelector` (`=`, `==`, `!=` on supported fields).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    /// Parses and checks every field against what the real server supports for `rt`; the error is
    /// the real server's message.
    pub fn parse(s: &str, rt: &ResourceType) -> Result<Self, String> {
        let mut out = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let (field, ne, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, false, v)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{part}'"
                ));
            };
            let field = field.trim();
            if !rt.supports_field(field) {
                return Err(format!("field label not supported: {field}"));
            }
            out.push((field.to_string(), ne, value.trim().to_string()));
        }
        Ok(Self(out))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(field, ne, want)| {
            let got = field_value(obj, field);
            (got == *want) != *ne
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A field's value as the real server's field sets render it: strings as-is, booleans as
/// `true`/`false`, absent as the empty string.
fn field_value(obj: &Value, field: &str) -> String {
    let pointer = format!("/{}", field.replace('.', "/"));
    match obj.pointer(&pointer) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        // `source` on core events is an object; the real server selects on `source.component`.
        Some(Value::Object(o)) => o
            .get("component")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        _ => {
            // The real server reports a missing boolean field as "false".
            if field == "spec.hostNetwork" || field == "spec.unschedulable" {
                "false".into()
            } else {
                String::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::by_plural;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "spec": {"nodeName": "n1"}})
    }

    #[test]
    fn label_operators_follow_the_real_server() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let bare = obj(json!({}));
        let m = |s: &str, o: &Value| LabelSelector::parse(s).unwrap().matches(o);
        assert!(m("app=web", &o) && m("app==web", &o) && !m("app=db", &o));
        assert!(m("app!=db", &o) && !m("app!=web", &o) && m("app!=web", &bare));
        assert!(m("app in (db, web)", &o) && !m("app in (db)", &o) && !m("app in (web)", &bare));
        assert!(
            m("app notin (db)", &o) && !m("app notin (web,db)", &o) && m("app notin (web)", &bare)
        );
        assert!(m("app", &o) && !m("app", &bare) && m("!app", &bare) && !m("!app", &o));
        assert!(m("app in (web,x),tier=front", &o) && !m("app in (web,x),tier=back", &o));
        assert!(m("", &bare));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b c").is_err());
    }

    #[test]
    fn field_selectors_check_the_field_per_kind() {
        let pods = by_plural("", "v1", "pods").unwrap();
        let vs = by_plural("networking.istio.io", "v1", "virtualservices").unwrap();
        let o = obj(json!({}));
        let f =
            FieldSelector::parse("spec.nodeName=n1,metadata.namespace!=kube-system", pods).unwrap();
        assert!(f.matches(&o));
        assert!(!FieldSelector::parse("spec.nodeName=n2", pods)
            .unwrap()
            .matches(&o));
        assert_eq!(
            FieldSelector::parse("spec.nodeName=n1", vs).unwrap_err(),
            "field label not supported: spec.nodeName"
        );
        assert!(FieldSelector::parse("metadata.name=a", vs)
            .unwrap()
            .matches(&o));
    }
}
