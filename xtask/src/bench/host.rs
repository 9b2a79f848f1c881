//! What a run of the bench ran on: the CPU (its family and caches), the kernel and each peer's
//! version. The ratios move with the host (Envoy measured 3.9x slower than Sluice on one CPU and
//! 2.1x on the next), so a figure is only comparable with one from the same kind of host.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use super::instructions::{cache_field, CPU0_CACHES};

/// The host and the programs of one run.
#[derive(Debug, Default, Serialize)]
pub struct Host {
    /// `model name`, with the family and model numbers the name may hide in a VM.
    pub cpu: String,
    /// Per level and kind, as sysfs gives them: `L1d 48K`, `L1i 32K`, `L2 1024K`, `L3 32768K`.
    pub caches: Vec<String>,
    pub kernel: String,
    /// The checkout Sluice was built from (`git describe --always --dirty`).
    pub sluice: String,
    pub haproxy: Option<String>,
    pub envoy: Option<String>,
    pub nginx: Option<String>,
}

impl Host {
    /// Reads the host; the peers' versions from the programs the run uses.
    pub fn read(
        root: &Path,
        haproxy: Option<&Path>,
        envoy: Option<&Path>,
        nginx: Option<&Path>,
    ) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Host {
            cpu: cpu(&cpuinfo),
            caches: caches(Path::new(CPU0_CACHES)),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            sluice: first_line(
                Command::new("git")
                    .args(["describe", "--always", "--dirty"])
                    .current_dir(root),
            )
            .unwrap_or_default(),
            // `HAProxy version 2.6.12-1 2025/10/03 - https://haproxy.org/`: up to the link.
            haproxy: haproxy.and_then(|p| {
                first_line(Command::new(p).arg("-v"))
                    .map(|l| l.split(" - ").next().unwrap_or_default().to_owned())
            }),
            // `envoy --version` prints its path, then `version: <sha>/<release>/...`.
            envoy: envoy.and_then(|p| {
                first_line(Command::new(p).arg("--version"))
                    .and_then(|l| l.split("version: ").nth(1).map(str::to_owned))
            }),
            nginx: nginx.and_then(|p| first_line(Command::new(p).arg("-v"))),
        }
    }

    /// One line for the report.
    pub fn line(&self) -> String {
        let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        format!(
            "host: {} ({}), Linux {}; sluice {}, {}, envoy {}, {}",
            self.cpu,
            self.caches.join(" "),
            self.kernel,
            self.sluice,
            or_none(&self.haproxy),
            or_none(&self.envoy),
            or_none(&self.nginx)
        )
    }
}

/// The CPU's name and, for x86, its family, model and stepping.
fn cpu(cpuinfo: &str) -> String {
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_owned())
        })
    };
    let name = field("model name").unwrap_or_else(|| "unknown CPU".into());
    match (field("cpu family"), field("model"), field("stepping")) {
        (Some(f), Some(m), Some(s)) => format!("{name}, family {f} model {m} stepping {s}"),
        _ => name,
    }
}

/// Each cache level of one CPU, as `L1d 48K`.
fn caches(dir: &Path) -> Vec<String> {
    let read = |i: usize, f: &str| cache_field(dir, i, f);
    (0..8)
        .map_while(|i| {
            let level = read(i, "level").ok()?;
            let kind = match read(i, "type").ok()?.as_str() {
                "Data" => "d",
                "Instruction" => "i",
                _ => "",
            };
            Some(format!("L{level}{kind} {}", read(i, "size").ok()?))
        })
        .collect()
}

/// The first non-empty line a command prints, on stdout or (nginx) stderr.
fn first_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_caches_as_the_kernel_gives_them() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n\
                    model name\t: AMD EPYC\nstepping\t: 1\n";
        assert_eq!(cpu(info), "AMD EPYC, family 26 model 2 stepping 1");
        assert_eq!(cpu("model name : Neoverse\n"), "Neoverse");
        let dir = tempfile::tempdir().unwrap();
        for (i, (level, kind, size)) in [
            ("1", "Data", "48K"),
            ("1", "Instruction", "32K"),
            ("2", "Unified", "1024K"),
        ]
        .into_iter()
        .enumerate()
        {
            let d = dir.path().join(format!("index{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("level"), format!("{level}\n")).unwrap();
            std::fs::write(d.join("type"), format!("{kind}\n")).unwrap();
            std::fs::write(d.join("size"), format!("{size}\n")).unwrap();
        }
        assert_eq!(caches(dir.path()), ["L1d 48K", "L1i 32K", "L2 1024K"]);
    }

    #[test]
    fn a_version_from_either_stream() {
        let v =
            first_line(Command::new("sh").args(["-c", "echo 'nginx version: nginx/1.22.1' >&2"]));
        assert_eq!(v.as_deref(), Some("nginx version: nginx/1.22.1"));
        assert_eq!(first_line(&mut Command::new("/nonexistent/program")), None);
    }
}
