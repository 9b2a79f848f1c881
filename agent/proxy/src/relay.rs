//! Who may use a redirecting listener (eBPF mode): the proxy is no open relay.
//!
//! In eBPF mode the outbound listener must be reachable from every enrolled pod, so it listens on
//! an address other hosts, other pods and the node itself can reach too, and a connection it
//! serves may go anywhere (the passthrough cluster forwards to whatever address the client says
//! it meant). So a connection is served only when both hold:
//! * its original destination is known: the eBPF programs recorded it for this very socket (the
//!   4-tuple map), or `SO_ORIGINAL_DST` answers for it. A client that connects to the listener
//!   directly has none (the programs never rewrite a `connect()` to the proxy itself);
//! * its peer address is that of an enrolled pod of this node that may be redirected (the
//!   snapshot's workloads: enrolled, not hostNetwork, running, with that IP). A pod is enrolled
//!   in the programs' map only after the snapshot says so, so every redirected pod passes. A pod
//!   that leaves is released from the map before the snapshot without it is applied; for a
//!   second after that, the pods of the snapshot it replaced pass too, so that a connection it
//!   made while still redirected, and that waits in the listen backlog, is served, not reset.
//!
//! Otherwise the connection is closed at once, before a byte is read: counted by reason
//! (`sluice_outbound_refused_connections_total`), written to the access log as an L4 entry with
//! `NR` and the reason as details (Envoy's entry for a connection no filter chain accepts), and
//! logged (the first of each reason as a warning, the rest at debug level: a client that keeps
//! trying must not flood the agent's log).
//!
//! ztunnel guards its shared-mode outbound listener the same way: the source workload is looked
//! up by the peer address and a connection from an unknown one is denied before anything is
//! proxied (`UnknownSource`). In its in-pod mode the listener lives in each pod's own network
//! namespace, so only that pod can reach it at all; one listener for a whole node has to check.

use crate::handler::{ConnInfo, Handler};
use parking_lot::Mutex;
use sluice_core::{RequestInfo, ResponseFlags};
use sluice_policy::Snapshot;
use sluice_telemetry::{Exchange, Record, ServiceName};
use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Why a redirecting listener refused a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No original destination: the client connected to the listener itself.
    NoOriginalDestination = 0,
    /// The client's address is no enrolled, redirectable pod of this node.
    ClientNotEnrolled = 1,
}

impl Refusal {
    const ALL: [Refusal; 2] = [Refusal::NoOriginalDestination, Refusal::ClientNotEnrolled];

    /// The `reason` label and the access log's details.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::ClientNotEnrolled => "client_not_enrolled",
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Refusal::NoOriginalDestination => {
                "refused a connection made straight to the outbound listener (no original \
                 destination): in eBPF mode only connections the programs redirected are served; \
                 clients that want an explicit proxy need one on loopback (--redirect none)"
            }
            Refusal::ClientNotEnrolled => {
                "refused a connection from an address that is no enrolled pod of this node: \
                 the outbound listener serves only the pods it redirects"
            }
        }
    }
}

/// How long, after a snapshot replaced another, the pods enrolled in the one replaced still pass:
/// long enough for the listen backlog to drain under load, short enough that an address a leaving
/// pod gave back is not trusted for long.
const LEAVING_GRACE: Duration = Duration::from_secs(1);

/// The addresses of the enrolled pods of one snapshot, and those that left with the snapshots
/// it replaced, each with the instant until which it still passes: its own, so that a second
/// change within the grace does not cut short the first one's.
struct Enrolled {
    of: Arc<Snapshot>,
    ips: HashSet<IpAddr>,
    leaving: HashMap<IpAddr, Instant>,
}

/// The rule's state: the enrolled pods' addresses of the snapshot in force (remade when the
/// snapshot changes), and the refusals so far.
#[derive(Default)]
pub(crate) struct ClientGuard {
    enrolled: Mutex<Option<Enrolled>>,
    refused: [AtomicU64; 2],
    warned: [AtomicBool; 2],
}

impl ClientGuard {
    /// Whether a redirected connection may be served.
    fn check(&self, snapshot: &Arc<Snapshot>, conn: &ConnInfo) -> Result<(), Refusal> {
        if conn.original_dst.is_none() {
            return Err(Refusal::NoOriginalDestination);
        }
        let ip = conn.peer.ip().to_canonical();
        let mut cached = self.enrolled.lock();
        let e = Self::enrolled(&mut cached, snapshot);
        let leaving = || {
            e.leaving
                .get(&ip)
                .is_some_and(|until| Instant::now() < *until)
        };
        if !e.ips.contains(&ip) && !leaving() {
            return Err(Refusal::ClientNotEnrolled);
        }
        Ok(())
    }

    /// Remakes the addresses for `snapshot` now that it is applied (off the connections' path),
    /// which also starts the grace of the pods it replaced.
    pub(crate) fn applied(&self, snapshot: &Arc<Snapshot>) {
        Self::enrolled(&mut self.enrolled.lock(), snapshot);
    }

    /// The addresses of the enrolled pods that may be redirected, made once per snapshot: a
    /// hash lookup per connection, under the lock that guards them, not a scan of every pod.
    /// With them, those of the pods that left, while they still pass (the ones whose grace
    /// ended are forgotten here, so the map holds at most a grace's worth of departures).
    fn enrolled<'a>(cached: &'a mut Option<Enrolled>, snapshot: &Arc<Snapshot>) -> &'a Enrolled {
        if !cached
            .as_ref()
            .is_some_and(|e| Arc::ptr_eq(&e.of, snapshot))
        {
            let ips: HashSet<IpAddr> = snapshot
                .workloads
                .values()
                .filter(|w| w.enrolled && w.not_redirectable().is_none())
                .flat_map(|w| w.ips.iter().map(|ip| ip.to_canonical()))
                .collect();
            let now = Instant::now();
            let until = now + LEAVING_GRACE;
            let (mut leaving, left) = cached
                .take()
                .map(|old| (old.leaving, old.ips))
                .unwrap_or_default();
            leaving.retain(|ip, left_until| now < *left_until && !ips.contains(ip));
            leaving.extend(
                left.into_iter()
                    .filter(|ip| !ips.contains(ip))
                    .map(|ip| (ip, until)),
            );
            *cached = Some(Enrolled {
                of: snapshot.clone(),
                ips,
                leaving,
            });
        }
        cached.as_ref().expect("made above")
    }

    /// Connections refused so far for `why`.
    pub(crate) fn refused(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    /// `sluice_outbound_refused_connections_total{reason}`, once anything was refused.
    pub(crate) fn encode(&self, out: &mut String) {
        if Refusal::ALL.iter().all(|&r| self.refused(r) == 0) {
            return;
        }
        let _ = writeln!(
            out,
            "# TYPE sluice_outbound_refused_connections_total counter"
        );
        for r in Refusal::ALL {
            let _ = writeln!(
                out,
                "sluice_outbound_refused_connections_total{{reason=\"{}\"}} {}",
                r.reason(),
                self.refused(r)
            );
        }
    }
}

impl Handler {
    /// The rule for a connection accepted by a redirecting listener (one given an
    /// `OriginalDst`, i.e. eBPF mode): `true` to serve it; `false` when it was refused (counted
    /// and logged here; the caller closes it).
    pub(crate) fn admit_redirected(&self, conn: &ConnInfo) -> bool {
        if !self.redirect.enrolled_clients_only {
            return true;
        }
        let state = self.state();
        let Err(why) = self.clients.check(&state.snapshot, conn) else {
            return true;
        };
        self.clients.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        if !self.clients.warned[why as usize].swap(true, Ordering::Relaxed) {
            tracing::warn!(
                peer = %conn.peer,
                original_dst = ?conn.original_dst,
                reason = why.reason(),
                "{}; further refusals are counted in sluice_outbound_refused_connections_total \
                 and logged at debug level",
                why.explain()
            );
        } else {
            tracing::debug!(peer = %conn.peer, original_dst = ?conn.original_dst, reason = why.reason(), "refused a connection");
        }
        let info = Arc::new(RequestInfo::new());
        info.add_flags(ResponseFlags::NO_ROUTE_FOUND);
        info.set_details(why.reason());
        let record = Record {
            start: SystemTime::now(),
            duration: Duration::ZERO,
            exchange: Exchange::Tcp {
                received: 0,
                sent: 0,
            },
            peer: Some(conn.peer),
            source: state.source_identity(conn.peer.ip()),
            service: ServiceName::unknown(),
            info: info.clone(),
            status: 0,
            grpc_status: None,
            response_bytes: 0,
        };
        // The access-log entry only: this is no mesh traffic, so no `istio_tcp_*` sample.
        self.telemetry.tcp_close(&[], info.flags(), Some(record));
        false
    }

    /// Connections the redirecting listeners refused so far for `why` (see [`Refusal`]).
    pub fn refused_connections(&self, why: Refusal) -> u64 {
        self.clients.refused(why)
    }
}
