//! The configuration source `sluice run` feeds the proxy from: a polled directory (standalone) or
//! the Kubernetes watchers (`sluice-kube`). Both end in the same object store and snapshots; this
//! module only applies each new snapshot to the proxy and the redirect's enrollment, and tells when
//! the agent may report ready.

use crate::agent::{AgentConfig, Mode};
use crate::ebpf::EbpfRedirect;
use anyhow::{Context, Result};
use sluice_config::{ConfigDir, Severity};
use sluice_policy::{Rejection, Snapshot};
use sluice_proxy::admin::KubernetesStatus;
use sluice_proxy::Handler;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub enum Source {
    Dir(Option<Box<ConfigDir>>),
    Kube(sluice_kube::Kubernetes),
}

impl Source {
    /// Standalone: reads the directory now, so that readiness means "serving what is on disk".
    /// Kubernetes: connects and starts the watchers (readiness waits for their first lists).
    pub async fn start(cfg: &AgentConfig, handler: &Handler) -> Result<Self> {
        match &cfg.mode {
            Mode::Standalone { config_dir } => {
                let mut dir = config_dir
                    .clone()
                    .map(|d| Box::new(ConfigDir::new(d, cfg.build_options())));
                if let Some(dir) = dir.as_mut() {
                    let reload = dir.reload();
                    report_problems(&reload.problems, &mut BTreeSet::new());
                    handler.apply(reload.snapshot);
                }
                Ok(Source::Dir(dir))
            }
            Mode::Kubernetes { node_name, .. } => {
                let client = sluice_kube::client(cfg.kubeconfig()).await.context(
                    "Kubernetes mode (--kubeconfig, KUBECONFIG or the in-cluster environment)",
                )?;
                let opts = sluice_kube::Options {
                    node_name: node_name.clone(),
                    build: cfg.build_options(),
                    instance: format!("sluice-{node_name}"),
                };
                let initial = handler.state().snapshot.clone();
                Ok(Source::Kube(sluice_kube::Kubernetes::start(
                    client, opts, initial,
                )))
            }
        }
    }

    /// Whether the state held now is complete (standalone: read from disk; Kubernetes: not until
    /// every kind is listed).
    pub fn is_complete(&self) -> bool {
        match self {
            Source::Dir(_) => true,
            Source::Kube(k) => *k.ready.borrow(),
        }
    }

    /// `sluice status`'s `kubernetes` section, in Kubernetes mode.
    pub fn kubernetes_status(&self) -> Option<KubernetesStatus> {
        match self {
            Source::Kube(k) => {
                let status = k.status.clone();
                Some(Arc::new(move || {
                    let s = status.get();
                    sluice_admin_api::KubeStatus {
                        synced: s.synced,
                        kinds: s
                            .kinds
                            .into_iter()
                            .map(|k| sluice_admin_api::KindStatus {
                                kind: k.kind,
                                api_version: k.api_version,
                                synced: k.synced,
                                objects: k.objects,
                                last_error: k.last_error,
                            })
                            .collect(),
                        forbidden: s
                            .forbidden
                            .into_iter()
                            .map(|f| sluice_admin_api::Forbidden {
                                verb: f.verb,
                                group: f.group,
                                resource: f.resource,
                                message: f.message,
                            })
                            .collect(),
                    }
                }))
            }
            Source::Dir(_) => None,
        }
    }

    /// Applies every new snapshot until shutdown. Enrollment is also re-synced every `every`
    /// without a change: a pod's cgroup may appear after its Pod object. Returns the readiness of
    /// the configuration.
    pub fn spawn(
        self,
        handler: Arc<Handler>,
        ebpf: Option<Arc<EbpfRedirect>>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> watch::Receiver<bool> {
        // Ready once a complete state is in the proxy (Kubernetes: every kind listed, and that
        // snapshot applied).
        let (ready_tx, ready) = watch::channel(matches!(self, Source::Dir(_)));
        let kube_ready = match &self {
            Source::Kube(k) => Some(k.ready.clone()),
            Source::Dir(_) => None,
        };
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut reported = BTreeSet::new();
            // Kubernetes mode enrolls nothing before its first complete state: an empty view
            // would un-enroll the pods a previous run of the agent enrolled.
            let mut have_state = matches!(self, Source::Dir(_));
            let (mut dir, mut snapshots) = match self {
                Source::Dir(dir) => (dir, None),
                Source::Kube(k) => (None, Some(k.snapshots)),
            };
            loop {
                let changed = async {
                    match snapshots.as_mut() {
                        Some(rx) => rx.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                let fresh: Option<Arc<Snapshot>> = tokio::select! {
                    _ = shutdown.changed() => return,
                    ok = changed => {
                        if !ok {
                            tracing::error!("the Kubernetes store stopped; configuration updates stop");
                            return;
                        }
                        snapshots.as_mut().map(|rx| rx.borrow_and_update().clone())
                    }
                    _ = tick.tick() => None,
                };
                have_state |= fresh.is_some();
                if !have_state {
                    continue;
                }
                // File I/O, and enrollment's stat and bpf calls, off the proxy thread.
                let e = ebpf.clone();
                let h = handler.clone();
                let kube = snapshots.is_some();
                let work = tokio::task::spawn_blocking(move || {
                    let in_force = h.state().snapshot.clone();
                    let (next, changed) = match dir.as_mut().map(|d| d.reload()) {
                        Some(r) => {
                            report_problems(&r.problems, &mut reported);
                            (r.snapshot, r.changed)
                        }
                        None => match fresh {
                            Some(f) => (f, true),
                            None => (in_force.clone(), false),
                        },
                    };
                    if !changed {
                        if let Some(e) = &e {
                            e.sync_enrollment(&next);
                        }
                        return (dir, reported, false);
                    }
                    if kube {
                        report_rejections(&next, &mut reported);
                    }
                    let apply = || {
                        tracing::info!(generation = next.generation, "configuration applied");
                        h.apply(next.clone());
                    };
                    match &e {
                        Some(e) => e.sync_enrollment_around(&in_force, &next, apply),
                        None => apply(),
                    }
                    (dir, reported, true)
                });
                let applied;
                (dir, reported, applied) = match work.await {
                    Ok(r) => r,
                    Err(err) => {
                        tracing::error!(%err, "config reload task failed; reloading stops");
                        return;
                    }
                };
                if applied
                    && !*ready_tx.borrow()
                    && kube_ready.as_ref().is_some_and(|r| *r.borrow())
                {
                    tracing::info!("ready: every kind listed and applied");
                    let _ = ready_tx.send(true);
                }
            }
        });
        ready
    }
}

/// Logs each problem once, when it first appears (the directory is rescanned every 250 ms).
fn report_problems(problems: &[sluice_config::Problem], reported: &mut BTreeSet<String>) {
    let now: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
    for p in problems {
        let line = p.to_string();
        if reported.contains(&line) {
            continue;
        }
        match p.severity {
            Severity::Error => {
                tracing::error!("rejected config, last good version stays in force: {line}")
            }
            Severity::Warning => tracing::warn!("{line}"),
        }
    }
    *reported = now;
}

/// The same for a snapshot's rejections and warnings (Kubernetes mode).
fn report_rejections(snapshot: &Snapshot, reported: &mut BTreeSet<String>) {
    let line = |r: &Rejection| {
        let rv = r
            .resource_version
            .as_ref()
            .map(|v| format!(" (resourceVersion {v})"))
            .unwrap_or_default();
        format!("{}{rv}: {}: {}", r.source, r.field, r.reason)
    };
    let mut now = BTreeSet::new();
    for (r, error) in snapshot
        .rejections
        .iter()
        .map(|r| (r, true))
        .chain(snapshot.warnings.iter().map(|r| (r, false)))
    {
        let l = line(r);
        if !reported.contains(&l) {
            if error {
                tracing::error!("rejected config, last good version stays in force: {l}");
            } else {
                tracing::warn!("{l}");
            }
        }
        now.insert(l);
    }
    *reported = now;
}
