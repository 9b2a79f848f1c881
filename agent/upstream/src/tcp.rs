//! Plain TCP connections to a cluster's endpoints, for the L4 proxy (redirected connections that are
//! not HTTP). One call is one connect attempt, as Envoy's TCP proxy makes it:
//!
//! - `maxConnections` is checked first and never waited on: over the limit the attempt overflows at
//!   once (`upstream_cx_overflow`, flag `UO`). TCP and HTTP connections share the one limit.
//! - A host is picked by the cluster's load balancer, skipping ejected hosts and the hosts earlier
//!   attempts of the same connection tried (Envoy's TCP proxy re-picks to avoid the failed host).
//! - The connect runs under `connectTimeout` (the pools' own connect); its outcome feeds the outlier
//!   detector as a local-origin connect success or failure (unsplit, a failure counts as a 503, as
//!   in Envoy). A client that leaves while its connect is under way drops the attempt: its slot is
//!   freed and nothing is reported.
//! - The connection keeps its slot, and its host's active count (what LEAST_REQUEST compares), until
//!   the [`TcpConnection`] is dropped.

use crate::cluster::{ensure_ticker, Host, Inner};
use crate::outcome::{self, Event};
use crate::pool::{self, ConnectOptions};
use crate::stats::inc;
use crate::ClusterHandle;
use sluice_core::{OverflowKind, ProxyError, RequestInfo};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpStream;

/// An upstream TCP connection and the slot it holds in the cluster.
pub struct TcpConnection {
    pub stream: TcpStream,
    /// The endpoint it is connected to.
    pub host: SocketAddr,
    _slot: TcpSlot,
}

/// Counts a connection against `maxConnections` and its host's active count until dropped.
struct TcpSlot {
    inner: Arc<Inner>,
    host: Arc<Host>,
    connected: bool,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        self.host.active.fetch_sub(1, Ordering::Relaxed);
        let mut pool = self.inner.pool.lock();
        if self.connected {
            pool.tcp_closed(self.host.addr);
        } else {
            pool.tcp_connect_failed(self.host.addr);
        }
    }
}

impl ClusterHandle {
    /// One connect attempt of the TCP proxy. The chosen endpoint is recorded in `info` (so a
    /// further attempt avoids it); the error carries Envoy's flag (`UO`, `UH`, `UF`).
    pub async fn connect_tcp(&self, info: &RequestInfo) -> Result<TcpConnection, ProxyError> {
        let inner = &self.inner;
        ensure_ticker(inner);
        let cfg = inner.config();
        let cp = &cfg.spec.policy.connection_pool;

        let host = inner.pick_host(&cfg, &info.upstreams())?;

        if !inner.pool.lock().try_reserve_tcp(host.addr) {
            inc(&inner.stats.cx_overflow);
            return Err(ProxyError::Overflow(OverflowKind::Connections));
        }
        host.active.fetch_add(1, Ordering::Relaxed);
        host.total.fetch_add(1, Ordering::Relaxed);
        let mut slot = TcpSlot {
            inner: inner.clone(),
            host: host.clone(),
            connected: false,
        };
        info.push_upstream(host.addr);
        inc(&inner.stats.cx_total);

        let opts = ConnectOptions::of(cp);
        match pool::connect_tcp(&inner.stats, host.addr, &opts).await {
            Ok(stream) => {
                inner.report(&host, outcome::decide(Event::Connected));
                inner.pool.lock().tcp_connected(host.addr);
                slot.connected = true;
                Ok(TcpConnection {
                    stream,
                    host: host.addr,
                    _slot: slot,
                })
            }
            Err(err) => {
                inc(&inner.stats.cx_connect_fail);
                let err = ProxyError::ConnectFailure(err);
                inner.report(&host, outcome::decide(Event::Failed(&err)));
                Err(err)
            }
        }
    }
}
