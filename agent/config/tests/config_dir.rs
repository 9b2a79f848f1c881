//! `ConfigDir`: add, modify and delete files; a broken edit keeps the last good object in force and
//! reports why; the generation moves only on real change.

use sluice_config::{BuildOptions, ConfigDir};
use std::fs;
use std::time::Duration;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: pricing\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n  - name: http\n    port: 80\n    targetPort: 9090\n  selector:\n    app: pricing\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pricing-1\n  labels:\n    app: pricing\n    version: v1\n  annotations:\n    sluice.io/netns: /var/run/netns/pricing-1\nstatus:\n  podIP: 10.0.0.5\n";

fn vs(timeout: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: pricing\nspec:\n  hosts: [pricing]\n  http:\n  - route:\n    - destination:\n        host: pricing\n    timeout: {timeout}\n")
}

const HOST: &str = "pricing.default.svc.cluster.local";

fn timeout(dir: &ConfigDir) -> Option<Duration> {
    dir.snapshot()
        .virtual_hosts
        .get(HOST)
        .and_then(|vh| vh.routes[0].timeout)
}

#[test]
fn last_good_per_object_and_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path();
    fs::write(path.join("svc.yaml"), SERVICE).unwrap();
    fs::write(path.join("vs.yaml"), vs("1s")).unwrap();
    fs::write(path.join("notes.txt"), "not config").unwrap();
    fs::create_dir(path.join(".hidden")).unwrap();
    fs::write(path.join(".hidden/x.yaml"), "kind: [broken").unwrap();
    let mut dir = ConfigDir::new(path.to_path_buf(), BuildOptions::default());

    let r = dir.reload();
    assert!(r.changed);
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    assert_eq!(r.snapshot.generation, 1);
    assert_eq!(timeout(&dir), Some(Duration::from_secs(1)));
    let cluster = &r.snapshot.clusters.values().next().unwrap();
    assert_eq!(cluster.endpoints[0].addr, "10.0.0.5:9090".parse().unwrap());
    let pod = &r.snapshot.workloads["default/pricing-1"];
    assert_eq!(
        pod.netns.as_deref(),
        Some(std::path::Path::new("/var/run/netns/pricing-1"))
    );

    // Nothing changed: same generation, nothing reparsed.
    let r = dir.reload();
    assert!(!r.changed);
    assert_eq!(r.snapshot.generation, 1);

    // A rewrite with identical effect (a comment) is not a change.
    fs::write(path.join("vs.yaml"), format!("# same\n{}", vs("1s"))).unwrap();
    let r = dir.reload();
    assert!(!r.changed);
    assert_eq!(r.snapshot.generation, 1);

    // A real change.
    fs::write(path.join("vs.yaml"), vs("2s")).unwrap();
    let r = dir.reload();
    assert!(r.changed);
    assert_eq!(r.snapshot.generation, 2);
    assert_eq!(timeout(&dir), Some(Duration::from_secs(2)));

    // A broken edit of the object: the last good version stays, the problem is reported.
    fs::write(path.join("vs.yaml"), vs("5 s")).unwrap();
    let r = dir.reload();
    assert!(r.changed, "the new rejection must be published");
    assert_eq!(r.snapshot.generation, 2);
    assert_eq!(timeout(&dir), Some(Duration::from_secs(2)));
    let err = r.problems.iter().find(|p| p.is_error()).expect("an error");
    assert_eq!(err.file, "vs.yaml");
    assert_eq!(err.field, "spec.http[0].timeout");
    assert!(
        err.reason.contains("last good version stays in force"),
        "{}",
        err.reason
    );
    assert_eq!(r.snapshot.rejections.len(), 1);
    assert_eq!(r.snapshot.rejections[0].field, "spec.http[0].timeout");

    // A YAML syntax error keeps every object of the file.
    fs::write(path.join("vs.yaml"), "apiVersion: [oops\n").unwrap();
    let r = dir.reload();
    assert_eq!(r.snapshot.generation, 2);
    assert_eq!(timeout(&dir), Some(Duration::from_secs(2)));
    assert!(r
        .problems
        .iter()
        .any(|p| p.is_error() && p.reason.contains("YAML syntax error")));

    // Fixed: the problem goes away.
    fs::write(path.join("vs.yaml"), vs("3s")).unwrap();
    let r = dir.reload();
    assert!(r.changed);
    assert_eq!(r.snapshot.generation, 3);
    assert!(r.problems.is_empty(), "{:#?}", r.problems);
    assert!(r.snapshot.rejections.is_empty());

    // A new file, then deleting it.
    fs::create_dir(path.join("more")).unwrap();
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: pricing\nspec:\n  host: pricing\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: 1\n";
    fs::write(path.join("more/dr.yml"), dr).unwrap();
    let r = dir.reload();
    assert!(r.changed);
    assert_eq!(r.snapshot.generation, 4);
    assert_eq!(
        r.snapshot
            .clusters
            .values()
            .next()
            .unwrap()
            .policy
            .connection_pool
            .max_connections,
        1
    );
    fs::remove_file(path.join("more/dr.yml")).unwrap();
    let r = dir.reload();
    assert!(r.changed);
    assert_eq!(r.snapshot.generation, 5);
    assert_eq!(
        r.snapshot
            .clusters
            .values()
            .next()
            .unwrap()
            .policy
            .connection_pool
            .max_connections,
        u32::MAX
    );

    // Deleting the VirtualService file removes its routing.
    fs::remove_file(path.join("vs.yaml")).unwrap();
    let r = dir.reload();
    assert!(r.changed);
    assert!(r.snapshot.virtual_hosts.is_empty());
}

#[test]
fn a_new_broken_object_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("vs.yaml"), vs("-1s")).unwrap();
    let mut dir = ConfigDir::new(tmp.path().to_path_buf(), BuildOptions::default());
    let r = dir.reload();
    assert!(r.snapshot.virtual_hosts.is_empty());
    assert_eq!(r.snapshot.rejections.len(), 1);
}

#[cfg(unix)]
#[test]
fn configmap_symlinks_are_read_once() {
    // Kubelet's layout: ..2024_01_01/vs.yaml, ..data -> ..2024_01_01, vs.yaml -> ..data/vs.yaml
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path();
    fs::create_dir(p.join("..2024_01_01")).unwrap();
    fs::write(p.join("..2024_01_01/vs.yaml"), vs("1s")).unwrap();
    std::os::unix::fs::symlink("..2024_01_01", p.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/vs.yaml", p.join("vs.yaml")).unwrap();
    let mut dir = ConfigDir::new(p.to_path_buf(), BuildOptions::default());
    let r = dir.reload();
    // Only the unknown-host warning (no Service here); no duplicate from the hidden copy.
    assert_eq!(r.problems.len(), 1, "{:#?}", r.problems);
    assert!(r.problems[0].reason.contains("unknown host"));
    assert_eq!(timeout(&dir), Some(Duration::from_secs(1)));
}

#[test]
fn rescanning_unchanged_files_reads_none_of_them() {
    let tmp = tempfile::tempdir().unwrap();
    for i in 0..50 {
        let text = vs("1s").replace("name: pricing\nspec", &format!("name: vs{i}\nspec"));
        fs::write(
            tmp.path().join(format!("vs{i}.yaml")),
            format!("{SERVICE}---\n{text}"),
        )
        .unwrap();
    }
    let mut dir = ConfigDir::new(tmp.path().to_path_buf(), BuildOptions::default());
    assert!(dir.reload().changed);
    for _ in 0..10 {
        assert!(!dir.reload().changed);
    }
    // Polled every 250 ms, a rescan only looks at each file's size and modification time: a
    // file rewritten with the same size and its old mtime put back is not read again. (Counted
    // this way, not timed: a timing bound says little on a shared machine.)
    let file = tmp.path().join("vs7.yaml");
    let mtime = fs::metadata(&file).unwrap().modified().unwrap();
    // A broken timeout of the same length: read, it would be a rejection.
    let text = fs::read_to_string(&file)
        .unwrap()
        .replace("timeout: 1s", "timeout: -1");
    fs::write(&file, text).unwrap();
    let f = fs::File::options().write(true).open(&file).unwrap();
    f.set_modified(mtime).unwrap();
    let r = dir.reload();
    assert!(
        !r.changed && r.snapshot.rejections.is_empty(),
        "an unchanged size and mtime was read"
    );
    // The same edit with a new mtime is seen.
    f.set_modified(mtime + Duration::from_secs(1)).unwrap();
    assert_eq!(dir.reload().snapshot.rejections.len(), 1);
}

#[test]
fn an_object_defined_twice_is_the_first_document_and_the_other_is_still_checked() {
    let good = vs("1s");
    // A type error: the document fails to parse, but its identity is known.
    let broken = vs("1s").replace("timeout: 1s", "timeout: [1s]");
    for (first, second, in_force) in [
        (&good, &broken, Some(Duration::from_secs(1))),
        (&broken, &good, None),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("vs.yaml");
        fs::write(&file, format!("{SERVICE}---\n{first}---\n{second}")).unwrap();
        let mut dir = ConfigDir::new(tmp.path().to_path_buf(), BuildOptions::default());
        let r = dir.reload();
        assert_eq!(timeout(&dir), in_force);
        let broken_doc = if in_force.is_some() { 4 } else { 3 };
        assert_eq!(
            r.snapshot.rejections.len(),
            1,
            "{:#?}",
            r.snapshot.rejections
        );
        let rejected = &r.problems.iter().find(|p| p.is_error()).unwrap();
        assert_eq!(
            (rejected.document, rejected.field.as_str()),
            (broken_doc, "spec.http[0].timeout")
        );
        let ignored = r
            .problems
            .iter()
            .find(|p| p.reason.contains("is also defined in"))
            .unwrap();
        assert_eq!(ignored.document, 4);
        assert!(
            ignored
                .reason
                .ends_with("vs.yaml document 3; this one is ignored"),
            "{}",
            ignored.reason
        );

        // `sluice validate` applies the same rule and finds the same problems.
        let found = sluice_config::validate_paths(&[file], &BuildOptions::default());
        let summary = |ps: &[sluice_config::Problem]| {
            let mut s: Vec<_> = ps
                .iter()
                .map(|p| (p.severity, p.document, p.field.clone()))
                .collect();
            s.sort();
            s
        };
        assert_eq!(summary(&found), summary(&r.problems));
    }
}
