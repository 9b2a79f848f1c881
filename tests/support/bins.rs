//! The workspace's binaries for tests that run them as processes. Cargo builds other packages'
//! binaries only for their own tests, so these are built here, once per test binary.
//!
//! Every build selects the same packages (`-p sluice -p fake-service`), as `cargo xtask demo`
//! does: cargo unifies features across the packages of one invocation, so a different selection
//! builds different dependency artifacts, and each build would invalidate the other's `sluice`
//! (minutes of thin-LTO relinking per switch in release).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Paths of the built binaries.
#[derive(Debug)]
pub struct Bins {
    pub sluice: PathBuf,
    pub fake_service: PathBuf,
}

/// `target/<profile>` of the running test binary (`target/<profile>/deps/<test>-<hash>`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test binary under target/<profile>/deps")
        .to_path_buf()
}

/// The binaries built with this test's own profile.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = profile_dir();
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev".to_owned(),
            Some(other) => other.to_owned(),
        };
        build(&profile, &dir)
    })
}

/// The binaries built with the release profile (what the demo runs), for timing.
pub fn release_bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let dir = profile_dir().parent().expect("target dir").join("release");
        build("release", &dir)
    })
}

/// `sluice` built with this test's profile.
pub fn sluice() -> &'static Path {
    &bins().sluice
}

fn build(profile: &str, dir: &Path) -> Bins {
    // One cargo build at a time from this process (tests run on parallel threads).
    static ONE: parking_lot::Mutex<()> = parking_lot::const_mutex(());
    let _one = ONE.lock();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    // What cargo set for this test process describes the test package, not the build: passed
    // on, it reaches build scripts (cc's, ring's) as changed environment and rebuilds them, so
    // the next plain `cargo build` (the demo's) rebuilds them again.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let injected = key == "OUT_DIR"
            || key == "CARGO_MANIFEST_DIR"
            || key == "CARGO_MANIFEST_PATH"
            || key == "CARGO_MANIFEST_LINKS"
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
            || key == "CARGO_RUSTC_CURRENT_DIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_EXE_");
        if injected {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .args(["build", "--quiet", "--profile", profile])
        .args(["-p", "sluice", "-p", "fake-service"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stdin(Stdio::null())
        .output()
        .expect("running cargo build for the sluice and fake-service binaries");
    assert!(
        out.status.success(),
        "cargo build --profile {profile} -p sluice -p fake-service: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bins = Bins {
        sluice: dir.join("sluice"),
        fake_service: dir.join("fake-service"),
    };
    for b in [&bins.sluice, &bins.fake_service] {
        assert!(b.is_file(), "{} was not built", b.display());
    }
    bins
}
