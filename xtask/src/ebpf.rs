//! `cargo xtask build-ebpf`: checks the eBPF toolchain (nightly, its rust-src, bpf-linker 0.13.0
//! built against the nightly's own libLLVM), installs what is missing with `--install`, then
//! builds `ebpf/programs` (release, BTF) into `target/bpf/sluice-ebpf.o`.
//!
//! Why bpf-linker is built against the Rust toolchain's libLLVM and not Debian's: see
//! `../shared/TOOLCHAIN.md` (Debian's LLVM 19 cannot read rustc's LLVM 22 bitcode).

// A synchronous command-line task: no runtime whose paused time wall clocks could defeat.
#![allow(clippy::disallowed_methods)]

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use anyhow::{bail, Context, Result};

const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_LINKER_LLVM_FEATURE: &str = "llvm-22";
const TARGET: &str = "bpfel-unknown-none";

#[derive(clap::Args, Debug)]
pub struct BuildEbpfArgs {
    /// Install missing prerequisites (rust-src, bpf-linker) instead of only naming them.
    #[arg(long)]
    install: bool,
    /// Build the variant N instead (`SLUICE_EBPF_VARIANT=N`): the same programs and maps with
    /// another program tag, written to `target/bpf/sluice-ebpf-variant-N.o` (tests upgrade to it
    /// in place).
    #[arg(long)]
    variant: Option<u32>,
}

pub fn run(args: BuildEbpfArgs) -> Result<ExitCode> {
    let root = workspace_root();
    let missing = check_prerequisites(args.install)?;
    if !missing.is_empty() {
        eprintln!("xtask build-ebpf: missing prerequisites; run (or pass --install):");
        for cmd in &missing {
            eprintln!("    {cmd}");
        }
        return Ok(ExitCode::from(2));
    }
    let started = std::time::Instant::now();
    let object = build(&root, args.variant)?;
    println!(
        "xtask build-ebpf: {} ({} bytes) in {}",
        object.display(),
        std::fs::metadata(&object)?.len(),
        secs(started.elapsed())
    );
    Ok(ExitCode::SUCCESS)
}

/// Where `sluice-redirect` looks for the object by default.
pub fn object_path(root: &Path) -> PathBuf {
    root.join("target/bpf/sluice-ebpf.o")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .into()
}

/// Returns the commands still to run (empty when everything is present).
fn check_prerequisites(install: bool) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    if !output_ok(rustup().args(["run", "nightly", "rustc", "--version"])) {
        // Never installed implicitly: a whole toolchain is the machine owner's call.
        missing.push("rustup toolchain install nightly --profile minimal".to_string());
        return Ok(missing);
    }

    let components =
        output(rustup().args(["component", "list", "--installed", "--toolchain", "nightly"]))
            .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        let cmd = "rustup component add rust-src --toolchain nightly";
        if install {
            println!("xtask build-ebpf: {cmd}");
            run_checked(rustup().args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
        } else {
            missing.push(cmd.to_string());
        }
    }

    let linker_ok = output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION));
    if !linker_ok {
        let prefix = llvm_prefix()?;
        let lib = nightly_libllvm()?;
        let link_cmd = format!(
            "mkdir -p {p}/lib && ln -sf {l} {p}/lib/libLLVM.so && ln -sf {l} {p}/lib/{n}",
            p = prefix.display(),
            l = lib.display(),
            n = lib.file_name().and_then(OsStr::to_str).unwrap_or_default(),
        );
        let install_cmd = format!(
            "LLVM_PREFIX={} cargo +nightly install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features {BPF_LINKER_LLVM_FEATURE} --force",
            prefix.display()
        );
        if install {
            link_llvm(&prefix, &lib)?;
            println!("xtask build-ebpf: {install_cmd}  (about 2-3 minutes cold)");
            let started = std::time::Instant::now();
            run_checked(
                rustup()
                    .args(["run", "nightly", "cargo", "install", "bpf-linker"])
                    .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
                    .args(["--features", BPF_LINKER_LLVM_FEATURE, "--force"])
                    .env("LLVM_PREFIX", &prefix),
            )?;
            println!(
                "xtask build-ebpf: bpf-linker installed in {}",
                secs(started.elapsed())
            );
        } else {
            missing.push(link_cmd);
            missing.push(install_cmd);
        }
    }
    Ok(missing)
}

/// A stable directory whose `lib/` holds the symlinks to the nightly's libLLVM; the installed
/// bpf-linker's rpath points there, so it must outlive any build directory.
fn llvm_prefix() -> Result<PathBuf> {
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(h) => PathBuf::from(h),
        None => {
            PathBuf::from(std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?)
                .join(".cargo")
        }
    };
    Ok(cargo_home.join("sluice-llvm"))
}

fn nightly_libllvm() -> Result<PathBuf> {
    let sysroot = output(rustup().args(["run", "nightly", "rustc", "--print", "sysroot"]))
        .context("rustc +nightly --print sysroot failed")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") {
            return Ok(lib.join(name));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: this nightly does not ship a shared LLVM",
        lib.display()
    )
}

fn link_llvm(prefix: &Path, lib: &Path) -> Result<()> {
    let dir = prefix.join("lib");
    std::fs::create_dir_all(&dir)?;
    let name = lib.file_name().context("libLLVM path has no file name")?;
    for link in [dir.join("libLLVM.so"), dir.join(name)] {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib, &link)
            .with_context(|| format!("symlink {} -> {}", link.display(), lib.display()))?;
    }
    Ok(())
}

/// Where `build-ebpf --variant N` writes its object.
pub fn variant_object_path(root: &Path, variant: u32) -> PathBuf {
    root.join(format!("target/bpf/sluice-ebpf-variant-{variant}.o"))
}

fn build(root: &Path, variant: Option<u32>) -> Result<PathBuf> {
    // A variant builds in its own target directory, so the plain build stays fresh.
    let target_dir = match variant {
        None => root.join("target/ebpf"),
        Some(n) => root.join(format!("target/ebpf-variant-{n}")),
    };
    let mut cmd = rustup();
    // Settings of the outer (stable, host) cargo must not leak into the nightly BPF build (CI's
    // codegen units would undo the one unit bpf-linker needs).
    without_outer_cargo_settings(&mut cmd);
    cmd.args([
        "run",
        "nightly",
        "cargo",
        "build",
        "--locked",
        "--release",
        "--target",
        TARGET,
    ])
    .args(["-Z", "build-std=core", "--target-dir"])
    .arg(&target_dir)
    .current_dir(root.join("ebpf/programs"))
    // BTF so the loader can relocate against this kernel and `bpftool` can show the maps.
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        "-Cdebuginfo=2\x1f-Clink-arg=--btf",
    );
    match variant {
        Some(n) => cmd.env("SLUICE_EBPF_VARIANT", n.to_string()),
        None => cmd.env_remove("SLUICE_EBPF_VARIANT"),
    };
    println!("xtask build-ebpf: cargo +nightly build --release --target {TARGET} -Z build-std=core (ebpf/programs)");
    run_checked(&mut cmd)?;
    let built = target_dir.join(TARGET).join("release/sluice-ebpf");
    let object = match variant {
        None => object_path(root),
        Some(n) => variant_object_path(root, n),
    };
    std::fs::create_dir_all(object.parent().expect("object path has a parent"))?;
    std::fs::copy(&built, &object)
        .with_context(|| format!("copying {} to {}", built.display(), object.display()))?;
    Ok(object)
}

/// Removes what the outer cargo (stable, the host's) was told from a nested nightly cargo's
/// environment: its toolchain, compiler flags, target directory and target, and profile overrides
/// (`CARGO_PROFILE_*`, which CI sets for its release build).
pub(crate) fn without_outer_cargo_settings(cmd: &mut Command) {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with("CARGO_PROFILE_"))
        {
            cmd.env_remove(key);
        }
    }
}

pub(crate) fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn output_ok(cmd: &mut Command) -> bool {
    output(cmd).is_some()
}

pub(crate) fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
