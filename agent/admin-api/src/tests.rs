//! Every answer survives encoding and decoding unchanged (the CLI re-encodes what it decoded for
//! `-o json`), and keeps the JSON shape scripts already point into.

use crate::*;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeMap;

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    v: &T,
) -> serde_json::Value {
    let text = serde_json::to_string(v).unwrap();
    let back: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&back, v, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn status(redirect: RedirectStatus) -> Status {
    Status {
        agent: Agent {
            version: "0.1.0".into(),
            mode: "kubernetes".into(),
            config_dir: None,
            kubeconfig: None,
            node_name: Some("node-a".into()),
            cluster_domain: "cluster.local".into(),
            cluster_id: "Kubernetes".into(),
            redirect: "ebpf".into(),
            listeners: Listeners {
                outbound: "0.0.0.0:15001".into(),
                admin: "127.0.0.1:15000".into(),
                admin_socket: Some(DEFAULT_SOCKET.into()),
                metrics: "127.0.0.1:15020".into(),
                ready: "0.0.0.0:15021".into(),
            },
            settings: BTreeMap::from([("workers".to_owned(), json!(1))]),
        },
        generation: 3,
        services: 2,
        clusters: 2,
        virtual_hosts: 1,
        workloads: 4,
        rejections: vec![Problem {
            source: "VirtualService default/pricing".into(),
            resource_version: Some("12".into()),
            object: "VirtualService default/pricing".into(),
            field: "spec.http[0].timeout".into(),
            reason: "not a duration".into(),
        }],
        warnings: vec![],
        access_log_dropped: 0,
        redirect,
        kubernetes: Some(KubeStatus {
            synced: true,
            kinds: vec![KindStatus {
                kind: "Pod".into(),
                api_version: "v1".into(),
                synced: true,
                objects: 4,
                last_error: None,
            }],
            forbidden: vec![],
        }),
    }
}

#[test]
fn status_round_trips_in_both_redirect_modes() {
    let none = round_trip(&status(RedirectStatus::None));
    assert_eq!(none["redirect"], json!({"mode": "none"}));
    assert_eq!(none["agent"]["mode"], "kubernetes");
    assert_eq!(
        none["agent"]["workers"], 1,
        "settings sit beside the typed fields"
    );
    assert!(none["agent"].get("config_dir").is_none());

    let ebpf = EbpfStatus {
        object: "/usr/lib/sluice/sluice-ebpf.o".into(),
        cgroup: "/sys/fs/cgroup".into(),
        pin_dir: "/sys/fs/bpf/sluice".into(),
        programs: Programs {
            attached: vec!["connect4".into()],
            ..Programs::default()
        },
        proxy: ProxyAddrs {
            ipv4: Some("10.0.0.1:15001".into()),
            ipv6: None,
        },
        enabled: true,
        sockmap: true,
        listener_registered: true,
        lease: Lease {
            state: LeaseState::Valid { remaining_ms: 800 },
            duration_ms: 1000,
            renew_every_ms: 250,
        },
        enrolled: vec![EnrolledPod {
            pod: "default/web".into(),
            cgroup_id: Some(42),
            found_by: Some("kubelet-name".into()),
            ..EnrolledPod::default()
        }],
        not_redirected: vec![NotRedirected {
            pod: "default/batch".into(),
            reason: Some("hostNetwork".into()),
        }],
        enrollment_error: None,
        enrollment: Enrollment::default(),
        exclusions: Exclusions {
            ports: vec![22],
            cidrs: vec!["169.254.0.0/16".into()],
        },
        counters: BTreeMap::from([("connect_redirected".to_owned(), 7)]),
        original_dst: OriginalDstCounts {
            from_map: 7,
            from_sockopt: 0,
            unknown: 0,
        },
    };
    let v = round_trip(&status(RedirectStatus::Ebpf(Box::new(ebpf))));
    let r = &v["redirect"];
    assert_eq!(r["mode"], "ebpf");
    assert_eq!(r["lease"]["state"], "valid");
    assert_eq!(r["lease"]["remaining_ms"], 800);
    assert_eq!(r["counters"]["connect_redirected"], 7);
}

#[test]
fn clusters_and_endpoints_round_trip() {
    let host = Host {
        addr: "10.0.0.7:8080".into(),
        pod: Some("default/pricing-1".into()),
        ejected: true,
        ejected_for_ms: Some(29000),
        ejection_count: 1,
        ..Host::default()
    };
    let cluster = Cluster {
        name: "outbound|80||pricing.default.svc.cluster.local".into(),
        protocol: "Http1".into(),
        stats: BTreeMap::from([("outlier_detection_ejections_active".to_owned(), 1)]),
        retry_budget: RetryBudget::default(),
        hosts: vec![host.clone()],
        outlier_events: vec![
            OutlierEvent {
                host: host.addr.clone(),
                ago_ms: 1000,
                kind: OutlierEventKind::Ejected {
                    reason: "Consecutive5xx".into(),
                    ejections: 1,
                    duration_ms: 30000,
                },
            },
            OutlierEvent {
                host: host.addr.clone(),
                ago_ms: 10,
                kind: OutlierEventKind::Unejected,
            },
        ],
    };
    let v = round_trip(&vec![cluster.clone()]);
    assert_eq!(v[0]["outlier_events"][0]["event"], "ejected");
    assert_eq!(
        v[0]["outlier_events"][1],
        json!({"host": "10.0.0.7:8080", "ago_ms": 10, "event": "unejected"})
    );
    assert_eq!(cluster.stat("outlier_detection_ejections_active"), 1);
    assert_eq!(cluster.stat("absent"), 0);

    let row = Endpoint {
        service: "pricing.default.svc.cluster.local".into(),
        cluster: cluster.name,
        host,
        status: "UNHEALTHY".into(),
        outlier_check: "FAILED".into(),
        ejected_until_unix_ms: Some(1),
    };
    let v = round_trip(&row);
    assert_eq!(
        v["addr"], "10.0.0.7:8080",
        "the host's fields are the row's"
    );
}

#[test]
fn requests_and_top_round_trip() {
    let r = Request {
        request_id: Some("abc".into()),
        status: 200,
        flags: "-".into(),
        route: Some(RoutePolicy {
            virtual_service: "default/pricing".into(),
            route: "all".into(),
            retries: 2,
            retry_on: vec!["5xx".into()],
            ..RoutePolicy::default()
        }),
        attempts: vec![
            Attempt {
                attempt: 1,
                status: 503,
                ..Attempt::default()
            },
            Attempt {
                attempt: 2,
                status: 200,
                ..Attempt::default()
            },
        ],
        ..Request::default()
    };
    round_trip(&r);
    round_trip(&Top {
        window_s: 10.0,
        requests: 1,
        edges: vec![Edge {
            source: "default/web".into(),
            flags: BTreeMap::from([("UH".to_owned(), 1)]),
            ..Edge::default()
        }],
    });
}
