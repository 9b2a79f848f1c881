//! Outlier detection with the semantics of Envoy's `outlier_detection_impl.cc`: per-host consecutive
//! 5xx, gateway-error and local-origin counters; immediate ejection when a counter reaches its
//! threshold (bounded by `maxEjectionPercent`); ejection time `baseEjectionTime × multiplier` capped at
//! `maxEjectionTime`; un-ejection and multiplier decay only at `interval` ticks.
//!
//! `maxEjectionPercent` is strict, as in Envoy since 1.27: a host is ejected only if
//! `(ejected + 1) / hosts <= maxEjectionPercent`, so with Istio's default of 10% a service with
//! fewer than 10 endpoints never ejects one (Envoy's `always_eject_one_host`, which would allow
//! one, is an option Istio never sets).
//!
//! Differences from Envoy, on purpose:
//! - No ejection-time jitter and no success-rate / failure-percentage detectors (Istio sets neither).

use crate::outcome::Outcome;
use crate::stats::{inc, Stats};
use parking_lot::Mutex;
use serde::Serialize;
use sluice_policy::OutlierDetection;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tracing::info;

/// How many ejection events [`crate::ClusterHandle::outlier_events`] remembers.
const EVENT_RING: usize = 64;

/// Why a host was ejected (Envoy's `OutlierEjectionType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum EjectionType {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

/// One ejection or un-ejection, for the demo and `sluice` debugging.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierEvent {
    pub at: Instant,
    pub host: SocketAddr,
    pub kind: OutlierEventKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutlierEventKind {
    /// Ejected for `duration`; `ejections` counts this host's ejections so far.
    Ejected {
        reason: EjectionType,
        ejections: u32,
        duration: Duration,
    },
    /// Returned to the load-balancing set at an interval tick.
    Unejected,
}

/// Per-host detector state (Envoy's `DetectorHostMonitorImpl`).
#[derive(Debug, Default)]
pub(crate) struct Monitor {
    pub(crate) consecutive_5xx: u32,
    pub(crate) consecutive_gateway: u32,
    pub(crate) consecutive_local: u32,
    pub(crate) ejected_at: Option<Instant>,
    pub(crate) unejected_at: Option<Instant>,
    pub(crate) num_ejections: u32,
    /// The ejection-time multiplier (Envoy's `ejectTimeBackoff`).
    pub(crate) multiplier: u32,
}

/// The outlier side of a host; `ejected` is read lock-free by the balancer.
#[derive(Debug, Default)]
pub(crate) struct HostOutlier {
    pub(crate) ejected: AtomicBool,
    /// Set when an update removes the host, so late reports cannot eject it.
    pub(crate) removed: AtomicBool,
    /// False only while the consecutive 5xx and gateway counters are both zero (written under
    /// the monitor's lock): a response that is no 5xx then changes nothing, and is not locked
    /// for (what most responses are).
    failing: AtomicBool,
    pub(crate) monitor: Mutex<Monitor>,
}

impl HostOutlier {
    pub(crate) fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }
}

/// How long a host with this multiplier stays out (Envoy: `min(base × backoff, max)`, where the
/// configured max is never below base).
pub(crate) fn ejection_time(cfg: &OutlierDetection, multiplier: u32) -> Duration {
    let max = cfg.max_ejection_time.max(cfg.base_ejection_time);
    cfg.base_ejection_time.saturating_mul(multiplier).min(max)
}

/// The cluster a report is about: its outlier policy, its name (for logs), its size (what
/// `maxEjectionPercent` is a share of) and its counters.
#[derive(Clone, Copy)]
pub(crate) struct Scope<'a> {
    pub(crate) cfg: &'a OutlierDetection,
    pub(crate) cluster: &'a str,
    pub(crate) hosts: usize,
    pub(crate) stats: &'a Stats,
}

/// The host a report is about.
#[derive(Clone, Copy)]
pub(crate) struct HostRef<'a> {
    pub(crate) addr: SocketAddr,
    pub(crate) outlier: &'a HostOutlier,
}

#[derive(Debug, Default)]
struct DetectorState {
    /// Hosts ejected now (Envoy's `ejections_active` gauge).
    active: u32,
    events: VecDeque<OutlierEvent>,
}

/// The cluster side of the detector: the ejection count that `maxEjectionPercent` bounds, and the
/// event ring. Lock order: detector, then a host's monitor.
#[derive(Debug)]
pub(crate) struct Detector {
    state: Mutex<DetectorState>,
    always_eject_one: AtomicBool,
}

impl Default for Detector {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            always_eject_one: AtomicBool::new(false),
        }
    }
}

impl Detector {
    /// Envoy's `always_eject_one_host` (off, as Istio leaves it; see the module docs).
    #[cfg(test)]
    pub(crate) fn set_always_eject_one(&self, on: bool) {
        self.always_eject_one.store(on, Ordering::Relaxed);
    }

    pub(crate) fn ejections_active(&self) -> u32 {
        self.state.lock().active
    }

    pub(crate) fn events(&self) -> Vec<OutlierEvent> {
        self.state.lock().events.iter().cloned().collect()
    }

    /// Feeds one attempt's outcome to `host`'s counters and ejects it when a threshold is reached.
    /// The cluster's one caller is `Inner::report`.
    pub(crate) fn report(&self, scope: &Scope<'_>, host: HostRef<'_>, outcome: Outcome) {
        let cfg = scope.cfg;
        let HostRef {
            addr: host_addr,
            outlier: host,
        } = host;
        // `consecutiveLocalOriginFailures` set = `split_external_local_origin_errors`.
        let split = cfg.consecutive_local_origin_failures.is_some();
        if !outcome.reported() || (outcome == Outcome::ConnectSuccess && !split) {
            // Not the host's doing; or a connect success unsplit, which Envoy ignores (this also
            // skips the lock on the hot path).
            return;
        }
        if let Outcome::Status(code) = outcome {
            if !(500..600).contains(&code) && !host.failing.load(Ordering::Relaxed) {
                // It would only reset counters that are zero.
                return;
            }
        }
        let mut fired: [Option<EjectionType>; 2] = [None, None];
        {
            let mut m = host.monitor.lock();
            let code = match (outcome, split) {
                (Outcome::Status(code), _) => Some(code),
                // Unsplit, Envoy maps local-origin results to the status it would answer with.
                (Outcome::ConnectFailed, false) => Some(503),
                (Outcome::Timeout(_), false) => Some(504),
                (Outcome::ConnectSuccess | Outcome::Cancelled | Outcome::NotTheHost, _) => None,
                (Outcome::ConnectFailed | Outcome::Timeout(_), true) => {
                    m.consecutive_local += 1;
                    if cfg.consecutive_local_origin_failures == Some(m.consecutive_local) {
                        fired[0] = Some(EjectionType::ConsecutiveLocalOriginFailure);
                    }
                    None
                }
            };
            if outcome == Outcome::ConnectSuccess {
                m.consecutive_local = 0;
            }
            if let Some(code) = code {
                if (500..600).contains(&code) {
                    host.failing.store(true, Ordering::Relaxed);
                    if matches!(code, 502..=504) {
                        m.consecutive_gateway += 1;
                        if cfg.consecutive_gateway_errors == Some(m.consecutive_gateway) {
                            fired[0] = Some(EjectionType::ConsecutiveGatewayFailure);
                        }
                    } else {
                        m.consecutive_gateway = 0;
                    }
                    m.consecutive_5xx += 1;
                    // Equality, as in Envoy: the counter keeps growing past the threshold without
                    // firing again until something resets it.
                    if cfg.consecutive_5xx == Some(m.consecutive_5xx) {
                        fired[1] = Some(EjectionType::Consecutive5xx);
                    }
                } else {
                    m.consecutive_5xx = 0;
                    m.consecutive_gateway = 0;
                    host.failing.store(false, Ordering::Relaxed);
                }
            }
        }
        for kind in fired.into_iter().flatten() {
            self.on_consecutive_error(
                scope,
                HostRef {
                    addr: host_addr,
                    outlier: host,
                },
                kind,
            );
        }
    }

    /// Envoy's `onConsecutiveErrorWorker` + `ejectHost`.
    fn on_consecutive_error(&self, scope: &Scope<'_>, host: HostRef<'_>, kind: EjectionType) {
        let Scope {
            cfg,
            cluster,
            hosts,
            stats,
        } = *scope;
        let HostRef {
            addr,
            outlier: host,
        } = host;
        let mut d = self.state.lock();
        let mut m = host.monitor.lock();
        if host.is_ejected() || host.removed.load(Ordering::Relaxed) {
            return;
        }
        let max_percent = f64::from(cfg.max_ejection_percent.min(100));
        let percent = 100.0 * f64::from(d.active + 1) / hosts.max(1) as f64;
        let allowed = percent <= max_percent
            || (d.active == 0 && self.always_eject_one.load(Ordering::Relaxed));
        if allowed {
            let now = Instant::now();
            d.active += 1;
            host.ejected.store(true, Ordering::Relaxed);
            m.num_ejections += 1;
            m.ejected_at = Some(now);
            let base = cfg.base_ejection_time;
            let max = cfg.max_ejection_time.max(base);
            if base.saturating_mul(m.multiplier) < max.saturating_add(base) {
                m.multiplier += 1;
            }
            inc(&stats.ejections_enforced_total);
            inc(match kind {
                EjectionType::Consecutive5xx => &stats.ejections_enforced_5xx,
                EjectionType::ConsecutiveGatewayFailure => &stats.ejections_enforced_gateway,
                EjectionType::ConsecutiveLocalOriginFailure => &stats.ejections_enforced_local,
            });
            let duration = ejection_time(cfg, m.multiplier);
            info!(cluster, host = %addr, ejections = m.num_ejections, reason = ?kind, ?duration,
                "ejected by the outlier detector");
            push_event(
                &mut d.events,
                OutlierEvent {
                    at: now,
                    host: addr,
                    kind: OutlierEventKind::Ejected {
                        reason: kind,
                        ejections: m.num_ejections,
                        duration,
                    },
                },
            );
        } else {
            inc(&stats.ejections_overflow);
        }
        // Envoy resets the firing counter whether or not the ejection was allowed, so a later bout
        // of errors can fire again.
        match kind {
            EjectionType::Consecutive5xx => m.consecutive_5xx = 0,
            EjectionType::ConsecutiveGatewayFailure => m.consecutive_gateway = 0,
            EjectionType::ConsecutiveLocalOriginFailure => m.consecutive_local = 0,
        }
    }

    /// One `interval` tick (Envoy's `onIntervalTimer`): un-eject hosts whose time is up, then decay
    /// the multiplier of hosts returned to service at least an interval ago.
    pub(crate) fn tick<'a>(
        &self,
        cfg: &OutlierDetection,
        cluster: &str,
        hosts: impl Iterator<Item = (SocketAddr, &'a HostOutlier)> + Clone,
        now: Instant,
    ) {
        let mut d = self.state.lock();
        for (addr, host) in hosts.clone() {
            if !host.is_ejected() {
                continue;
            }
            let mut m = host.monitor.lock();
            let ejected_at = m.ejected_at.unwrap_or(now);
            if now.saturating_duration_since(ejected_at) >= ejection_time(cfg, m.multiplier) {
                uneject(&mut d, cluster, addr, host, &mut m, now);
            }
        }
        for (_, host) in hosts {
            if host.is_ejected() {
                continue;
            }
            let mut m = host.monitor.lock();
            if let Some(at) = m.unejected_at {
                if now.saturating_duration_since(at) >= cfg.interval && m.multiplier > 0 {
                    m.multiplier -= 1;
                }
            }
        }
    }

    /// Returns every ejected host to service (outlier detection was switched off).
    pub(crate) fn uneject_all<'a>(
        &self,
        cluster: &str,
        hosts: impl Iterator<Item = (SocketAddr, &'a HostOutlier)>,
    ) {
        let mut d = self.state.lock();
        let now = Instant::now();
        for (addr, host) in hosts {
            if host.is_ejected() {
                let mut m = host.monitor.lock();
                uneject(&mut d, cluster, addr, host, &mut m, now);
            }
        }
    }

    /// Forgets a host that an update removed.
    pub(crate) fn remove(&self, host: &HostOutlier) {
        let mut d = self.state.lock();
        host.removed.store(true, Ordering::Relaxed);
        if host.ejected.swap(false, Ordering::Relaxed) {
            d.active = d.active.saturating_sub(1);
        }
    }
}

fn uneject(
    d: &mut DetectorState,
    cluster: &str,
    addr: SocketAddr,
    host: &HostOutlier,
    m: &mut Monitor,
    now: Instant,
) {
    d.active = d.active.saturating_sub(1);
    host.ejected.store(false, Ordering::Relaxed);
    // As Envoy: reset every counter so a host close to a threshold is not re-ejected at once.
    m.consecutive_5xx = 0;
    m.consecutive_gateway = 0;
    m.consecutive_local = 0;
    m.unejected_at = Some(now);
    info!(cluster, host = %addr, ejections = m.num_ejections, "returned to service by the outlier detector");
    push_event(
        &mut d.events,
        OutlierEvent {
            at: now,
            host: addr,
            kind: OutlierEventKind::Unejected,
        },
    );
}

fn push_event(events: &mut VecDeque<OutlierEvent>, event: OutlierEvent) {
    if events.len() == EVENT_RING {
        events.pop_front();
    }
    events.push_back(event);
}

/// The ejection state of a host for the admin API.
pub(crate) fn remaining(cfg: Option<&OutlierDetection>, m: &Monitor, now: Instant) -> Duration {
    match (cfg, m.ejected_at) {
        (Some(cfg), Some(at)) => {
            (at + ejection_time(cfg, m.multiplier)).saturating_duration_since(now)
        }
        _ => Duration::ZERO,
    }
}
