//! Istio semantics pinned: override order of traffic policies (pilot `MergeSubsetTrafficPolicy`),
//! DestinationRule merging and VirtualService precedence (`sortConfigByCreationTime`), retries
//! (`retry.ConvertPolicy`), faults (`TranslateFault`), registry, enrollment and endpoints.

use sluice_config::{build, parse_str, BuildOptions, Problem};
use sluice_policy::{ClusterKey, LoadBalancer, RetryPolicy, Snapshot, StringMatch};
use std::time::Duration;

fn snap(yaml: &str) -> (Snapshot, Vec<Problem>) {
    let parsed = parse_str("t.yaml", yaml);
    assert!(
        parsed.problems.iter().all(|p| !p.is_error()),
        "{:#?}",
        parsed.problems
    );
    let (s, mut problems) = build(&parsed.objects, &BuildOptions::default());
    problems.extend(parsed.problems);
    assert!(problems.iter().all(|p| !p.is_error()), "{problems:#?}");
    (s, problems)
}

const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: pricing\nspec:\n  ports:\n  - {name: http, port: 80, targetPort: 9090}\n  - {name: http-admin, port: 81, targetPort: admin}\n  selector: {app: pricing}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p1\n  labels: {app: pricing, version: v1}\nspec:\n  containers:\n  - name: c\n    ports:\n    - {name: admin, containerPort: 9191}\nstatus:\n  podIP: 10.0.0.1\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p2\n  labels: {app: pricing, version: v2}\nstatus:\n  podIPs: [{ip: 10.0.0.2}]\n---\n";
const HOST: &str = "pricing.default.svc.cluster.local";

fn key(port: u16, subset: Option<&str>) -> ClusterKey {
    ClusterKey {
        host: HOST.into(),
        port,
        subset: subset.map(Into::into),
    }
}

#[test]
fn traffic_policy_override_order() {
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: pricing\n  trafficPolicy:\n    connectionPool: {tcp: {maxConnections: 10}}\n    outlierDetection: {consecutive5xxErrors: 7}\n    portLevelSettings:\n    - port: {number: 80}\n      loadBalancer: {simple: RANDOM}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy:\n      connectionPool: {http: {http2MaxRequests: 3}}\n  - name: v2\n    labels: {version: v2}\n    trafficPolicy:\n      loadBalancer: {simple: ROUND_ROBIN}\n      portLevelSettings:\n      - port: {number: 81}\n        outlierDetection: {consecutiveGatewayErrors: 2}\n";
    let (s, _) = snap(&format!("{SVC}{dr}"));
    let p = |port, subset| s.clusters[&key(port, subset)].policy.clone();
    // Port-level replaces every section; what it lacks falls back to defaults, not to the top level.
    let p80 = p(80, None);
    assert_eq!(p80.load_balancer, LoadBalancer::Random);
    assert_eq!(p80.connection_pool.max_connections, u32::MAX);
    assert_eq!(p80.outlier_detection, None);
    let p81 = p(81, None);
    assert_eq!(p81.connection_pool.max_connections, 10);
    assert_eq!(p81.outlier_detection.unwrap().consecutive_5xx, Some(7));
    assert_eq!(p81.load_balancer, LoadBalancer::LeastRequest);
    // A subset section replaces the whole section (no field merge), others are inherited.
    let v1_81 = p(81, Some("v1"));
    assert_eq!(v1_81.connection_pool.max_requests, 3);
    assert_eq!(v1_81.connection_pool.max_connections, u32::MAX);
    assert_eq!(v1_81.outlier_detection.unwrap().consecutive_5xx, Some(7));
    // ...and inherits from the top level's port-level entry for its port.
    let v1_80 = p(80, Some("v1"));
    assert_eq!(v1_80.load_balancer, LoadBalancer::Random);
    assert_eq!(v1_80.outlier_detection, None);
    // A subset's own port-level entry replaces everything for that port.
    let v2_81 = p(81, Some("v2"));
    assert_eq!(
        v2_81
            .outlier_detection
            .as_ref()
            .unwrap()
            .consecutive_gateway_errors,
        Some(2)
    );
    assert_eq!(v2_81.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(v2_81.connection_pool.max_connections, u32::MAX);
    assert_eq!(p(80, Some("v2")).load_balancer, LoadBalancer::RoundRobin);
    // Subset endpoints are filtered by labels; named targetPort resolves per pod.
    assert_eq!(s.clusters[&key(80, Some("v1"))].endpoints.len(), 1);
    assert_eq!(s.clusters[&key(80, None)].endpoints.len(), 2);
    let admin = &s.clusters[&key(81, None)].endpoints;
    assert_eq!(admin.len(), 1, "p2 has no container port named admin");
    assert_eq!(admin[0].addr, "10.0.0.1:9191".parse().unwrap());
}

#[test]
fn outlier_detection_translation() {
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: pricing\n  trafficPolicy:\n    outlierDetection:\n      consecutiveErrors: 4\n      consecutive5xxErrors: 6\n      maxEjectionPercent: 0\n      splitExternalLocalOriginErrors: true\n";
    let (s, _) = snap(&format!("{SVC}{dr}"));
    let od = s.clusters[&key(80, None)]
        .policy
        .outlier_detection
        .clone()
        .unwrap();
    // consecutiveErrors is ignored (Istio 1.7+); consecutive5xxErrors is what counts.
    assert_eq!(
        (od.consecutive_gateway_errors, od.consecutive_5xx),
        (None, Some(6))
    );
    assert_eq!(od.max_ejection_percent, 10, "0 keeps Envoy's default");
    assert_eq!(od.consecutive_local_origin_failures, Some(5));
    let dr0 = dr
        .replace("consecutive5xxErrors: 6", "consecutive5xxErrors: 0")
        .replace("      consecutiveErrors: 4\n", "");
    let (s, _) = snap(&format!("{SVC}{dr0}"));
    assert_eq!(
        s.clusters[&key(80, None)]
            .policy
            .outlier_detection
            .clone()
            .unwrap()
            .consecutive_5xx,
        None
    );
}

#[test]
fn destination_rules_merge_like_istio() {
    let drs = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: b, creationTimestamp: \"2024-01-01T00:00:00Z\"}\nspec:\n  host: pricing.default.svc.cluster.local\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}}}\n  subsets: [{name: v1, labels: {version: v2}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a, creationTimestamp: \"2024-06-01T00:00:00Z\"}\nspec:\n  host: pricing\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 9}}}\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n";
    let (s, problems) = snap(&format!("{SVC}{drs}"));
    assert_eq!(
        s.clusters[&key(80, None)]
            .policy
            .connection_pool
            .max_connections,
        2,
        "the oldest wins"
    );
    let v1 = &s.clusters[&key(80, Some("v1"))];
    assert_eq!(
        v1.endpoints[0].pod.as_deref(),
        Some("default/p2"),
        "first definition of v1 wins"
    );
    assert!(
        s.clusters.contains_key(&key(80, Some("v2"))),
        "subsets are merged"
    );
    assert!(problems
        .iter()
        .any(|p| p.reason.contains("duplicate subset \"v1\"")));
}

#[test]
fn oldest_virtual_service_wins_a_host() {
    let vs = |name: &str, ts: &str, t: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, creationTimestamp: \"{ts}\"}}\nspec:\n  hosts: [pricing]\n  http:\n  - route: [{{destination: {{host: pricing, port: {{number: 80}}}}}}]\n    timeout: {t}\n---\n")
    };
    let (s, problems) = snap(&format!(
        "{SVC}{}{}",
        vs("a", "2024-02-01T00:00:00Z", "1s"),
        vs("z", "2024-01-01T00:00:00Z", "2s")
    ));
    assert_eq!(s.virtual_hosts[HOST].name, "default/z");
    assert_eq!(
        s.virtual_hosts[HOST].routes[0].timeout,
        Some(Duration::from_secs(2))
    );
    let w = problems.iter().find(|p| p.field == "spec.hosts").unwrap();
    assert_eq!(w.object.as_deref(), Some("VirtualService default/a"));
    assert!(w.reason.contains("VirtualService default/z"));
    // Same creation time: by name.
    let (s, _) = snap(&format!("{SVC}{}{}", vs("b", "", "1s"), vs("a", "", "2s")));
    assert_eq!(s.virtual_hosts[HOST].name, "default/a");
}

#[test]
fn retries_as_convert_policy() {
    let vs = |retries: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [pricing]\n  http:\n  - route: [{{destination: {{host: pricing, port: {{number: 80}}}}}}]\n{retries}")
    };
    let retry = |r: &str| {
        snap(&format!("{SVC}{}", vs(r))).0.virtual_hosts[HOST].routes[0]
            .retry
            .clone()
    };
    assert_eq!(retry(""), RetryPolicy::istio_default());
    assert_eq!(retry("    retries: {attempts: 0}\n").num_retries, 0);
    let r = retry("    retries: {attempts: 5}\n");
    assert_eq!(
        (r.num_retries, r.retry_on.clone()),
        (5, RetryPolicy::istio_default().retry_on)
    );
    let r = retry("    retries: {attempts: 1, retryOn: \"503\", backoff: 100ms}\n");
    assert_eq!(r.retry_on.retriable_status_codes, vec![503]);
    assert!(!r.retry_on.connect_failure);
    assert_eq!(
        (r.backoff_base, r.backoff_max),
        (Duration::from_millis(100), Duration::from_secs(1))
    );
}

#[test]
fn faults_as_translate_fault() {
    let vs = |fault: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: v}}\nspec:\n  hosts: [pricing]\n  http:\n  - route: [{{destination: {{host: pricing, port: {{number: 80}}}}}}]\n    timeout: 3s\n    fault:\n{fault}")
    };
    let route = |f: &str| snap(&format!("{SVC}{}", vs(f))).0.virtual_hosts[HOST].routes[0].clone();
    // No percentage: Envoy's zero default, i.e. never (Istio docs: "If not specified, no request").
    let r = route("      delay: {fixedDelay: 1s}\n      abort: {httpStatus: 503}\n");
    let f = r.fault.clone().unwrap();
    assert_eq!(f.delay.unwrap().percentage, 0.0);
    assert_eq!(
        f.abort.unwrap(),
        sluice_policy::FaultAbort::Http {
            status: 503,
            percentage: 0.0
        }
    );
    // Retries and timeout stay on the route, as pilot leaves them.
    assert_eq!(r.timeout, Some(Duration::from_secs(3)));
    assert_eq!(r.retry, RetryPolicy::istio_default());
    // Legacy integer percent.
    let r = route("      delay: {fixedDelay: 1s, percent: 30}\n");
    assert_eq!(r.fault.unwrap().delay.unwrap().percentage, 30.0);
}

#[test]
fn matches_weights_and_wildcards() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [pricing, \"*.example.com\", \"*\", \"*.api.example.com\"]\n  http:\n  - match:\n    - headers: {X-User: {exact: bob}, x-canary: {}}\n      uri: {prefix: /api}\n      ignoreUriCase: true\n    - gateways: [some-gateway]\n    route:\n    - {destination: {host: pricing, port: {number: 80}, subset: v1}, weight: 80}\n    - {destination: {host: pricing, port: {number: 80}, subset: v2}, weight: 20}\n    - {destination: {host: pricing, port: {number: 80}}, weight: 0}\n  - route: [{destination: {host: pricing}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: pricing\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n";
    let (s, problems) = snap(&format!("{SVC}{vs}"));
    let vh = &s.virtual_hosts[HOST];
    let r0 = &vh.routes[0];
    assert_eq!(r0.name, "default/v.0");
    assert_eq!(
        r0.matches.len(),
        1,
        "the gateway-only match does not apply to mesh traffic"
    );
    let m = &r0.matches[0];
    assert!(m.ignore_uri_case && matches!(&m.uri, Some(StringMatch::Prefix(p)) if p == "/api"));
    assert!(m.headers.iter().any(|h| h.name == "x-user"));
    assert!(m
        .headers
        .iter()
        .any(|h| h.name == "x-canary" && matches!(h.value, StringMatch::Present)));
    assert!(problems
        .iter()
        .any(|p| p.field == "spec.http[0].match[0].headers.X-User"));
    let weights: Vec<u32> = r0.destinations.iter().map(|d| d.weight).collect();
    assert_eq!(weights, vec![80, 20]);
    // Port omitted: the port the request came in on (resolved per port by the proxy); the
    // Service has both of its own ports, so nothing to warn about.
    assert_eq!(
        vh.routes[1].destinations[0].cluster.port,
        sluice_policy::INCOMING_PORT
    );
    assert!(
        !problems
            .iter()
            .any(|p| p.field.ends_with("destination.port")),
        "{problems:#?}"
    );
    let order: Vec<&str> = s.wildcard_hosts.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(order, vec!["*.api.example.com", "*.example.com", "*"]);
    assert!(s.virtual_host("x.api.example.com").is_some());
}

#[test]
fn enrollment_and_endpoint_slices() {
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {istio.io/dataplane-mode: ambient}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: shop}\nstatus: {podIP: 10.1.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: shop, labels: {istio.io/dataplane-mode: none, version: v9}}\nstatus: {podIP: 10.1.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: c, labels: {istio.io/dataplane-mode: ambient}}\nstatus: {podIP: 10.1.0.3}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: d}\nstatus: {podIP: 10.1.0.4}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: cart, namespace: shop}\nspec:\n  clusterIP: 10.96.1.1\n  ports: [{name: http, port: 8080}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: cart-abc\n  namespace: shop\n  labels: {kubernetes.io/service-name: cart}\naddressType: IPv4\nports: [{name: http, port: 9000}, {name: other, port: 1}]\nendpoints:\n- addresses: [10.1.0.1]\n  targetRef: {kind: Pod, name: a}\n- addresses: [10.1.0.2]\n  conditions: {ready: true}\n- addresses: [10.1.0.9]\n  conditions: {ready: false}\n";
    let (s, _) = snap(yaml);
    let enrolled = |k: &str| s.workloads[k].enrolled;
    assert!(enrolled("shop/a"));
    assert!(!enrolled("shop/b"), "pod label none opts out");
    assert!(enrolled("default/c"));
    assert!(!enrolled("default/d"));
    let svc = s
        .service_by_vip("10.96.1.1".parse().unwrap(), 8080)
        .unwrap();
    assert_eq!(svc.hostname, "cart.shop.svc.cluster.local");
    let c = &s.clusters[&ClusterKey {
        host: svc.hostname.clone(),
        port: 8080,
        subset: None,
    }];
    let addrs: Vec<String> = c.endpoints.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(addrs, vec!["10.1.0.1:9000", "10.1.0.2:9000"]);
    // Labels come from the pod, found by targetRef or by IP.
    assert_eq!(
        c.endpoints[1].labels.get("version").map(String::as_str),
        Some("v9")
    );
}

/// A Service without `clusterIP` gets one from 10.96.0.0/12, as the API server would: stable for
/// the same namespace/name, distinct per Service, never one a Service set explicitly; headless
/// (`None`) stays without.
#[test]
fn services_without_cluster_ip_get_one_allocated() {
    let svc = |name: &str, ip: Option<&str>| {
        let ip = ip
            .map(|ip| format!("  clusterIP: {ip}\n"))
            .unwrap_or_default();
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n{ip}  ports:\n  - {{name: http, port: 80}}\n---\n")
    };
    let yaml: String = ["a", "b", "c", "d", "e", "f"]
        .iter()
        .map(|n| svc(n, None))
        .chain([
            svc("fixed", Some("10.96.0.50")),
            svc("headless", Some("None")),
        ])
        .collect();
    let (s, _) = snap(&yaml);
    let ip = |name: &str| {
        s.services[&format!("{name}.default.svc.cluster.local")]
            .cluster_ips
            .clone()
    };
    let cidr = |ip: &std::net::IpAddr| match ip {
        std::net::IpAddr::V4(v4) => v4.octets()[0] == 10 && (96..112).contains(&v4.octets()[1]),
        _ => false,
    };
    let mut seen = std::collections::BTreeSet::new();
    for name in ["a", "b", "c", "d", "e", "f"] {
        let ips = ip(name);
        assert_eq!(ips.len(), 1, "{name}: {ips:?}");
        assert!(cidr(&ips[0]), "{name}: {ips:?} outside 10.96.0.0/12");
        assert!(seen.insert(ips[0]), "{name}: {ips:?} given twice");
        assert_eq!(
            s.service_by_vip(ips[0], 80).map(|v| v.name.as_str()),
            Some(name)
        );
    }
    assert_eq!(
        ip("fixed"),
        vec!["10.96.0.50".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(!seen.contains(&"10.96.0.50".parse().unwrap()));
    assert!(ip("headless").is_empty());
    // Stable: the same input allocates the same addresses; adding a Service moves no other.
    let (again, _) = snap(&format!("{yaml}{}", svc("g", None)));
    for name in ["a", "b", "c", "d", "e", "f"] {
        assert_eq!(
            again.services[&format!("{name}.default.svc.cluster.local")].cluster_ips,
            ip(name)
        );
    }
}

#[test]
fn direct_response_and_response_headers() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [pricing]\n  http:\n  - match: [{uri: {exact: /ok}}]\n    directResponse:\n      status: 200\n      body: {string: ok}\n    headers:\n      response:\n        set: {Content-Type: application/json}\n        add: {x-served-by: sluice}\n        remove: [x-internal]\n  - match: [{uri: {exact: /bin}}]\n    directResponse:\n      status: 503\n      body: {bytes: AAECAw==}\n  - match: [{uri: {exact: /empty}}]\n    directResponse: {status: 204}\n  - route:\n    - destination: {host: pricing, port: {number: 80}}\n    headers:\n      response:\n        set: {x-route: rest}\n";
    let (s, problems) = snap(&format!("{SVC}{vs}"));
    // SVC's own warning (a pod without the named port) only.
    assert!(
        problems
            .iter()
            .all(|p| p.field == "spec.ports[1].targetPort"),
        "{problems:#?}"
    );
    let routes = &s.virtual_hosts[HOST].routes;
    let ok = routes[0].direct_response.as_ref().unwrap();
    assert_eq!((ok.status, &ok.body[..]), (200, &b"ok"[..]));
    assert!(routes[0].destinations.is_empty());
    let ops = routes[0].response_headers.as_ref().unwrap();
    assert_eq!(
        ops.set,
        vec![("content-type".to_string(), "application/json".to_string())]
    );
    assert_eq!(
        ops.add,
        vec![("x-served-by".to_string(), "sluice".to_string())]
    );
    assert_eq!(ops.remove, vec!["x-internal".to_string()]);
    let bin = routes[1].direct_response.as_ref().unwrap();
    assert_eq!((bin.status, &bin.body[..]), (503, &[0u8, 1, 2, 3][..]));
    let empty = routes[2].direct_response.as_ref().unwrap();
    assert_eq!((empty.status, empty.body.len()), (204, 0));
    assert!(routes[3].direct_response.is_none());
    assert_eq!(
        routes[3].response_headers.as_ref().unwrap().set,
        vec![("x-route".to_string(), "rest".to_string())]
    );
}

#[test]
fn tcp_routes_and_tcp_timeouts() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [pricing]\n  tcp:\n  - match:\n    - {port: 81, destinationSubnets: [10.96.0.0/12, 10.0.0.1], sourceLabels: {app: batch}, sourceNamespace: shop}\n    - {gateways: [shop/gw]}\n    route:\n    - {destination: {host: pricing, port: {number: 81}, subset: v1}, weight: 80}\n    - {destination: {host: pricing, port: {number: 81}, subset: v2}, weight: 20}\n  - match:\n    - {gateways: [shop/gw]}\n    route:\n    - destination: {host: pricing}\n  - route:\n    - destination: {host: pricing, port: {number: 80}}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: pricing\n  trafficPolicy:\n    connectionPool:\n      tcp: {idleTimeout: 30s, maxConnectionDuration: 1h}\n    portLevelSettings:\n    - port: {number: 81}\n      connectionPool:\n        tcp: {idleTimeout: 0s}\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n";
    let (s, problems) = snap(&format!("{SVC}{vs}"));
    // The rule bound only to a gateway is left out, with a warning.
    assert!(
        problems
            .iter()
            .any(|p| p.field == "spec.tcp[1].match" && p.reason.contains("other than mesh")),
        "{problems:#?}"
    );
    let tcp = &s.virtual_hosts[HOST].tcp_routes;
    assert_eq!(tcp.len(), 2);
    // The gateway-only match entry of the first rule is dropped; the mesh one stays.
    assert_eq!(tcp[0].matches.len(), 1);
    let m = &tcp[0].matches[0];
    assert_eq!(m.port, Some(81));
    assert_eq!(
        m.destination_subnets
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["10.96.0.0/12", "10.0.0.1/32"]
    );
    assert_eq!(
        m.source_labels.get("app").map(String::as_str),
        Some("batch")
    );
    assert_eq!(m.source_namespace.as_deref(), Some("shop"));
    let dests: Vec<_> = tcp[0]
        .destinations
        .iter()
        .map(|d| (d.cluster.clone(), d.weight))
        .collect();
    assert_eq!(
        dests,
        [(key(81, Some("v1")), 80), (key(81, Some("v2")), 20)]
    );
    assert!(tcp[1].matches.is_empty());
    assert_eq!(tcp[1].destinations[0].cluster, key(80, None));
    // Istio's TCP proxy defaults: 1 h idle, no duration limit; `0s` turns the idle timeout off.
    let pool = |port, subset| {
        s.clusters[&key(port, subset)]
            .policy
            .connection_pool
            .clone()
    };
    assert_eq!(
        pool(80, None).tcp_idle_timeout,
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        pool(80, Some("v1")).max_connection_duration,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(pool(81, None).tcp_idle_timeout, None);
    assert_eq!(pool(81, None).max_connection_duration, None);
    let default = sluice_policy::ConnectionPool::default();
    assert_eq!(default.tcp_idle_timeout, Some(Duration::from_secs(3600)));
    assert_eq!(default.max_connection_duration, None);
}

#[test]
fn only_names_without_a_dot_are_short() {
    // Istio takes `pricing.default` as a full name: this VirtualService binds no Service, and the
    // warning says what the user probably meant.
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [pricing.default]\n  http:\n  - route: [{destination: {host: pricing.default}}]\n    timeout: 1s\n";
    let (s, problems) = snap(&format!("{SVC}{vs}"));
    assert!(
        !s.virtual_hosts.contains_key(HOST),
        "{:?}",
        s.virtual_hosts.keys()
    );
    assert!(s.virtual_hosts.contains_key("pricing.default"));
    let hint = problems
        .iter()
        .find(|p| p.field == "spec.http[0].route[0].destination.host")
        .expect("a warning on the destination");
    assert!(!hint.is_error());
    assert!(
        hint.reason.contains(&format!("did you mean {HOST}?")),
        "{}",
        hint.reason
    );

    // The short name binds as before.
    let (s, _) = snap(&format!(
        "{SVC}{}",
        vs.replace("pricing.default", "pricing")
    ));
    assert!(s.virtual_hosts.contains_key(HOST));
}

#[test]
fn source_labels_and_namespace_are_kept_for_the_proxy_to_match() {
    let vs = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\nspec:\n  hosts: [pricing]\n  http:\n  - match: [{sourceLabels: {app: batch}, sourceNamespace: shop}]\n    route: [{destination: {host: pricing}}]\n    timeout: 1s\n  - route: [{destination: {host: pricing}}]\n";
    let (s, problems) = snap(&format!("{SVC}{vs}"));
    assert!(
        !problems.iter().any(|p| p.field.contains("source")),
        "no longer unsupported: {problems:?}"
    );
    let m = &s.virtual_hosts[HOST].routes[0].matches[0];
    assert_eq!(
        m.source_labels.get("app").map(String::as_str),
        Some("batch")
    );
    assert_eq!(m.source_namespace.as_deref(), Some("shop"));

    let bad = vs.replace("sourceNamespace: shop", "sourceNamespace: Shop_1");
    let parsed = parse_str("t.yaml", &format!("{SVC}{bad}"));
    let (_, problems) = build(&parsed.objects, &BuildOptions::default());
    let err = problems
        .iter()
        .find(|p| p.is_error())
        .expect("an invalid namespace is an error");
    assert_eq!(err.field, "spec.http[0].match[0].sourceNamespace");
}
