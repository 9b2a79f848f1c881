//! What `sluice status` shows under `kubernetes`: whether every kind has been listed, each kind's
//! objects and last error, and the permissions the API server refused (verb, group, resource).

use parking_lot::RwLock;
use serde::Serialize;
use std::sync::Arc;

/// One watched kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KindStatus {
    pub kind: String,
    /// The version watched (`v1`, `discovery.k8s.io/v1`, `networking.istio.io/v1`...); empty until
    /// discovery has chosen one.
    pub api_version: String,
    /// Its first complete list has arrived.
    pub synced: bool,
    /// Objects of this kind in the store.
    pub objects: usize,
    /// The last error of its watch, cleared when it recovers.
    pub last_error: Option<String>,
}

/// A permission the API server refused (`403`): what to add to the ClusterRole.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Forbidden {
    pub verb: String,
    /// API group; `""` is the core group.
    pub group: String,
    pub resource: String,
    /// The API server's message.
    pub message: String,
}

/// The `kubernetes` section of `sluice status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KubeStatus {
    /// Every kind has been listed and a snapshot published from it.
    pub synced: bool,
    pub kinds: Vec<KindStatus>,
    pub forbidden: Vec<Forbidden>,
}

/// Shared, cheaply cloned view of [`KubeStatus`], written by the watchers and the store task.
#[derive(Clone, Debug, Default)]
pub struct StatusHandle(Arc<RwLock<KubeStatus>>);

impl StatusHandle {
    pub(crate) fn new(kinds: &[crate::watch::Kind]) -> Self {
        Self(Arc::new(RwLock::new(KubeStatus {
            synced: false,
            kinds: kinds
                .iter()
                .map(|k| KindStatus {
                    kind: k.kind.to_string(),
                    api_version: k.api_version(),
                    synced: false,
                    objects: 0,
                    last_error: None,
                })
                .collect(),
            forbidden: Vec::new(),
        })))
    }

    /// A copy of the current status.
    pub fn get(&self) -> KubeStatus {
        self.0.read().clone()
    }

    pub(crate) fn kinds(&self) -> Vec<String> {
        self.0.read().kinds.iter().map(|k| k.kind.clone()).collect()
    }

    pub(crate) fn update_kind(&self, index: usize, f: impl FnOnce(&mut KindStatus)) {
        if let Some(k) = self.0.write().kinds.get_mut(index) {
            f(k);
        }
    }

    pub(crate) fn set_objects(&self, count: impl Fn(&str) -> usize) {
        for k in &mut self.0.write().kinds {
            k.objects = count(&k.kind);
        }
    }

    pub(crate) fn set_synced(&self) {
        self.0.write().synced = true;
    }

    /// Records a refused permission (once per verb, group and resource).
    pub(crate) fn forbid(&self, f: Forbidden) {
        let mut s = self.0.write();
        match s
            .forbidden
            .iter_mut()
            .find(|x| (&x.verb, &x.group, &x.resource) == (&f.verb, &f.group, &f.resource))
        {
            Some(existing) => existing.message = f.message,
            None => s.forbidden.push(f),
        }
    }

    /// The permission works now.
    pub(crate) fn allow(&self, group: &str, resource: &str, verbs: &[&str]) {
        self.0.write().forbidden.retain(|x| {
            !(x.group == group && x.resource == resource && verbs.contains(&x.verb.as_str()))
        });
    }
}
