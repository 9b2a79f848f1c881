//! The workspace's binaries for tests that run them as processes: built once per test binary with
//! the test's own profile (cargo builds other packages' binaries only for their own tests).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// `target/<profile>` of the running test binary (`target/<profile>/deps/<test>-<hash>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps")
        .to_path_buf()
}

/// `sluice`, built up to date.
pub fn sluice() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build(&["sluice"]).remove(0))
}

/// Builds the binaries of `packages` (each named like its package) and returns their paths.
pub fn build(packages: &[&str]) -> Vec<PathBuf> {
    let dir = profile_dir();
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--quiet", "--profile", &profile]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let out = cmd
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stdin(Stdio::null())
        .output()
        .expect("running cargo build");
    assert!(
        out.status.success(),
        "cargo build {packages:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    packages
        .iter()
        .map(|p| {
            let bin = dir.join(p);
            assert!(bin.is_file(), "{} was not built", bin.display());
            bin
        })
        .collect()
}
