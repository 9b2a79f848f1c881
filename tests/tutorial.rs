//! The seed tutorial's steps 4-8, with its YAML verbatim (from `examples/tutorial/`) and its services'
//! settings (pricing: every 2nd call waits 3 s then answers 500; inventory: every 3rd call 500), the
//! proxy in-process in front of real fake services on loopback. Each test asserts the effect the
//! tutorial describes, as Envoy would produce it.

use sluice_tests::{endpoint_slice, join_all, to_service, tutorial_yaml, Mesh};
use std::time::Duration;

const MAX_TIME: Duration = Duration::from_secs(5);

struct App {
    mesh: Mesh,
    inventory_ports: Vec<u16>,
}

/// The tutorial's step 2: four services, frontend -> product -> pricing + inventory, all calls through
/// the proxy. The Service objects are the tutorial's files verbatim; the EndpointSlices (what
/// Kubernetes would make) point at the fake services' loopback ports.
async fn deploy() -> App {
    let mut mesh = Mesh::start().await;
    let frontend = mesh
        .fake_service("frontend", &[("UPSTREAM_URIS", "http://product")])
        .await;
    let product = mesh
        .fake_service(
            "product",
            &[("UPSTREAM_URIS", "http://pricing,http://inventory")],
        )
        .await;
    let pricing = mesh
        .fake_service(
            "pricing",
            &[
                ("ERROR_RATE", "0.4"),
                ("ERROR_TYPE", "delay"),
                ("ERROR_DELAY", "3s"),
            ],
        )
        .await;
    let inventory = mesh
        .fake_service(
            "inventory",
            &[
                ("ERROR_RATE", "0.3"),
                ("ERROR_TYPE", "http_error"),
                ("ERROR_CODE", "500"),
            ],
        )
        .await;
    for (name, port) in [
        ("frontend", frontend),
        ("product", product),
        ("pricing", pricing),
    ] {
        mesh.write(
            &format!("{name}.yaml"),
            &tutorial_yaml(&format!("{name}.yaml")),
        );
        mesh.write(
            &format!("{name}-endpoints.yaml"),
            &endpoint_slice(name, &[port]),
        );
    }
    mesh.write("inventory.yaml", &tutorial_yaml("inventory.yaml"));
    mesh.write(
        "inventory-endpoints.yaml",
        &endpoint_slice("inventory", &[inventory]),
    );
    mesh.reload();
    App {
        mesh,
        inventory_ports: vec![inventory],
    }
}

/// The tutorial's traffic generator, minus its 0.5 s pauses: `n` sequential requests to the frontend.
async fn sequential(mesh: &Mesh, n: usize) -> Vec<sluice_tests::Outcome> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(mesh.get("http://frontend/", MAX_TIME).await);
    }
    out
}

fn slowest(outcomes: &[sluice_tests::Outcome]) -> Duration {
    outcomes.iter().map(|o| o.elapsed).max().unwrap_or_default()
}

fn successes(outcomes: &[sluice_tests::Outcome]) -> usize {
    outcomes.iter().filter(|o| o.code() == 200).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step4_timeouts_bound_the_slow_pricing_call() {
    let mut app = deploy().await;
    // Without policy: every 2nd pricing call holds the whole chain for 3 s.
    let before = sequential(&app.mesh, 4).await;
    assert!(
        slowest(&before) >= Duration::from_millis(2900),
        "baseline slowest {:?}",
        slowest(&before)
    );

    app.mesh
        .write("timeout-config.yaml", &tutorial_yaml("timeout-config.yaml"));
    app.mesh.reload();
    let mut log = app.mesh.access_log();
    let after = sequential(&app.mesh, 4).await;
    let lines = log.drain().await;

    // pricing's `timeout: 1s` ends the slow call at 1 s with 504 UT, so nothing waits 3 s any more.
    let slow = slowest(&after);
    assert!(
        slow >= Duration::from_millis(950) && slow < Duration::from_millis(1800),
        "slowest {slow:?}"
    );
    let pricing: Vec<_> = to_service(&lines, "pricing").collect();
    let timed_out: Vec<_> = pricing
        .iter()
        .filter(|l| l.status == 504 && l.has_flag("UT"))
        .collect();
    assert_eq!(timed_out.len(), 2, "pricing calls: {pricing:#?}");
    assert!(
        timed_out
            .iter()
            .all(|l| (990..1300).contains(&l.duration_ms)),
        "{timed_out:#?}"
    );
    // No retries on a timed-out route by default (Istio's default retries only connect failures).
    assert!(pricing.iter().all(|l| l.attempts == 1), "{pricing:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step5_retries_turn_failures_into_successes() {
    let mut app = deploy().await;
    app.mesh
        .write("timeout-config.yaml", &tutorial_yaml("timeout-config.yaml"));
    app.mesh.reload();
    let timeouts_only = sequential(&app.mesh, 6).await;

    app.mesh.remove("timeout-config.yaml");
    app.mesh
        .write("retry-config.yaml", &tutorial_yaml("retry-config.yaml"));
    app.mesh.reload();
    let mut log = app.mesh.access_log();
    let with_retries = sequential(&app.mesh, 6).await;
    let lines = log.drain().await;

    assert!(
        successes(&timeouts_only) < 6,
        "timeouts alone leave failures"
    );
    assert_eq!(successes(&with_retries), 6, "{with_retries:#?}");
    // pricing's slow call is cut by perTryTimeout 0.5 s and retried (4 tries allowed: attempts 3 =
    // 3 retries); inventory's 500 is retried under `5xx`.
    let pricing_retried: Vec<_> = to_service(&lines, "pricing")
        .filter(|l| l.attempts > 1)
        .collect();
    let inventory_retried: Vec<_> = to_service(&lines, "inventory")
        .filter(|l| l.attempts > 1)
        .collect();
    assert!(
        !pricing_retried.is_empty() && !inventory_retried.is_empty(),
        "{lines:#?}"
    );
    assert!(
        pricing_retried
            .iter()
            .all(|l| l.status == 200 && (500..1200).contains(&l.duration_ms)),
        "{pricing_retried:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step6_circuit_breaker_turns_overload_into_fast_503s() {
    let mut app = deploy().await;
    app.mesh
        .write("retry-config.yaml", &tutorial_yaml("retry-config.yaml"));
    app.mesh.write(
        "circuit-breaker.yaml",
        &tutorial_yaml("circuit-breaker.yaml"),
    );
    app.mesh.reload();
    let mut log = app.mesh.access_log();

    // The high-traffic generator: 20 in parallel (here 60 requests rather than 200).
    let mesh = &app.mesh;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let batch = (0..20).map(|_| mesh.get("http://frontend/", MAX_TIME));
        outcomes.extend(join_all(batch).await);
    }
    let lines = log.drain().await;

    // The tutorial's classification: a 500 at the frontend counts as "circuit open".
    let cb_open = outcomes.iter().filter(|o| o.code() == 500).count();
    assert!(
        cb_open > outcomes.len() / 2,
        "circuit open {cb_open} of {}",
        outcomes.len()
    );
    let overflowed: Vec<_> = lines.iter().filter(|l| l.has_flag("UO")).collect();
    assert!(!overflowed.is_empty(), "no UO in {lines:#?}");
    // Overflow is answered at once and never retried (Envoy does not retry overflow); an overflow can
    // still end a request whose earlier attempts ran into the 0.5 s perTryTimeout.
    let slow: Vec<_> = overflowed
        .iter()
        .filter(|l| l.status != 503 || l.duration_ms >= 200 + 600 * u64::from(l.attempts - 1))
        .collect();
    assert!(slow.is_empty(), "{slow:#?}");
    for svc in ["pricing", "inventory"] {
        let stats = mesh
            .cluster(&format!("outbound|80||{svc}.default.svc.cluster.local"))
            .stats();
        assert!(stats.upstream_rq_pending_overflow > 0, "{svc}: {stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step7_outlier_detection_ejects_the_failing_instance() {
    let mut app = deploy().await;
    // `kubectl scale deployment inventory --replicas=3` plus the always-failing instance.
    for _ in 0..2 {
        let port = app
            .mesh
            .fake_service(
                "inventory",
                &[
                    ("ERROR_RATE", "0.3"),
                    ("ERROR_TYPE", "http_error"),
                    ("ERROR_CODE", "500"),
                ],
            )
            .await;
        app.inventory_ports.push(port);
    }
    let failing = app
        .mesh
        .fake_service(
            "inventory",
            &[
                ("ERROR_RATE", "0.9"),
                ("ERROR_TYPE", "http_error"),
                ("ERROR_CODE", "500"),
            ],
        )
        .await;
    app.inventory_ports.push(failing);
    app.mesh.write(
        "inventory-endpoints.yaml",
        &endpoint_slice("inventory", &app.inventory_ports),
    );
    app.mesh.write(
        "outlier-detection.yaml",
        &tutorial_yaml("outlier-detection.yaml"),
    );
    app.mesh.reload();

    let mut log = app.mesh.access_log();
    for _ in 0..60 {
        app.mesh.get("http://inventory/", MAX_TIME).await;
    }
    let lines = log.drain().await;

    let failing_addr = format!("127.0.0.1:{failing}");
    let sent_to_failing = lines.iter().filter(|l| l.upstream == failing_addr).count();
    // It fails every call (int(1/0.9) = 1), so its 5th consecutive 5xx ejects it for 30 s at once.
    assert_eq!(
        sent_to_failing, 5,
        "requests to the failing instance: {lines:#?}"
    );
    let hosts = app
        .mesh
        .cluster("outbound|80||inventory.default.svc.cluster.local")
        .hosts();
    let failing_host = hosts
        .iter()
        .find(|h| h.addr.to_string() == failing_addr)
        .unwrap();
    assert!(
        failing_host.ejected && failing_host.ejections == 1,
        "{failing_host:?}"
    );
    let left = failing_host.ejected_for.unwrap();
    assert!(
        left > Duration::from_secs(20) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    // The healthy replicas fail only every 3rd call: never 5 in a row, never ejected.
    assert_eq!(hosts.iter().filter(|h| h.ejected).count(), 1, "{hosts:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step8_fault_injection_delays_and_aborts_a_share_of_requests() {
    let mut app = deploy().await;
    app.mesh.write(
        "fault-injection.yaml",
        &tutorial_yaml("fault-injection.yaml"),
    );
    app.mesh.reload();
    let mut log = app.mesh.access_log();
    let mesh = &app.mesh;

    let pricing = join_all((0..200).map(|_| mesh.get("http://pricing/", MAX_TIME))).await;
    let inventory = join_all((0..100).map(|_| mesh.get("http://inventory/", MAX_TIME))).await;
    let lines = log.drain().await;

    // pricing: abort 5% with 500 (flag FI, the upstream never sees it). Binomial(200, 0.05).
    let aborted: Vec<_> = to_service(&lines, "pricing")
        .filter(|l| l.has_flag("FI"))
        .collect();
    assert!(
        (1..=30).contains(&aborted.len()),
        "aborted {}",
        aborted.len()
    );
    assert!(
        aborted.iter().all(|l| l.status == 500 && l.upstream == "-"),
        "{aborted:#?}"
    );
    assert_eq!(
        pricing
            .iter()
            .filter(|o| o.body.as_ref() == b"fault filter abort")
            .count(),
        aborted.len()
    );
    // inventory: delay 10% by 2 s (flag DI). Binomial(100, 0.1).
    let delayed: Vec<_> = to_service(&lines, "inventory")
        .filter(|l| l.has_flag("DI"))
        .collect();
    assert!(
        (1..=30).contains(&delayed.len()),
        "delayed {}",
        delayed.len()
    );
    assert!(
        delayed.iter().all(|l| l.duration_ms >= 2000),
        "{delayed:#?}"
    );
    let slow = inventory
        .iter()
        .filter(|o| o.elapsed >= Duration::from_secs(2))
        .count();
    assert_eq!(slow, delayed.len());
}
