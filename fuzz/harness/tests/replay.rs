//! The seed corpus through exactly what the fuzz targets run, on the stable toolchain: every
//! invariant the fuzzer checks holds for every seed (and for the YAML under `examples/`, which
//! `cargo xtask fuzz` adds to the configuration target's corpus).

use sluice_fuzz_harness::{config, front::Front, seeds};
use std::path::Path;

#[test]
fn configuration_seeds_and_examples_keep_every_invariant() {
    let mut inputs = seeds("config");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let (files, problems) = sluice_config::collect_files(&examples);
    assert!(problems.is_empty(), "{problems:?}");
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        inputs.push((f, bytes));
    }
    assert!(inputs.len() > 20, "{} inputs", inputs.len());
    for (file, bytes) in inputs {
        eprintln!("{}", file.display());
        config::check_file(&bytes);
        config::check_api(&bytes);
    }
}

#[test]
fn http_seeds_keep_every_invariant() {
    let front = Front::new();
    let inputs = seeds("http");
    assert!(inputs.len() >= 30);
    for (file, bytes) in inputs {
        eprintln!("{}", file.display());
        front.exchange(&bytes);
    }
}
