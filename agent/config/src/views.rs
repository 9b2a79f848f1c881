//! Who sees what: `exportTo` on VirtualServices and DestinationRules, and which of several objects
//! for one host a client namespace uses, as istiod decides it for a sidecar in that namespace.
//!
//! * VirtualServices (pilot `initVirtualServices`, `SelectVirtualServices`): a client in namespace
//!   N takes those private to N (exported to N by an object of N) first, then those of other
//!   namespaces exported to N by name, then the public ones (`*`, the default), each group oldest
//!   first; for a host the first exact match wins, else the most specific wildcard (first of
//!   equals), as `computeWildcardHostVirtualServiceIndex` and the domain de-duplication do.
//! * DestinationRules (`setDestinationRules`, `mergeDestinationRule`, `destinationRule`,
//!   `SidecarScope.DestinationRule`): rules are merged per namespace and host, only while their
//!   `exportTo` is equal (or a superset of a set one); a client in N takes the most specific host
//!   match among N's own rules, else among those of the Service's namespace exported to N, else
//!   among those of the root namespace (`istio-system`) exported to N. Of several unmerged rules
//!   for the host the last one applies.
//!
//! A namespace that holds no VirtualService or DestinationRule and that no `exportTo` names sees
//! only public objects: every such namespace sees the same, the generic view. Only where another
//! namespace sees something else (for the hosts its own or explicitly exported objects name) does
//! the snapshot say so.

use crate::dr::{CheckedDr, CheckedSubset, Layer};
use crate::problem::Sink;
use crate::vs::{is_dns1123_label, CheckedVs};
use std::collections::{BTreeMap, BTreeSet};

/// Istio's host wildcards: `*` matches everything, `*.foo.com` any name ending in `.foo.com`.
pub(crate) fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// Istio's mesh config `rootNamespace` default: its public DestinationRules apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A checked `exportTo`, as written (`.` kept): empty when not set, which is the mesh default `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportTo(pub BTreeSet<String>);

impl ExportTo {
    pub fn is_public(&self) -> bool {
        self.0.is_empty() || self.0.contains("*")
    }

    /// Whether it names `ns` itself (not through `.`).
    fn names(&self, ns: &str) -> bool {
        self.0.contains(ns)
    }
}

/// Istio's `validateExportTo` for a VirtualService or DestinationRule of namespace `ns`.
pub(crate) fn check_export_to(
    sink: &mut Sink,
    values: &[String],
    ns: &str,
    with_workload_selector: bool,
) -> ExportTo {
    let mut seen = BTreeSet::new();
    for (i, e) in values.iter().enumerate() {
        let field = format!("spec.exportTo[{i}]");
        // `.` and the namespace's own name are the same entry.
        let key = if e == "." { ns } else { e.as_str() };
        if seen.contains(key) {
            if key != e {
                sink.error(
                    field,
                    format!("duplicate entries in exportTo: . and current namespace {ns}"),
                );
            } else {
                sink.error(
                    field,
                    format!("duplicate entries in exportTo for entry {e}"),
                );
            }
            continue;
        }
        if key == "~" {
            sink.error(
                field,
                "exportTo ~ (none) is not allowed for Istio configuration objects",
            );
        } else if key != "*" && !is_dns1123_label(key) {
            sink.error(
                field,
                "only .,*, or a valid DNS 1123 label is allowed as exportTo entry",
            );
        } else {
            seen.insert(key);
        }
    }
    if with_workload_selector && !seen.is_empty() {
        if !seen.contains(ns) {
            sink.error(
                "spec.exportTo",
                "destination rule with workload selector cannot have exportTo beyond current namespace",
            );
        } else if seen.len() > 1 {
            sink.error(
                "spec.exportTo",
                "destination rule with workload selector cannot have multiple entries in exportTo",
            );
        }
    }
    if seen.contains("*") && values.len() > 1 {
        sink.error(
            "spec.exportTo",
            "cannot have both public (*) and non-public exportTo values for a resource",
        );
    }
    ExportTo(values.iter().cloned().collect())
}

// ---------------------------------------------------------------------------------------------
// VirtualServices

/// VirtualServices (by index into the caller's list, oldest first) in the order a client
/// namespace takes them, and the winner per host.
#[derive(Debug, Default)]
pub(crate) struct VsIndex {
    /// Exact host -> the first VirtualService naming it.
    pub exact: BTreeMap<String, usize>,
    /// Wildcard pattern -> the first VirtualService naming it, most specific pattern first.
    pub wildcard: Vec<(String, usize)>,
    /// Hosts a later VirtualService lost to an earlier one: (loser, host, winner).
    pub lost: Vec<(usize, String, usize)>,
}

impl VsIndex {
    /// Indexes `order` (indices into `vss`), earlier ones winning.
    pub fn new(vss: &[&CheckedVs], order: &[usize]) -> Self {
        let mut out = Self::default();
        let mut wildcard: BTreeMap<String, usize> = BTreeMap::new();
        for &i in order {
            for h in &vss[i].hosts {
                let taken = if h.starts_with('*') {
                    wildcard.entry(h.clone())
                } else {
                    out.exact.entry(h.clone())
                };
                match taken {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(i);
                    }
                    std::collections::btree_map::Entry::Occupied(e) => {
                        if *e.get() != i {
                            out.lost.push((i, h.clone(), *e.get()));
                        }
                    }
                }
            }
        }
        out.wildcard = wildcard.into_iter().collect();
        // Longer suffixes before shorter ones, `*` last.
        out.wildcard
            .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        out
    }

    /// The winner for `host` by exact name.
    fn exact(&self, host: &str) -> Option<usize> {
        self.exact.get(host).copied()
    }

    /// The most specific wildcard matching `host`, with the pattern's length.
    fn wildcard(&self, host: &str) -> Option<(usize, usize)> {
        self.wildcard
            .iter()
            .find(|(p, _)| host_matches(p, host))
            .map(|(p, i)| (p.len(), *i))
    }

    /// The VirtualService for `host` when this index's objects come before `then`'s.
    pub fn choose(&self, then: &VsIndex, host: &str) -> Option<usize> {
        if let Some(i) = self.exact(host).or_else(|| then.exact(host)) {
            return Some(i);
        }
        match (self.wildcard(host), then.wildcard(host)) {
            (Some((mine, i)), Some((theirs, _))) if mine >= theirs => Some(i),
            (_, Some((_, i))) => Some(i),
            (Some((_, i)), None) => Some(i),
            (None, None) => None,
        }
    }
}

/// Per client namespace, the VirtualServices (indices into `vss`, in `vss`' order) it takes
/// before the public ones: those of the namespace exported to it, then those of other namespaces
/// exported to it by name. Namespaces without any are left out.
pub(crate) fn vs_before_public(vss: &[&CheckedVs]) -> BTreeMap<String, Vec<usize>> {
    let mut private: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut exported: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, v) in vss.iter().enumerate() {
        if v.export_to.is_public() {
            continue;
        }
        let mut to: BTreeSet<&str> = BTreeSet::new();
        for e in &v.export_to.0 {
            to.insert(if e == "." { &v.namespace } else { e });
        }
        for ns in to {
            let group = if ns == v.namespace {
                &mut private
            } else {
                &mut exported
            };
            group.entry(ns.to_string()).or_default().push(i);
        }
    }
    for (ns, list) in exported {
        private.entry(ns).or_default().extend(list);
    }
    private
}

/// Public VirtualServices (indices into `vss`, in order).
pub(crate) fn vs_public(vss: &[&CheckedVs]) -> Vec<usize> {
    (0..vss.len())
        .filter(|&i| vss[i].export_to.is_public())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// DestinationRules

/// What a consolidated DestinationRule gives a host's clusters.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DrPolicy {
    /// `namespace/name` of the rule (the first one, when several merged).
    pub name: String,
    pub policy: Option<Layer>,
    pub subsets: Vec<CheckedSubset>,
}

/// DestinationRules of one host merged as Istio merges them (`ConsolidatedDestRule`).
#[derive(Clone, Debug)]
struct Consolidated {
    export_to: ExportTo,
    rule: DrPolicy,
    /// The first rule merged into it (`DestinationRule ns/name`).
    from: String,
}

/// Rules by host pattern.
type ByHost = BTreeMap<String, Vec<Consolidated>>;

/// A problem found while merging: (index of the rule, field, reason).
pub(crate) type MergeNote = (usize, &'static str, String);

/// Istio's `destinationRuleIndex`.
#[derive(Debug, Default)]
pub(crate) struct DrIndex {
    /// Per namespace, its rules visible in it (`namespaceLocal`).
    local: BTreeMap<String, ByHost>,
    /// Per namespace, its rules visible beyond it (`exportedByNamespace`).
    exported: BTreeMap<String, ByHost>,
    /// The root namespace's rules visible only in it (`rootNamespaceLocal`).
    root_local: ByHost,
    /// Per namespace, the host patterns of exported rules whose `exportTo` names it.
    named: BTreeMap<String, Vec<String>>,
}

impl DrIndex {
    /// Indexes `drs` (oldest first, as Istio sorts them; `names` describe them) and says what
    /// merging did.
    pub fn new(drs: &[&CheckedDr], names: &[String]) -> (Self, Vec<MergeNote>) {
        let mut out = Self::default();
        let mut notes = BTreeSet::new();
        for (i, d) in drs.iter().enumerate() {
            let e = &d.export_to;
            let own = d.namespace.as_str();
            if e.is_public() || e.0.contains(".") || e.names(own) {
                let idx = out.local.entry(own.to_string()).or_default();
                merge(idx, drs, names, i, &mut notes);
            }
            let private_only = e.0.len() == 1 && (e.0.contains(".") || e.names(own));
            if !private_only {
                let idx = out.exported.entry(own.to_string()).or_default();
                merge(idx, drs, names, i, &mut notes);
            } else if own == ROOT_NAMESPACE {
                merge(&mut out.root_local, drs, names, i, &mut notes);
            }
        }
        for rules in out.exported.values() {
            for (pattern, list) in rules {
                for c in list {
                    for ns in c.export_to.0.iter().filter(|e| *e != "." && *e != "*") {
                        out.named
                            .entry(ns.clone())
                            .or_default()
                            .push(pattern.clone());
                    }
                }
            }
        }
        (out, notes.into_iter().collect())
    }

    /// The rule a client in `client` (`None`: the generic view) applies to `host`, a Service of
    /// namespace `svc_ns`.
    pub fn pick(&self, client: Option<&str>, host: &str, svc_ns: &str) -> Option<&DrPolicy> {
        match client {
            Some(ROOT_NAMESPACE) => {
                if let Some(list) = most_specific(&self.root_local, host) {
                    return list.last().map(|c| &c.rule);
                }
            }
            Some(ns) => {
                if let Some(list) = self.local.get(ns).and_then(|l| most_specific(l, host)) {
                    return list.last().map(|c| &c.rule);
                }
            }
            None => {}
        }
        for owner in [svc_ns, ROOT_NAMESPACE] {
            let Some(list) = self
                .exported
                .get(owner)
                .and_then(|l| most_specific(l, host))
            else {
                continue;
            };
            let visible = list.iter().rfind(|c| {
                c.export_to.is_public() || client.is_some_and(|ns| c.export_to.names(ns))
            });
            if let Some(c) = visible {
                return Some(&c.rule);
            }
        }
        None
    }

    /// The client namespaces that may pick another rule than the generic view for some host:
    /// those with rules of their own, those an `exportTo` names, and the root namespace.
    pub fn namespaces(&self) -> BTreeSet<&str> {
        self.local
            .keys()
            .chain(self.named.keys())
            .map(String::as_str)
            .chain([ROOT_NAMESPACE])
            .collect()
    }

    /// The host patterns for which a client in `ns` may pick another rule than the generic view:
    /// those of its own namespace's rules and of rules exported to it by name.
    pub fn patterns_for<'a>(&'a self, ns: &str) -> impl Iterator<Item = &'a str> {
        let own = if ns == ROOT_NAMESPACE {
            Some(&self.root_local)
        } else {
            self.local.get(ns)
        };
        own.into_iter()
            .flat_map(|l| l.keys())
            .chain(self.named.get(ns).into_iter().flatten())
            .map(String::as_str)
    }
}

/// Istio's `MostSpecificHostMatch`: the exact host, else the longest matching wildcard.
fn most_specific<'a>(rules: &'a ByHost, host: &str) -> Option<&'a Vec<Consolidated>> {
    if let Some(list) = rules.get(host) {
        return Some(list);
    }
    rules
        .iter()
        .filter(|(p, _)| p.starts_with('*') && host_matches(p, host))
        .max_by_key(|(p, _)| p.len())
        .map(|(_, list)| list)
}

/// Istio's `mergeDestinationRule` (with `ENABLE_ENHANCED_DESTINATIONRULE_MERGE`, the default):
/// a rule merges into an earlier one for the same host whose `exportTo` is equal (or set and a
/// subset of its own): subsets are added unless the name is taken, the earlier `trafficPolicy`
/// stays unless it had none. Otherwise it stands apart.
fn merge(
    idx: &mut ByHost,
    drs: &[&CheckedDr],
    names: &[String],
    i: usize,
    notes: &mut BTreeSet<MergeNote>,
) {
    let d = drs[i];
    let rule = DrPolicy {
        name: format!("{}/{}", d.namespace, d.name),
        policy: d.policy.clone(),
        subsets: d.subsets.clone(),
    };
    let Some(list) = idx.get_mut(&d.host) else {
        idx.insert(
            d.host.clone(),
            vec![Consolidated {
                export_to: d.export_to.clone(),
                rule,
                from: names[i].clone(),
            }],
        );
        return;
    };
    let mut apart = true;
    for c in list.iter_mut() {
        let merges = d.export_to == c.export_to
            || (!c.export_to.0.is_empty() && d.export_to.0.is_superset(&c.export_to.0));
        // As in Istio, only the last rule compared decides whether this one also stands apart.
        apart = !merges;
        if !merges {
            continue;
        }
        notes.insert((
            i,
            "spec.host",
            format!(
                "{} also configures host {}; merged as Istio does (subsets added, the first trafficPolicy wins)",
                c.from, d.host
            ),
        ));
        if c.rule.policy.is_none() {
            c.rule.policy = d.policy.clone();
        }
        for s in &d.subsets {
            if c.rule.subsets.iter().any(|f| f.name == s.name) {
                notes.insert((
                    i,
                    "spec.subsets",
                    format!("duplicate subset {:?} for host {} ignored", s.name, d.host),
                ));
            } else {
                c.rule.subsets.push(s.clone());
            }
        }
    }
    if apart {
        let others: Vec<&str> = list.iter().map(|c| c.from.as_str()).collect();
        notes.insert((
            i,
            "spec.exportTo",
            format!(
                "{} also configures host {} with another exportTo; Istio keeps them apart, and a client that sees both uses this one (the newer)",
                others.join(", "),
                d.host
            ),
        ));
        list.push(Consolidated {
            export_to: d.export_to.clone(),
            rule,
            from: names[i].clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::problem::Origin;

    fn errors(values: &[&str], ns: &str, selector: bool) -> Vec<String> {
        let origin = Origin::file("t.yaml", 0);
        let mut sink = Sink::new(&origin, None);
        let values: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        check_export_to(&mut sink, &values, ns, selector);
        sink.problems
            .iter()
            .filter(|p| p.is_error())
            .map(|p| format!("{}: {}", p.field, p.reason))
            .collect()
    }

    #[test]
    fn export_to_is_validated_as_istio_does() {
        for ok in [&[][..], &["."], &["*"], &["shop"], &[".", "shop", "web"]] {
            assert!(errors(ok, "default", false).is_empty(), "{ok:?}");
        }
        let e = errors(&["~"], "default", false);
        assert!(e[0].contains("exportTo ~ (none) is not allowed"), "{e:?}");
        let e = errors(&["*", "shop"], "default", false);
        assert!(e[0].contains("both public (*) and non-public"), "{e:?}");
        let e = errors(&["default", "."], "default", false);
        assert!(
            e[0].starts_with(
                "spec.exportTo[1]: duplicate entries in exportTo: . and current namespace default"
            ),
            "{e:?}"
        );
        let e = errors(&["shop", "shop"], "default", false);
        assert!(
            e[0].contains("duplicate entries in exportTo for entry shop"),
            "{e:?}"
        );
        let e = errors(&["Shop_1"], "default", false);
        assert!(e[0].contains("valid DNS 1123 label"), "{e:?}");
        assert!(errors(&["."], "default", true).is_empty());
        assert!(errors(&["shop"], "default", true)[0].contains("beyond current namespace"));
        assert!(errors(&["default", "shop"], "default", true)[0].contains("multiple entries"));
    }
}
