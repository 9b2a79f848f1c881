//! Kubernetes Events for rejected Istio objects, where `kubectl describe` and dashboards show them:
//! reason `SluiceRejected`, type Warning, the note naming the field path and the reason, posted
//! through kube-runtime's `Recorder` (`events.k8s.io/v1`). Each (object, resourceVersion, message)
//! is posted once; at most [`BURST`] are posted at once, then [`PER_SECOND`] a second, so a bad
//! rollout of many objects cannot flood the API server.

use crate::status::{Forbidden, StatusHandle};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use sluice_config::{Origin, Problem};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

pub const REASON: &str = "SluiceRejected";
pub const BURST: u32 = 20;
pub const PER_SECOND: u32 = 5;
/// The API server refuses longer notes.
const MAX_NOTE: usize = 1024;

/// One Event to post: which object version and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rejected {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub resource_version: Option<String>,
    pub uid: Option<String>,
    /// `spec.http[0].timeout: invalid duration ...`
    pub message: String,
}

/// The rejections of Istio objects among `problems`, one per object version and message.
pub fn rejected(problems: &[Problem]) -> BTreeSet<Rejected> {
    problems
        .iter()
        .filter(|p| p.is_error())
        .filter_map(|p| match &p.origin {
            Origin::Api {
                kind,
                namespace,
                name,
                resource_version,
                uid,
            } if kind == "VirtualService" || kind == "DestinationRule" => {
                let mut message = if p.field.is_empty() {
                    p.reason.clone()
                } else {
                    format!("{}: {}", p.field, p.reason)
                };
                if message.len() > MAX_NOTE {
                    let mut cut = MAX_NOTE - 3;
                    while !message.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    message.truncate(cut);
                    message.push_str("...");
                }
                Some(Rejected {
                    kind: kind.clone(),
                    namespace: namespace.clone(),
                    name: name.clone(),
                    resource_version: resource_version.clone(),
                    uid: uid.clone(),
                    message,
                })
            }
            _ => None,
        })
        .collect()
}

/// Deduplication and rate limiting, apart from the API calls so they can be tested on paused time.
#[derive(Debug)]
pub struct Limiter {
    posted: BTreeSet<Rejected>,
    tokens: f64,
    last: Instant,
}

impl Default for Limiter {
    fn default() -> Self {
        Self {
            posted: BTreeSet::new(),
            tokens: f64::from(BURST),
            last: Instant::now(),
        }
    }
}

impl Limiter {
    /// What to post now that `current` is the set of rejections in force; forgets those no longer
    /// in force (so the memory stays bounded by what is rejected now).
    pub fn todo(&mut self, current: &BTreeSet<Rejected>) -> Vec<Rejected> {
        self.posted.retain(|r| current.contains(r));
        current
            .iter()
            .filter(|r| !self.posted.contains(*r))
            .cloned()
            .collect()
    }

    /// Waits for a token, then marks `r` as posted.
    pub async fn admit(&mut self, r: &Rejected) {
        loop {
            let now = Instant::now();
            let refill = now.duration_since(self.last).as_secs_f64() * f64::from(PER_SECOND);
            self.tokens = (self.tokens + refill).min(f64::from(BURST));
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                self.posted.insert(r.clone());
                return;
            }
            let wait = (1.0 - self.tokens) / f64::from(PER_SECOND);
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// Posts an Event for each new rejection of an Istio object, for as long as the agent runs.
pub(crate) async fn report(
    client: Client,
    instance: String,
    status: StatusHandle,
    mut problems: watch::Receiver<Vec<Problem>>,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "sluice".into(),
            instance: Some(instance),
        },
    );
    let mut limiter = Limiter::default();
    while problems.changed().await.is_ok() {
        let current = rejected(&problems.borrow_and_update());
        for r in limiter.todo(&current) {
            limiter.admit(&r).await;
            let api_version = status
                .get()
                .kinds
                .iter()
                .find(|k| k.kind == r.kind)
                .map(|k| k.api_version.clone());
            let reference = ObjectReference {
                api_version,
                kind: Some(r.kind.clone()),
                name: Some(r.name.clone()),
                namespace: Some(r.namespace.clone()),
                resource_version: r.resource_version.clone(),
                uid: r.uid.clone(),
                field_path: None,
            };
            let event = Event {
                type_: EventType::Warning,
                reason: REASON.into(),
                note: Some(r.message.clone()),
                action: "Validate".into(),
                secondary: None,
            };
            match recorder.publish(&event, &reference).await {
                Ok(()) => {
                    tracing::debug!(kind = %r.kind, namespace = %r.namespace, name = %r.name, "posted a {REASON} Event")
                }
                Err(err) => {
                    if let kube::Error::Api(s) = &err {
                        if s.code == 403 {
                            status.forbid(Forbidden {
                                verb: "create".into(),
                                group: "events.k8s.io".into(),
                                resource: "events".into(),
                                message: s.message.clone(),
                            });
                        }
                    }
                    tracing::warn!(kind = %r.kind, namespace = %r.namespace, name = %r.name, "cannot post a {REASON} Event: {err}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str) -> Rejected {
        Rejected {
            kind: "VirtualService".into(),
            namespace: "shop".into(),
            name: name.into(),
            resource_version: Some("1".into()),
            uid: None,
            message: "spec.http[0].timeout: bad".into(),
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn each_rejection_is_posted_once_and_at_a_bounded_rate() {
        let mut limiter = Limiter::default();
        let current: BTreeSet<Rejected> = (0..30).map(|i| r(&format!("vs{i}"))).collect();
        let start = Instant::now();
        let todo = limiter.todo(&current);
        assert_eq!(todo.len(), 30);
        for x in &todo {
            limiter.admit(x).await;
        }
        // 20 at once, the other 10 at 5 a second.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1900) && took <= Duration::from_millis(2100),
            "{took:?}"
        );
        assert!(limiter.todo(&current).is_empty(), "posted once");
        // A new version of one object is news; objects no longer rejected are forgotten.
        let mut next: BTreeSet<Rejected> = BTreeSet::new();
        let mut changed = r("vs0");
        changed.resource_version = Some("2".into());
        next.insert(changed.clone());
        assert_eq!(limiter.todo(&next), vec![changed]);
        assert!(limiter.posted.is_empty());
    }
}
