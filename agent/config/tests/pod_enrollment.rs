//! What enrollment needs from a Pod reaches the snapshot's `Workload`: `metadata.uid`,
//! `status.qosClass`, `spec.hostNetwork`, `status.phase` and the containers' runtime IDs, from a
//! Pod as the API server returns it (with the many fields Sluice does not read); and which
//! enrolled pods must not be redirected.

use sluice_config::{build, parse_str, BuildOptions};

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: pricing-7d4b9c-x2x9k
  namespace: shop
  uid: 3c2f8a4e-5b1d-4e8f-9a7b-0c1d2e3f4a5b
  resourceVersion: "1234"
  labels: {app: pricing, istio.io/dataplane-mode: ambient}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: pricing-7d4b9c, uid: 1}]
spec:
  nodeName: node-1
  hostNetwork: false
  containers: [{name: app, image: pricing:1}, {name: log, image: busybox}]
status:
  phase: Running
  qosClass: Burstable
  podIP: 10.244.1.7
  podIPs: [{ip: 10.244.1.7}]
  containerStatuses:
  - name: app
    containerID: containerd://4b825dc642cb6eb9a060e54bf8d69288fbee4904aabbccddeeff001122334455
    ready: true
  - name: log
    ready: false
"#;

fn workload(yaml: &str) -> sluice_policy::Workload {
    let parsed = parse_str("pods.yaml", yaml);
    assert!(
        parsed.problems.iter().all(|p| !p.is_error()),
        "{:#?}",
        parsed.problems
    );
    let (snap, _) = build(&parsed.objects, &BuildOptions::default());
    let w = snap.workloads.values().next().expect("one pod");
    (**w).clone()
}

#[test]
fn a_running_pods_uid_qos_class_and_container_ids_reach_the_workload() {
    let w = workload(POD);
    assert_eq!(
        w.uid.as_deref(),
        Some("3c2f8a4e-5b1d-4e8f-9a7b-0c1d2e3f4a5b")
    );
    assert_eq!(w.qos_class.as_deref(), Some("Burstable"));
    assert_eq!(w.phase.as_deref(), Some("Running"));
    assert!(!w.host_network);
    assert_eq!(
        w.container_ids,
        vec!["containerd://4b825dc642cb6eb9a060e54bf8d69288fbee4904aabbccddeeff001122334455"],
        "a container that has not started has no ID yet"
    );
    assert!(w.enrolled);
    assert_eq!(w.cgroup, None, "no annotation: found from the uid");
    assert_eq!(w.not_redirectable(), None);
}

#[test]
fn host_network_pending_and_addressless_pods_are_not_redirected() {
    let host = workload(&POD.replace("hostNetwork: false", "hostNetwork: true"));
    assert!(host.host_network);
    assert!(host.not_redirectable().unwrap().contains("hostNetwork"));
    let pending = workload(&POD.replace("phase: Running", "phase: Pending"));
    assert!(pending.not_redirectable().unwrap().contains("Pending"));
    let done = workload(&POD.replace("phase: Running", "phase: Succeeded"));
    assert!(done.not_redirectable().is_some());
    let no_ip = workload(
        &POD.replace("  podIP: 10.244.1.7\n", "")
            .replace("  podIPs: [{ip: 10.244.1.7}]\n", ""),
    );
    assert_eq!(no_ip.not_redirectable(), Some("no pod IP yet"));
    // Hand-written standalone Pods without a phase count as running.
    let plain = workload(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: c, uid: u-1}\nstatus: {podIP: 10.0.0.2}\n",
    );
    assert_eq!(plain.not_redirectable(), None);
    assert_eq!(plain.uid.as_deref(), Some("u-1"));
}

#[test]
fn a_pod_from_the_api_server_as_json_carries_the_same_fields() {
    // Kubernetes mode reads objects as the watch delivers them (JSON, built-in lists without
    // `kind`, which the watcher restores): the same Workload must come out as from the file.
    let mut json: serde_json::Value = serde_yaml::from_str(POD).unwrap();
    json["metadata"]["resourceVersion"] = "99".into();
    let parsed = sluice_config::parse_api_object(&json);
    assert!(
        parsed.problems.iter().all(|p| !p.is_error()),
        "{:#?}",
        parsed.problems
    );
    let (snap, _) = build(&parsed.objects, &BuildOptions::default());
    let from_api = (**snap.workloads.values().next().expect("one pod")).clone();
    assert_eq!(from_api, workload(POD));
}
