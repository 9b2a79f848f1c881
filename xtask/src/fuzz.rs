//! `cargo xtask fuzz [--target T]... [--seconds N]`: runs the libFuzzer targets of `fuzz/`
//! (`cargo fuzz`, nightly) one after the other, each for N seconds, and prints what each did:
//! executions, coverage (libFuzzer's edge and feature counts), corpus, peak RSS, and any finding.
//!
//! Prerequisites, as `build-ebpf` has them: the nightly toolchain (the one `.ci/ebpf-prereqs`
//! installs for the eBPF build; its `rust-src` too) and `cargo-fuzz`, installed with `--install`
//! when missing and reused when present. The fuzz build goes to `target/fuzz` (its own
//! sanitizer-instrumented build of every dependency: a few minutes cold, seconds after).
//!
//! Corpora: new inputs go to `target/fuzz/corpus/<target>` (kept between runs on a machine, so a
//! later run continues where the last one stopped); the committed seeds under `fuzz/seeds/<target>`
//! (both configuration targets share `fuzz/seeds/config`) and, for them, every YAML/JSON file of
//! `examples/` are read as well. A crashing or hanging input is written under
//! `fuzz/artifacts/<target>/`; the run fails then.

// A synchronous command-line task: wall-clock time is what it measures.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::ebpf::{output, output_ok, run_checked, rustup, without_outer_cargo_settings};
use anyhow::{Context, Result};

const CARGO_FUZZ_VERSION: &str = "0.13.1";
const TARGETS: [&str; 3] = ["config", "config_api", "http"];

#[derive(clap::Args, Debug)]
pub struct FuzzArgs {
    /// Target to run (repeat for several) [default: all: config, config_api, http].
    #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// libFuzzer's per-input time limit (a slower input is reported as a hang).
    #[arg(long, default_value_t = 10)]
    input_timeout: u64,
    /// Install missing prerequisites (nightly's rust-src, cargo-fuzz) instead of only naming them.
    #[arg(long)]
    install: bool,
}

/// What one target's run did, read from libFuzzer's output.
#[derive(Debug, Default)]
struct Figures {
    runs: u64,
    exec_per_sec: u64,
    cov: u64,
    ft: u64,
    corpus: String,
    new_units: u64,
    peak_rss_mb: u64,
    slowest_input_s: u64,
}

pub fn run(args: FuzzArgs) -> Result<ExitCode> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf();
    let missing = prerequisites(args.install)?;
    if !missing.is_empty() {
        eprintln!("xtask fuzz: missing prerequisites; run (or pass --install):");
        for cmd in &missing {
            eprintln!("    {cmd}");
        }
        return Ok(ExitCode::from(2));
    }
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };

    let started = Instant::now();
    println!("xtask fuzz: cargo +nightly fuzz build (target/fuzz; a few minutes cold)");
    let mut build = cargo_fuzz(&root);
    build.arg("build");
    fuzz_dirs(&mut build);
    run_checked(&mut build)?;
    println!(
        "xtask fuzz: built in {:.0}s",
        started.elapsed().as_secs_f64()
    );

    let examples = examples_corpus(&root)?;
    let mut failed = Vec::new();
    let mut report = Vec::new();
    for target in &targets {
        let corpus = root.join("target/fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        // Both configuration targets read configuration files: the same seeds.
        let seeds = if target.starts_with("config") {
            "config"
        } else {
            target
        };
        let mut dirs = vec![corpus, root.join("fuzz/seeds").join(seeds)];
        if seeds == "config" {
            dirs.push(examples.clone());
        }
        let log = root.join("target/fuzz/logs").join(format!("{target}.log"));
        let (ok, figures, elapsed) = run_target(&root, target, &dirs, &args, &log)?;
        if !ok {
            failed.push(target.to_string());
        }
        report.push((target.to_string(), ok, figures, elapsed, log));
    }

    println!("\nxtask fuzz: {} s per target", args.seconds);
    println!(
        "{:<8} {:>7} {:>12} {:>8} {:>7} {:>7} {:>14} {:>6} {:>8} {:>9}  result",
        "target",
        "seconds",
        "executions",
        "exec/s",
        "cov",
        "ft",
        "corpus",
        "new",
        "rss MB",
        "slowest s"
    );
    for (target, ok, f, elapsed, log) in &report {
        println!(
            "{:<8} {:>7.0} {:>12} {:>8} {:>7} {:>7} {:>14} {:>6} {:>8} {:>9}  {}",
            target,
            elapsed.as_secs_f64(),
            f.runs,
            f.exec_per_sec,
            f.cov,
            f.ft,
            f.corpus,
            f.new_units,
            f.peak_rss_mb,
            f.slowest_input_s,
            if *ok {
                "no crash, no hang".to_string()
            } else {
                format!(
                    "FAILED (see {} and fuzz/artifacts/{target}/)",
                    log.display()
                )
            }
        );
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "xtask fuzz: {} found a crash or hang: reproduce with `cargo +nightly fuzz run --fuzz-dir fuzz --target-dir target/fuzz TARGET fuzz/artifacts/TARGET/<file>`, then make it a test",
            failed.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

/// `cargo +nightly fuzz` from the repository root, with the outer (stable) cargo's settings kept
/// out of the nightly build.
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = rustup();
    cmd.args(["run", "nightly", "cargo", "fuzz"])
        .current_dir(root);
    without_outer_cargo_settings(&mut cmd);
    cmd
}

/// Appends the fuzz directory and target directory: after the subcommand.
fn fuzz_dirs(cmd: &mut Command) {
    cmd.args(["--fuzz-dir", "fuzz", "--target-dir", "target/fuzz"]);
}

fn run_target(
    root: &Path,
    target: &str,
    dirs: &[PathBuf],
    args: &FuzzArgs,
    log: &Path,
) -> Result<(bool, Figures, Duration)> {
    println!(
        "\nxtask fuzz: {target} for {} s (log: {})",
        args.seconds,
        log.display()
    );
    std::fs::create_dir_all(log.parent().expect("a log directory"))?;
    let mut file = std::fs::File::create(log)?;
    let mut cmd = cargo_fuzz(root);
    cmd.arg("run");
    fuzz_dirs(&mut cmd);
    cmd.arg(target)
        .args(dirs)
        .arg("--")
        .arg(format!("-max_total_time={}", args.seconds))
        .arg(format!("-timeout={}", args.input_timeout))
        .arg("-print_final_stats=1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().context("cannot run cargo fuzz")?;
    // libFuzzer reports on stderr; the targets print nothing on stdout, but drain it anyway.
    let stdout = child.stdout.take().expect("piped stdout");
    let drain = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut BufReader::new(stdout), &mut out);
        out
    });
    let mut figures = Figures::default();
    let mut last_print = Instant::now();
    let mut tail: std::collections::VecDeque<String> = Default::default();
    for line in BufReader::new(child.stderr.take().expect("piped stderr")).lines() {
        let line = line?;
        writeln!(file, "{line}")?;
        read_figures(&line, &mut figures);
        // Progress about every 10 s, and every line that is not routine (libFuzzer's status
        // lines, its notes and its closing dictionary are).
        let routine = line.starts_with('#')
            || line.starts_with("INFO:")
            || line.starts_with('"')
            || line.trim_start().starts_with("NEW_FUNC")
            || line.starts_with("MS:")
            || line.starts_with("Done ")
            || line.starts_with("stat::")
            || line.trim().is_empty();
        if !routine || (line.starts_with('#') && last_print.elapsed() >= Duration::from_secs(10)) {
            println!("  {line}");
            last_print = Instant::now();
        }
        tail.push_back(line);
        if tail.len() > 40 {
            tail.pop_front();
        }
    }
    let status = child.wait()?;
    let stdout = drain.join().unwrap_or_default();
    file.write_all(&stdout)?;
    let elapsed = started.elapsed();
    if !status.success() {
        eprintln!("xtask fuzz: {target} ended with {status}; the end of its output:");
        for line in &tail {
            eprintln!("  {line}");
        }
    }
    Ok((status.success(), figures, elapsed))
}

/// The figures libFuzzer prints: status lines (`#N  pulse  cov: C ft: F corp: U/S ...
/// exec/s: E rss: RMb`) and, at the end, `stat::` lines.
fn read_figures(line: &str, f: &mut Figures) {
    let value = |key: &str| -> Option<&str> {
        let mut words = line.split_whitespace();
        words.find(|w| *w == key)?;
        words.next()
    };
    let number = |key: &str| value(key).and_then(|v| v.trim_end_matches("Mb").parse::<u64>().ok());
    if let Some(status) = line.strip_prefix('#') {
        if let Some(runs) = status
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
        {
            f.runs = runs;
        }
        if let Some(c) = number("cov:") {
            f.cov = c;
        }
        if let Some(v) = number("ft:") {
            f.ft = v;
        }
        if let Some(v) = value("corp:") {
            f.corpus = v.to_string();
        }
        if let Some(v) = number("exec/s:") {
            f.exec_per_sec = v;
        }
        if let Some(v) = number("rss:") {
            f.peak_rss_mb = f.peak_rss_mb.max(v);
        }
    } else if let Some(rest) = line.strip_prefix("stat::") {
        let (key, v) = rest.split_once(':').unwrap_or((rest, ""));
        let v: u64 = v.trim().parse().unwrap_or(0);
        match key {
            "number_of_executed_units" => f.runs = v,
            "average_exec_per_sec" => f.exec_per_sec = v,
            "new_units_added" => f.new_units = v,
            "slowest_unit_time_sec" => f.slowest_input_s = v,
            "peak_rss_mb" => f.peak_rss_mb = v,
            _ => {}
        }
    }
}

/// Every YAML/JSON file of `examples/`, copied flat into a corpus directory of its own.
fn examples_corpus(root: &Path) -> Result<PathBuf> {
    let out = root.join("target/fuzz/examples");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    let mut stack = vec![root.join("examples")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                let name = rel.to_string_lossy().replace('/', "_");
                std::fs::copy(&path, out.join(name))?;
            }
        }
    }
    Ok(out)
}

/// Returns the commands still to run (empty when everything is present).
fn prerequisites(install: bool) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    if !output_ok(rustup().args(["run", "nightly", "rustc", "--version"])) {
        // Never installed implicitly: a whole toolchain is the machine owner's call
        // (`.ci/ebpf-prereqs` installs it in CI).
        missing.push("rustup toolchain install nightly --profile minimal".to_string());
        return Ok(missing);
    }
    let components =
        output(rustup().args(["component", "list", "--installed", "--toolchain", "nightly"]))
            .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        let cmd = "rustup component add rust-src --toolchain nightly";
        if install {
            println!("xtask fuzz: {cmd}");
            run_checked(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        } else {
            missing.push(cmd.to_string());
        }
    }
    let present = output(rustup().args(["run", "nightly", "cargo", "fuzz", "--version"]))
        .is_some_and(|v| v.contains(CARGO_FUZZ_VERSION));
    if !present {
        // Built with the repository's pinned stable toolchain: its locked dependencies
        // (rustix 0.36) do not build on a current nightly, and the tool itself needs no nightly.
        let cmd = format!("cargo install cargo-fuzz --version {CARGO_FUZZ_VERSION} --locked");
        if install {
            println!("xtask fuzz: {cmd}  (about 2 minutes)");
            run_checked(
                Command::new(env!("CARGO"))
                    .args(["install", "cargo-fuzz"])
                    .args(["--version", CARGO_FUZZ_VERSION, "--locked"]),
            )?;
        } else {
            missing.push(cmd);
        }
    }
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_gives_the_figures() {
        let mut f = Figures::default();
        for line in [
            "INFO: Seed: 123",
            "#2\tINITED cov: 10 ft: 11 corp: 3/1024b exec/s: 0 rss: 40Mb",
            "#65536\tpulse  cov: 4021 ft: 9120 corp: 812/96Kb lim: 4096 exec/s: 2184 rss: 512Mb",
            "#70001\tNEW    cov: 4022 ft: 9121 corp: 813/96Kb lim: 4096 exec/s: 2180 rss: 498Mb L: 9/4000 MS: 1 ChangeBit-",
            "Done 130000 runs in 60 second(s)",
            "stat::number_of_executed_units: 130000",
            "stat::average_exec_per_sec:     2166",
            "stat::new_units_added:          540",
            "stat::slowest_unit_time_sec:    1",
            "stat::peak_rss_mb:              530",
        ] {
            read_figures(line, &mut f);
        }
        assert_eq!(
            (f.runs, f.exec_per_sec, f.cov, f.ft, f.corpus.as_str()),
            (130000, 2166, 4022, 9121, "813/96Kb")
        );
        assert_eq!(
            (f.new_units, f.peak_rss_mb, f.slowest_input_s),
            (540, 530, 1)
        );
    }
}
