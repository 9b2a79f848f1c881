//! The few system calls the loader needs that aya does not make: `RLIMIT_MEMLOCK`, mounting
//! bpffs, finding mounts; and the accept-queue length of the proxy's listener, which decides
//! whether the redirect lease is renewed.

use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
};

use crate::{Error, Result};

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`; raise it so loading does not fail
/// there (harmless on newer kernels, which use memcg accounting).
pub fn raise_memlock() -> Result<()> {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `limit` is a valid, initialized `rlimit` that outlives the call.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) };
    if ret != 0 {
        tracing::debug!(
            "setrlimit(RLIMIT_MEMLOCK): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Connections waiting in a listening TCP socket's accept queue (`TCP_INFO`: for a listener the
/// kernel reports the queue length as `tcpi_unacked`).
pub fn accept_queue_len(listener: BorrowedFd<'_>) -> std::io::Result<u32> {
    // SAFETY: `tcp_info` is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid and writable for the call; `len` holds `info`'s size.
    let ret = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // TCP_LISTEN in the kernel's `enum tcp_state` (include/net/tcp_states.h).
    const TCP_LISTEN: u8 = 10;
    if info.tcpi_state != TCP_LISTEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a listening TCP socket",
        ));
    }
    Ok(info.tcpi_unacked)
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns()` reads, so a lease written
/// from here compares with what the programs see.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    // CLOCK_MONOTONIC cannot fail on Linux with a valid pointer.
    debug_assert_eq!(ret, 0);
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// CPU time of the calling thread, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whether any of `fds` became readable within `timeout` (`poll(2)`; EINTR counts as ready, so
/// the caller looks again).
pub fn poll_readable(fds: &[RawFd], timeout: std::time::Duration) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the call's duration.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    ret != 0
}

/// Mounts bpffs at `at` unless one is mounted there.
pub fn ensure_bpffs(at: &Path) -> Result<()> {
    if mounts()
        .iter()
        .any(|(point, fstype)| point == at && fstype == "bpf")
    {
        return Ok(());
    }
    let c = |s: &str| CString::new(s).expect("no NUL");
    let target = CString::new(at.as_os_str().as_encoded_bytes()).map_err(|_| Error::Io {
        what: "mounting bpffs at",
        path: at.into(),
        source: std::io::ErrorKind::InvalidInput.into(),
    })?;
    let (source, fstype) = (c("bpf"), c("bpf"));
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call; no data.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        return Err(Error::Io {
            what: "mounting bpffs (needs root) at",
            path: at.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The first mount point of a filesystem type.
pub fn mount_point_of_type(fstype: &str) -> Option<PathBuf> {
    mounts()
        .into_iter()
        .find(|(_, t)| t == fstype)
        .map(|(p, _)| p)
}

/// (mount point, filesystem type) from `/proc/self/mountinfo`.
fn mounts() -> Vec<(PathBuf, String)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(sep + 1)?;
            Some((PathBuf::from(unescape(point)), fstype.to_string()))
        })
        .collect()
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `BPF_LINK_CREATE` of `prog` on `target` (cgroup links coexist with other programs on the
/// same cgroup; their `flags` must be 0), pinned at `pin` so the attachment outlives this
/// process. (aya 0.14 cannot turn every cgroup link into a pinnable `FdLink`, e.g. getsockopt's.)
pub fn link_create_pinned(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
    flags: u32,
    pin: &Path,
) -> std::io::Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_LINK_CREATE: libc::c_long = 28;
    // `union bpf_attr`, zeroed beyond the fields set (the kernel requires that).
    let mut attr = [0u32; 32];
    attr[0] = prog.as_raw_fd() as u32;
    attr[1] = target.as_raw_fd() as u32;
    attr[2] = attach_type;
    attr[3] = flags;
    let link = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: a successful BPF_LINK_CREATE returns a new descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(link) };
    let (path, mut attr) = path_attr(pin)?;
    attr[2] = link.as_raw_fd() as u32;
    bpf(BPF_OBJ_PIN, &mut attr)?;
    drop(path);
    Ok(())
}

/// A `union bpf_attr` whose first field (`pathname`) points at `pin`, and the string it points
/// at (keep it alive until the call).
fn path_attr(pin: &Path) -> std::io::Result<(CString, [u32; 32])> {
    let path = CString::new(pin.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut attr = [0u32; 32];
    let ptr = path.as_ptr() as u64;
    attr[0] = ptr as u32;
    attr[1] = (ptr >> 32) as u32;
    Ok((path, attr))
}

/// `BPF_OBJ_GET`: a descriptor for the object pinned at `pin`.
pub fn obj_get(pin: &Path) -> std::io::Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let (path, mut attr) = path_attr(pin)?;
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    drop(path);
    // SAFETY: a successful BPF_OBJ_GET returns a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (a `bpf_link_info` or `bpf_prog_info` prefix).
fn obj_info(fd: BorrowedFd<'_>, info: &mut [u32]) -> std::io::Result<()> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    let mut attr = [0u32; 32];
    attr[0] = fd.as_raw_fd() as u32;
    attr[1] = std::mem::size_of_val(info) as u32;
    let ptr = info.as_mut_ptr() as u64;
    attr[2] = ptr as u32;
    attr[3] = (ptr >> 32) as u32;
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(())
}

/// The tag (SHA of the instructions, map references masked) of the program a link runs, as
/// [`aya::programs::ProgramInfo::tag`] gives it, when that program is the one pinned at
/// `prog_pin` (`None` otherwise). Read through the pin because `BPF_PROG_GET_FD_BY_ID` needs
/// CAP_SYS_ADMIN, which the agent does without.
pub fn link_program_tag(link: BorrowedFd<'_>, prog_pin: &Path) -> std::io::Result<Option<u64>> {
    let info = link_info(link)?;
    let prog = match obj_get(prog_pin) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    // `struct bpf_prog_info`: type, id, tag[8], ...
    let mut prog_info = [0u32; 8];
    obj_info(prog.as_fd(), &mut prog_info)?;
    if prog_info[1] != info.prog_id {
        return Ok(None);
    }
    let mut tag = [0u8; 8];
    tag[..4].copy_from_slice(&prog_info[2].to_ne_bytes());
    tag[4..].copy_from_slice(&prog_info[3].to_ne_bytes());
    Ok(Some(u64::from_be_bytes(tag)))
}

/// What [`link_info`] reads of a cgroup link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub prog_id: u32,
    /// The cgroup it is attached to; 0 once detached (`BPF_LINK_DETACH`, or the cgroup died).
    pub cgroup_id: u64,
}

/// `BPF_OBJ_GET_INFO_BY_FD` of a cgroup link.
pub fn link_info(link: BorrowedFd<'_>) -> std::io::Result<LinkInfo> {
    // `struct bpf_link_info`: type, id, prog_id, then (8-aligned) the `cgroup` union member:
    // cgroup_id (u64), attach_type.
    let mut info = [0u32; 8];
    obj_info(link, &mut info)?;
    Ok(LinkInfo {
        prog_id: info[2],
        cgroup_id: u64::from(info[4]) | (u64::from(info[5]) << 32),
    })
}

/// `BPF_LINK_DETACH`: the link stays (and its pin) but no longer runs its program.
pub fn link_detach(link: BorrowedFd<'_>) -> std::io::Result<()> {
    const BPF_LINK_DETACH: libc::c_long = 34;
    let mut attr = [0u32; 32];
    attr[0] = link.as_raw_fd() as u32;
    bpf(BPF_LINK_DETACH, &mut attr)?;
    Ok(())
}

/// `BPF_LINK_UPDATE`: the link runs `prog` from now on, atomically (no moment without a program).
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> std::io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let mut attr = [0u32; 32];
    attr[0] = link.as_raw_fd() as u32;
    attr[1] = prog.as_raw_fd() as u32;
    bpf(BPF_LINK_UPDATE, &mut attr)?;
    Ok(())
}

fn bpf(cmd: libc::c_long, attr: &mut [u32; 32]) -> std::io::Result<RawFd> {
    // SAFETY: `attr` is a zero-initialized `union bpf_attr`-sized buffer whose set fields match
    // the command's layout; pointers inside it (a path) outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr) as u32,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret as RawFd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }

    #[test]
    fn proc_is_mounted() {
        assert_eq!(mount_point_of_type("proc"), Some(PathBuf::from("/proc")));
    }
}
