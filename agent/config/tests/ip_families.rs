//! Endpoints a Service's selector yields from dual-stack pods follow the Service's IP families, as
//! the EndpointSlice controller makes one slice per family in `spec.ipFamilies` (defaulted from the
//! cluster IPs; a headless Service is single-stack in the primary family unless its
//! `ipFamilyPolicy` asks for dual stack).

use sluice_config::{build, parse_str, BuildOptions};
use sluice_policy::ClusterKey;

/// The endpoints of Service `name` (port 80) built from `service_spec` over two dual-stack pods.
fn endpoints(name: &str, service_spec: &str) -> Vec<String> {
    let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: web}}\nstatus:\n  podIP: 10.1.0.1\n  podIPs: [{ip: 10.1.0.1}, {ip: 'fd00::1'}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, labels: {app: web}}\nstatus:\n  podIP: 10.1.0.2\n  podIPs: [{ip: 10.1.0.2}, {ip: 'fd00::2'}]\n---\n";
    let yaml = format!(
        "{pods}apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: web}}\n  ports: [{{name: http, port: 80, targetPort: 9090}}]\n{service_spec}"
    );
    let parsed = parse_str("t.yaml", &yaml);
    assert!(
        parsed.problems.iter().all(|p| !p.is_error()),
        "{:#?}",
        parsed.problems
    );
    let (snap, _) = build(&parsed.objects, &BuildOptions::default());
    let key = ClusterKey {
        host: format!("{name}.default.svc.cluster.local"),
        port: 80,
        subset: None,
    };
    snap.clusters[&key]
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect()
}

#[test]
fn selector_endpoints_follow_the_service_ip_families() {
    let v4 = ["10.1.0.1:9090", "10.1.0.2:9090"];
    let v6 = ["[fd00::1]:9090", "[fd00::2]:9090"];
    // No families, no cluster IP: one is allocated from 10.96.0.0/12, so IPv4.
    assert_eq!(endpoints("plain", ""), v4);
    // Families from the cluster IP.
    assert_eq!(endpoints("by-ip", "  clusterIP: 10.96.5.5\n"), v4);
    assert_eq!(endpoints("by-ip6", "  clusterIP: fd00:96::5\n"), v6);
    // Families named.
    assert_eq!(
        endpoints("named6", "  clusterIP: fd00:96::6\n  ipFamilies: [IPv6]\n"),
        v6
    );
    let both: Vec<String> = endpoints(
        "dual",
        "  clusterIPs: [10.96.5.7, 'fd00:96::7']\n  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n",
    );
    assert_eq!(both.len(), 4, "{both:?}");
    assert!(v4.iter().chain(&v6).all(|a| both.contains(&a.to_string())));
    // Headless: the primary family (a pod's first address), unless dual stack is asked for.
    assert_eq!(endpoints("headless", "  clusterIP: None\n"), v4);
    assert_eq!(
        endpoints(
            "headless-dual",
            "  clusterIP: None\n  ipFamilyPolicy: PreferDualStack\n"
        )
        .len(),
        4
    );
}
