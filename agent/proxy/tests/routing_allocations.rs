//! Routing a request allocates nothing: the client's namespace view, the VirtualService's plan for
//! the incoming port, the route match, the weighted pick and the live cluster of the client's
//! DestinationRule are all lookups into tables made once per generation. Counted with a global
//! allocator that wraps the system one, per thread: the test harness's own thread allocates while
//! it waits for the test (its channel's first receive), and that is not routing.
#![deny(unsafe_op_in_unsafe_fn)]

use sluice_policy::{
    Cluster, ClusterKey, NamespaceView, RetryPolicy, Route, Service, ServiceExportTo, ServicePort,
    Snapshot, TrafficPolicy, VirtualHost, WeightedDestination, INCOMING_PORT,
};
use sluice_proxy::{route, State};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::Arc;

struct Counting;

thread_local! {
    // `const` and without a destructor: reading it never allocates, even from inside the allocator.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    // `try_with`: an allocation while the thread's locals are being torn down is not counted.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocated() -> usize {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every call is passed unchanged to the system allocator, which upholds the contract;
// counting touches only a thread-local cell.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract for `alloc` is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this `layout` (see `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: as for `dealloc`; the new size is the caller's, as the contract requires.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const HOST: &str = "pricing.default.svc.cluster.local";

fn key(port: u16, subset: Option<&str>) -> ClusterKey {
    ClusterKey {
        host: HOST.into(),
        port,
        subset: subset.map(Into::into),
    }
}

fn clusters(limit: u32) -> BTreeMap<ClusterKey, Arc<Cluster>> {
    let mut out = BTreeMap::new();
    for port in [80, 8080] {
        for subset in [None, Some("v1")] {
            let mut policy = TrafficPolicy::default();
            policy.connection_pool.max_connections = limit;
            let key = key(port, subset);
            out.insert(
                key.clone(),
                Arc::new(Cluster {
                    key,
                    endpoints: vec![],
                    policy,
                    destination_rule: None,
                    subset_labels: Default::default(),
                }),
            );
        }
    }
    out
}

/// `pricing` (ports 80, 8080) routed without a destination port, 90/10 to subsets; namespace
/// `shop` sees its own DestinationRule.
fn state() -> State {
    let mut snap = Snapshot::default();
    snap.services.insert(
        HOST.into(),
        Arc::new(Service {
            name: "pricing".into(),
            namespace: "default".into(),
            hostname: HOST.into(),
            cluster_ips: vec![],
            ports: [80, 8080]
                .map(|port| ServicePort {
                    name: None,
                    port,
                    app_protocol: None,
                })
                .to_vec(),
            export_to: ServiceExportTo::Public,
        }),
    );
    snap.clusters = clusters(1);
    let dest = |subset: Option<&str>, weight| WeightedDestination {
        cluster: key(INCOMING_PORT, subset),
        weight,
    };
    snap.virtual_hosts.insert(
        HOST.into(),
        Arc::new(VirtualHost {
            name: "default/pricing".into(),
            routes: vec![Route {
                name: "r".into(),
                matches: vec![],
                destinations: vec![dest(None, 90), dest(Some("v1"), 10)],
                timeout: None,
                retry: RetryPolicy::istio_default(),
                fault: None,
                direct_response: None,
                response_headers: None,
            }],
            tcp_routes: vec![],
        }),
    );
    snap.namespaces.insert(
        "shop".into(),
        NamespaceView {
            virtual_hosts: BTreeMap::new(),
            clusters: BTreeMap::from([(HOST.to_string(), clusters(7))]),
        },
    );
    State::next(&State::empty(), Arc::new(snap))
}

/// Routes one request from a client in `ns` on `port`; returns the cluster's port and its
/// connection limit (which DestinationRule applied).
fn route_one(state: &State, req: &http::Request<()>, ns: &str, port: u16, draw: u32) -> (u16, u32) {
    let viewer = state.viewer(ns);
    assert!(state.sees(viewer, HOST));
    let (vh, plans) = state.routes(viewer, HOST, port).expect("a VirtualService");
    let (idx, _, _) = route::select(vh, req, port, None).expect("a route");
    let dest = route::pick_destination(&plans[idx].destinations, |_| draw).expect("a destination");
    let up = state.upstream(viewer, &dest.cluster).expect("a cluster");
    (
        dest.cluster.port,
        up.spec.policy.connection_pool.max_connections,
    )
}

#[test]
fn routing_allocates_nothing() {
    let state = state();
    let req = http::Request::get("http://pricing:8080/").body(()).unwrap();
    // The answers are right...
    assert_eq!(route_one(&state, &req, "web", 80, 0), (80, 1));
    assert_eq!(route_one(&state, &req, "web", 8080, 95), (8080, 1));
    assert_eq!(route_one(&state, &req, "shop", 8080, 0), (8080, 7));
    // ...and come without allocating, for clients of either kind of namespace.
    let before = allocated();
    let mut seen = 0u64;
    for i in 0..1_000u32 {
        for ns in ["web", "shop"] {
            for port in [80, 8080] {
                let (p, limit) = route_one(&state, &req, ns, port, i % 100);
                seen += u64::from(p) + u64::from(limit);
            }
        }
    }
    let allocations = allocated() - before;
    assert!(seen > 0);
    assert_eq!(allocations, 0, "allocations while routing 4,000 requests");
    // The counter does count.
    let before = allocated();
    std::hint::black_box(Box::new(seen));
    assert!(allocated() > before);
}
