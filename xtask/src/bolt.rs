//! The last stage of `cargo xtask build-pgo`: the profile-guided binary laid out again by BOLT
//! (LLVM's post-link optimizer) from a profile of the same training.
//!
//! Profile-guided compilation orders blocks within a function and inlines by frequency, but
//! functions stay where the linker put them, crate by crate: the request path (hyper, tower,
//! tokio, the proxy's layers) is spread over megabytes of text. BOLT moves the functions the
//! training ran next to each other, in call order, and splits their cold blocks out (callgrind
//! under the benchmark's load: 388 -> 266 first-level instruction-cache misses and 32,584 -> 30,731
//! instructions per request). It rewrites the binary, so the link keeps its relocations
//! (`--emit-relocs`).
//!
//! Steps: `llvm-bolt -instrument` (counters in every block; no hardware counters needed, which
//! virtual machines rarely expose), the training run of that binary (it writes its profile at
//! exit, one file per process), `merge-fdata`, and `llvm-bolt` with the merged profile. The tools
//! come from the distribution's `bolt-N` package for the LLVM of the toolchain's rustc, installed
//! if missing; without them the profile-guided binary is the result.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::bench::path_str;

/// The link argument BOLT needs to move functions (their relocations kept in the binary).
pub(crate) const LINK_ARGS: &str = "-Clink-arg=-Wl,--emit-relocs";

/// `llvm-bolt` and `merge-fdata` from one LLVM.
pub(crate) struct Tools {
    bolt: PathBuf,
    merge: PathBuf,
}

impl Tools {
    /// The tools of the LLVM that rustc uses, else any installed; installs the distribution's
    /// package when `install` and none is found.
    pub(crate) fn find(install: bool) -> Option<Self> {
        let major = rustc_llvm_major();
        if let Some(tools) = Self::locate(major.as_deref()) {
            return Some(tools);
        }
        if install {
            if let Some(major) = &major {
                crate::bench::install_apt(&[(
                    &format!("llvm-bolt-{major}"),
                    &format!("bolt-{major}"),
                )]);
            }
        }
        Self::locate(major.as_deref())
    }

    fn locate(major: Option<&str>) -> Option<Self> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        if let Some(m) = major {
            dirs.push(PathBuf::from(format!("/usr/lib/llvm-{m}/bin")));
        }
        // Any other installed LLVM, newest first: BOLT reads machine code and DWARF, not LLVM IR.
        let mut others: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let v: u32 = name.strip_prefix("llvm-")?.parse().ok()?;
                Some((v, e.path().join("bin")))
            })
            .collect();
        others.sort_by_key(|o| std::cmp::Reverse(o.0));
        dirs.extend(others.into_iter().map(|(_, d)| d));
        dirs.into_iter()
            .map(|d| Self {
                bolt: d.join("llvm-bolt"),
                merge: d.join("merge-fdata"),
            })
            .chain(crate::bench::which("llvm-bolt").map(|bolt| Self {
                merge: bolt.with_file_name("merge-fdata"),
                bolt,
            }))
            .find(|t| t.bolt.is_file() && t.merge.is_file())
    }

    /// `binary` with counters in every block, writing `<profile>.<pid>.fdata` at exit.
    pub(crate) fn instrument(&self, binary: &Path, out: &Path, profile: &Path) -> Result<()> {
        self.run(
            Command::new(&self.bolt)
                .arg(binary)
                .arg("-instrument")
                .arg("-o")
                .arg(out)
                .arg(format!("--instrumentation-file={}", path_str(profile)))
                .arg("--instrumentation-file-append-pid"),
            "llvm-bolt -instrument",
        )
    }

    /// `binary` laid out by the profiles in `dir` (every `.fdata` there), written to `out`.
    pub(crate) fn optimize(&self, binary: &Path, dir: &Path, out: &Path) -> Result<()> {
        let profiles = crate::pgo::profiles_in(dir, "fdata")?;
        let merged = dir.join("merged.profile");
        let output = Command::new(&self.merge)
            .args(&profiles)
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("running {}", self.merge.display()))?;
        if !output.status.success() {
            bail!("merge-fdata failed ({})", output.status);
        }
        fs::write(&merged, output.stdout)?;
        self.run(
            Command::new(&self.bolt)
                .arg(binary)
                .arg("-o")
                .arg(out)
                .arg(format!("-data={}", path_str(&merged)))
                // Blocks in the order the profile runs them; functions clustered by calls.
                .args(["-reorder-blocks=ext-tsp", "-reorder-functions=cdsort"])
                // Cold blocks (error paths, landing pads) out of the hot functions' lines.
                .args(["-split-functions", "-split-all-cold", "-split-eh"])
                // Identical functions folded where no address of theirs is taken; the stack stays
                // non-executable.
                .args(["-icf=safe", "-use-gnu-stack"])
                // Backtraces and debuggers keep reading the right lines.
                .arg("-update-debug-sections"),
            "llvm-bolt",
        )
    }

    fn run(&self, cmd: &mut Command, what: &str) -> Result<()> {
        // BOLT reports every function it could not lay out (hand-written assembly in `ring`,
        // for one) as a warning; only a failure matters here, and its log is kept.
        let out = cmd
            .output()
            .with_context(|| format!("running {}", self.bolt.display()))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(20).collect();
            bail!(
                "{what} failed ({}):\n{}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }
}

/// The major version of rustc's LLVM (`LLVM version: 22.1.2` in `rustc -vV`).
fn rustc_llvm_major() -> Option<String> {
    let out = Command::new("rustc").arg("-vV").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    llvm_major(&text)
}

fn llvm_major(rustc_vv: &str) -> Option<String> {
    rustc_vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .filter(|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_digit()))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_rustc_vv() {
        let vv = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.2\n";
        assert_eq!(llvm_major(vv).as_deref(), Some("22"));
        assert_eq!(llvm_major("rustc 1.95.0\n"), None);
        assert_eq!(llvm_major("LLVM version: x.1\n"), None);
    }
}
