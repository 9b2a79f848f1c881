//! The seed documents' YAML: every document parses without errors, means what Istio means, and the
//! copies in `examples/` are verbatim.

mod common;

use common::{read_seeds, repo_dir, snippets, Snippet, BLOG_NAMES};
use sluice_config::{build, parse_str, validate_paths, BuildOptions, Object, Problem, Severity};
use sluice_policy::{ClusterKey, FaultAbort, RetryPolicy, Snapshot};
use std::time::Duration;

const PRICING: &str = "pricing.default.svc.cluster.local";
const INVENTORY: &str = "inventory.default.svc.cluster.local";
const GREETER: &str = "greeter-service.default.svc.cluster.local";

/// The blog never shows greeter-service's Service; this stands in for it (port 3000, three versions).
const GREETER_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: greeter-service\nspec:\n  ports:\n  - name: http\n    port: 3000\n  selector:\n    app: greeter-service\n";

fn build_texts(texts: &[(&str, &str)]) -> (Snapshot, Vec<Problem>) {
    let mut objects: Vec<Object> = Vec::new();
    let mut problems = Vec::new();
    for (name, text) in texts {
        let parsed = parse_str(name, text);
        problems.extend(parsed.problems);
        objects.extend(parsed.objects);
    }
    let (snap, more) = build(&objects, &BuildOptions::default());
    problems.extend(more);
    (snap, problems)
}

fn errors(problems: &[Problem]) -> Vec<String> {
    problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .map(|p| p.to_string())
        .collect()
}

fn key(host: &str, port: u16, subset: Option<&str>) -> ClusterKey {
    ClusterKey {
        host: host.to_string(),
        port,
        subset: subset.map(str::to_string),
    }
}

fn tutorial_file<'a>(snips: &'a [Snippet], name: &str) -> &'a str {
    &snips
        .iter()
        .find(|s| s.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("{name} not in the tutorial"))
        .text
}

/// Services of the tutorial plus one step.
fn tutorial_step(snips: &[Snippet], step: &str) -> (Snapshot, Vec<Problem>) {
    let mut texts: Vec<(&str, &str)> = [
        "frontend.yaml",
        "product.yaml",
        "pricing.yaml",
        "inventory.yaml",
    ]
    .iter()
    .map(|n| (*n, tutorial_file(snips, n)))
    .collect();
    texts.push((step, tutorial_file(snips, step)));
    let (snap, problems) = build_texts(&texts);
    assert!(errors(&problems).is_empty(), "{:#?}", errors(&problems));
    (snap, problems)
}

#[test]
fn every_seed_document_parses_without_errors() {
    let Some((tutorial, blog)) = read_seeds() else {
        return;
    };
    let tut = snippets(&tutorial);
    let blg = snippets(&blog);
    assert_eq!(
        tut.len(),
        14,
        "tutorial files: {:?}",
        tut.iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    assert_eq!(blg.len(), 6);
    for (i, s) in tut.iter().chain(&blg).enumerate() {
        let name = s.name.clone().unwrap_or_else(|| format!("blog-{i}"));
        let parsed = parse_str(&name, &s.text);
        let errs: Vec<_> = parsed.problems.iter().filter(|p| p.is_error()).collect();
        assert!(errs.is_empty(), "{name}: {errs:#?}");
        let unknown: Vec<_> = parsed
            .problems
            .iter()
            .filter(|p| p.reason == "unknown field")
            .collect();
        assert!(unknown.is_empty(), "{name}: {unknown:#?}");
        let objects: Vec<Object> = parsed.objects;
        let (_, problems) = build(&objects, &BuildOptions::default());
        assert!(
            errors(&problems).is_empty(),
            "{name}: {:#?}",
            errors(&problems)
        );
    }
}

#[test]
fn tutorial_means_what_istio_means() {
    let Some((tutorial, _)) = read_seeds() else {
        return;
    };
    let snips = snippets(&tutorial);

    // Services: port 80 -> targetPort 9090, no VirtualService = no virtual host.
    let (snap, _) = tutorial_step(&snips, "timeout-config.yaml");
    assert_eq!(snap.services[PRICING].ports[0].port, 80);
    assert_eq!(
        snap.services[PRICING].ports[0].app_protocol.as_deref(),
        Some("http")
    );
    let pricing = &snap.virtual_hosts[PRICING];
    assert_eq!(pricing.name, "default/pricing");
    let route = &pricing.routes[0];
    assert_eq!(route.timeout, Some(Duration::from_secs(1)));
    assert_eq!(route.destinations.len(), 1);
    // The destination names no port: it takes the port the request came in on (80 here).
    assert!(route.destinations[0].takes_incoming_port());
    assert_eq!(
        route.destinations[0].cluster_for(80),
        key(PRICING, 80, None)
    );
    assert_eq!(route.destinations[0].weight, 100);
    assert_eq!(route.retry, RetryPolicy::istio_default());
    assert_eq!(
        snap.virtual_hosts[INVENTORY].routes[0].timeout,
        Some(Duration::from_millis(500))
    );

    let (snap, _) = tutorial_step(&snips, "retry-config.yaml");
    let route = &snap.virtual_hosts[PRICING].routes[0];
    assert_eq!(route.timeout, Some(Duration::from_millis(2500)));
    assert_eq!(route.retry.num_retries, 3);
    assert_eq!(
        route.retry.per_try_timeout,
        Some(Duration::from_millis(500))
    );
    let on = &route.retry.retry_on;
    assert!(
        on.gateway_error && on.connect_failure && on.refused_stream && on.unavailable && on.five_xx
    );
    assert!(
        !on.reset && !on.cancelled && !on.retriable_4xx && on.retriable_status_codes.is_empty()
    );
    assert!(route.retry.avoid_previous_hosts);
    assert_eq!(
        snap.virtual_hosts[INVENTORY].routes[0].timeout,
        Some(Duration::from_secs(2))
    );

    let (snap, _) = tutorial_step(&snips, "circuit-breaker.yaml");
    for host in [PRICING, INVENTORY] {
        let p = &snap.clusters[&key(host, 80, None)].policy;
        assert_eq!(p.connection_pool.max_connections, 1);
        assert_eq!(p.connection_pool.max_pending_requests, 1);
        assert_eq!(p.connection_pool.max_requests_per_connection, 1);
        assert_eq!(p.connection_pool.max_requests, u32::MAX);
        assert_eq!(p.connection_pool.connect_timeout, Duration::from_secs(10));
        let od = p.outlier_detection.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx, Some(5));
        assert_eq!(od.consecutive_gateway_errors, None);
        assert_eq!(od.interval, Duration::from_secs(10));
        assert_eq!(od.base_ejection_time, Duration::from_secs(60));
        assert_eq!(od.max_ejection_percent, 100);
        assert_eq!(od.max_ejection_time, Duration::from_secs(300));
    }

    let (snap, _) = tutorial_step(&snips, "outlier-detection.yaml");
    let od = snap.clusters[&key(INVENTORY, 80, None)]
        .policy
        .outlier_detection
        .clone()
        .unwrap();
    assert_eq!((od.consecutive_5xx, od.max_ejection_percent), (Some(5), 50));
    assert_eq!(od.base_ejection_time, Duration::from_secs(30));

    let (snap, _) = tutorial_step(&snips, "fault-injection.yaml");
    let inv = &snap.virtual_hosts[INVENTORY].routes[0];
    let delay = inv.fault.as_ref().unwrap().delay.as_ref().unwrap();
    assert_eq!(
        (delay.fixed_delay, delay.percentage),
        (Duration::from_secs(2), 10.0)
    );
    assert!(inv.fault.as_ref().unwrap().abort.is_none());
    let pri = &snap.virtual_hosts[PRICING].routes[0];
    assert_eq!(
        pri.fault.as_ref().unwrap().abort,
        Some(FaultAbort::Http {
            status: 500,
            percentage: 5.0
        })
    );
    // Istio keeps the route's retry policy and timeout next to a fault (the fault filter runs before
    // the router, so injected faults themselves are never retried or timed out).
    assert_eq!(pri.retry, RetryPolicy::istio_default());
    assert_eq!(pri.timeout, None);

    // The gateway-bound VirtualService does not apply to mesh traffic, and says so.
    let (snap, problems) = tutorial_step(&snips, "gateway.yaml");
    assert!(snap.virtual_hosts.is_empty() && snap.wildcard_hosts.is_empty());
    assert!(problems.iter().any(|p| p.severity == Severity::Warning
        && p.object.as_deref() == Some("VirtualService default/frontend")
        && p.field == "spec.gateways"));
}

#[test]
fn blog_means_what_istio_means() {
    let Some((_, blog)) = read_seeds() else {
        return;
    };
    let snips = snippets(&blog);
    let step = |i: usize| {
        build_texts(&[
            ("greeter.yaml", GREETER_SERVICE),
            (BLOG_NAMES[i], &snips[i].text),
        ])
    };

    let (snap, problems) = step(0);
    assert!(errors(&problems).is_empty());
    for v in ["v1", "v2", "v3"] {
        assert!(snap.clusters.contains_key(&key(GREETER, 3000, Some(v))));
    }

    let (snap, _) = build_texts(&[
        ("greeter.yaml", GREETER_SERVICE),
        (BLOG_NAMES[0], &snips[0].text),
        (BLOG_NAMES[1], &snips[1].text),
    ]);
    let route = &snap.virtual_hosts[GREETER].routes[0];
    assert_eq!(route.timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        route.destinations[0].cluster,
        key(GREETER, 3000, Some("v3"))
    );

    let (snap, problems) = step(2);
    let route = &snap.virtual_hosts[GREETER].routes[0];
    assert_eq!(route.timeout, Some(Duration::from_secs(2)));
    assert_eq!(route.retry.num_retries, 3);
    assert_eq!(
        route.retry.per_try_timeout,
        Some(Duration::from_millis(500))
    );
    // No retryOn: Istio keeps its default conditions.
    assert_eq!(route.retry.retry_on, RetryPolicy::istio_default().retry_on);
    // Without the subsets DR, subset v3 is unknown: a warning, not an error.
    assert!(errors(&problems).is_empty());
    assert!(problems
        .iter()
        .any(|p| p.reason.contains("unknown subset \"v3\"")));

    let (snap, _) = step(3);
    let p = &snap.clusters[&key(GREETER, 3000, None)].policy;
    assert_eq!(p.connection_pool.max_requests, 10);
    assert_eq!(p.connection_pool.max_requests_per_connection, 5);
    let od = p.outlier_detection.as_ref().unwrap();
    // The deprecated consecutiveErrors is ignored, as by Istio since 1.7: Envoy's defaults.
    assert_eq!(od.consecutive_gateway_errors, None);
    assert_eq!(od.consecutive_5xx, Some(5));
    assert_eq!(od.base_ejection_time, Duration::from_secs(600));
    assert_eq!(od.max_ejection_percent, 10);
    assert!(snap.clusters.contains_key(&key(GREETER, 3000, Some("v1"))));
    assert_eq!(snap.clusters[&key(GREETER, 3000, Some("v2"))].policy, *p);

    let (snap, problems) = step(4);
    let p = &snap.clusters[&key(GREETER, 3000, None)].policy;
    assert_eq!(p.connection_pool.max_pending_requests, 1);
    assert_eq!(p.connection_pool.max_requests_per_connection, 1);
    let od = p.outlier_detection.as_ref().unwrap();
    assert_eq!(
        (od.consecutive_gateway_errors, od.consecutive_5xx),
        (None, Some(5))
    );
    // Said as istioctl analyze would: deprecated, and what applies instead.
    assert!(
        problems.iter().any(|p| !p.is_error()
            && p.field.ends_with("outlierDetection.consecutiveErrors")
            && p.reason.contains("ignored")),
        "{problems:?}"
    );
    assert_eq!(od.interval, Duration::from_secs(1));
    assert_eq!(od.base_ejection_time, Duration::from_secs(120));
    assert_eq!(od.max_ejection_percent, 100);

    let (snap, _) = step(5);
    let route = &snap.virtual_hosts[GREETER].routes[0];
    assert_eq!(route.destinations[0].cluster, key(GREETER, 3000, None));
    assert_eq!(route.retry, RetryPolicy::istio_default());
}

#[test]
fn examples_are_verbatim_and_valid() {
    let Some((tutorial, blog)) = read_seeds() else {
        return;
    };
    let examples = repo_dir().join("examples");
    let mut expected = Vec::new();
    for s in snippets(&tutorial) {
        expected.push((
            examples.join("tutorial").join(s.name.clone().unwrap()),
            s.text,
        ));
    }
    for (s, name) in snippets(&blog).into_iter().zip(BLOG_NAMES) {
        expected.push((examples.join("blog").join(name), s.text));
    }
    for (path, text) in &expected {
        let on_disk =
            std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(&on_disk, text, "{} differs from the seed", path.display());
    }
    let yaml_files = std::fs::read_dir(examples.join("tutorial"))
        .unwrap()
        .count()
        + std::fs::read_dir(examples.join("blog")).unwrap().count();
    assert_eq!(
        yaml_files,
        expected.len(),
        "examples/ holds files not from the seeds"
    );
    let problems = validate_paths(&[examples], &BuildOptions::default());
    assert!(errors(&problems).is_empty(), "{:#?}", errors(&problems));
}
