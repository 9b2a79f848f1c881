//! The L4 proxy for redirected connections that are not HTTP: the original destination's cluster
//! (a Service cluster IP and port) or the passthrough cluster (any other address), an upstream
//! connection under the cluster's `connectTimeout`, `maxConnections` and outlier detection (see
//! `sluice_upstream::ClusterHandle::connect_tcp`), then bytes copied both ways, half-closes
//! included, until both sides are done.
//!
//! The Service's VirtualService `tcp` rules choose the cluster as Istio's do: the first rule whose
//! match holds (original destination port and subnet, the client pod's labels and namespace) sends
//! the connection to one of its weighted destinations; no rule matching leaves it on the service
//! port's own cluster.
//!
//! The chosen cluster's `connectionPool.tcp` bounds the connection as Envoy's TCP proxy does under
//! Istio: `idleTimeout` (default 1 h) closes both sides after that long without a byte either way
//! (no response flag, as in Envoy; details `tcp_session_idle_timeout`), `maxConnectionDuration`
//! closes them that long after the connection was accepted (flag `DT`). Both are counted
//! (`envoy_tcp_idle_timeout`, `envoy_tcp_max_downstream_connection_duration`).
//!
//! Each connection ends in one access-log line in Envoy's TCP style, and is counted in Istio's
//! `istio_tcp_*` families under both reporters (the client's side and, once an endpoint accepted
//! it, the endpoint's), its bytes added as they flow so a long connection shows its traffic while
//! it is open.

use crate::handler::{ConnInfo, Handler};
use crate::metrics::TcpTimeout;
use crate::route;
use crate::stamp::{wall_time_of, Stamp};
use sluice_core::{ProxyError, RequestInfo, ResponseFlags};
use sluice_policy::ClusterKey;
use sluice_telemetry::recent::{ConnectionGuard, OpenConnection, Side};
use sluice_telemetry::{Exchange, Peer, Protocol, Record, Reporter, ServiceName, TcpCounters};
use sluice_upstream::UpstreamProtocol;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

impl Handler {
    /// Proxies `client` at L4 to `dst`'s cluster until both directions end. `start` is when the
    /// connection was accepted (the logged duration includes protocol detection, as Envoy's does).
    pub(crate) async fn proxy_tcp<IO>(
        &self,
        client: IO,
        conn: &ConnInfo,
        dst: SocketAddr,
        start: Instant,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let state = self.state();
        let info = Arc::new(RequestInfo::new());
        let source = state.source(conn.peer.ip());
        let source_id = state.source_identity(conn.peer.ip());
        let wall_start = wall_time_of(start);
        // The client's namespace decides which objects it sees (`exportTo`), as for HTTP.
        let viewer = state.viewer(self.client_namespace(source));
        let service = state
            .service_by_vip(dst.ip(), dst.port())
            .filter(|svc| state.sees(viewer, &svc.hostname));
        let (upstream, service) = match service {
            Some(svc) => {
                let rule = state
                    .routes(viewer, &svc.hostname, dst.port())
                    .and_then(|(vh, _)| {
                        route::select_tcp(&vh.tcp_routes, dst, source.map(|s| &*s.pod))
                    });
                let key = match rule {
                    Some(rule) => {
                        route::pick_destination(&rule.destinations, |total| fastrand::u32(0..total))
                            .map(|d| d.cluster.clone())
                    }
                    None => Some(ClusterKey {
                        host: svc.hostname.clone(),
                        port: dst.port(),
                        subset: None,
                    }),
                };
                let upstream = key.and_then(|k| state.upstream(viewer, &k).cloned());
                (upstream, Some(svc.clone()))
            }
            None => (
                Some(self.passthrough.upstream(dst, UpstreamProtocol::Http1)),
                None,
            ),
        };
        let service_labels = self
            .labels_of(&state, service.as_deref())
            .cloned()
            .unwrap_or_else(ServiceName::unknown);
        let telemetry = &self.telemetry;

        let meter = Arc::new(Meter::default());
        let mut client = Counted::new(client, meter.clone(), start);
        match upstream {
            None => info.add_flags(ResponseFlags::NO_CLUSTER_FOUND),
            Some(upstream) => {
                info.set_cluster(upstream.name.clone());
                // The pod's budget of upstream connections: one for as long as this one lasts.
                let held = match conn.slot.as_ref().map(|s| s.take_upstream()) {
                    Some(Err(why)) => {
                        info.add_flags(ResponseFlags::OVERLOAD_MANAGER);
                        info.set_details(why.details());
                        None
                    }
                    Some(Ok(unit)) => Some(Some(unit)),
                    None => Some(None),
                };
                let max_attempts = self.redirect.tcp_max_connect_attempts.max(1);
                let connected = if held.is_none() {
                    None
                } else {
                    loop {
                        let attempt = info.add_attempt();
                        match upstream.handle.connect_tcp(&info).await {
                            Ok(connected) => break Some(connected),
                            Err(ProxyError::ConnectFailure(why)) if attempt < max_attempts => {
                                tracing::debug!(peer = %conn.peer, %dst, %why, "TCP connect failed; trying another host");
                            }
                            Err(err) => {
                                tracing::debug!(peer = %conn.peer, %dst, error = %err, "TCP connection refused by the proxy");
                                info.add_flags(err.flag());
                                break None;
                            }
                        }
                    }
                };
                if let Some(mut connected) = connected {
                    let endpoint = info.upstream().and_then(|a| state.endpoint_identity(a));
                    let pod_at = |ip| {
                        state
                            .snapshot
                            .workload_by_ip(ip)
                            .map(|w| format!("{}/{}", w.namespace, w.name))
                    };
                    let open = |side, peer: Option<SocketAddr>, workload: Peer| OpenConnection {
                        side,
                        peer,
                        pod: peer.and_then(|p| pod_at(p.ip())),
                        workload,
                        service: service_labels.clone(),
                        protocol: Protocol::Tcp,
                        opened: SystemTime::now(),
                        bytes_in: Default::default(),
                        bytes_out: Default::default(),
                    };
                    let registry = telemetry.connections();
                    let _ = meter.registered.set([
                        registry.open(open(Side::Downstream, Some(conn.peer), source_id.clone())),
                        registry.open(open(
                            Side::Upstream,
                            info.upstream(),
                            endpoint
                                .clone()
                                .unwrap_or_else(sluice_telemetry::unknown_identity),
                        )),
                    ]);
                    let _ = meter.counters.set(vec![
                        telemetry.tcp_open(
                            Reporter::Source,
                            &source_id,
                            endpoint.clone(),
                            &service_labels,
                        ),
                        telemetry.tcp_open(
                            Reporter::Destination,
                            &source_id,
                            endpoint,
                            &service_labels,
                        ),
                    ]);
                    let pool = &upstream.spec.policy.connection_pool;
                    let limits = Limits {
                        idle: pool.tcp_idle_timeout,
                        until: pool.max_connection_duration.map(|d| start + d),
                    };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut connected.stream);
                    match bounded(copy, &meter, start, limits).await {
                        Ended::Done(Ok(_)) => {}
                        Ended::Done(Err(err)) => {
                            tracing::debug!(peer = %conn.peer, %dst, %err, "TCP connection ended with an error");
                        }
                        Ended::Idle => {
                            tracing::debug!(peer = %conn.peer, %dst, cluster = %upstream.name, "TCP connection idle past idleTimeout; closed");
                            info.set_details("tcp_session_idle_timeout");
                            self.tcp_timeouts.count(&upstream.name, TcpTimeout::Idle);
                        }
                        Ended::MaxDuration => {
                            tracing::debug!(peer = %conn.peer, %dst, cluster = %upstream.name, "TCP connection reached maxConnectionDuration; closed");
                            info.add_flags(ResponseFlags::DURATION_TIMEOUT);
                            self.tcp_timeouts
                                .count(&upstream.name, TcpTimeout::MaxDuration);
                        }
                    }
                    // Dropping both streams here closes both sides.
                }
            }
        }

        drop(client);
        // A connection that reached no endpoint is still the client's side's to count.
        let counters = match meter.counters.get() {
            Some(c) => c.iter().collect::<Vec<_>>(),
            None => Vec::new(),
        };
        let unconnected;
        let counters = if counters.is_empty() {
            unconnected = telemetry.tcp_open(Reporter::Source, &source_id, None, &service_labels);
            vec![&unconnected]
        } else {
            counters
        };
        let record = Record {
            start: wall_start,
            duration: start.elapsed(),
            exchange: Exchange::Tcp {
                received: meter.read.load(Ordering::Relaxed),
                sent: meter.written.load(Ordering::Relaxed),
            },
            peer: Some(conn.peer),
            source: source_id.clone(),
            service: service_labels.clone(),
            info: info.clone(),
            status: 0,
            grpc_status: None,
            response_bytes: 0,
        };
        telemetry.tcp_close(&counters, info.flags(), Some(record));
    }

    /// Refuses a non-HTTP connection whose original destination is this proxy's own listener.
    pub(crate) fn refuse_loop_tcp(&self, conn: &ConnInfo, start: Instant) {
        tracing::warn!(
            peer = %conn.peer,
            original_dst = ?conn.original_dst,
            "refused a redirected connection addressed to the proxy's own listener (it would loop); \
             exclude this address or port from redirection"
        );
        let info = Arc::new(RequestInfo::new());
        info.set_cluster(Arc::from(crate::BLACK_HOLE_CLUSTER));
        let state = self.state();
        let source = state.source_identity(conn.peer.ip());
        let service = ServiceName::unknown();
        let counters = self
            .telemetry
            .tcp_open(Reporter::Source, &source, None, &service);
        let record = Record {
            start: wall_time_of(start),
            duration: start.elapsed(),
            exchange: Exchange::Tcp {
                received: 0,
                sent: 0,
            },
            peer: Some(conn.peer),
            source,
            service,
            info: info.clone(),
            status: 0,
            grpc_status: None,
            response_bytes: 0,
        };
        self.telemetry
            .tcp_close(&[&counters], info.flags(), Some(record));
    }
}

/// The idle timeout and the deadline of one L4 connection.
#[derive(Clone, Copy, Debug)]
struct Limits {
    idle: Option<Duration>,
    until: Option<Instant>,
}

/// How the copy of an L4 connection ended.
enum Ended<T> {
    /// Both directions finished (or failed).
    Done(T),
    /// No byte either way for the idle timeout.
    Idle,
    /// The connection's maximum duration passed.
    MaxDuration,
}

/// Runs `copy` until it ends or a limit passes. The idle timer is re-armed from the last byte
/// `meter` saw, so each wake-up either finds activity (and moves the deadline forward) or ends it.
async fn bounded<F: std::future::Future>(
    copy: F,
    meter: &Meter,
    base: Instant,
    limits: Limits,
) -> Ended<F::Output> {
    tokio::pin!(copy);
    let idle_at = |meter: &Meter, idle| meter.last_activity(base) + idle;
    let mut idle_deadline = limits.idle.map(|idle| base + idle);
    loop {
        tokio::select! {
            done = &mut copy => return Ended::Done(done),
            _ = sleep_until_opt(idle_deadline) => {
                let (Some(idle), Some(deadline)) = (limits.idle, idle_deadline) else {
                    continue;
                };
                let next = idle_at(meter, idle);
                if next <= deadline {
                    return Ended::Idle;
                }
                idle_deadline = Some(next);
            }
            _ = sleep_until_opt(limits.until) => return Ended::MaxDuration,
        }
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Bytes read from and written to the client, and when the last one moved (after the
/// connection's start), shared with the timers while the copy holds the connection.
#[derive(Debug, Default)]
struct Meter {
    read: AtomicU64,
    written: AtomicU64,
    last: Stamp,
    /// The connection's `istio_tcp_*` byte counters, once it has an endpoint.
    counters: OnceLock<Vec<TcpCounters>>,
    /// Its two ends in the registry `sluice connections` lists (client, endpoint), once it has
    /// an endpoint.
    registered: OnceLock<[ConnectionGuard; 2]>,
}

impl Meter {
    fn last_activity(&self, base: Instant) -> Instant {
        self.last.get(base)
    }

    fn moved(&self, counter: &AtomicU64, n: usize, base: Instant) {
        if n > 0 {
            counter.fetch_add(n as u64, Ordering::Relaxed);
            if let Some(counters) = self.counters.get() {
                let read = std::ptr::eq(counter, &self.read);
                for c in counters {
                    if read {
                        c.received(n as u64);
                    } else {
                        c.sent(n as u64);
                    }
                }
            }
            if let Some([client, endpoint]) = self.registered.get() {
                // Read from the client is written to the endpoint, and the other way round.
                if std::ptr::eq(counter, &self.read) {
                    client.read(n as u64);
                    endpoint.written(n as u64);
                } else {
                    client.written(n as u64);
                    endpoint.read(n as u64);
                }
            }
            self.last.set(base, Instant::now());
        }
    }
}

/// Counts the bytes read from and written to the client into a [`Meter`].
struct Counted<IO> {
    io: IO,
    meter: Arc<Meter>,
    base: Instant,
}

impl<IO> Counted<IO> {
    fn new(io: IO, meter: Arc<Meter>, base: Instant) -> Self {
        Self { io, meter, base }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.meter.moved(&self.meter.read, n, self.base);
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.meter.moved(&self.meter.written, n, self.base);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counts_both_directions() {
        let (a, mut b) = tokio::io::duplex(64);
        let meter = Arc::new(Meter::default());
        let mut counted = Counted::new(a, meter.clone(), Instant::now());
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        counted.read_exact(&mut buf).await.unwrap();
        counted.write_all(b"hi").await.unwrap();
        let read = meter.read.load(Ordering::Relaxed);
        assert_eq!((read, meter.written.load(Ordering::Relaxed)), (5, 2));
    }

    /// A copy that never ends, through a [`Counted`] client: `poke` sends a byte through it.
    async fn idle_copy(limits: Limits, pokes: &[u64]) -> (Ended<()>, Duration) {
        let start = Instant::now();
        let meter = Arc::new(Meter::default());
        let (client, mut peer) = tokio::io::duplex(64);
        let mut counted = Counted::new(client, meter.clone(), start);
        let pokes = pokes.to_vec();
        tokio::spawn(async move {
            for at in pokes {
                tokio::time::sleep_until(start + Duration::from_secs(at)).await;
                let _ = peer.write_all(b"x").await;
            }
            std::future::pending::<()>().await;
        });
        let copy = async move {
            let mut buf = [0u8; 8];
            while counted.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        };
        let ended = bounded(copy, &meter, start, limits).await;
        (ended, start.elapsed())
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_timeout_counts_from_the_last_byte() {
        let idle = Limits {
            idle: Some(Duration::from_secs(10)),
            until: None,
        };
        let (ended, at) = idle_copy(idle, &[]).await;
        assert!(matches!(ended, Ended::Idle));
        assert_eq!(at, Duration::from_secs(10));
        // Bytes at 4 s and 13 s: idle from 13 s, closed at 23 s.
        let (ended, at) = idle_copy(idle, &[4, 13]).await;
        assert!(matches!(ended, Ended::Idle));
        assert_eq!(at, Duration::from_secs(23));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn max_duration_ends_a_busy_connection() {
        let start = Instant::now();
        let limits = Limits {
            idle: Some(Duration::from_secs(10)),
            until: Some(start + Duration::from_secs(30)),
        };
        let (ended, at) = idle_copy(limits, &[5, 10, 15, 20, 25, 29]).await;
        assert!(matches!(ended, Ended::MaxDuration));
        assert_eq!(at, Duration::from_secs(30));
    }
}
