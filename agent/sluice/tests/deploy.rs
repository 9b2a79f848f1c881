//! `deploy/` against the binary it runs: every flag the DaemonSets pass to `sluice` is one the
//! binary accepts, and every key of the agent's ConfigMap is the environment variable of a
//! `sluice run` flag. A manifest that drifts from the code fails here, not on a node.
//! (Schema validity of the manifests is checked by `.ci/run` with `kubernetes-validate --strict`.)

use serde_yaml::Value;
use std::path::Path;
use std::process::Command;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn deploy() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy"))
}

fn load(file: &str) -> Value {
    let path = deploy().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn help(subcommand: &str) -> String {
    let out = Command::new(SLUICE)
        .args([subcommand, "--help"])
        .output()
        .expect("run sluice");
    assert!(out.status.success(), "sluice {subcommand} --help failed");
    String::from_utf8(out.stdout).unwrap()
}

/// `(args, container name)` of every container and init container of a DaemonSet file.
fn containers(file: &str) -> Vec<(String, Vec<String>)> {
    let ds = load(file);
    let spec = &ds["spec"]["template"]["spec"];
    let mut found = Vec::new();
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_sequence().into_iter().flatten() {
            let image = c["image"].as_str().unwrap_or_default();
            if image != "sluice" {
                continue;
            }
            let args = c["args"]
                .as_sequence()
                .expect("a sluice container passes args")
                .iter()
                .map(|a| a.as_str().expect("args are strings").to_string())
                .collect();
            found.push((c["name"].as_str().unwrap().to_string(), args));
        }
    }
    assert!(
        !found.is_empty(),
        "{file}: no container runs the sluice image"
    );
    found
}

#[test]
fn every_flag_in_the_daemonsets_is_one_sluice_accepts() {
    for file in ["daemonset.yaml", "uninstall/daemonset.yaml"] {
        for (name, args) in containers(file) {
            let subcommand = &args[0];
            let help = help(subcommand);
            for arg in &args[1..] {
                let flag = arg.split('=').next().unwrap();
                assert!(
                    flag.starts_with("--"),
                    "{file} {name}: {arg:?} is not a --flag"
                );
                assert!(
                    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                    "{file} container {name}: `sluice {subcommand}` has no flag {flag}"
                );
            }
        }
    }
}

#[test]
fn every_configmap_key_is_the_environment_variable_of_a_run_flag() {
    let cm = load("configmap.yaml");
    let data = cm["data"].as_mapping().expect("configmap data");
    assert!(!data.is_empty());
    let help = help("run");
    for key in data.keys() {
        let key = key.as_str().unwrap();
        assert!(
            help.contains(&format!("[env: {key}=")),
            "configmap.yaml: {key} is not the environment variable of any `sluice run` flag"
        );
    }
}

#[test]
fn the_daemonset_reads_the_configmap_it_ships_with() {
    let ds = load("daemonset.yaml");
    let cm = load("configmap.yaml");
    let name = cm["metadata"]["name"].as_str().unwrap();
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    let refs: Vec<&str> = agent["envFrom"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|e| e["configMapRef"]["name"].as_str())
        .collect();
    assert_eq!(refs, [name]);
    // The node name comes from the downward API, as Kubernetes mode requires.
    let env = agent["env"].as_sequence().expect("env");
    let node = env
        .iter()
        .find(|e| e["name"] == "NODE_NAME")
        .expect("NODE_NAME");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let caps = &agent["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        serde_yaml::from_str::<Value>("[ALL]").unwrap()
    );
}

#[test]
fn the_cluster_role_grants_exactly_what_the_watchers_and_event_recorder_use() {
    use std::collections::BTreeSet;
    let role = load("clusterrole.yaml");
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        let list = |field: &str| -> Vec<String> {
            rule[field]
                .as_sequence()
                .unwrap_or_else(|| panic!("clusterrole.yaml: a rule without {field}"))
                .iter()
                .map(|v| v.as_str().expect("strings").to_string())
                .collect()
        };
        for group in list("apiGroups") {
            for resource in list("resources") {
                for verb in list("verbs") {
                    granted.insert((group.clone(), resource.clone(), verb));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = sluice_kube::RBAC_RULES
        .iter()
        .flat_map(|r| {
            r.verbs
                .iter()
                .map(|v| (r.group.to_string(), r.resource.to_string(), v.to_string()))
        })
        .collect();
    assert_eq!(
        granted.difference(&used).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "clusterrole.yaml grants more than the code uses"
    );
    assert_eq!(
        used.difference(&granted).collect::<Vec<_>>(),
        Vec::<&(String, String, String)>::new(),
        "the code uses permissions clusterrole.yaml does not grant"
    );
}
