//! Istio semantics pinned for who sees what and where a destination without `port` goes:
//! `exportTo` on VirtualServices and DestinationRules (pilot `initVirtualServices`,
//! `SelectVirtualServices`, `setDestinationRules`, `destinationRule`), the Service
//! `networking.istio.io/exportTo` annotation (`IsServiceVisible`), and `GetDestinationCluster`
//! with the listener port of the route being built.

use sluice_config::{build, parse_str, BuildOptions, Problem};
use sluice_policy::{ClusterKey, ServiceExportTo, Snapshot, INCOMING_PORT};

fn snap(yaml: &str) -> (Snapshot, Vec<Problem>) {
    let parsed = parse_str("t.yaml", yaml);
    let (s, mut problems) = build(&parsed.objects, &BuildOptions::default());
    problems.extend(parsed.problems);
    assert!(problems.iter().all(|p| !p.is_error()), "{problems:#?}");
    (s, problems)
}

fn errors(yaml: &str) -> Vec<String> {
    let parsed = parse_str("t.yaml", yaml);
    let (_, mut problems) = build(&parsed.objects, &BuildOptions::default());
    problems.extend(parsed.problems);
    problems
        .iter()
        .filter(|p| p.is_error())
        .map(|p| {
            format!(
                "{} {}: {}",
                p.object.clone().unwrap_or_default(),
                p.field,
                p.reason
            )
        })
        .collect()
}

const PRICING: &str = "pricing.default.svc.cluster.local";

/// A Service `name` in `ns` with the given ports (`name: port` pairs).
fn service(name: &str, ns: &str, ports: &[(&str, u16)]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|(n, p)| format!("{{name: {n}, port: {p}}}"))
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  ports: [{}]\n---\n",
        ports.join(", ")
    )
}

/// A VirtualService `name` in `ns` for `hosts` whose `http:` and the rest of its spec are
/// `rest` (indented two spaces).
fn vs(name: &str, ns: &str, created: &str, hosts: &str, rest: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec:\n  hosts: {hosts}\n{rest}---\n")
}

fn dr(name: &str, ns: &str, created: &str, spec: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}, creationTimestamp: \"{created}\"}}\nspec:\n{spec}---\n")
}

fn key(host: &str, port: u16, subset: Option<&str>) -> ClusterKey {
    ClusterKey {
        host: host.into(),
        port,
        subset: subset.map(Into::into),
    }
}

/// Which VirtualService routes `host` for a client in `ns` (`-` for none).
fn vs_in(s: &Snapshot, ns: &str, host: &str) -> String {
    s.virtual_host_in(ns, host)
        .map_or("-".to_string(), |vh| vh.name.clone())
}

/// The connection limit of `host`'s port-80 cluster for a client in `ns`: which
/// DestinationRule it sees (each test rule sets a distinct one; `None`: no cluster).
fn max_conns_in(s: &Snapshot, ns: &str, host: &str) -> Option<u32> {
    s.cluster_in(ns, &key(host, 80, None))
        .map(|c| c.policy.connection_pool.max_connections)
}

fn pool(n: u32) -> String {
    format!("  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: {n}}}}}}}\n")
}

#[test]
fn a_destination_without_port_takes_the_incoming_port() {
    // A multi-port Service routed to itself without a port: one destination for every incoming
    // port, each port reaching its own cluster; nothing to warn about.
    let yaml = format!(
        "{}{}",
        service("pricing", "default", &[("http", 80), ("http-admin", 8080)]),
        vs(
            "p",
            "default",
            "",
            "[pricing]",
            "  http:\n  - route: [{destination: {host: pricing}}]\n"
        )
    );
    let (s, problems) = snap(&yaml);
    let d = &s.virtual_hosts[PRICING].routes[0].destinations[0];
    assert_eq!(d.cluster.port, INCOMING_PORT);
    assert_eq!(d.cluster_for(80), key(PRICING, 80, None));
    assert_eq!(d.cluster_for(8080), key(PRICING, 8080, None));
    assert!(s.clusters.contains_key(&key(PRICING, 8080, None)));
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn a_destination_lacking_the_incoming_port_is_warned_about() {
    // The VirtualService of `frontend` (ports 80, 8080) sends everything to `backend`
    // (port 80 only) without a port: Istio builds the route of listener 8080 to
    // `outbound|8080||backend...`, a cluster that does not exist (503 NC). Even a single-port
    // destination takes the incoming port in an HTTP route: istiod looks it up among the Services
    // of the listener's port only.
    let yaml = format!(
        "{}{}{}{}",
        service("frontend", "default", &[("http", 80), ("http-alt", 8080)]),
        service("backend", "default", &[("http", 80)]),
        service("single", "default", &[("http", 9000)]),
        vs(
            "f",
            "default",
            "",
            "[frontend]",
            "  http:\n  - match: [{uri: {prefix: /single}}]\n    route: [{destination: {host: single}}]\n  - route: [{destination: {host: backend}}]\n"
        )
    );
    let (s, problems) = snap(&yaml);
    let routes = &s.virtual_hosts["frontend.default.svc.cluster.local"].routes;
    assert_eq!(routes[1].destinations[0].cluster.port, INCOMING_PORT);
    assert_eq!(routes[0].destinations[0].cluster.port, INCOMING_PORT);
    let warned = |route: usize| {
        problems
            .iter()
            .find(|p| p.field == format!("spec.http[{route}].route[0].destination.port"))
            .map(|p| p.reason.clone())
            .unwrap_or_default()
    };
    assert!(
        warned(1).contains("service backend.default.svc.cluster.local has no port 8080")
            && warned(1).contains("503 (NC)"),
        "{problems:#?}"
    );
    assert!(warned(0).contains("has no port 80, 8080"), "{problems:#?}");
}

#[test]
fn tcp_destinations_without_port_follow_istio() {
    // `tcp[]`: a single-port destination gets its port; on a multi-port one the rule becomes one
    // rule per incoming port, each matching its port only.
    let yaml = format!(
        "{}{}{}",
        service("db", "default", &[("tcp", 5432), ("tcp-replica", 5433)]),
        service("one", "default", &[("tcp", 7000)]),
        vs(
            "d",
            "default",
            "",
            "[db]",
            "  tcp:\n  - match: [{sourceLabels: {app: batch}}]\n    route: [{destination: {host: one}}]\n  - match: [{port: 5433}]\n    route: [{destination: {host: db, subset: r}}]\n  - route: [{destination: {host: db}}]\n"
        ) + &dr("d", "default", "", "  host: db\n  subsets: [{name: r, labels: {role: replica}}]\n")
    );
    let (s, problems) = snap(&yaml);
    let db = "db.default.svc.cluster.local";
    let tcp = &s.virtual_hosts[db].tcp_routes;
    let summary: Vec<(Option<u16>, ClusterKey)> = tcp
        .iter()
        .map(|r| {
            (
                r.matches.first().and_then(|m| m.port),
                r.destinations[0].cluster.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (None, key("one.default.svc.cluster.local", 7000, None)),
            (Some(5433), key(db, 5433, Some("r"))),
            (Some(5432), key(db, 5432, None)),
            (Some(5433), key(db, 5433, None)),
        ]
    );
    assert_eq!(
        tcp[0].matches[0]
            .source_labels
            .get("app")
            .map(String::as_str),
        Some("batch")
    );
    assert!(
        !problems.iter().any(|p| p.field.contains("destination")),
        "{problems:#?}"
    );
}

#[test]
fn virtual_services_are_seen_where_exported() {
    // `p-all`: public (the default). `p-shop`: in shop, exported to shop only ("."), newer.
    // `p-web`: in ops, exported to web by name. A client takes its namespace's private ones
    // first, then those exported to it by name, then the public ones, whatever their age.
    let yaml = format!(
        "{}{}{}{}",
        service("pricing", "default", &[("http", 80)]),
        vs("p-all", "default", "2024-01-01T00:00:00Z", "[pricing]", "  http:\n  - route: [{destination: {host: pricing}}]\n"),
        vs("p-shop", "shop", "2024-06-01T00:00:00Z", "[pricing.default.svc.cluster.local]", "  exportTo: [.]\n  http:\n  - route: [{destination: {host: pricing.default.svc.cluster.local}}]\n"),
        vs("p-web", "ops", "2024-06-01T00:00:00Z", "[pricing.default.svc.cluster.local]", "  exportTo: [web]\n  http:\n  - route: [{destination: {host: pricing.default.svc.cluster.local}}]\n"),
    );
    let (s, problems) = snap(&yaml);
    assert_eq!(vs_in(&s, "shop", PRICING), "shop/p-shop");
    assert_eq!(vs_in(&s, "web", PRICING), "ops/p-web");
    assert_eq!(
        vs_in(&s, "ops", PRICING),
        "default/p-all",
        "not exported to ops"
    );
    assert_eq!(vs_in(&s, "default", PRICING), "default/p-all");
    assert_eq!(vs_in(&s, "anywhere", PRICING), "default/p-all");
    // The generic view (what the proxy's L4 path and /policy show) is the public one.
    assert_eq!(s.virtual_hosts[PRICING].name, "default/p-all");
    assert!(!s.namespaces.contains_key("anywhere"));
    // Overriding a public VirtualService for one's own namespace is what exportTo is for.
    assert!(
        !problems.iter().any(|p| p.field == "spec.hosts"),
        "{problems:#?}"
    );

    // Only a VirtualService exported to nobody but its own namespace: the others have none.
    let yaml = format!(
        "{}{}",
        service("pricing", "default", &[("http", 80)]),
        vs("p-shop", "shop", "", "[pricing.default.svc.cluster.local]", "  exportTo: [.]\n  http:\n  - route: [{destination: {host: pricing.default.svc.cluster.local}}]\n"),
    );
    let (s, _) = snap(&yaml);
    assert_eq!(vs_in(&s, "shop", PRICING), "shop/p-shop");
    assert_eq!(vs_in(&s, "default", PRICING), "-");
    assert!(s.virtual_hosts.is_empty());
}

#[test]
fn within_one_namespace_the_oldest_virtual_service_wins() {
    let private = "  exportTo: [.]\n  http:\n  - route: [{destination: {host: pricing.default.svc.cluster.local}}]\n";
    let yaml = format!(
        "{}{}{}",
        service("pricing", "default", &[("http", 80)]),
        vs(
            "new",
            "shop",
            "2024-06-01T00:00:00Z",
            "[pricing.default.svc.cluster.local]",
            private
        ),
        vs(
            "old",
            "shop",
            "2024-01-01T00:00:00Z",
            "[pricing.default.svc.cluster.local]",
            private
        ),
    );
    let (s, problems) = snap(&yaml);
    assert_eq!(vs_in(&s, "shop", PRICING), "shop/old");
    let w = problems.iter().find(|p| p.field == "spec.hosts").unwrap();
    assert_eq!(w.object.as_deref(), Some("VirtualService shop/new"));
    assert!(
        w.reason.contains("VirtualService shop/old") && w.reason.contains("namespace shop"),
        "{}",
        w.reason
    );
}

#[test]
fn destination_rules_client_namespace_then_service_namespace_then_root() {
    let yaml = format!(
        "{}{}{}{}{}{}",
        service("pricing", "default", &[("http", 80)]),
        service("cart", "shop", &[("http", 80)]),
        // The service's own namespace, public.
        dr(
            "d-default",
            "default",
            "",
            &format!("  host: pricing\n{}", pool(1))
        ),
        // A client namespace's own rule: it comes first there, though public and newer.
        dr(
            "d-web",
            "web",
            "2025-01-01T00:00:00Z",
            &format!("  host: pricing.default.svc.cluster.local\n{}", pool(2))
        ),
        // The root namespace: mesh-wide, after the service's namespace.
        dr(
            "d-root",
            "istio-system",
            "",
            &format!("  host: \"*.svc.cluster.local\"\n{}", pool(3))
        ),
        // Exported by name from a namespace that is neither the client's, the service's nor
        // the root: Istio never looks there for clients of other namespaces.
        dr(
            "d-ops",
            "ops",
            "",
            &format!(
                "  host: cart.shop.svc.cluster.local\n  exportTo: [web]\n{}",
                pool(4)
            )
        ),
    );
    let (s, _) = snap(&yaml);
    let cart = "cart.shop.svc.cluster.local";
    assert_eq!(max_conns_in(&s, "web", PRICING), Some(2));
    assert_eq!(max_conns_in(&s, "default", PRICING), Some(1));
    assert_eq!(max_conns_in(&s, "anywhere", PRICING), Some(1));
    // cart: no rule in shop, so the root namespace's wildcard; d-ops is never consulted for web
    // (neither web's own, nor shop's, nor the root's).
    assert_eq!(max_conns_in(&s, "anywhere", cart), Some(3));
    assert_eq!(max_conns_in(&s, "web", cart), Some(3));
    // Nor by ops' own clients: its exportTo leaves its own namespace out. It applies nowhere.
    assert_eq!(max_conns_in(&s, "ops", cart), Some(3));
    // The generic view's clusters are those of a namespace no object names.
    assert_eq!(
        s.clusters[&key(PRICING, 80, None)]
            .policy
            .connection_pool
            .max_connections,
        1
    );
}

#[test]
fn destination_rules_are_seen_where_exported() {
    let yaml = format!(
        "{}{}{}",
        service("pricing", "default", &[("http", 80)]),
        // Private to the service's namespace: others fall through to the root's.
        dr(
            "d-private",
            "default",
            "",
            &format!("  host: pricing\n  exportTo: [.]\n{}", pool(1))
        ),
        dr(
            "d-root",
            "istio-system",
            "",
            &format!(
                "  host: pricing.default.svc.cluster.local\n  exportTo: [web, istio-system]\n{}",
                pool(2)
            )
        ),
    );
    let (s, _) = snap(&yaml);
    assert_eq!(max_conns_in(&s, "default", PRICING), Some(1));
    assert_eq!(max_conns_in(&s, "web", PRICING), Some(2));
    assert_eq!(max_conns_in(&s, "istio-system", PRICING), Some(2));
    // Nobody else sees either: Envoy's defaults.
    assert_eq!(max_conns_in(&s, "anywhere", PRICING), Some(u32::MAX));
}

#[test]
fn destination_rules_merge_only_with_the_same_export_to() {
    // Istio's enhanced merge: rules for one host merge only while their exportTo is equal; kept
    // apart, the last (newest) one applies where both are seen.
    let yaml = format!(
        "{}{}{}{}",
        service("pricing", "default", &[("http", 80)]),
        dr(
            "a",
            "default",
            "2024-01-01T00:00:00Z",
            &format!(
                "  host: pricing\n{}  subsets: [{{name: v1, labels: {{v: '1'}}}}]\n",
                pool(1)
            )
        ),
        dr(
            "b",
            "default",
            "2024-02-01T00:00:00Z",
            "  host: pricing\n  subsets: [{name: v2, labels: {v: '2'}}]\n"
        ),
        dr(
            "c",
            "default",
            "2024-03-01T00:00:00Z",
            &format!("  host: pricing\n  exportTo: [.]\n{}", pool(3))
        ),
    );
    let (s, problems) = snap(&yaml);
    // Outside default: a and b merged (v1 and v2, a's policy).
    assert_eq!(max_conns_in(&s, "anywhere", PRICING), Some(1));
    assert!(s
        .cluster_in("anywhere", &key(PRICING, 80, Some("v2")))
        .is_some());
    // In default: c, the newest, stands apart and applies; it has no subsets.
    assert_eq!(max_conns_in(&s, "default", PRICING), Some(3));
    assert!(s
        .cluster_in("default", &key(PRICING, 80, Some("v1")))
        .is_none());
    assert!(problems
        .iter()
        .any(|p| p.object.as_deref() == Some("DestinationRule default/c")
            && p.field == "spec.exportTo"
            && p.reason.contains("keeps them apart")));
    assert!(problems
        .iter()
        .any(|p| p.object.as_deref() == Some("DestinationRule default/b")
            && p.reason
                .contains("DestinationRule default/a also configures host")));
}

#[test]
fn export_to_values_are_validated() {
    let base = service("pricing", "default", &[("http", 80)]);
    let e = errors(&format!(
        "{base}{}",
        vs(
            "v",
            "default",
            "",
            "[pricing]",
            "  exportTo: [\"~\"]\n  http:\n  - route: [{destination: {host: pricing}}]\n"
        )
    ));
    assert!(
        e.iter().any(|e| e.contains(
            "VirtualService default/v spec.exportTo[0]: exportTo ~ (none) is not allowed"
        )),
        "{e:?}"
    );
    let e = errors(&format!(
        "{base}{}",
        dr(
            "d",
            "default",
            "",
            "  host: pricing\n  exportTo: [\"*\", web]\n"
        )
    ));
    assert!(
        e.iter().any(|e| e.contains(
            "DestinationRule default/d spec.exportTo: cannot have both public (*) and non-public"
        )),
        "{e:?}"
    );
    let e = errors(&format!(
        "{base}{}",
        dr(
            "d",
            "default",
            "",
            "  host: pricing\n  exportTo: [Web.Shop]\n"
        )
    ));
    assert!(
        e.iter().any(|e| e.contains("valid DNS 1123 label")),
        "{e:?}"
    );
}

#[test]
fn the_service_export_to_annotation_is_read() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata:\n  name: a\n  annotations: {networking.istio.io/exportTo: \". , web\"}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: b\n  annotations: {networking.istio.io/exportTo: \"~\"}\nspec: {ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: c\nspec: {ports: [{port: 80}]}\n";
    let (s, _) = snap(yaml);
    let a = &s.services["a.default.svc.cluster.local"];
    assert_eq!(
        a.export_to,
        ServiceExportTo::Namespaces(vec!["default".into(), "web".into()])
    );
    assert!(a.visible_to("web") && a.visible_to("default") && !a.visible_to("shop"));
    assert!(!s.services["b.default.svc.cluster.local"].visible_to("default"));
    assert!(s.services["c.default.svc.cluster.local"].visible_to("shop"));
}
