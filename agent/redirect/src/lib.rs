//! Loads Sluice's eBPF redirect programs (`ebpf/programs`, built by `cargo xtask build-ebpf`),
//! attaches them, pins programs, links and maps under `/sys/fs/bpf/sluice` and reuses those pins on
//! restart; [`uninstall`] detaches everything and removes the pins. [`Maps`] is the agent's handle
//! on the pinned maps: enrollment, proxy address, exclusions, counters.
//!
//! Attachments: `connect4`, `connect6`, `getsockopt` and `sock_ops` on one cgroup v2 directory
//! (normally the root, so every pod's cgroup is below it), `sk_msg` on the SOCKHASH.
//!
//! Pinned maps outlive the agent, so a new build may meet maps an older build pinned. aya would
//! silently reuse them whatever their layout; [`install`] compares every pinned map's type, key
//! and value sizes and capacity with the object's first, and replaces a stale installation whole
//! (programs included: old programs would keep reading the old maps) with a warning.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod cgroup;
pub mod enroll;
pub mod lease;
mod maps;
pub mod origdst;
mod sys;
pub mod watch;

use std::{
    fs::File,
    os::fd::{AsFd as _, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Map, MapData, SockHash},
    programs::{links::PinnedLink, CgroupSockAddr, CgroupSockopt, Link, SkMsg, SockOps},
    Ebpf, EbpfLoader,
};
use sluice_ebpf_common::{maps as map_names, programs as prog_names, TupleKey};

pub use maps::{Lease, Maps};
pub use sluice_ebpf_common::{Counter, ProxyConfig};
pub use sys::accept_queue_len;

/// Where programs, links and maps are pinned.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/sluice";
/// Where `cargo xtask build-ebpf` puts the object, relative to the workspace root.
pub const DEFAULT_OBJECT: &str = "target/bpf/sluice-ebpf.o";

/// Pinned maps. aya-log's ring buffer is pinned too, so that after a restart the logger reads the
/// buffer the (reused) pinned programs write to.
const ALL_MAPS: [&str; 11] = [
    map_names::CONFIG,
    map_names::ENROLLED,
    map_names::EXCLUDED_PORTS,
    map_names::EXCLUDED_V4,
    map_names::EXCLUDED_V6,
    map_names::ORIG_BY_COOKIE,
    map_names::ORIG_BY_TUPLE,
    map_names::SOCKETS,
    map_names::COUNTERS,
    map_names::LISTENER,
    "AYA_LOGS",
];

/// Programs attached to the cgroup, each with a pinned link.
const CGROUP_PROGRAMS: [&str; 4] = [
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::GETSOCKOPT,
    prog_names::SOCK_OPS,
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "eBPF object {0} not found: build it with `cargo xtask build-ebpf` (or pass its path)"
    )]
    MissingObject(PathBuf),
    #[error("loading {path}: {source}")]
    Load {
        path: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error(
        "program {0} is not in the eBPF object (stale object? rerun `cargo xtask build-ebpf`)"
    )]
    MissingProgram(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: String,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NoCgroup2,
    #[error("{0} is not an IPv{1} address")]
    Family(std::net::IpAddr, u8),
    #[error("proxy addresses {0} and {1} differ in port: the programs rewrite to one port")]
    ProxyPorts(std::net::SocketAddr, std::net::SocketAddr),
    #[error("reading the eBPF object {path}: {reason}")]
    Object { path: PathBuf, reason: String },
    #[error("map {0} is not pinned: install this build's programs first")]
    MissingPin(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to load and where to attach it.
#[derive(Clone, Debug)]
pub struct Options {
    /// The eBPF object (`target/bpf/sluice-ebpf.o`).
    pub object: PathBuf,
    /// The cgroup v2 directory the cgroup programs attach to (normally the hierarchy's root).
    pub cgroup: PathBuf,
    /// The bpffs directory for pins.
    pub pin_dir: PathBuf,
}

impl Options {
    /// The default object and pin directory, the machine's cgroup v2 root.
    pub fn new(object: impl Into<PathBuf>) -> Result<Self> {
        Ok(Options {
            object: object.into(),
            cgroup: cgroup2_root()?,
            pin_dir: DEFAULT_PIN_DIR.into(),
        })
    }
}

/// What [`install`] did for each attachment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// Programs attached by this call.
    pub attached: Vec<&'static str>,
    /// Programs whose pinned attachment was found and kept.
    pub reused: Vec<&'static str>,
    /// Pinned attachments that ran another build's program (tag differs): switched to this
    /// object's program in place (`BPF_LINK_UPDATE`, no moment without a program).
    pub upgraded: Vec<&'static str>,
    /// Pinned maps from an older layout that were found and replaced (with what differed); the
    /// whole previous installation was detached and removed first.
    pub replaced: Vec<String>,
}

/// What [`uninstall`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UninstallReport {
    /// Programs whose cgroup attachment was detached.
    pub detached: Vec<&'static str>,
    /// Pins removed (programs, links, maps).
    pub removed: Vec<PathBuf>,
}

impl UninstallReport {
    pub fn is_empty(&self) -> bool {
        self.detached.is_empty() && self.removed.is_empty()
    }
}

/// The loaded programs (kept for their log buffer) and the pinned maps.
pub struct Redirect {
    // Dropping the `Ebpf` unloads only this process's references: the pinned links keep the
    // programs attached. Kept also to repair the installation (re-attach, re-pin).
    ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    maps: Maps,
    report: InstallReport,
    /// Our maps as installed (`SLUICE_*`), kept to re-pin them.
    pinned_maps: Vec<(&'static str, MapData)>,
    cgroup: PathBuf,
    pin_dir: PathBuf,
}

/// One thing [`Redirect::repair`] found different in the kernel from what this installation
/// put there, and put back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    /// Short and stable, for counting: `link_missing`, `link_detached`, `program_replaced`,
    /// `map_pin_missing`, `map_pin_replaced`.
    pub kind: &'static str,
    /// The program or map.
    pub what: &'static str,
    pub detail: String,
}

impl Redirect {
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn report(&self) -> &InstallReport {
        &self.report
    }

    /// Compares what the kernel holds with this installation and puts back what drifted: each
    /// cgroup program's pinned link exists, is still attached to the attach cgroup and runs this
    /// build's program (by tag); each map's pin is the map the programs use. Errors that stop a
    /// repair are returned with what was repaired before them in the log.
    pub fn repair(&mut self) -> Result<Vec<Repair>> {
        let mut done = Vec::new();
        let cgroup_id = cgroup_id(&self.cgroup)?;
        for name in CGROUP_PROGRAMS {
            let link_pin = self.pin_dir.join("links").join(name);
            let link = match sys::obj_get(&link_pin) {
                Ok(link) => link,
                Err(e) => {
                    let cgroup = File::open(&self.cgroup).map_err(|source| Error::Io {
                        what: "opening cgroup",
                        path: self.cgroup.clone(),
                        source,
                    })?;
                    let _ = std::fs::remove_file(&link_pin);
                    attach_cgroup_program(&mut self.ebpf, name, &cgroup, &link_pin)?;
                    // The pinned program is the one the link runs.
                    pin_program(&mut self.ebpf, name, &self.pin_dir)?;
                    done.push(Repair {
                        kind: "link_missing",
                        what: name,
                        detail: format!(
                            "pinned link {} unusable ({e}): attached again",
                            link_pin.display()
                        ),
                    });
                    continue;
                }
            };
            let io = |what: &'static str| {
                let path = link_pin.clone();
                move |source| Error::Io { what, path, source }
            };
            let info = sys::link_info(link.as_fd()).map_err(io("reading link"))?;
            if info.cgroup_id != cgroup_id {
                // Detached (BPF_LINK_DETACH, or its cgroup is gone): a link cannot be
                // re-attached, so a new one replaces its pin.
                let cgroup = File::open(&self.cgroup).map_err(|source| Error::Io {
                    what: "opening cgroup",
                    path: self.cgroup.clone(),
                    source,
                })?;
                std::fs::remove_file(&link_pin).map_err(io("removing pin"))?;
                attach_cgroup_program(&mut self.ebpf, name, &cgroup, &link_pin)?;
                // The pinned program is the one the link runs.
                pin_program(&mut self.ebpf, name, &self.pin_dir)?;
                done.push(Repair {
                    kind: "link_detached",
                    what: name,
                    detail: format!(
                        "link attached to cgroup id {} instead of {cgroup_id}: attached again",
                        info.cgroup_id
                    ),
                });
                continue;
            }
            let want = program_tag(&self.ebpf, name)?;
            let running =
                sys::link_program_tag(link.as_fd(), &self.pin_dir.join("progs").join(name))
                    .map_err(io("reading the program of link"))?;
            if running != Some(want) {
                let (prog, _) = load_cgroup_program(&mut self.ebpf, name)?;
                sys::link_update(link.as_fd(), prog.as_fd())
                    .map_err(io("updating the program of link"))?;
                pin_program(&mut self.ebpf, name, &self.pin_dir)?;
                let running = running.map_or("unknown (not the pinned program)".to_string(), |t| {
                    format!("{t:016x}")
                });
                done.push(Repair {
                    kind: "program_replaced",
                    what: name,
                    detail: format!(
                        "link ran program tag {running}, this build's is {want:016x}: swapped back"
                    ),
                });
            }
        }
        for (name, data) in &self.pinned_maps {
            let name = *name;
            let pin = self.pin_dir.join("maps").join(name);
            let ours = data.info().map_err(map_err(name))?;
            let pinned = aya::maps::MapInfo::from_pin(&pin).ok().map(|i| i.id());
            if pinned == Some(ours.id()) {
                continue;
            }
            let kind = if pinned.is_none() {
                "map_pin_missing"
            } else {
                "map_pin_replaced"
            };
            let _ = std::fs::remove_file(&pin);
            data.pin(&pin).map_err(|source| Error::Pin {
                path: pin.clone(),
                source,
            })?;
            done.push(Repair {
                kind,
                what: name,
                detail: format!(
                    "{} did not hold the programs' map (id {}): pinned again",
                    pin.display(),
                    ours.id()
                ),
            });
        }
        Ok(done)
    }

    /// Forwards the programs' aya-log lines (enabled with [`ProxyConfig::DEBUG_LOG`]) to the `log`
    /// facade; call it periodically or when the logger's fd is readable.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }
}

/// The pin directory and its `maps`, `links` and `progs` subdirectories.
fn create_pin_dirs(pin_dir: &Path) -> Result<()> {
    for sub in ["", "maps", "links", "progs"] {
        let dir = pin_dir.join(sub);
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            what: "creating",
            path: dir.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Loads the object and attaches whatever is not already attached (a restart reuses the pins,
/// so established connections keep their state).
pub fn install(opts: &Options) -> Result<Redirect> {
    if !opts.object.is_file() {
        return Err(Error::MissingObject(opts.object.clone()));
    }
    sys::raise_memlock()?;
    sys::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
    create_pin_dirs(&opts.pin_dir)?;
    let map_dir = opts.pin_dir.join("maps");
    let stale = stale_maps(&opts.object, &map_dir)?;
    if !stale.is_empty() {
        tracing::warn!(
            pin_dir = %opts.pin_dir.display(),
            stale = %stale.join("; "),
            "pinned eBPF maps are from an older layout: detaching the old programs and replacing every pin (connections redirected before keep working but lose the sk_msg fast path)"
        );
        uninstall(&opts.pin_dir)?;
        create_pin_dirs(&opts.pin_dir)?;
    }
    let sockhash_was_pinned = map_dir.join(map_names::SOCKETS).exists();

    let map_paths: Vec<(&str, PathBuf)> = ALL_MAPS
        .iter()
        .map(|name| (*name, map_dir.join(name)))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        // Reuses the map pinned there, or creates and pins it.
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load_file(&opts.object)
        .map_err(|source| Error::Load {
            path: opts.object.clone(),
            source: Box::new(source),
        })?;
    let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!("eBPF logger unavailable: {e}");
            None
        }
    };

    let cgroup = File::open(&opts.cgroup).map_err(|source| Error::Io {
        what: "opening cgroup",
        path: opts.cgroup.clone(),
        source,
    })?;
    let mut report = InstallReport {
        replaced: stale,
        ..InstallReport::default()
    };
    for name in CGROUP_PROGRAMS {
        let link_pin = opts.pin_dir.join("links").join(name);
        if PinnedLink::from_pin(&link_pin).is_ok() {
            // The pinned program stays the one the link runs: reused, it is the earlier
            // process's (same tag); upgraded, this build's.
            if upgrade_pinned_link(&mut ebpf, name, &link_pin, &opts.pin_dir)? {
                report.upgraded.push(name);
                pin_program(&mut ebpf, name, &opts.pin_dir)?;
            } else {
                report.reused.push(name);
            }
            continue;
        }
        let _ = std::fs::remove_file(&link_pin);
        attach_cgroup_program(&mut ebpf, name, &cgroup, &link_pin)?;
        pin_program(&mut ebpf, name, &opts.pin_dir)?;
        report.attached.push(name);
    }

    // sk_msg is attached to the map itself (no link object): a reused SOCKHASH with the pinned
    // program still has it.
    let sk_msg_pin = opts.pin_dir.join("progs").join(prog_names::SK_MSG);
    let pinned_sk_msg_tag = sockhash_was_pinned
        .then(|| aya::programs::ProgramInfo::from_pin(&sk_msg_pin).ok())
        .flatten()
        .map(|info| info.tag());
    if let Some(pinned) = pinned_sk_msg_tag {
        // Attaching to the SOCKHASH replaces its program: sockets added from now on get this
        // build's; sockets already in the map keep the one they were added with.
        attach_sk_msg(&mut ebpf)?;
        if program_tag(&ebpf, prog_names::SK_MSG)? == pinned {
            report.reused.push(prog_names::SK_MSG);
        } else {
            report.upgraded.push(prog_names::SK_MSG);
        }
        pin_program(&mut ebpf, prog_names::SK_MSG, &opts.pin_dir)?;
    } else {
        attach_sk_msg(&mut ebpf)?;
        pin_program(&mut ebpf, prog_names::SK_MSG, &opts.pin_dir)?;
        report.attached.push(prog_names::SK_MSG);
    }
    tracing::debug!(attached = ?report.attached, reused = ?report.reused, "eBPF redirect installed");
    let maps = Maps::open(&opts.pin_dir)?;
    let mut pinned_maps = Vec::new();
    for name in ALL_MAPS
        .iter()
        .copied()
        .filter(|n| n.starts_with("SLUICE_"))
    {
        let data =
            MapData::from_pin(opts.pin_dir.join("maps").join(name)).map_err(map_err(name))?;
        pinned_maps.push((name, data));
    }
    Ok(Redirect {
        ebpf,
        logger,
        maps,
        report,
        pinned_maps,
        cgroup: opts.cgroup.clone(),
        pin_dir: opts.pin_dir.clone(),
    })
}

fn program_error(name: &'static str) -> impl Fn(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { name, source }
}

/// Loads one cgroup program of the object; returns its descriptor and its attach type.
fn load_cgroup_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(OwnedFd, u32)> {
    // Attach types (`enum bpf_attach_type`).
    const SOCK_OPS: u32 = 3;
    const INET4_CONNECT: u32 = 10;
    const INET6_CONNECT: u32 = 11;
    const GETSOCKOPT: u32 = 21;
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    let err = program_error(name);
    // Loaded once per process; repairs re-attach the loaded program.
    let loaded = |r: std::result::Result<(), aya::programs::ProgramError>| match r {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(()),
        Err(e) => Err(err(e)),
    };
    let dup = |fd: BorrowedFd<'_>| {
        fd.try_clone_to_owned().map_err(|source| Error::Io {
            what: "duplicating the descriptor of program",
            path: name.into(),
            source,
        })
    };
    match name {
        prog_names::SOCK_OPS => {
            let p: &mut SockOps = program.try_into().map_err(&err)?;
            loaded(p.load())?;
            Ok((dup(p.fd().map_err(&err)?.as_fd())?, SOCK_OPS))
        }
        prog_names::GETSOCKOPT => {
            let p: &mut CgroupSockopt = program.try_into().map_err(&err)?;
            loaded(p.load())?;
            Ok((dup(p.fd().map_err(&err)?.as_fd())?, GETSOCKOPT))
        }
        _ => {
            let p: &mut CgroupSockAddr = program.try_into().map_err(&err)?;
            loaded(p.load())?;
            let t = if name == prog_names::CONNECT6 {
                INET6_CONNECT
            } else {
                INET4_CONNECT
            };
            Ok((dup(p.fd().map_err(&err)?.as_fd())?, t))
        }
    }
}

/// The tag of a loaded program of the object.
fn program_tag(ebpf: &Ebpf, name: &'static str) -> Result<u64> {
    let err = program_error(name);
    let program = ebpf.program(name).ok_or(Error::MissingProgram(name))?;
    let info = match program {
        aya::programs::Program::SockOps(p) => p.info(),
        aya::programs::Program::CgroupSockopt(p) => p.info(),
        aya::programs::Program::CgroupSockAddr(p) => p.info(),
        aya::programs::Program::SkMsg(p) => p.info(),
        _ => return Err(Error::MissingProgram(name)),
    };
    Ok(info.map_err(err)?.tag())
}

/// A pinned link kept on restart: if it runs another build's program (its tag differs from this
/// object's), swaps in this build's program atomically with `BPF_LINK_UPDATE`. Returns whether it
/// did.
fn upgrade_pinned_link(
    ebpf: &mut Ebpf,
    name: &'static str,
    link_pin: &Path,
    pin_dir: &Path,
) -> Result<bool> {
    let io = |what: &'static str| {
        move |source| Error::Io {
            what,
            path: link_pin.into(),
            source,
        }
    };
    let (prog, _) = load_cgroup_program(ebpf, name)?;
    let link = sys::obj_get(link_pin).map_err(io("opening pinned link"))?;
    let running = sys::link_program_tag(link.as_fd(), &pin_dir.join("progs").join(name))
        .map_err(io("reading the program of link"))?;
    if running == Some(program_tag(ebpf, name)?) {
        return Ok(false);
    }
    sys::link_update(link.as_fd(), prog.as_fd()).map_err(io("updating the program of link"))?;
    Ok(true)
}

fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    link_pin: &Path,
) -> Result<()> {
    let (prog, attach_type) = load_cgroup_program(ebpf, name)?;
    sys::link_create_pinned(prog.as_fd(), cgroup.as_fd(), attach_type, 0, link_pin).map_err(
        |source| Error::Io {
            what: "attaching and pinning",
            path: link_pin.into(),
            source,
        },
    )
}

fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<()> {
    let name = prog_names::SK_MSG;
    let err = program_error(name);
    let map = ebpf
        .take_map(map_names::SOCKETS)
        .ok_or(Error::MissingProgram(map_names::SOCKETS))?;
    let sockets: SockHash<MapData, TupleKey> =
        SockHash::try_from(map).map_err(|source| Error::Map {
            name: map_names::SOCKETS.into(),
            source,
        })?;
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    let p: &mut SkMsg = program.try_into().map_err(&err)?;
    p.load().map_err(&err)?;
    let id = p.attach(sockets.fd()).map_err(&err)?;
    let link = p.take_link(id).map_err(&err)?;
    // Dropping the link would detach it; the attachment must outlive this process (it lives as
    // long as the pinned SOCKHASH), so the two descriptors it holds are deliberately leaked.
    std::mem::forget(link);
    Ok(())
}

fn pin_program(ebpf: &mut Ebpf, name: &'static str, pin_dir: &Path) -> Result<()> {
    let path = pin_dir.join("progs").join(name);
    let _ = std::fs::remove_file(&path);
    let program = ebpf.program_mut(name).ok_or(Error::MissingProgram(name))?;
    program
        .pin(&path)
        .map_err(|source| Error::Pin { path, source })
}

/// The pinned maps (of ours: aya-log's buffer is aya-log's business) whose type, key size, value
/// size or capacity differ from the object's definition, each with what differs.
fn stale_maps(object: &Path, map_dir: &Path) -> Result<Vec<String>> {
    let pinned: Vec<&str> = ALL_MAPS
        .iter()
        .copied()
        .filter(|name| name.starts_with("SLUICE_") && map_dir.join(name).exists())
        .collect();
    if pinned.is_empty() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(object).map_err(|source| Error::Io {
        what: "reading",
        path: object.into(),
        source,
    })?;
    let obj = aya_obj::Object::parse(&bytes).map_err(|e| Error::Object {
        path: object.into(),
        reason: e.to_string(),
    })?;
    let mut stale = Vec::new();
    for name in pinned {
        let Some(want) = obj.maps.get(name) else {
            continue;
        };
        let want = MapLayout {
            map_type: want.map_type(),
            key_size: want.key_size(),
            value_size: want.value_size(),
            max_entries: want.max_entries(),
        };
        match aya::maps::MapInfo::from_pin(map_dir.join(name)) {
            Ok(info) => {
                let have = MapLayout {
                    map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
                    key_size: info.key_size(),
                    value_size: info.value_size(),
                    max_entries: info.max_entries(),
                };
                if let Some(diff) = want.differs(&have) {
                    stale.push(format!("{name}: {diff}"));
                }
            }
            // A pin that is not a map (or unreadable) cannot be reused either.
            Err(e) => stale.push(format!("{name}: unreadable pin ({e})")),
        }
    }
    Ok(stale)
}

/// What a map's pin must match for the programs and the agent to read it as they expect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MapLayout {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
}

impl MapLayout {
    /// `None` when `have` (the pin) matches `self` (the object), else what differs.
    fn differs(&self, have: &MapLayout) -> Option<String> {
        let mut out = Vec::new();
        let fields = [
            ("type", self.map_type, have.map_type),
            ("key_size", self.key_size, have.key_size),
            ("value_size", self.value_size, have.value_size),
            ("max_entries", self.max_entries, have.max_entries),
        ];
        for (what, want, got) in fields {
            if want != got {
                out.push(format!("{what} {got}, this build's {want}"));
            }
        }
        (!out.is_empty()).then(|| out.join(", "))
    }
}

/// Detaches every program and removes the pins. Missing pins are fine (uninstalling twice, or
/// after a partial install).
pub fn uninstall(pin_dir: &Path) -> Result<UninstallReport> {
    let mut report = UninstallReport::default();
    for name in CGROUP_PROGRAMS {
        let path = pin_dir.join("links").join(name);
        if !path.exists() {
            continue;
        }
        let link = PinnedLink::from_pin(&path).map_err(|source| Error::Link {
            path: path.clone(),
            source,
        })?;
        let fd_link = link.unpin().map_err(|source| Error::Io {
            what: "unpinning",
            path: path.clone(),
            source,
        })?;
        fd_link.detach().map_err(program_error(name))?;
        report.detached.push(name);
    }
    // The sk_msg attachment goes with the SOCKHASH once its pin and last descriptor are gone.
    for sub in ["progs", "maps", "links"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|source| Error::Io {
                what: "removing pin",
                path: path.clone(),
                source,
            })?;
            report.removed.push(path);
        }
        let _ = std::fs::remove_dir(&dir);
    }
    let _ = std::fs::remove_dir(pin_dir);
    Ok(report)
}

/// Detaches the link pinned at `pin` and leaves the pin in place, as `bpftool link detach` does:
/// the drift [`Redirect::repair`] finds as `link_detached`.
pub fn detach_link(pin: &Path) -> Result<()> {
    let io = |what: &'static str| {
        move |source| Error::Io {
            what,
            path: pin.into(),
            source,
        }
    };
    let link = sys::obj_get(pin).map_err(io("opening pinned link"))?;
    sys::link_detach(link.as_fd()).map_err(io("detaching link"))
}

/// One pinned program's run-time statistics (kept by the kernel while
/// [`enable_run_stats`]'s descriptor is open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunStats {
    pub program: &'static str,
    /// Total time spent running it.
    pub run_time: std::time::Duration,
    pub runs: u64,
}

/// Turns on the kernel's run-time accounting of BPF programs (`BPF_ENABLE_STATS`) until the
/// returned descriptor is closed: how `connect4`'s cost per `connect()` is measured.
pub fn enable_run_stats() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| Error::Io {
        what: "BPF_ENABLE_STATS",
        path: PathBuf::new(),
        source: e.io_error,
    })
}

/// The run-time statistics of the pinned programs (the ones the links run).
pub fn run_stats(pin_dir: &Path) -> Result<Vec<RunStats>> {
    CGROUP_PROGRAMS
        .iter()
        .chain([&prog_names::SK_MSG])
        .map(|name| {
            let info = aya::programs::ProgramInfo::from_pin(pin_dir.join("progs").join(name))
                .map_err(program_error(name))?;
            Ok(RunStats {
                program: name,
                run_time: info.run_time(),
                runs: info.run_count(),
            })
        })
        .collect()
}

/// Whether an installation's pins exist.
pub fn is_installed(pin_dir: &Path) -> bool {
    CGROUP_PROGRAMS
        .iter()
        .all(|name| pin_dir.join("links").join(name).exists())
}

/// The first cgroup v2 mount (here `/sys/fs/cgroup/unified`; on pure v2 hosts `/sys/fs/cgroup`).
pub fn cgroup2_root() -> Result<PathBuf> {
    sys::mount_point_of_type("cgroup2").ok_or(Error::NoCgroup2)
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is mounted (hosts do not always mount it).
pub fn ensure_bpffs() -> Result<()> {
    sys::ensure_bpffs(Path::new("/sys/fs/bpf"))
}

/// CLOCK_MONOTONIC now, in nanoseconds (the clock of [`ProxyConfig::lease_until_ns`]).
pub fn monotonic_ns() -> u64 {
    sys::monotonic_ns()
}

/// A cgroup v2 id: the inode number of the cgroup's directory.
pub fn cgroup_id(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| Error::Io {
            what: "stat cgroup",
            path: path.into(),
            source,
        })
}

/// A map's name for error messages.
fn map_err(name: &str) -> impl Fn(aya::maps::MapError) -> Error + '_ {
    move |source| Error::Map {
        name: name.to_string(),
        source,
    }
}

/// Opens one pinned map.
fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let data = MapData::from_pin(pin_dir.join("maps").join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_object_names_the_build_command() {
        let opts = Options {
            object: "/nonexistent/sluice-ebpf.o".into(),
            cgroup: "/sys/fs/cgroup".into(),
            pin_dir: "/nonexistent/pins".into(),
        };
        let err = install(&opts).err().expect("no object");
        assert!(err.to_string().contains("cargo xtask build-ebpf"), "{err}");
    }

    #[test]
    fn cgroup_ids_are_directory_inodes() {
        let dir = std::env::temp_dir();
        assert!(cgroup_id(&dir).unwrap() > 0);
        assert!(cgroup_id(Path::new("/nonexistent/cgroup")).is_err());
    }

    #[test]
    fn layouts_name_what_differs() {
        let want = MapLayout {
            map_type: 2,
            key_size: 4,
            value_size: 32,
            max_entries: 1,
        };
        assert_eq!(want.differs(&want), None);
        let old = MapLayout {
            value_size: 24,
            ..want
        };
        assert_eq!(
            want.differs(&old).as_deref(),
            Some("value_size 24, this build's 32")
        );
    }

    #[test]
    fn uninstalling_nothing_is_fine() {
        let report = uninstall(Path::new("/nonexistent/sluice-pins")).unwrap();
        assert!(report.is_empty());
        assert!(!is_installed(Path::new("/nonexistent/sluice-pins")));
    }
}
