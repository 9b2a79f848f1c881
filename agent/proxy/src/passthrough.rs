//! Istio's `PassthroughCluster`: where a redirected connection goes when its original destination
//! is not a Service cluster IP and port (a pod IP, an address outside the mesh). The request or
//! connection is forwarded unchanged to that address with no route policy: no retries, no timeout,
//! no fault, Istio's default connection settings. Like Envoy's `ORIGINAL_DST` cluster, one small
//! cluster (one host) exists per destination address, created on first use; the table is bounded and
//! forgets destinations with nothing in flight when full.

use crate::state::{RoutePlan, ServiceLabels, Upstream};
use parking_lot::Mutex;
use sluice_policy::{Cluster, ClusterKey, Endpoint, RetryPolicy, TrafficPolicy};
use sluice_resilience::RetryBudget;
use sluice_upstream::UpstreamProtocol;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// The cluster name Istio gives this traffic (access log, metrics).
pub const PASSTHROUGH_CLUSTER: &str = "PassthroughCluster";

/// Destinations remembered before idle ones are forgotten.
const MAX_DESTINATIONS: usize = 4096;

pub(crate) struct Passthrough {
    clusters: Mutex<HashMap<(SocketAddr, UpstreamProtocol), Upstream>>,
    name: Arc<str>,
    plan: Arc<RoutePlan>,
    pub(crate) labels: ServiceLabels,
}

impl Passthrough {
    pub(crate) fn new() -> Self {
        Self {
            clusters: Mutex::new(HashMap::new()),
            name: Arc::from(PASSTHROUGH_CLUSTER),
            // Istio's `allow_any` route: no retry policy, no timeout.
            plan: Arc::new(RoutePlan {
                destinations: Vec::new(),
                timeout: None,
                retry: Arc::new(RetryPolicy::disabled()),
                per_try_timeout: None,
                fault: None,
                direct: None,
                response_headers: None,
                notes: Arc::new([sluice_core::PolicyNote::new(Arc::new(
                    sluice_admin_api::RoutePolicy {
                        virtual_service: "allow_any".into(),
                        route: "allow_any".into(),
                        ..Default::default()
                    },
                ))]),
            }),
            labels: sluice_telemetry::ServiceName::new(
                PASSTHROUGH_CLUSTER,
                PASSTHROUGH_CLUSTER,
                sluice_policy::UNKNOWN,
            ),
        }
    }

    pub(crate) fn plan(&self) -> &Arc<RoutePlan> {
        &self.plan
    }

    /// The cluster for `addr` (HTTP/2 upstream when the client spoke HTTP/2, as Istio's
    /// passthrough cluster uses the downstream protocol).
    pub(crate) fn upstream(&self, addr: SocketAddr, protocol: UpstreamProtocol) -> Upstream {
        let mut clusters = self.clusters.lock();
        if let Some(up) = clusters.get(&(addr, protocol)) {
            return up.clone();
        }
        if clusters.len() >= MAX_DESTINATIONS {
            // Forgetting is always safe (whatever is in flight holds its cluster); idle connections
            // of a forgotten cluster close at their idle deadline.
            clusters.retain(|_, up| up.handle.hosts().iter().any(|h| h.active_requests > 0));
        }
        let spec = Arc::new(Cluster {
            key: ClusterKey {
                host: PASSTHROUGH_CLUSTER.to_owned(),
                port: addr.port(),
                subset: None,
            },
            endpoints: vec![Endpoint {
                addr,
                pod: None,
                labels: Default::default(),
                identity: None,
            }],
            policy: TrafficPolicy::default(),
            destination_rule: None,
            subset_labels: Default::default(),
        });
        let up = Upstream {
            name: self.name.clone(),
            note: crate::notes::cluster_note(&self.name, &spec),
            retry_budget: Arc::new(RetryBudget::new(spec.policy.connection_pool.max_retries)),
            handle: sluice_upstream::Cluster::new(spec.clone(), protocol),
            spec,
        };
        clusters.insert((addr, protocol), up.clone());
        up
    }
}
