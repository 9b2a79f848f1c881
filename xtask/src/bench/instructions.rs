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
    let (dump, text) = read_dump(out_dir, pid, 1)?;
    let total = totals(&text)
        .and_then(|t| t.first().copied())
        .with_context(|| format!("no summary line in {}", dump.display()))?;
    Ok(total as f64 / REQUESTS as f64)
}

/// Dump `n` of process `pid` (callgrind numbers them from 1, one per `callgrind_control -d`):
/// its path and text.
fn read_dump(out_dir: &Path, pid: u32, n: u32) -> Result<(std::path::PathBuf, String)> {
    let dump = out_dir.join(format!("cg.{pid}.{n}"));
    let text = std::fs::read_to_string(&dump)
        .with_context(|| format!("callgrind wrote no dump {}", dump.display()))?;
    Ok((dump, text))
}

/// A dump's total of each event, in the order of its `events:` line.
fn totals(dump: &str) -> Option<Vec<u64>> {
    dump.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })?
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect()
}

/// Rounds (a request on every connection, then every response) before and while counting.
const CACHE_WARM_UP_ROUNDS: usize = 10;
pub(crate) const CACHE_ROUNDS: usize = 60;

/// What a request costs in callgrind's model of this machine's caches, with as many requests in
/// flight as the timed rounds keep (`--connections`, 32 by default): one connection keeps a
/// proxy's whole working set warm, where 32 make each request's state and code compete with the
/// other 31's, which is where two proxies with the same instruction count part.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct CacheFigures {
    pub(crate) instructions: f64,
    /// First-level instruction cache misses.
    pub(crate) l1i: f64,
    /// First-level data cache misses, reads and writes.
    pub(crate) l1d: f64,
    /// Misses of the level modelled as the last (this machine's L2, see [`cache_model`]).
    pub(crate) l2: f64,
}

/// valgrind's options for a model of CPU 0's caches as sysfs describes them: its first-level
/// instruction and data caches, and its second level as the "last level" (the L3 beyond is large
/// and shared, and would count next to nothing). `None` where sysfs does not say, or gives a
/// geometry valgrind cannot model (a number of sets that is not a power of two).
pub(crate) fn cache_model() -> Option<Vec<String>> {
    cache_model_from(Path::new(CPU0_CACHES))
}

/// Where sysfs describes CPU 0's caches, one `indexN` directory per cache.
pub(crate) const CPU0_CACHES: &str = "/sys/devices/system/cpu/cpu0/cache";

/// The file `field` of the `i`-th cache under `dir` (as [`CPU0_CACHES`]), trimmed.
pub(crate) fn cache_field(dir: &Path, i: usize, field: &str) -> std::io::Result<String> {
    std::fs::read_to_string(dir.join(format!("index{i}/{field}"))).map(|s| s.trim().to_owned())
}

fn cache_model_from(dir: &Path) -> Option<Vec<String>> {
    let read = |i: usize, f: &str| cache_field(dir, i, f);
    let mut model = [None, None, None];
    for i in 0..8 {
        let Ok(level) = read(i, "level") else { break };
        let (kind, size, ways, line) = (
            read(i, "type").ok()?,
            read(i, "size").ok()?,
            read(i, "ways_of_associativity").ok()?,
            read(i, "coherency_line_size").ok()?,
        );
        let slot = match (level.trim(), kind.trim()) {
            ("1", "Instruction") => 0,
            ("1", "Data") => 1,
            ("2", "Unified") => 2,
            _ => continue,
        };
        let size = size.trim();
        let bytes: u64 = match size.strip_suffix('K') {
            Some(k) => k.parse::<u64>().ok()? * 1024,
            None => size.parse().ok()?,
        };
        let (ways, line): (u64, u64) = (ways.trim().parse().ok()?, line.trim().parse().ok()?);
        let sets = bytes.checked_div(ways * line)?;
        if !sets.is_power_of_two() || sets * ways * line != bytes {
            return None;
        }
        model[slot] = Some(format!("{bytes},{ways},{line}"));
    }
    let [Some(i1), Some(d1), Some(l2)] = model else {
        return None;
    };
    Some(vec![
        "--cache-sim=yes".into(),
        format!("--I1={i1}"),
        format!("--D1={d1}"),
        format!("--LL={l2}"),
    ])
}

/// [`CacheFigures`] of the process `pid` (running under callgrind with [`cache_model`]'s options,
/// after [`per_request`] wrote its first dump) serving `addr`: `connections` keep-alive
/// connections each send a request, then each response is read, round after round.
pub(crate) fn cache_per_request(
    pid: u32,
    addr: SocketAddr,
    host: &str,
    out_dir: &Path,
    connections: usize,
) -> Result<CacheFigures> {
    let mut conns = (0..connections)
        .map(|_| Conn::open(addr, host))
        .collect::<Result<Vec<_>>>()?;
    let round = |conns: &mut [Conn]| -> Result<()> {
        for c in conns.iter_mut() {
            c.send()?;
        }
        conns.iter_mut().try_for_each(Conn::receive)
    };
    for _ in 0..CACHE_WARM_UP_ROUNDS {
        round(&mut conns)?;
    }
    control(pid, "-z")?;
    for _ in 0..CACHE_ROUNDS {
        round(&mut conns)?;
    }
    control(pid, "-d")?;
    let (dump, text) = read_dump(out_dir, pid, 2)?;
    let requests = (CACHE_ROUNDS * connections) as f64;
    cache_figures(&text, requests).with_context(|| {
        format!(
            "{}: no cache events (was callgrind run with --cache-sim=yes?)",
            dump.display()
        )
    })
}

/// The figures of a dump's totals, per request.
fn cache_figures(dump: &str, requests: f64) -> Option<CacheFigures> {
    let names: Vec<&str> = dump
        .lines()
        .find_map(|l| l.strip_prefix("events:"))?
        .split_whitespace()
        .collect();
    let totals = totals(dump)?;
    // Summed before the division: each figure is the events of exactly those requests.
    let per_request = |events: &[&str]| {
        let mut sum = 0;
        for name in events {
            let i = names.iter().position(|n| n == name)?;
            sum += totals.get(i).copied().unwrap_or(0);
        }
        Some(sum as f64 / requests)
    };
    Some(CacheFigures {
        instructions: per_request(&["Ir"])?,
        l1i: per_request(&["I1mr"])?,
        l1d: per_request(&["D1mr", "D1mw"])?,
        l2: per_request(&["ILmr", "DLmr", "DLmw"])?,
    })
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
        self.send()?;
        self.receive()
    }

    fn send(&mut self) -> Result<()> {
        Ok(self.stream.write_all(&self.request)?)
    }

    fn receive(&mut self) -> Result<()> {
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

/// Atomic read-modify-writes per request in `program`'s own code: the `lock`-prefixed
/// instructions (and `xchg` with memory, locked implicitly) that ran, from the per-instruction
/// counts of the dump [`per_request`] read (callgrind run with `--dump-instr=yes`) and the
/// program's disassembly (`objdump -d`). Each is a full barrier on x86: some 4.5 ns back to back
/// on this machine's cores, where a plain load and store take 0.5, so two proxies with the same
/// instruction count can differ in time by their atomics. Shared libraries are not counted
/// (glibc's is the same for every proxy).
pub(crate) fn atomics_per_request(pid: u32, out_dir: &Path, program: &Path) -> Result<f64> {
    let (_, text) = read_dump(out_dir, pid, 1)?;
    let name = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
    let counts = instruction_counts(&text, &name);
    if counts.is_empty() {
        bail!(
            "the dump counts no instruction of {} (was it run with --dump-instr=yes?)",
            name.display()
        );
    }
    let listing = Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(&name)
        .output()
        .context("cannot run objdump (binutils)")?;
    if !listing.status.success() {
        bail!("objdump -d {} failed", name.display());
    }
    let (starts, locked) = disassembly(&String::from_utf8_lossy(&listing.stdout));
    // The dump's addresses are the program's link-time ones (position-independent executables
    // included): all of them fall on instruction starts, or this is not the program that ran.
    let on_starts = counts.keys().filter(|a| starts.contains(a)).count();
    if on_starts * 100 < counts.len() * 99 {
        bail!(
            "{} of the {} instruction addresses counted are not instruction starts in {}",
            counts.len() - on_starts,
            counts.len(),
            name.display()
        );
    }
    let total: u64 = locked.iter().filter_map(|a| counts.get(a)).sum();
    Ok(total as f64 / REQUESTS as f64)
}

/// Executions per instruction address of the object named `object`, from a callgrind dump
/// written with `--dump-instr=yes` (positions `address line`, each either absolute, relative
/// `+n`/`-n` or `*` for the same; the line after `calls=` is a call's inclusive cost, not the
/// instruction's own).
fn instruction_counts(dump: &str, object: &Path) -> std::collections::HashMap<u64, u64> {
    // Each object id, and whether it is `object` (valgrind names it as it was started).
    let is = |name: &str| {
        std::fs::canonicalize(name).is_ok_and(|n| n == object) || name == object.as_os_str()
    };
    let mut names: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
    let mut ours = false;
    let mut call = false;
    let mut addr: u64 = 0;
    let mut counts = std::collections::HashMap::new();
    for line in dump.lines() {
        if let Some(ob) = line.strip_prefix("ob=") {
            // `(id) name` defines, `(id)` refers back.
            let (id, name) = ob.split_once(' ').unwrap_or((ob, ""));
            if !name.is_empty() {
                names.insert(id, is(name));
            }
            ours = names.get(id).copied().unwrap_or(false);
            continue;
        }
        if let Some(cob) = line.strip_prefix("cob=") {
            if let Some((id, name)) = cob.split_once(' ') {
                names.insert(id, is(name));
            }
            continue;
        }
        if line.starts_with("calls=") {
            call = true;
            continue;
        }
        let Some(first) = line.split_ascii_whitespace().next() else {
            continue;
        };
        let at = if let Some(hex) = first.strip_prefix("0x") {
            u64::from_str_radix(hex, 16).ok()
        } else if let Some(d) = first.strip_prefix('+') {
            d.parse::<u64>().ok().map(|d| addr.wrapping_add(d))
        } else if let Some(d) = first.strip_prefix('-') {
            d.parse::<u64>().ok().map(|d| addr.wrapping_sub(d))
        } else if first == "*" {
            Some(addr)
        } else {
            None
        };
        let Some(at) = at else { continue };
        addr = at;
        if std::mem::take(&mut call) || !ours {
            continue;
        }
        // Events follow the address and the line: the first is `Ir`, executions.
        if let Some(n) = line
            .split_ascii_whitespace()
            .nth(2)
            .and_then(|n| n.parse::<u64>().ok())
        {
            *counts.entry(at).or_insert(0) += n;
        }
    }
    counts
}

/// Every instruction's address and the locked ones', from `objdump -d --no-show-raw-insn`.
fn disassembly(listing: &str) -> (std::collections::HashSet<u64>, Vec<u64>) {
    let mut starts = std::collections::HashSet::new();
    let mut locked = Vec::new();
    for line in listing.lines() {
        let Some((addr, insn)) = line.split_once(":\t") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        starts.insert(addr);
        let insn = insn.trim_start();
        if insn.starts_with("lock ") || (insn.starts_with("xchg") && insn.contains('(')) {
            locked.push(addr);
        }
    }
    (starts, locked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_address_compression_and_skip_call_costs() {
        let dump = "ob=(1) /bin/proxy\nfl=(1) a.rs\nfn=(1) f\n0x1000 3 10\n+4 * 10\ncalls=1 0x2000 7\n+2 4 999\n+1 5 10\nob=(2) /lib/libc.so\nfn=(2) g\n0x1000 1 5\nob=(1)\nfn=(1)\n0x1004 3 1\n";
        let counts = instruction_counts(dump, Path::new("/bin/proxy"));
        assert_eq!(counts.get(&0x1000), Some(&10));
        // +4 then the call's line (+2: its cost is the callee's) then +1.
        assert_eq!(counts.get(&0x1004), Some(&11));
        assert_eq!(counts.get(&0x1006), None);
        assert_eq!(counts.get(&0x1007), Some(&10));
        let (starts, locked) = disassembly(
            "  401000:\tlock xadd %rax,(%rdi)\n  401005:\tmov    %rax,%rbx\n  401008:\txchg   %rax,(%rdx)\n  40100b:\txchg   %ax,%ax\n",
        );
        assert_eq!(starts.len(), 4);
        assert_eq!(locked, vec![0x401000, 0x401008]);
    }

    /// A sysfs cache directory: (level, type, size, ways, line) per index.
    fn sysfs(entries: &[(&str, &str, &str, &str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (i, (level, kind, size, ways, line)) in entries.iter().enumerate() {
            let d = dir.path().join(format!("index{i}"));
            std::fs::create_dir(&d).unwrap();
            for (f, v) in [
                ("level", level),
                ("type", kind),
                ("size", size),
                ("ways_of_associativity", ways),
                ("coherency_line_size", line),
            ] {
                std::fs::write(d.join(f), format!("{v}\n")).unwrap();
            }
        }
        dir
    }

    #[test]
    fn the_cache_model_is_this_cores_first_two_levels() {
        let epyc = sysfs(&[
            ("1", "Data", "32K", "8", "64"),
            ("1", "Instruction", "32K", "8", "64"),
            ("2", "Unified", "1024K", "8", "64"),
            ("3", "Unified", "32768K", "16", "64"),
        ]);
        assert_eq!(
            cache_model_from(epyc.path()).unwrap(),
            [
                "--cache-sim=yes",
                "--I1=32768,8,64",
                "--D1=32768,8,64",
                "--LL=1048576,8,64"
            ]
        );
        // 1.25 MiB 10-way: 2,048 sets, a power of two.
        let odd_ways = sysfs(&[
            ("1", "Data", "48K", "12", "64"),
            ("1", "Instruction", "32K", "8", "64"),
            ("2", "Unified", "1280K", "10", "64"),
        ]);
        assert_eq!(
            cache_model_from(odd_ways.path()).unwrap()[3],
            "--LL=1310720,10,64"
        );
        // 3 MiB 16-way: 3,072 sets, which valgrind cannot model; and no L2 at all.
        let three_mib = sysfs(&[
            ("1", "Data", "32K", "8", "64"),
            ("1", "Instruction", "32K", "8", "64"),
            ("2", "Unified", "3072K", "16", "64"),
        ]);
        assert_eq!(cache_model_from(three_mib.path()), None);
        let no_l2 = sysfs(&[
            ("1", "Data", "32K", "8", "64"),
            ("1", "Instruction", "32K", "8", "64"),
        ]);
        assert_eq!(cache_model_from(no_l2.path()), None);
    }

    #[test]
    fn cache_figures_are_the_totals_per_request() {
        let dump = "version: 1\nevents: Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw\nfl=(1) a.rs\n\
                    fn=(1) f\n0x1000 3 10\nsummary: 3000 900 600 150 60 30 3 6\n";
        let f = cache_figures(dump, 10.0).unwrap();
        assert_eq!(
            f,
            CacheFigures {
                instructions: 300.0,
                l1i: 15.0,
                l1d: 9.0,
                // The last event was left out of the line: zero.
                l2: 0.9,
            }
        );
        let no_cache = "events: Ir\nsummary: 3000\n";
        assert_eq!(cache_figures(no_cache, 10.0), None);
    }
}
