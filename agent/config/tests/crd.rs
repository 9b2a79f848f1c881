//! Every field Istio's CRD schema defines for VirtualService and DestinationRule (v1) is known to
//! Sluice's serde types: understood, or kept so that conversion warns it is unsupported. A document
//! with every field set (generated from the schema) must parse without "unknown field" warnings.

mod common;

use serde_yaml::{Mapping, Value};
use sluice_config::{build, parse_str, BuildOptions};

/// A value of the schema's shape with every property present.
fn fill(schema: &Value) -> Value {
    if let Some(props) = schema.get("properties").and_then(Value::as_mapping) {
        let mut m = Mapping::new();
        for (k, v) in props {
            m.insert(k.clone(), fill(v));
        }
        return Value::Mapping(m);
    }
    if let Some(extra) = schema
        .get("additionalProperties")
        .filter(|v| v.is_mapping())
    {
        let mut m = Mapping::new();
        m.insert("x-key".into(), fill(extra));
        return Value::Mapping(m);
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_sequence)
        .and_then(|s| s.first())
    {
        return first.clone();
    }
    match schema.get("type").and_then(Value::as_str) {
        Some("array") => Value::Sequence(vec![fill(schema.get("items").unwrap_or(&Value::Null))]),
        Some("integer") => 1.into(),
        Some("number") => 1.5.into(),
        Some("boolean") => true.into(),
        Some("object") => Value::Mapping(Mapping::new()),
        _ => "1s".into(),
    }
}

#[test]
fn every_crd_field_is_known() {
    let Some(dir) = common::shared_dir("istio") else {
        return;
    };
    let text = std::fs::read_to_string(dir.join("crd-all.gen.yaml")).unwrap();
    let mut checked = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let crd = Value::deserialize_from(doc);
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if kind != "VirtualService" && kind != "DestinationRule" {
            continue;
        }
        for version in crd["spec"]["versions"].as_sequence().unwrap() {
            if version["name"].as_str() != Some("v1") {
                continue;
            }
            let spec = fill(&version["schema"]["openAPIV3Schema"]["properties"]["spec"]);
            let mut obj = Mapping::new();
            obj.insert("apiVersion".into(), "networking.istio.io/v1".into());
            obj.insert("kind".into(), kind.clone().into());
            obj.insert(
                "metadata".into(),
                serde_yaml::from_str("{name: everything, namespace: shop}").unwrap(),
            );
            obj.insert("spec".into(), spec);
            let yaml = serde_yaml::to_string(&Value::Mapping(obj)).unwrap();
            let parsed = parse_str("everything.yaml", &yaml);
            let bad: Vec<_> = parsed
                .problems
                .iter()
                .filter(|p| p.is_error() || p.reason == "unknown field")
                .collect();
            assert!(bad.is_empty(), "{kind}: {bad:#?}\n{yaml}");
            assert_eq!(parsed.objects.len(), 1);
            // Conversion may reject these nonsense values, but must not panic, and it names the
            // unsupported fields it sees.
            let (_, problems) = build(&parsed.objects, &BuildOptions::default());
            assert!(problems
                .iter()
                .any(|p| p.reason == "not supported by Sluice yet; ignored"));
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "VirtualService and DestinationRule v1 schemas");
}

trait FromDoc {
    fn deserialize_from(doc: serde_yaml::Deserializer) -> Value;
}

impl FromDoc for Value {
    fn deserialize_from(doc: serde_yaml::Deserializer) -> Value {
        serde::Deserialize::deserialize(doc).unwrap()
    }
}
