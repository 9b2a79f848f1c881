//! Instructions per request, counted by valgrind's callgrind: a steadier figure than time on a
//! shared machine (the same binary, inputs and environment give the same count whatever else the
//! machine is doing).
//!
//! Each proxy runs under `valgrind --tool=callgrind`; one keep-alive connection sends
//! [`WARM_UP`] requests (connections to the upstream made, lazy state built), the counters are
//! zeroed (`callgrind_control -z`), [`REQUESTS`] more requests go the same way, and a dump
//! (`callgrind_control -d`) gives the instructions of exactly those requests, every thread of the
//! proxy included (an access-log writer too): start-up is never counted.
//!
//! Every proxy runs with glibc's `rep movsb`/`rep stosb` thresholds raised ([`GLIBC_TUNABLES`]), so
//! that its `memcpy` and `memset` use their vector loops. valgrind counts each iteration of a `rep`
//! string instruction as one instruction: a copy of n bytes through `rep movsb` counted n, where
//! the vector loop executes about n/8. HAProxy copies whole buffers and counted about 61,000
//! instructions per request this way, 33,000 of them in `memcpy`; with the loops, 32,800.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The environment every counted proxy runs with (see the module's documentation); the
/// thresholds are bytes, far above any copy a proxy makes per request.
pub(crate) const GLIBC_TUNABLES: &str =
    "glibc.cpu.x86_rep_movsb_threshold=1000000000:glibc.cpu.x86_rep_stosb_threshold=1000000000";

pub(crate) const WARM_UP: usize = 200;
pub(crate) const REQUESTS: usize = 2_000;

/// Instructions per request of the process `pid` (running under callgrind, writing its dumps as
/// `out_dir/cg.PID.N`) serving `addr`.
pub(crate) fn per_request(pid: u32, addr: SocketAddr, host: &str, out_dir: &Path) -> Result<f64> {
    let mut conn = Conn::open(addr, host)?;
    for _ in 0..WARM_UP {
        conn.get()?;
    }
    control(pid, "-z")?;
    for _ in 0..REQUESTS {
        conn.get()?;
    }
    control(pid, "-d")?;
    let dump = out_dir.join(format!("cg.{pid}.1"));
    let text = std::fs::read_to_string(&dump)
        .with_context(|| format!("callgrind wrote no dump {}", dump.display()))?;
    let total: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no summary line in {}", dump.display()))?;
    Ok(total as f64 / REQUESTS as f64)
}

/// `callgrind_control FLAG PID`: zero the counters or dump them.
fn control(pid: u32, flag: &str) -> Result<()> {
    let out = Command::new("callgrind_control")
        .args([flag, &pid.to_string()])
        .output()
        .context("cannot run callgrind_control (valgrind's package)")?;
    if !out.status.success() {
        bail!(
            "callgrind_control {flag} {pid}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One keep-alive HTTP/1.1 connection sending `GET /`, reading each response whole.
struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    buf: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr, host: &str) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        // Under valgrind a proxy answers slowly, but never this slowly.
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            request: format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
            buf: Vec::with_capacity(4096),
        })
    }

    fn get(&mut self) -> Result<()> {
        self.stream.write_all(&self.request)?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                if !head.starts_with("http/1.1 200") {
                    bail!("the proxy answered {:?}", head.lines().next());
                }
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .context("a response without content-length")?;
                if self.buf.len() >= end + 4 + len {
                    return Ok(());
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                bail!("the proxy closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
