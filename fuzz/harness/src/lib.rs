//! What Sluice's fuzz targets (`fuzz/fuzz_targets`, run by `cargo xtask fuzz`) do with each input,
//! and the invariants they check. Kept in the main workspace so that `cargo test` replays the seed
//! corpus (`fuzz/seeds/`) through exactly what the fuzzer runs, on the stable toolchain.
//!
//! * [`config::check`]: a configuration file through every entry point the agent reads
//!   configuration through.
//! * [`front::Front::exchange`]: raw client bytes at the proxy's listeners.
//! * [`wire::check`]: what a client may receive (used by `front`).
#![forbid(unsafe_code)]

pub mod config;
pub mod front;
pub mod wire;

use std::path::{Path, PathBuf};

/// The committed seed inputs of `target` (`config`, `http`), as (file, bytes).
pub fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            (f, bytes)
        })
        .collect()
}
