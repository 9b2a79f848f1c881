//! Restarts and upgrades of the agent under load, in real network namespaces (root).
//!
//! Three enrolled client pods send steady HTTP/1.1 load (about 1,000 requests/s in all, half on
//! keep-alive connections, half on a new connection each) to a server pod's address through the
//! real `sluice run --redirect ebpf`. The load generator is this test binary run again inside
//! each pod (its network namespace and cgroup: the programs see its `connect()`s), as the ignored
//! test [`load_generator`]; it counts every request's outcome (connection errors included) and
//! whether the server saw it come from the proxy (the host's bridge address) or straight from the
//! pod (fail-open). The server is a plain keep-alive HTTP/1.1 server in the server pod that
//! answers `peer=<address it saw>` after 5 ms (so that requests are under way at any moment): it works whether or not the proxy is in the path, so a request
//! that went direct during a restart succeeds, and only the agent can fail one.
//!
//! Under that load:
//! - ten graceful restarts (SIGTERM, then a new agent on the same pins while the old one drains)
//!   fail no request;
//! - one SIGKILL fails only requests under way at the kill and the next request on each
//!   keep-alive connection to the dead agent; no connect is refused (the agent's listening socket
//!   is in a SOCKMAP the programs check, which the kernel empties when it closes), new
//!   connections go direct at once and still after the lease;
//! - an upgrade to a different build (`cargo xtask build-ebpf --variant 1`: other program tags,
//!   swapped into the pinned links in place) fails no request.
//!
//! The figures (requests, failures, direct vs through the proxy, per restart) are printed; run
//! with `--nocapture` to see them. Without root, `bpf-linker` or the eBPF object the test says
//! why and returns, except under `CI`, where it fails. Run:
//! `sudo -E cargo test -p sluice-tests --test restart -- --nocapture`.

use std::{
    ffi::OsString,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use sluice_netns::{skip_because, Pod, Topology};
use sluice_tests::listen::Listen;

#[allow(clippy::disallowed_methods)] // a plain std test without a runtime: bounded blocking wait
fn pause(d: Duration) {
    std::thread::sleep(d);
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for this process and the load generators.
fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

// ---------------------------------------------------------------------------------------------
// The load generator (a child process in a client pod).

/// Environment of a load generator run: `target;own_ip;workers_keepalive;workers_new;interval_us;stop_file;out_file`.
const LOADGEN_ENV: &str = "SLUICE_RESTART_LOADGEN";
/// A keep-alive connection is closed by its client after this many requests (about 0.5 s), as
/// pooled clients recycle theirs: otherwise one opened while the agent was away would stay direct
/// for the rest of the run and no later restart would meet keep-alive connections.
const KEEPALIVE_MAX_REQUESTS: u32 = 25;
/// A load generator stops by itself after this, whatever happens to the test.
const LOADGEN_MAX: Duration = Duration::from_secs(150);

/// How one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// 200 with `peer=<ip>`.
    Ok,
    /// A response other than 200.
    Status,
    /// `connect()` failed (refused, timed out).
    Connect,
    /// Writing the request or reading the response failed (reset, closed, timed out).
    Io,
}

impl Outcome {
    fn code(self) -> char {
        match self {
            Outcome::Ok => 'o',
            Outcome::Status => 's',
            Outcome::Connect => 'c',
            Outcome::Io => 'i',
        }
    }

    fn from_code(c: &str) -> Outcome {
        match c {
            "o" => Outcome::Ok,
            "s" => Outcome::Status,
            "c" => Outcome::Connect,
            _ => Outcome::Io,
        }
    }
}

/// One request as the load generator saw it.
#[derive(Clone, Debug)]
struct Rec {
    start: u64,
    end: u64,
    outcome: Outcome,
    /// The server saw the proxy's address (through the proxy) rather than the pod's (direct).
    proxied: bool,
    /// Sent on a connection that had carried a request before.
    reused: bool,
    /// From a keep-alive worker (else a new connection per request).
    keepalive: bool,
    /// Which pod sent it.
    pod: usize,
}

/// Not a test of its own: the load generator that `restarts_under_load_cost_no_requests` runs in
/// each client pod. Without its environment it does nothing.
#[test]
#[ignore = "run by restarts_under_load_cost_no_requests inside a pod"]
fn load_generator() {
    let Ok(spec) = std::env::var(LOADGEN_ENV) else {
        return;
    };
    let f: Vec<&str> = spec.split(';').collect();
    let target: SocketAddr = f[0].parse().unwrap();
    let own: IpAddr = f[1].parse().unwrap();
    let keepalive: usize = f[2].parse().unwrap();
    let fresh: usize = f[3].parse().unwrap();
    let interval = Duration::from_micros(f[4].parse().unwrap());
    let stop_file = PathBuf::from(f[5]);
    let out_file = PathBuf::from(f[6]);
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..keepalive + fresh)
        .map(|i| {
            let stop = stop.clone();
            std::thread::spawn(move || load_worker(target, own, i < keepalive, interval, &stop))
        })
        .collect();
    let started = mono_ns();
    while !stop_file.exists() && mono_ns() - started < LOADGEN_MAX.as_nanos() as u64 {
        pause(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let mut out = String::new();
    for w in workers {
        for r in w.join().unwrap() {
            out.push_str(&format!(
                "{} {} {} {} {} {}\n",
                r.start,
                r.end,
                r.outcome.code(),
                u8::from(r.proxied),
                u8::from(r.reused),
                u8::from(r.keepalive)
            ));
        }
    }
    let tmp = out_file.with_extension("tmp");
    fs::write(&tmp, out).unwrap();
    fs::rename(&tmp, &out_file).unwrap();
}

/// One worker: a request every `interval` (no catching up after a slow one), on one keep-alive
/// connection (reopened when closed) or on a new connection each.
fn load_worker(
    target: SocketAddr,
    own: IpAddr,
    keepalive: bool,
    interval: Duration,
    stop: &AtomicBool,
) -> Vec<Rec> {
    let mut recs = Vec::new();
    let mut conn: Option<BufReader<TcpStream>> = None;
    let mut on_conn = 0u32;
    let step = interval.as_nanos() as u64;
    // Workers start spread over one interval.
    let mut next = mono_ns() + fastrand_ns(step);
    while !stop.load(Ordering::Relaxed) {
        let now = mono_ns();
        if next > now {
            pause(Duration::from_nanos(next - now));
        }
        next = next.max(now) + step;
        let start = mono_ns();
        if conn.is_none() {
            on_conn = 0;
        }
        let reused = conn.is_some();
        on_conn += 1;
        let last = on_conn >= KEEPALIVE_MAX_REQUESTS;
        let (outcome, proxied) = one_request(target, own, keepalive && !last, &mut conn);
        recs.push(Rec {
            start,
            end: mono_ns(),
            outcome,
            proxied,
            reused,
            keepalive,
            pod: 0,
        });
    }
    recs
}

/// A spread without a random crate: the low bits of the clock.
fn fastrand_ns(below: u64) -> u64 {
    mono_ns() % below.max(1)
}

fn one_request(
    target: SocketAddr,
    own: IpAddr,
    keepalive: bool,
    conn: &mut Option<BufReader<TcpStream>>,
) -> (Outcome, bool) {
    if conn.is_none() {
        match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_nodelay(true);
                *conn = Some(BufReader::new(s));
            }
            Err(_) => return (Outcome::Connect, false),
        }
    }
    let stream = conn.as_mut().expect("connected");
    let request: &[u8] = if keepalive {
        b"GET / HTTP/1.1\r\nHost: restart\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: restart\r\nConnection: close\r\n\r\n"
    };
    let result = stream
        .get_mut()
        .write_all(request)
        .and_then(|()| read_response(stream));
    match result {
        Ok((status, close, body)) => {
            if close || !keepalive {
                *conn = None;
            }
            if status != 200 {
                return (Outcome::Status, false);
            }
            let peer = body.trim().strip_prefix("peer=").unwrap_or_default();
            (Outcome::Ok, peer != own.to_string())
        }
        Err(_) => {
            *conn = None;
            (Outcome::Io, false)
        }
    }
}

/// Status, whether the connection closes after it, and the body (`content-length` framed).
fn read_response(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool, String)> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(bad("closed before a response"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let (mut len, mut close) = (0usize, false);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("closed in the head"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                len = v.parse().map_err(|_| bad("content-length"))?;
            } else if k == "connection" && v.eq_ignore_ascii_case("close") {
                close = true;
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok((status, close, String::from_utf8_lossy(&body).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// The server: keep-alive HTTP/1.1 in the server pod, a thread per connection.

struct PeerServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeerServer {
    fn start(pod: &Pod, port: u16) -> PeerServer {
        let listener = pod.listen(port).expect("listen inside the server pod");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || accept_loop(listener, &s));
        PeerServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let _ = stream.set_nonblocking(false);
                // Connection threads end on the client's close or their read timeout.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
                let _ = stream.set_nodelay(true);
                std::thread::spawn(move || serve_peer(stream, peer.ip().to_canonical()));
            }
            Err(_) => pause(Duration::from_millis(1)),
        }
    }
}

fn serve_peer(stream: TcpStream, peer: IpAddr) {
    let mut r = BufReader::new(stream);
    let body = format!("peer={peer}\n");
    loop {
        let mut close = false;
        let mut line = String::new();
        // The head: request line and headers, up to the blank line.
        let mut lines = 0;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let l = line.trim_end();
            if l.is_empty() && lines > 0 {
                break;
            }
            if l.to_ascii_lowercase().starts_with("connection:") && l.contains("close") {
                close = true;
            }
            lines += 1;
            if lines > 100 {
                return;
            }
        }
        // Requests take a little while, so that some are under way at any moment (the drain
        // must finish them; the SIGKILL catches some).
        pause(SERVER_DELAY);
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n",
            body.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if r.get_mut()
            .write_all(format!("{head}{body}").as_bytes())
            .is_err()
            || close
        {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Objects, machine checks, guards.

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// `target/bpf/sluice-ebpf.o`, built by `cargo xtask build-ebpf`.
fn ebpf_object() -> PathBuf {
    let target = sluice_tests::bins::profile_dir()
        .parent()
        .expect("target dir")
        .to_path_buf();
    let beside = target.join("bpf/sluice-ebpf.o");
    if beside.is_file() {
        return beside;
    }
    workspace_root().join("target/bpf/sluice-ebpf.o")
}

/// Builds (or finds fresh) the variant object: the same programs with other tags.
fn variant_object() -> Result<PathBuf, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // What cargo set for this test process describes the test package, not the build.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key == "OUT_DIR"
            || key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_MANIFEST")
            || key == "CARGO_CRATE_NAME"
            || key == "CARGO_PRIMARY_PACKAGE"
            || key == "CARGO_TARGET_TMPDIR"
        {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .args(["xtask", "build-ebpf", "--variant", "1"])
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cargo xtask build-ebpf --variant 1: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo xtask build-ebpf --variant 1 failed (needs bpf-linker: `cargo xtask build-ebpf --install`): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(workspace_root().join("target/bpf/sluice-ebpf-variant-1.o"))
}

fn cannot_run() -> Option<String> {
    if let Some(why) = sluice_netns::cannot_run() {
        return Some(why);
    }
    if !ebpf_object().is_file() {
        return Some(format!(
            "{} is missing: run `cargo xtask build-ebpf`",
            ebpf_object().display()
        ));
    }
    None
}

/// A port nothing listens on at `ip` right now.
fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// The pin directory: `sluice uninstall --pin-dir` on drop, then whatever is left removed.
struct PinGuard(PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        if !self.0.exists() {
            return;
        }
        let _ = Command::new(&sluice_tests::bins::bins().sluice)
            .args(["uninstall", "--pin-dir"])
            .arg(&self.0)
            .stdin(Stdio::null())
            .output();
        if self.0.exists() {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// The agents' cgroup under the topology's: every agent (and straggler) killed, then removed.
struct CgroupGuard(PathBuf);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        if !self.0.exists() {
            return;
        }
        let _ = fs::write(self.0.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            pause(Duration::from_millis(20));
        }
        eprintln!("restart: could not remove {}", self.0.display());
    }
}

/// HTTP/1.0 GET to a host listener: the status, `None` if unreachable.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((
        head.split_whitespace().nth(1)?.parse().ok()?,
        body.to_owned(),
    ))
}

/// The agents: each start is a new `sluice run` on the same pins, addresses and configuration.
struct Agents {
    args: Vec<OsString>,
    cgroup_procs: PathBuf,
    log_dir: PathBuf,
    ready: SocketAddr,
    admin: SocketAddr,
    /// The one serving.
    current: Option<Child>,
    /// Agents told to stop, still draining.
    stopping: Vec<Child>,
    starts: usize,
}

impl Agents {
    fn stderr(&self, n: usize) -> String {
        fs::read_to_string(self.log_dir.join(format!("agent-{n}.err"))).unwrap_or_default()
    }

    /// Starts an agent with `object` and waits until it is ready.
    fn start(&mut self, object: &Path) {
        assert!(self.current.is_none());
        self.starts += 1;
        let n = self.starts;
        let out = fs::File::create(self.log_dir.join(format!("agent-{n}.out"))).unwrap();
        let err = fs::File::create(self.log_dir.join(format!("agent-{n}.err"))).unwrap();
        // Each agent binds its own loopback ports and says which in its own file; the outbound
        // address is the one they share.
        let listen = Listen::new(&self.log_dir, &format!("agent-{n}.addresses"));
        let mut cmd = Command::new("bash");
        cmd.arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(&self.cgroup_procs)
            .arg(&sluice_tests::bins::bins().sluice)
            .args(&self.args)
            .args(listen.local_args())
            .arg("--ebpf-object")
            .arg(object)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe and touches only the child. A killed test takes its
        // agents with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn sluice run");
        let mut bound = false;
        for _ in 0..300 {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("sluice run {n} exited with {status}:\n{}", self.stderr(n));
            }
            if !bound {
                let Some(b) = listen.try_read() else {
                    pause(Duration::from_millis(20));
                    continue;
                };
                (self.admin, self.ready) = (b.admin, b.ready);
                bound = true;
            }
            if http_get(self.ready, "/healthz/ready").is_some_and(|(c, _)| c == 200) {
                self.current = Some(child);
                return;
            }
            pause(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("sluice run {n} not ready:\n{}", self.stderr(n));
    }

    /// SIGTERM to the serving agent; returns once it stopped answering readiness (it then drains
    /// on its own; reaped later).
    fn terminate(&mut self) {
        let child = self.current.take().expect("an agent serving");
        // SAFETY: kill has no memory preconditions; the PID is our unreaped child's.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        self.stopping.push(child);
        for _ in 0..250 {
            if http_get(self.ready, "/healthz/ready").is_none() {
                return;
            }
            pause(Duration::from_millis(2));
        }
        panic!("the agent still answers readiness after SIGTERM");
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.current.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) for every stopping agent to exit; their exit statuses.
    fn reap(&mut self) -> Vec<std::process::ExitStatus> {
        let mut statuses = Vec::new();
        for mut child in self.stopping.drain(..) {
            let mut status = None;
            for _ in 0..500 {
                if let Ok(Some(s)) = child.try_wait() {
                    status = Some(s);
                    break;
                }
                pause(Duration::from_millis(20));
            }
            match status {
                Some(s) => statuses.push(s),
                None => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("an agent did not exit within 10 s of SIGTERM");
                }
            }
        }
        statuses
    }

    fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.admin, "/status").expect("admin /status");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        self.kill9();
        for mut c in self.stopping.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    requests: u64,
    failed: u64,
    direct: u64,
    proxied: u64,
}

impl Tally {
    fn of<'a>(recs: impl Iterator<Item = &'a Rec>) -> Tally {
        let mut t = Tally::default();
        for r in recs {
            t.requests += 1;
            match r.outcome {
                Outcome::Ok if r.proxied => t.proxied += 1,
                Outcome::Ok => t.direct += 1,
                _ => t.failed += 1,
            }
        }
        t
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>6} requests, {:>3} failed, {:>6} through the proxy, {:>5} direct",
            self.requests, self.failed, self.proxied, self.direct
        )
    }
}

// ---------------------------------------------------------------------------------------------

const PODS: usize = 3;
/// How long the server takes per request (about 5 requests under way at 1,000/s).
const SERVER_DELAY: Duration = Duration::from_millis(5);
/// Per pod: keep-alive workers and new-connection workers.
const KEEPALIVE: usize = 3;
const FRESH: usize = 3;
/// Total rate: PODS * (KEEPALIVE + FRESH) workers, a request each per interval.
const RATE: u64 = 1000;
const GRACEFUL: usize = 10;
const LEASE: Duration = Duration::from_secs(1);

#[test]
fn restarts_under_load_cost_no_requests() {
    if skip_because(cannot_run()) {
        return;
    }
    let variant = match variant_object() {
        Ok(v) => v,
        Err(why) => {
            skip_because(Some(why));
            return;
        }
    };
    let _ = sluice_tests::bins::bins();
    for what in sluice_netns::sweep_stale() {
        eprintln!("restart: removed stale {what}");
    }
    let mut topo = Topology::create().expect("topology");
    let dir = tempfile::tempdir().unwrap();
    let pins = PinGuard(PathBuf::from(format!(
        "/sys/fs/bpf/sluice-test-{}",
        topo.id()
    )));
    let agent_cgroup = CgroupGuard(topo.cgroup().join("agent"));
    fs::create_dir(&agent_cgroup.0).unwrap();

    let server_pod = topo.add_pod("server").unwrap();
    let clients: Vec<Pod> = (0..PODS)
        .map(|i| topo.add_pod(&format!("client-{i}")).unwrap())
        .collect();
    let server = PeerServer::start(&server_pod, 9090);
    let config = dir.path().join("config");
    fs::create_dir(&config).unwrap();
    let mut yaml = String::new();
    for (pod, enrolled) in clients
        .iter()
        .map(|p| (p, true))
        .chain([(&server_pod, false)])
    {
        yaml.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    istio.io/dataplane-mode: {mode}\n  annotations:\n    sluice.io/netns: {netns}\n    sluice.io/cgroup: {cgroup}\nstatus:\n  podIP: {ip}\n---\n",
            name = pod.name,
            mode = if enrolled { "ambient" } else { "none" },
            netns = pod.netns_path.display(),
            cgroup = pod.cgroup.display(),
            ip = pod.ip,
        ));
    }
    fs::write(config.join("pods.yaml"), yaml).unwrap();

    let host = IpAddr::V4(topo.host_ip());
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let listen = SocketAddr::new(host, free_port(host));
    // Known once each agent has bound them (port 0: the kernel chooses).
    let unbound = SocketAddr::new(local, 0);
    let mut agents = Agents {
        args: [
            "run",
            "--redirect",
            "ebpf",
            "--no-access-log",
            "--config-dir",
            config.to_str().unwrap(),
            "--outbound-addr",
            &listen.to_string(),
            // Two agents overlap during a restart: neither takes the default admin socket.
            "--admin-socket",
            "none",
            "--cgroup",
            topo.cgroup().to_str().unwrap(),
            "--cgroup-root",
            topo.cgroup().to_str().unwrap(),
            "--pin-dir",
            pins.0.to_str().unwrap(),
            "--proxy-ip",
            &host.to_string(),
            "--lease",
            "1s",
            "--drain",
            "5s",
        ]
        .map(OsString::from)
        .to_vec(),
        cgroup_procs: agent_cgroup.0.join("cgroup.procs"),
        log_dir: dir.path().to_path_buf(),
        ready: unbound,
        admin: unbound,
        current: None,
        stopping: Vec::new(),
        starts: 0,
    };
    let plain = ebpf_object();
    agents.start(&plain);

    // The load generators: this binary again, in each client pod.
    let workers = (PODS * (KEEPALIVE + FRESH)) as u64;
    let interval_us = 1_000_000 * workers / RATE;
    let stop_file = dir.path().join("stop");
    let outs: Vec<PathBuf> = (0..PODS)
        .map(|i| dir.path().join(format!("load-{i}.txt")))
        .collect();
    let exe = std::env::current_exe().unwrap();
    for (pod, out) in clients.iter().zip(&outs) {
        let mut cmd = topo.command(pod, &exe).unwrap();
        cmd.args(["--exact", "load_generator", "--ignored", "--nocapture"])
            .env(
                LOADGEN_ENV,
                format!(
                    "{};{};{KEEPALIVE};{FRESH};{interval_us};{};{}",
                    server.addr,
                    pod.ip,
                    stop_file.display(),
                    out.display()
                ),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: as for the agents: the load ends with the test.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        topo.spawn(&mut cmd).unwrap();
    }
    let load_started = mono_ns();
    pause(Duration::from_secs(2));

    // (a) Graceful restarts: SIGTERM, and a new agent at once on the same pins.
    let mut restarts: Vec<(u64, u64)> = Vec::new();
    for _ in 0..GRACEFUL {
        let term = mono_ns();
        agents.terminate();
        agents.start(&plain);
        restarts.push((term, mono_ns()));
        pause(Duration::from_millis(1500));
    }
    let graceful_exits = agents.reap();

    // (b) SIGKILL: the agent is gone at once; after the lease, new connections go direct.
    // The signal, and the moment the agent is gone (reaped: its sockets are closed). A request
    // under way at any time in between was in flight at the kill.
    let killed = mono_ns();
    agents.kill9();
    let dead = mono_ns();
    pause(LEASE + Duration::from_millis(1500));
    let restarted = mono_ns();
    agents.start(&plain);
    pause(Duration::from_millis(1500));

    // (c) Upgrade to a different build: its programs are swapped into the pinned links.
    let upgrade = mono_ns();
    agents.terminate();
    agents.start(&variant);
    let upgraded_ready = mono_ns();
    let status = agents.status();
    assert_eq!(
        status.pointer("/redirect/listener_registered"),
        Some(&serde_json::Value::Bool(true)),
        "the outbound listener is not registered with the programs: {status:#}"
    );
    pause(Duration::from_millis(2500));
    let load_stopped = mono_ns();
    fs::write(&stop_file, "").unwrap();
    let upgrade_exits = agents.reap();

    let mut recs: Vec<Rec> = Vec::new();
    for (i, out) in outs.iter().enumerate() {
        let mut waited = 0;
        while !out.exists() && waited < 500 {
            pause(Duration::from_millis(20));
            waited += 1;
        }
        let text = fs::read_to_string(out).expect("load generator output");
        for line in text.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            recs.push(Rec {
                start: f[0].parse().unwrap(),
                end: f[1].parse().unwrap(),
                outcome: Outcome::from_code(f[2]),
                proxied: f[3] == "1",
                reused: f[4] == "1",
                keepalive: f[5] == "1",
                pod: i,
            });
        }
    }
    recs.sort_by_key(|r| r.start);
    let final_stderr = agents.stderr(agents.starts);
    agents.terminate();
    let last_exit = agents.reap();

    // ---- Figures.
    let secs = (load_stopped - load_started) as f64 / 1e9;
    let all = Tally::of(recs.iter());
    println!(
        "\nrestart under load: {PODS} client pods x ({KEEPALIVE} keep-alive + {FRESH} new-connection workers), {:.0} requests/s over {secs:.1} s",
        all.requests as f64 / secs
    );
    println!("all:      {all}");
    let failures: Vec<&Rec> = recs.iter().filter(|r| r.outcome != Outcome::Ok).collect();

    println!("(a) {GRACEFUL} graceful restarts (SIGTERM, new agent on the same pins at once):");
    let mut graceful = Tally::default();
    for (i, (term, ready_at)) in restarts.iter().enumerate() {
        // Up to the next restart, or the kill (requests under way at the kill are (b)'s).
        let until = restarts.get(i + 1).map_or(killed, |r| r.0);
        let w: Vec<&Rec> = recs
            .iter()
            .filter(|r| r.start >= *term && r.start < until && r.end < killed)
            .collect();
        let t = Tally::of(w.iter().copied());
        // The gap: new connections that went direct (keep-alive connections opened during it
        // stay direct until they close, so they say nothing about it).
        let direct_new: Vec<u64> = w
            .iter()
            .filter(|r| r.outcome == Outcome::Ok && !r.proxied && !r.keepalive)
            .map(|r| r.start - term)
            .collect();
        let gap = match (direct_new.iter().min(), direct_new.iter().max()) {
            (Some(a), Some(b)) => format!("{:>5.1} .. {:>6.1} ms", ms(*a), ms(*b)),
            _ => "none".into(),
        };
        println!(
            "  restart {:>2}: new agent ready {:>6.1} ms after SIGTERM; new connections direct {gap} ({} of them); {t}",
            i + 1,
            ms(ready_at - term),
            direct_new.len(),
        );
        graceful.requests += t.requests;
        graceful.failed += t.failed;
        graceful.direct += t.direct;
        graceful.proxied += t.proxied;
    }
    let before_kill: Vec<&Rec> = recs.iter().filter(|r| r.end < killed).collect();
    let before = Tally::of(before_kill.iter().copied());
    println!("  whole phase (warm-up included, up to the kill): {before}");

    let in_flight: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.start < dead && r.end >= killed)
        .collect();
    let in_flight_failed = in_flight
        .iter()
        .filter(|r| r.outcome != Outcome::Ok)
        .count();
    let window_end = killed + LEASE.as_nanos() as u64 + 500_000_000;
    let after_kill: Vec<&Rec> = recs
        .iter()
        .filter(|r| r.start >= dead && r.start < restarted)
        .collect();
    let after_kill_failed: Vec<&&Rec> = after_kill
        .iter()
        .filter(|r| r.outcome != Outcome::Ok)
        .collect();
    let refused = after_kill_failed
        .iter()
        .filter(|r| r.outcome == Outcome::Connect)
        .count();
    let dead_conn = after_kill_failed.len() - refused;
    let last_failed = after_kill_failed.iter().map(|r| r.start).max();
    let first_direct = after_kill
        .iter()
        .filter(|r| r.outcome == Outcome::Ok && !r.proxied)
        .map(|r| r.start)
        .min();
    let late: Vec<&&Rec> = after_kill
        .iter()
        .filter(|r| r.start >= window_end)
        .collect();
    let late_tally = Tally::of(late.iter().map(|r| **r));
    println!(
        "(b) SIGKILL (lease {LEASE:?}; the agent was gone {:.1} ms after the signal):",
        ms(dead - killed)
    );
    println!(
        "  in flight at the kill: {} requests, {in_flight_failed} failed",
        in_flight.len()
    );
    println!(
        "  started after the kill: {} failed ({refused} connects refused, {dead_conn} on keep-alive connections to the dead proxy); last failure {} ms after the kill; first direct success {} ms after",
        after_kill_failed.len(),
        last_failed.map_or("-".into(), |t| format!("{:.1}", ms(t - killed))),
        first_direct.map_or("-".into(), |t| format!("{:.1}", ms(t - killed))),
    );
    println!("  from lease + 500 ms after the kill to the restart: {late_tally}");
    let after_restart = Tally::of(
        recs.iter()
            .filter(|r| r.start >= restarted && r.start < upgrade),
    );
    println!("  agent started again on the pins: {after_restart}");
    let upgraded_from_status = status
        .pointer("/redirect/programs/upgraded")
        .cloned()
        .unwrap_or_default();
    let upgrade_window = Tally::of(
        recs.iter()
            .filter(|r| r.start >= upgrade && r.start < load_stopped),
    );
    println!(
        "(c) upgrade to another build (variant object), new agent ready {:.1} ms after SIGTERM, programs upgraded in place: {upgraded_from_status}",
        ms(upgraded_ready - upgrade)
    );
    println!("  upgrade, SIGTERM to the end: {upgrade_window}");
    let keepalive_reused = recs.iter().filter(|r| r.reused).count();
    println!(
        "requests on reused keep-alive connections in the whole run: {keepalive_reused} (a keep-alive connection opened while the agent was away stays direct until it closes)"
    );
    if !failures.is_empty() {
        let count = |o: Outcome, reused: bool| {
            failures
                .iter()
                .filter(|f| f.outcome == o && f.reused == reused)
                .count()
        };
        println!(
            "failures: {} refused connects, {} on new connections and {} on reused keep-alive connections (reset or closed), {} non-200",
            count(Outcome::Connect, false),
            count(Outcome::Io, false),
            count(Outcome::Io, true),
            count(Outcome::Status, false) + count(Outcome::Status, true),
        );
        println!("the first 40 (ms since load start, pod, outcome, reused):");
        for f in failures.iter().take(40) {
            println!(
                "  {:>9.1} .. {:>9.1}  pod {} {:?} reused={}",
                ms(f.start - load_started),
                ms(f.end - load_started),
                f.pod,
                f.outcome,
                f.reused
            );
        }
    }

    // ---- Assertions: counts and outcomes, no timings beyond the lease's own bound.
    assert!(
        graceful.proxied > 0 && graceful.direct > 0,
        "the restarts must show both paths: {graceful:?}"
    );
    assert_eq!(
        before.failed, 0,
        "graceful restarts failed requests ({before})"
    );
    for s in graceful_exits
        .iter()
        .chain(&upgrade_exits)
        .chain(&last_exit)
    {
        assert!(s.success(), "an agent exited with {s} after SIGTERM");
    }
    // SIGKILL: what failed was under way at the kill, or the one request each keep-alive
    // connection to the dead proxy carried next; no connect was refused (the kernel dropped the
    // listener from SLUICE_LISTENER, so the programs failed open at once).
    assert!(in_flight_failed <= in_flight.len());
    assert_eq!(
        refused, 0,
        "connects refused after the kill: the programs should fail open at once"
    );
    assert!(
        after_kill_failed
            .iter()
            .all(|r| r.reused && r.keepalive && r.start < window_end),
        "a failure after the kill that is not the next request on a keep-alive connection"
    );
    assert!(
        after_kill_failed.len() <= PODS * KEEPALIVE,
        "more than one failure per keep-alive connection"
    );
    assert!(
        late_tally.requests > 0 && late_tally.failed == 0 && late_tally.proxied == 0,
        "after the lease, new connections must go direct and succeed: {late_tally}"
    );
    assert_eq!(after_restart.failed, 0, "the restart after the kill");
    assert!(
        after_restart.proxied > 0,
        "redirection resumed after the kill"
    );
    // Upgrade: the new build's programs went into the pinned links, nothing failed.
    assert!(
        upgraded_from_status
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "the variant's programs were not swapped in: {status:#}\n{final_stderr}"
    );
    assert_eq!(upgrade_window.failed, 0, "the upgrade failed requests");
    assert!(upgrade_window.proxied > 0);

    let (pin_dir, topo_cgroup) = (pins.0.clone(), topo.cgroup().to_path_buf());
    drop(agents);
    drop(server);
    drop(agent_cgroup);
    drop(pins);
    drop(topo);
    assert!(!pin_dir.exists(), "pins left behind: {}", pin_dir.display());
    assert!(
        !topo_cgroup.exists(),
        "cgroup left behind: {}",
        topo_cgroup.display()
    );
}

// ---------------------------------------------------------------------------------------------
// The drain in-process (no root): what the restarts rely on, one mechanism at a time.

/// Reads one HTTP/1.1 response (content-length framed) off `s`: status and whether it says
/// `connection: close`.
async fn read_response_async(s: &mut tokio::net::TcpStream) -> std::io::Result<(u16, bool)> {
    use tokio::io::AsyncReadExt as _;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let close = head
        .lines()
        .any(|l| l.starts_with("connection:") && l.contains("close"));
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok((status, close))
}

/// The listener's drain: connections queued when the shutdown comes (in eBPF mode, redirected
/// just before the lease ended) are accepted and served, not reset; a keep-alive client idle at
/// the shutdown can still send its next request, whose response says `Connection: close`; an
/// HTTP/2 connection gets a GOAWAY and ends cleanly; an idle HTTP/1 connection is closed after
/// the grace (half the drain).
#[tokio::test(flavor = "current_thread")]
async fn drain_serves_queued_connections_and_tells_keep_alive_clients() {
    use sluice_proxy::{AccessLog, Handler, HandlerOptions, Metrics};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let handler = Arc::new(Handler::new(
        HandlerOptions::default(),
        AccessLog::new(false),
        Metrics::new(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let drain = Duration::from_secs(2);
    let server = tokio::spawn(sluice_proxy::server::serve(
        listener,
        handler,
        None,
        Default::default(),
        rx,
        drain,
    ));
    // No Service is configured: the proxy answers every request itself, which is all the drain
    // needs.
    let request = b"GET / HTTP/1.1\r\nHost: nowhere.example\r\n\r\n";
    let mut keep_alive = tokio::net::TcpStream::connect(addr).await.unwrap();
    keep_alive.write_all(request).await.unwrap();
    let (first, close) = read_response_async(&mut keep_alive).await.unwrap();
    assert!(!close, "before the shutdown, connections are kept alive");
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    idle.write_all(request).await.unwrap();
    read_response_async(&mut idle).await.unwrap();
    // An HTTP/2 (h2c) client with one request done.
    let (mut h2_client, h2_conn) =
        h2::client::handshake(tokio::net::TcpStream::connect(addr).await.unwrap())
            .await
            .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let (rsp, _) = h2_client
        .send_request(
            http::Request::get("http://nowhere.example/")
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(rsp.await.unwrap().status().as_u16(), first);

    // Connections the kernel completes while the accept loop does not run (this thread is ours
    // until the next await), then the shutdown: they are queued when it comes.
    let queued: Vec<std::net::TcpStream> = (0..8)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    shutdown.send(true).unwrap();
    let mut served = 0;
    for s in queued {
        s.set_nonblocking(true).unwrap();
        let mut s = tokio::net::TcpStream::from_std(s).unwrap();
        if s.write_all(request).await.is_ok() {
            if let Ok((status, close)) = read_response_async(&mut s).await {
                assert_eq!(status, first);
                assert!(close, "a response during the drain says Connection: close");
                served += 1;
            }
        }
    }
    assert_eq!(
        served, 8,
        "connections queued at the shutdown were not all served"
    );

    // The keep-alive client, idle at the shutdown, sends its next request: answered, and told.
    keep_alive.write_all(request).await.unwrap();
    let (status, close) = read_response_async(&mut keep_alive).await.unwrap();
    assert_eq!(status, first);
    assert!(close, "the drain's response says Connection: close");
    let mut rest = Vec::new();
    let n = keep_alive.read_to_end(&mut rest).await.unwrap_or(0);
    assert_eq!(n, 0, "closed after that response");

    // The HTTP/2 connection got a GOAWAY at once and ended cleanly (no reset).
    let ended = tokio::time::timeout(drain, h2_conn).await;
    assert!(
        matches!(ended, Ok(Ok(Ok(())))),
        "the HTTP/2 connection did not end with a GOAWAY: {ended:?}"
    );

    // The idle one is closed after the grace, within the drain.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(drain, idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle connection outlived the drain");
    tokio::time::timeout(drain * 2, server)
        .await
        .expect("the listener's task ends after the drain")
        .unwrap();
    // And the address is free again.
    tokio::net::TcpListener::bind(addr).await.unwrap();
}
