//! Route selection: which `http[]` entry of a VirtualService a request takes, and which weighted
//! destination it goes to. Matching follows Istio's `HTTPMatchRequest`: every condition of one
//! `match` entry must hold, any one entry suffices, and the first matching route wins.

use http::Request;
use sluice_policy::{
    L4Match, RequestMatch, Route, StringMatch, TcpRoute, VirtualHost, WeightedDestination, Workload,
};
use std::net::SocketAddr;

/// The first route of `vhost` that matches `req` from `source` (the client pod, when known), with
/// its index and the index of the `match` entry that fitted (`None` for a route without `match`,
/// which takes everything). A match with `sourceLabels`/`sourceNamespace` that the client does not fit is
/// dropped, as istiod drops it from the client's sidecar: a route whose matches all drop is
/// skipped, never taken as a catch-all.
pub fn select<'a, B>(
    vhost: &'a VirtualHost,
    req: &Request<B>,
    port: u16,
    source: Option<&Workload>,
) -> Option<(usize, Option<usize>, &'a Route)> {
    vhost.routes.iter().enumerate().find_map(|(i, route)| {
        if route.matches.is_empty() {
            return Some((i, None, route));
        }
        route
            .matches
            .iter()
            .position(|m| matches(m, req, port, source))
            .map(|m| (i, Some(m), route))
    })
}

fn matches<B>(m: &RequestMatch, req: &Request<B>, port: u16, source: Option<&Workload>) -> bool {
    if let Some(p) = m.port {
        if p != port {
            return false;
        }
    }
    if let Some(ns) = &m.source_namespace {
        if source.is_none_or(|w| &w.namespace != ns) {
            return false;
        }
    }
    if !m.source_labels.is_empty() {
        let Some(w) = source else {
            return false;
        };
        if !m
            .source_labels
            .iter()
            .all(|(k, v)| w.labels.get(k) == Some(v))
        {
            return false;
        }
    }
    if let Some(uri) = &m.uri {
        let path = req.uri().path();
        let ok = if m.ignore_uri_case {
            uri.matches_ignore_case(path)
        } else {
            uri.matches(path)
        };
        if !ok {
            return false;
        }
    }
    if let Some(method) = &m.method {
        if !method.matches(req.method().as_str()) {
            return false;
        }
    }
    if let Some(scheme) = &m.scheme {
        if !scheme.matches(req.uri().scheme_str().unwrap_or("http")) {
            return false;
        }
    }
    if let Some(authority) = &m.authority {
        if !authority.matches(authority_of(req)) {
            return false;
        }
    }
    for h in &m.headers {
        if !header_matches(req, &h.name, &h.value) {
            return false;
        }
    }
    for h in &m.without_headers {
        if header_matches(req, &h.name, &h.value) {
            return false;
        }
    }
    if !m.query_params.is_empty() {
        let query = req.uri().query().unwrap_or("");
        for q in &m.query_params {
            let found = query.split('&').find_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == q.name).then_some(v)
            });
            match found {
                Some(v) if q.value.matches(v) => {}
                _ => return false,
            }
        }
    }
    true
}

/// Istio matches headers on any of a header's values; `{}` only needs the header to be present.
fn header_matches<B>(req: &Request<B>, name: &str, value: &StringMatch) -> bool {
    let mut values = req.headers().get_all(name).iter().peekable();
    if values.peek().is_none() {
        return false;
    }
    values.any(|v| v.to_str().is_ok_and(|v| value.matches(v)))
}

/// The request's authority: from the URI in absolute form (proxy requests, HTTP/2), else `Host`.
pub fn authority_of<B>(req: &Request<B>) -> &str {
    if let Some(a) = req.uri().authority() {
        return a.as_str();
    }
    req.headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}

/// The first `tcp[]` rule that matches a connection to `dst` from `source` (the client pod, when
/// known). Istio's `L4MatchAttributes`: every condition of one match entry must hold, any entry
/// suffices, no entries match everything.
pub fn select_tcp<'a>(
    routes: &'a [TcpRoute],
    dst: SocketAddr,
    source: Option<&Workload>,
) -> Option<&'a TcpRoute> {
    routes
        .iter()
        .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| l4_matches(m, dst, source)))
}

fn l4_matches(m: &L4Match, dst: SocketAddr, source: Option<&Workload>) -> bool {
    if m.port.is_some_and(|p| p != dst.port()) {
        return false;
    }
    if !m.destination_subnets.is_empty()
        && !m.destination_subnets.iter().any(|n| n.contains(dst.ip()))
    {
        return false;
    }
    if let Some(ns) = &m.source_namespace {
        if source.is_none_or(|w| &w.namespace != ns) {
            return false;
        }
    }
    if !m.source_labels.is_empty() {
        let Some(w) = source else {
            return false;
        };
        if !m
            .source_labels
            .iter()
            .all(|(k, v)| w.labels.get(k) == Some(v))
        {
            return false;
        }
    }
    true
}

/// Picks a destination by weight; `draw` is uniform in `0..total weight`.
pub fn pick_destination(
    destinations: &[WeightedDestination],
    draw: impl FnOnce(u32) -> u32,
) -> Option<&WeightedDestination> {
    match destinations {
        [] => None,
        [only] => Some(only),
        _ => {
            let total: u32 = destinations.iter().map(|d| d.weight).sum();
            if total == 0 {
                return destinations.first();
            }
            let mut n = draw(total);
            destinations.iter().find(|d| {
                if n < d.weight {
                    true
                } else {
                    n -= d.weight;
                    false
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::{ClusterKey, HeaderMatch, QueryMatch, RetryPolicy};

    fn route(name: &str, matches: Vec<RequestMatch>) -> Route {
        Route {
            name: name.into(),
            matches,
            destinations: vec![],
            timeout: None,
            retry: RetryPolicy::istio_default(),
            fault: None,
            direct_response: None,
            response_headers: None,
        }
    }

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn first_matching_route_wins() {
        let vh = VirtualHost {
            name: "default/reviews".into(),
            tcp_routes: vec![],
            routes: vec![
                route(
                    "jason",
                    vec![RequestMatch {
                        headers: vec![HeaderMatch {
                            name: "end-user".into(),
                            value: StringMatch::Exact("jason".into()),
                        }],
                        ..Default::default()
                    }],
                ),
                route(
                    "api",
                    vec![RequestMatch {
                        uri: Some(StringMatch::Prefix("/api".into())),
                        ..Default::default()
                    }],
                ),
                route("rest", vec![]),
            ],
        };
        let name = |r: &Request<()>| select(&vh, r, 80, None).map(|(_, _, r)| r.name.clone());
        assert_eq!(
            name(&req("/api/x", &[("end-user", "jason")])).as_deref(),
            Some("jason")
        );
        assert_eq!(
            name(&req("/api/x", &[("end-user", "bob")])).as_deref(),
            Some("api")
        );
        assert_eq!(name(&req("/other", &[])).as_deref(), Some("rest"));
    }

    #[test]
    fn source_matches_that_do_not_fit_the_client_are_dropped() {
        let vh = VirtualHost {
            name: "t".into(),
            tcp_routes: vec![],
            routes: vec![
                route(
                    "batch",
                    vec![RequestMatch {
                        source_labels: [("app".to_string(), "batch".to_string())].into(),
                        ..Default::default()
                    }],
                ),
                route(
                    "shop-api",
                    vec![RequestMatch {
                        source_namespace: Some("shop".into()),
                        uri: Some(StringMatch::Prefix("/api".into())),
                        ..Default::default()
                    }],
                ),
                route("rest", vec![]),
            ],
        };
        let pod = |ns: &str, app: &str| Workload {
            name: "p".into(),
            namespace: ns.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            ..Default::default()
        };
        let name = |path: &str, w: Option<&Workload>| {
            select(&vh, &req(path, &[]), 80, w).map(|(_, _, r)| r.name.clone())
        };
        let batch = pod("default", "batch");
        let shop = pod("shop", "web");
        assert_eq!(name("/", Some(&batch)).as_deref(), Some("batch"));
        assert_eq!(name("/api/x", Some(&shop)).as_deref(), Some("shop-api"));
        // A client that fits no source condition skips those routes (they are not catch-alls),
        // and so does a client that is not a known pod.
        assert_eq!(
            name("/api/x", Some(&pod("default", "web"))).as_deref(),
            Some("rest")
        );
        assert_eq!(name("/api/x", None).as_deref(), Some("rest"));
        assert_eq!(name("/", Some(&shop)).as_deref(), Some("rest"));
    }

    #[test]
    fn conditions_within_a_match_are_anded() {
        let m = RequestMatch {
            uri: Some(StringMatch::regex("/v[0-9]+/items").unwrap()),
            method: Some(StringMatch::Exact("GET".into())),
            query_params: vec![QueryMatch {
                name: "debug".into(),
                value: StringMatch::Exact("1".into()),
            }],
            without_headers: vec![HeaderMatch {
                name: "x-canary".into(),
                value: StringMatch::Present,
            }],
            ..Default::default()
        };
        let vh = VirtualHost {
            name: "t".into(),
            tcp_routes: vec![],
            routes: vec![route("m", vec![m])],
        };
        let hit = |r: Request<()>| select(&vh, &r, 80, None).is_some();
        assert!(hit(req("/v2/items?debug=1", &[])));
        assert!(
            !hit(req("/v2/items/x?debug=1", &[])),
            "regex must match the whole path"
        );
        assert!(!hit(req("/v2/items?debug=0", &[])));
        assert!(!hit(req("/v2/items", &[])));
        assert!(!hit(req("/v2/items?debug=1", &[("x-canary", "")])));
        let mut post = req("/v2/items?debug=1", &[]);
        *post.method_mut() = http::Method::POST;
        assert!(!hit(post));
    }

    #[test]
    fn port_and_authority_and_case() {
        let m = RequestMatch {
            port: Some(8080),
            authority: Some(StringMatch::Prefix("shop".into())),
            uri: Some(StringMatch::Exact("/Cart".into())),
            ignore_uri_case: true,
            ..Default::default()
        };
        let vh = VirtualHost {
            name: "t".into(),
            tcp_routes: vec![],
            routes: vec![route("m", vec![m])],
        };
        let r = req("/cart", &[("host", "shop.example")]);
        assert!(select(&vh, &r, 8080, None).is_some());
        assert!(select(&vh, &r, 80, None).is_none());
        let r = req("http://shop:8080/CART", &[]);
        assert!(select(&vh, &r, 8080, None).is_some());
    }

    #[test]
    fn tcp_rules_match_port_subnet_and_source() {
        let key = |subset: &str| ClusterKey {
            host: "db.default.svc.cluster.local".into(),
            port: 5432,
            subset: Some(subset.into()),
        };
        let rule = |subset: &str, m: L4Match| TcpRoute {
            matches: vec![m],
            destinations: vec![WeightedDestination {
                cluster: key(subset),
                weight: 100,
            }],
        };
        let routes = vec![
            rule(
                "canary",
                L4Match {
                    source_labels: [("app".to_string(), "batch".to_string())].into(),
                    ..Default::default()
                },
            ),
            rule(
                "shop",
                L4Match {
                    source_namespace: Some("shop".into()),
                    port: Some(5432),
                    ..Default::default()
                },
            ),
            rule(
                "net",
                L4Match {
                    destination_subnets: vec![sluice_policy::IpNet::parse("10.96.0.0/16").unwrap()],
                    ..Default::default()
                },
            ),
        ];
        let pod = |ns: &str, app: &str| Workload {
            name: "p".into(),
            namespace: ns.into(),
            ips: vec![],
            labels: [("app".to_string(), app.to_string())].into(),
            enrolled: true,
            netns: None,
            cgroup: None,
            ..Default::default()
        };
        let subset = |dst: &str, w: Option<&Workload>| {
            select_tcp(&routes, dst.parse().unwrap(), w)
                .map(|r| r.destinations[0].cluster.subset.clone().unwrap())
        };
        let batch = pod("default", "batch");
        let shop = pod("shop", "web");
        assert_eq!(
            subset("10.96.0.5:5432", Some(&batch)).as_deref(),
            Some("canary")
        );
        assert_eq!(
            subset("10.96.0.5:5432", Some(&shop)).as_deref(),
            Some("shop")
        );
        assert_eq!(subset("10.97.0.5:5433", Some(&shop)), None);
        // An unknown client matches no source condition, only the subset rule.
        assert_eq!(subset("10.96.0.5:5432", None).as_deref(), Some("net"));
        assert_eq!(subset("10.97.0.5:5432", None), None);
    }

    #[test]
    fn weighted_pick() {
        let d = |subset: &str, weight| WeightedDestination {
            cluster: ClusterKey {
                host: "reviews.default.svc.cluster.local".into(),
                port: 80,
                subset: Some(subset.into()),
            },
            weight,
        };
        let dests = vec![d("v1", 75), d("v2", 25)];
        let subset = |n| {
            pick_destination(&dests, |_| n)
                .unwrap()
                .cluster
                .subset
                .clone()
                .unwrap()
        };
        assert_eq!(subset(0), "v1");
        assert_eq!(subset(74), "v1");
        assert_eq!(subset(75), "v2");
        assert_eq!(subset(99), "v2");
        let mut counts = [0u32; 2];
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let s = pick_destination(&dests, |t| rng.u32(0..t)).unwrap();
            counts[usize::from(s.weight == 25)] += 1;
        }
        assert!((7_300..7_700).contains(&counts[0]), "{counts:?}");
    }
}
