//! Bad input gets a clear problem naming the file, the document, the field and the reason.

use sluice_config::{build, parse_str, BuildOptions, Problem, Severity};

fn problems(file: &str, text: &str) -> Vec<Problem> {
    let parsed = parse_str(file, text);
    let mut out = parsed.problems;
    out.extend(build(&parsed.objects, &BuildOptions::default()).1);
    out
}

/// The one error in `text` (as the second document of its file).
fn the_error(yaml: &str) -> Problem {
    let text = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\n{yaml}");
    let errs: Vec<Problem> = problems("bad.yaml", &text)
        .into_iter()
        .filter(Problem::is_error)
        .collect();
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = errs.into_iter().next().unwrap();
    assert_eq!(e.file, "bad.yaml");
    assert_eq!(e.document, 2);
    e
}

const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: inventory\nspec:\n  hosts:\n  - inventory\n  http:\n  - route:\n    - destination:\n        host: inventory\n";

#[test]
fn typo_is_a_warning_with_the_full_path() {
    let text = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: cb\nspec:\n  host: pricing\n  trafficPolicy:\n    outlierDetection:\n      consecutive5xxError: 3\n";
    let ps = problems("cb.yaml", text);
    assert!(ps.iter().all(|p| p.severity == Severity::Warning));
    let p = ps.iter().find(|p| p.reason == "unknown field").unwrap();
    assert_eq!(
        p.field,
        "spec.trafficPolicy.outlierDetection.consecutive5xxError"
    );
    assert_eq!(
        p.to_string(),
        "cb.yaml: document 1 (DestinationRule default/cb): spec.trafficPolicy.outlierDetection.consecutive5xxError: unknown field"
    );
}

#[test]
fn bad_duration() {
    let e = the_error(&format!("{VS}    timeout: 5 s\n"));
    assert_eq!(
        e.object.as_deref(),
        Some("VirtualService default/inventory")
    );
    assert_eq!(e.field, "spec.http[0].timeout");
    assert!(
        e.reason.contains("invalid duration \"5 s\""),
        "{}",
        e.reason
    );
    assert!(e.to_string().starts_with(
        "bad.yaml: document 2 (VirtualService default/inventory): spec.http[0].timeout: invalid duration \"5 s\""
    ));
}

#[test]
fn negative_attempts() {
    let e = the_error(&format!("{VS}    retries:\n      attempts: -1\n"));
    assert_eq!(e.field, "spec.http[0].retries.attempts");
    assert!(e.reason.contains("cannot be negative"));
}

#[test]
fn unknown_retry_on() {
    let e = the_error(&format!(
        "{VS}    retries:\n      attempts: 2\n      retryOn: 5xx,sometimes\n"
    ));
    assert_eq!(e.field, "spec.http[0].retries.retryOn");
    assert!(
        e.reason
            .starts_with("\"sometimes\" is not a valid retryOn policy"),
        "{}",
        e.reason
    );
}

#[test]
fn retry_on_status_codes() {
    let ps = problems(
        "ok.yaml",
        &format!("{VS}    retries:\n      attempts: 2\n      retryOn: 503,reset\n"),
    );
    assert!(ps.iter().all(|p| !p.is_error()), "{ps:#?}");
    let parsed = parse_str(
        "ok.yaml",
        &format!("{VS}    retries:\n      attempts: 2\n      retryOn: 503,reset\n"),
    );
    let (snap, _) = build(&parsed.objects, &BuildOptions::default());
    let on = &snap.virtual_hosts["inventory.default.svc.cluster.local"].routes[0]
        .retry
        .retry_on;
    assert_eq!(on.retriable_status_codes, vec![503]);
    assert!(on.reset && !on.connect_failure);
}

#[test]
fn regex_that_does_not_compile() {
    let yaml = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n  namespace: shop\nspec:\n  hosts: [pricing]\n  http:\n  - match:\n    - uri:\n        regex: \"/api/(v1\"\n    route:\n    - destination:\n        host: pricing\n";
    let e = the_error(yaml);
    assert_eq!(e.object.as_deref(), Some("VirtualService shop/r"));
    assert_eq!(e.field, "spec.http[0].match[0].uri.regex");
    assert!(e.reason.contains("invalid RE2 regex"));
}

#[test]
fn percentage_out_of_range() {
    let yaml = format!("{VS}    fault:\n      abort:\n        httpStatus: 503\n        percentage:\n          value: 150\n");
    let e = the_error(&yaml);
    assert_eq!(e.field, "spec.http[0].fault.abort.percentage.value");
    assert!(e.reason.contains("not in range 0..100"));
}

#[test]
fn http_status_out_of_range() {
    let e = the_error(&format!("{VS}    fault:\n      abort:\n        httpStatus: 600\n        percentage:\n          value: 1\n"));
    assert_eq!(e.field, "spec.http[0].fault.abort.httpStatus");
}

#[test]
fn type_errors_carry_lines() {
    let e = the_error(&format!("{VS}    retries:\n      attempts: lots\n"));
    assert_eq!(e.field, "spec.http[0].retries.attempts");
    assert!(e.reason.contains("line 18"), "{}", e.reason);
}

#[test]
fn max_ejection_percent_range() {
    let yaml = "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata:\n  name: d\nspec:\n  host: pricing\n  trafficPolicy:\n    outlierDetection:\n      maxEjectionPercent: 101\n";
    let e = the_error(yaml);
    assert_eq!(
        e.field,
        "spec.trafficPolicy.outlierDetection.maxEjectionPercent"
    );
}

#[test]
fn per_try_timeout_below_one_millisecond() {
    let e = the_error(&format!(
        "{VS}    retries:\n      attempts: 2\n      perTryTimeout: 500us\n"
    ));
    assert_eq!(e.field, "spec.http[0].retries.perTryTimeout");
    assert!(e.reason.contains("at least 1ms"));
}

#[test]
fn unsupported_fields_are_warned_not_dropped() {
    let ps = problems("m.yaml", &format!("{VS}    mirror:\n      host: shadow\n    corsPolicy:\n      allowOrigins: [{{exact: x}}]\n"));
    assert!(ps.iter().all(|p| !p.is_error()));
    for f in ["spec.http[0].mirror", "spec.http[0].corsPolicy"] {
        assert!(
            ps.iter()
                .any(|p| p.field == f && p.reason == "not supported by Sluice yet; ignored"),
            "{f}: {ps:#?}"
        );
    }
}

#[test]
fn unsupported_api_version_is_an_error() {
    let e = the_error("apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata:\n  name: x\nspec: {}\n");
    assert_eq!(e.field, "apiVersion");
}

/// A VirtualService whose only route is `route` (the `- ` entry under `http:`).
fn vs_route(route: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: web\nspec:\n  hosts:\n  - web\n  http:\n{route}")
}

#[test]
fn direct_response_status_is_required_and_in_range() {
    let e = the_error(&vs_route("  - directResponse:\n      body: {string: ok}\n"));
    assert_eq!(e.field, "spec.http[0].directResponse.status");
    assert!(e.reason.starts_with("required"), "{}", e.reason);
    for status in ["199", "600", "0"] {
        let e = the_error(&vs_route(&format!(
            "  - directResponse:\n      status: {status}\n"
        )));
        assert_eq!(e.field, "spec.http[0].directResponse.status");
        assert_eq!(
            e.reason,
            format!("HTTP status {status} is not in range 200-599")
        );
    }
}

#[test]
fn direct_response_body_is_string_or_bytes() {
    let e = the_error(&vs_route(
        "  - directResponse:\n      status: 200\n      body: {string: a, bytes: YQ==}\n",
    ));
    assert_eq!(e.field, "spec.http[0].directResponse.body");
    assert_eq!(e.reason, "only one of string or bytes may be set");
    let e = the_error(&vs_route(
        "  - directResponse:\n      status: 200\n      body: {}\n",
    ));
    assert_eq!(e.field, "spec.http[0].directResponse.body");
    assert!(e.reason.starts_with("one of string or bytes is required"));
    let e = the_error(&vs_route(
        "  - directResponse:\n      status: 200\n      body: {bytes: \"not base64!\"}\n",
    ));
    assert_eq!(e.field, "spec.http[0].directResponse.body.bytes");
    assert!(e.reason.starts_with("not valid base64: "), "{}", e.reason);
    assert!(e.to_string().starts_with(
        "bad.yaml: document 2 (VirtualService default/web): spec.http[0].directResponse.body.bytes: not valid base64"
    ));
}

#[test]
fn direct_response_body_over_one_mib() {
    let big = "x".repeat(1024 * 1024 + 1);
    let e = the_error(&vs_route(&format!(
        "  - directResponse:\n      status: 200\n      body: {{string: {big}}}\n"
    )));
    assert_eq!(e.field, "spec.http[0].directResponse.body");
    assert!(e.reason.contains("must be less than 1MB"), "{}", &e.reason);
    let large = "x".repeat(200 * 1024);
    let ps = problems(
        "large.yaml",
        &vs_route(&format!(
            "  - directResponse:\n      status: 200\n      body: {{string: {large}}}\n"
        )),
    );
    assert!(ps.iter().all(|p| !p.is_error()), "{ps:#?}");
    assert!(ps
        .iter()
        .any(|p| p.field == "spec.http[0].directResponse.body"
            && p.reason.starts_with("large direct_responses may impact")));
}

#[test]
fn direct_response_excludes_route_redirect_rewrite_and_delegate() {
    for (other, yaml, reason) in [
        (
            "route",
            "    route:\n    - destination: {host: web}\n",
            "HTTP route cannot contain both route and direct_response",
        ),
        (
            "redirect",
            "    redirect: {uri: /x}\n",
            "HTTP route rule cannot contain both direct_response and redirect",
        ),
        (
            "rewrite",
            "    rewrite: {uri: /x}\n",
            "HTTP route rule cannot contain both rewrite and direct_response",
        ),
        (
            "delegate",
            "    delegate: {name: other}\n",
            "HTTP route cannot contain both delegate and direct_response",
        ),
    ] {
        let e = the_error(&vs_route(&format!(
            "  - directResponse: {{status: 200}}\n{yaml}"
        )));
        assert_eq!(e.field, format!("spec.http[0].{other}"));
        assert_eq!(e.reason, reason);
    }
}

#[test]
fn direct_response_with_a_fault_is_refused_as_istio_does() {
    let e = the_error(&vs_route(
        "  - directResponse: {status: 200}\n    fault:\n      delay: {fixedDelay: 1s, percentage: {value: 100}}\n",
    ));
    assert_eq!(e.field, "spec.http[0].fault");
    assert_eq!(
        e.reason,
        "HTTP route cannot contain both fault and direct_response"
    );
}

#[test]
fn response_header_names_are_checked() {
    let e = the_error(&vs_route(
        "  - directResponse: {status: 200}\n    headers:\n      response:\n        set: {\"x bad\": v}\n",
    ));
    assert_eq!(e.field, "spec.http[0].headers.response.set.x bad");
    assert_eq!(e.reason, "header name x bad is not a valid header name");
    let e = the_error(&vs_route(
        "  - directResponse: {status: 200}\n    headers:\n      response:\n        remove: [Host]\n",
    ));
    assert_eq!(e.field, "spec.http[0].headers.response.remove[0]");
    assert!(e.reason.contains("cannot have \":\" prefix or be \"host\""));
    // Request header manipulation is not implemented: warned, not dropped silently.
    let ps = problems(
        "h.yaml",
        &vs_route("  - directResponse: {status: 200}\n    headers:\n      request:\n        set: {x-a: b}\n"),
    );
    assert!(ps.iter().all(|p| !p.is_error()));
    assert!(ps.iter().any(|p| p.field == "spec.http[0].headers.request"
        && p.reason == "not supported by Sluice yet; ignored"));
}

/// A VirtualService for `db` whose only TCP rule is `rule` (the `- ` entry under `tcp:`).
fn vs_tcp(rule: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: db\nspec:\n  hosts:\n  - db\n  tcp:\n{rule}")
}

#[test]
fn tcp_route_errors_name_their_field() {
    let route = "    route:\n    - destination: {host: db}\n";
    for (rule, field, reason) in [
        (
            format!("  - match:\n    - destinationSubnets: [10.0.0.0/40]\n{route}"),
            "spec.tcp[0].match[0].destinationSubnets[0]",
            "prefix length \"40\" is not in 0..32",
        ),
        (
            format!("  - match:\n    - destinationSubnets: [db.local]\n{route}"),
            "spec.tcp[0].match[0].destinationSubnets[0]",
            "\"db.local\" is not an IP address",
        ),
        (
            format!("  - match:\n    - port: 70000\n{route}"),
            "spec.tcp[0].match[0].port",
            "port number 70000 must be in the range 1..65535",
        ),
        (
            format!("  - match:\n    - sourceNamespace: Shop_1\n{route}"),
            "spec.tcp[0].match[0].sourceNamespace",
            "sourceNamespace match Shop_1 is invalid",
        ),
        (
            "  - match:\n    - port: 5432\n".to_string(),
            "spec.tcp[0].route",
            "TCP route is required",
        ),
        (
            "  - route:\n    - weight: 100\n".to_string(),
            "spec.tcp[0].route[0].destination",
            "destination is required",
        ),
    ] {
        let e = the_error(&vs_tcp(&rule));
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            (field, reason),
            "{rule}"
        );
    }
}

#[test]
fn tcp_timeouts_are_checked() {
    let dr = |tcp: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: db\nspec:\n  host: db\n  trafficPolicy:\n    connectionPool:\n      tcp: {{{tcp}}}\n")
    };
    let e = the_error(&dr("maxConnectionDuration: 0s"));
    assert_eq!(
        e.field,
        "spec.trafficPolicy.connectionPool.tcp.maxConnectionDuration"
    );
    assert!(e.reason.contains("at least 1ms"), "{}", e.reason);
    let e = the_error(&dr("idleTimeout: 5 minutes"));
    assert_eq!(e.field, "spec.trafficPolicy.connectionPool.tcp.idleTimeout");
    let ps = problems(
        "ok.yaml",
        &dr("idleTimeout: 0s, maxConnectionDuration: 24h"),
    );
    assert!(ps.is_empty(), "{ps:#?}");
}
