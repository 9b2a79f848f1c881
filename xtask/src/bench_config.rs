//! `cargo xtask bench-config`: the control plane at scale, in one process, with the agent's own
//! code (the object store the watchers and the config directory feed, the snapshot build, the
//! proxy's per-generation state) and the real listener serving meanwhile.
//!
//! Builds the policy snapshot for `--services` Services with `--endpoints` endpoints among them,
//! `--virtual-services` VirtualServices and `--destination-rules` DestinationRules; then applies
//! `--updates` changed EndpointSlices and as many changed VirtualServices, one at a time, while
//! a client keeps sending requests through the proxy to Service 0 (whose endpoint is a real
//! upstream on loopback). Reports build and update times, this process's RSS (the store and the
//! proxy's state, as the agent holds them), what the client got during the updates, and the
//! request rate through the proxy with the whole configuration against one with Service 0 alone
//! (taking turns, in one run): per-request cost must not grow with the number of Services.
//! Writes `target/bench/config.json`.
// Wall-clock time of real work is what it measures.
#![allow(clippy::disallowed_methods)]

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sluice_config::{parse_api_object, BuildOptions, Event, Store, Update};
use sluice_proxy::{AccessLog, Handler, HandlerOptions, Metrics};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(clap::Args, Debug)]
pub struct BenchConfigArgs {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    /// Endpoints in all, spread evenly over the Services.
    #[arg(long, default_value_t = 100_000)]
    endpoints: usize,
    #[arg(long, default_value_t = 2_000)]
    virtual_services: usize,
    #[arg(long, default_value_t = 2_000)]
    destination_rules: usize,
    /// Changed EndpointSlices applied one at a time (and as many changed VirtualServices).
    #[arg(long, default_value_t = 20)]
    updates: usize,
    /// Rounds of the request-rate comparison (2 s with each configuration per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "target/bench/config.json")]
    out: PathBuf,
}

pub fn run(args: BenchConfigArgs) -> Result<()> {
    if cfg!(debug_assertions) {
        // Timings of a debug build say little: run the same command from a release build.
        let root = crate::bench::workspace_root();
        let bin = crate::bench::release_loadgen(&root)?;
        if bin != std::env::current_exe()? {
            let status = std::process::Command::new(bin)
                .arg("bench-config")
                .args(std::env::args().skip(2))
                .current_dir(&root)
                .status()?;
            if !status.success() {
                bail!("bench-config (release build) failed: {status}");
            }
            return Ok(());
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

fn service_name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn host(i: usize) -> String {
    format!("{}.default.svc.cluster.local", service_name(i))
}

fn object(v: Value) -> Update {
    Update::from_parsed(parse_api_object(&v))
        .0
        .pop()
        .expect("one object")
}

fn service(i: usize) -> Update {
    object(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": service_name(i), "namespace": "default", "resourceVersion": "1"},
        "spec": {"clusterIP": format!("10.{}.{}.{}", 96 + (i + 1) / 65536, ((i + 1) / 256) % 256, (i + 1) % 256),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}))
}

/// Service `i`'s slice: `n` endpoints, or the real upstream for Service 0; `rv` and `shift`
/// make a changed version.
fn slice(i: usize, n: usize, upstream: u16, rv: usize, shift: usize) -> Update {
    let (endpoints, port): (Vec<Value>, u16) = if i == 0 {
        (
            vec![json!({"addresses": ["127.0.0.1"], "conditions": {"ready": true}})],
            upstream,
        )
    } else {
        let eps = (0..n)
            .map(|k| {
                let a = i * n + k + shift;
                json!({"addresses": [format!("10.{}.{}.{}", 1 + a / 65536, (a / 256) % 256, a % 256)],
                       "conditions": {"ready": true}})
            })
            .collect();
        (eps, 8080)
    };
    object(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{}-x", service_name(i)), "namespace": "default",
                     "resourceVersion": rv.to_string(),
                     "labels": {"kubernetes.io/service-name": service_name(i)}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": port}]}),
    )
}

fn virtual_service(i: usize, rv: usize, timeout_s: usize) -> Update {
    object(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
        "metadata": {"name": service_name(i), "namespace": "default", "resourceVersion": rv.to_string()},
        "spec": {"hosts": [service_name(i)], "http": [
            {"name": "api", "match": [{"uri": {"prefix": "/api"}}, {"headers": {"x-canary": {"exact": "1"}}}],
             "route": [{"destination": {"host": service_name(i)}}], "timeout": format!("{timeout_s}s"),
             "retries": {"attempts": 2, "retryOn": "5xx,connect-failure"}},
            {"name": "rest", "route": [{"destination": {"host": service_name(i)}}],
             "timeout": format!("{timeout_s}s")}]}}),
    )
}

fn destination_rule(i: usize) -> Update {
    object(
        json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
        "metadata": {"name": service_name(i), "namespace": "default", "resourceVersion": "1"},
        "spec": {"host": service_name(i), "trafficPolicy": {
            "connectionPool": {"tcp": {"maxConnections": 1000}, "http": {"http2MaxRequests": 1000}},
            "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s", "baseEjectionTime": "30s"}}}}),
    )
}

/// This process's resident memory, MiB.
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn bench(args: BenchConfigArgs) -> Result<()> {
    if args.services == 0 || args.virtual_services > args.services {
        bail!("--services must be at least 1 and at least --virtual-services");
    }
    let per_service = (args.endpoints / args.services).max(1);
    let upstream = upstream().await?;
    let rss_before = rss_mib();

    // The whole configuration, as the watchers hand it over: one upsert per object, one commit.
    let mut store = Store::new(BuildOptions::default());
    let started = Instant::now();
    for i in 0..args.services {
        store.apply(Event::Upsert(service(i)));
        store.apply(Event::Upsert(slice(i, per_service, upstream, 1, 0)));
    }
    for i in 0..args.virtual_services {
        store.apply(Event::Upsert(virtual_service(i, 1, 5)));
    }
    for i in 0..args.destination_rules.min(args.services) {
        store.apply(Event::Upsert(destination_rule(i)));
    }
    let stored = started.elapsed();
    let started = Instant::now();
    let first = store.commit();
    let built = started.elapsed();
    if first
        .problems
        .iter()
        .any(|p| p.severity == sluice_config::Severity::Error)
    {
        bail!(
            "the generated configuration has errors: {:#?}",
            &first.problems[..3.min(first.problems.len())]
        );
    }
    let endpoints: usize = first
        .snapshot
        .clusters
        .values()
        .map(|c| c.endpoints.len())
        .sum();
    let handler = Arc::new(Handler::new(
        HandlerOptions::default(),
        AccessLog::new(false),
        Metrics::new(),
    ));
    let started = Instant::now();
    handler.apply(first.snapshot.clone());
    let proxy_state = started.elapsed();
    drop(first);
    let rss_built = rss_mib();
    println!(
        "{} Services, {endpoints} endpoints, {} VirtualServices, {} DestinationRules: stored in {:.0} ms, \
         snapshot built in {:.0} ms, the proxy's state made in {:.0} ms; RSS {:.0} MiB ({:.0} MiB before)",
        args.services,
        args.virtual_services,
        args.destination_rules,
        ms(stored),
        ms(built),
        ms(proxy_state),
        rss_built.unwrap_or(f64::NAN),
        rss_before.unwrap_or(f64::NAN),
    );

    // One Service alone, for the per-request comparison.
    let small = Arc::new(Handler::new(
        HandlerOptions::default(),
        AccessLog::new(false),
        Metrics::new(),
    ));
    {
        let mut one = Store::new(BuildOptions::default());
        one.apply(Event::Upsert(service(0)));
        one.apply(Event::Upsert(slice(0, 1, upstream, 1, 0)));
        one.apply(Event::Upsert(virtual_service(0, 1, 5)));
        one.apply(Event::Upsert(destination_rule(0)));
        small.apply(one.commit().snapshot);
    }
    let (large_addr, _large) = serve(handler.clone()).await?;
    let (small_addr, _small) = serve(small).await?;

    // Updates one at a time while a client keeps sending requests through the proxy.
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let client = tokio::spawn(keep_sending(large_addr, stop.clone(), counts.clone()));
    let (mut slices, mut routes) = (Vec::new(), Vec::new());
    // An EndpointSlice change's two halves: the store's commit, the proxy's next generation.
    let (mut commits, mut states) = (Vec::new(), Vec::new());
    let mut store = Some(store);
    for u in 0..args.updates {
        let i = 1 + u % (args.services - 1).max(1);
        let (h, mut s) = (handler.clone(), store.take().expect("store"));
        let (took_slice, committed, took_vs, s) = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            s.apply(Event::Upsert(slice(i, per_service, upstream, 10 + u, 1)));
            let r = s.commit();
            let committed = started.elapsed();
            h.apply(r.snapshot);
            let took_slice = started.elapsed();
            let started = Instant::now();
            s.apply(Event::Upsert(virtual_service(
                u % args.virtual_services.max(1),
                10 + u,
                6 + u,
            )));
            let r = s.commit();
            h.apply(r.snapshot);
            (took_slice, committed, started.elapsed(), s)
        })
        .await?;
        store = Some(s);
        slices.push(ms(took_slice));
        commits.push(ms(committed));
        states.push(ms(took_slice - committed));
        routes.push(ms(took_vs));
    }
    stop.store(true, Ordering::Relaxed);
    client.await??;
    let (ok, failed) = (
        counts[0].load(Ordering::Relaxed),
        counts[1].load(Ordering::Relaxed),
    );
    let (slice_max, route_max) = (
        slices.iter().copied().fold(0.0, f64::max),
        routes.iter().copied().fold(0.0, f64::max),
    );
    let (slice_med, route_med) = (median(&mut slices), median(&mut routes));
    let (commit_med, state_med) = (median(&mut commits), median(&mut states));
    println!(
        "one changed EndpointSlice applied (store, snapshot, proxy state) in {slice_med:.1} ms median \
         ({commit_med:.1} ms store and snapshot, {state_med:.1} ms the proxy's state), {slice_max:.1} ms max; \
         one changed VirtualService in {route_med:.1} ms median, {route_max:.1} ms max ({} of each); \
         meanwhile the client got {ok} answers 200 and {failed} others",
        args.updates
    );

    // Request rate with the whole configuration against Service 0 alone, taking turns.
    let mut rates = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        rates.0.push(rate(large_addr).await?);
        rates.1.push(rate(small_addr).await?);
    }
    let (large_rps, small_rps) = (median(&mut rates.0), median(&mut rates.1));
    println!(
        "requests/s through the proxy, one keep-alive connection: {large_rps:.0} with all {} Services, \
         {small_rps:.0} with one ({:.2}x; medians of {} rounds)",
        args.services,
        large_rps / small_rps,
        args.rounds
    );
    let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
    let rss = rss_built.unwrap_or(f64::NAN);
    println!(
        "{:<5} snapshot build under 1 s: {:.0} ms\n{:<5} one EndpointSlice change applied in under 50 ms: {slice_max:.1} ms (max)\n\
         {:<5} RSS under 300 MiB: {rss:.0} MiB\n{:<5} no failed request during the updates: {failed}",
        verdict(built < Duration::from_secs(1)),
        ms(built),
        verdict(slice_max < 50.0),
        verdict(rss < 300.0),
        verdict(failed == 0),
    );

    let report = json!({
        "services": args.services, "endpoints": endpoints,
        "virtual_services": args.virtual_services, "destination_rules": args.destination_rules,
        "stored_ms": ms(stored), "snapshot_build_ms": ms(built), "proxy_state_ms": ms(proxy_state),
        "rss_mib": rss_built, "rss_before_mib": rss_before,
        "endpoint_slice_update_ms": {"median": slice_med, "max": slice_max,
                                     "store_median": commit_med, "proxy_state_median": state_med},
        "virtual_service_update_ms": {"median": route_med, "max": route_max},
        "during_updates": {"ok": ok, "failed": failed},
        "requests_per_s": {"all_services": large_rps, "one_service": small_rps},
    });
    let out = crate::bench::workspace_root().join(&args.out);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", out.display());
    Ok(())
}

/// The real listener in front of `handler` on loopback; served while the guard lives.
async fn serve(handler: Arc<Handler>) -> Result<(SocketAddr, tokio::sync::watch::Sender<bool>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(sluice_proxy::server::serve(
        listener,
        handler,
        None,
        Default::default(),
        rx,
        Duration::from_secs(1),
    ));
    Ok((addr, stop))
}

/// An upstream on loopback answering `200 ok` to everything.
async fn upstream() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = 0;
                loop {
                    match s.read(&mut buf[have..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => have += n,
                    }
                    // Requests carry no body here: each head ends a request.
                    while let Some(end) = find(&buf[..have], b"\r\n\r\n") {
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                    if have == buf.len() {
                        return;
                    }
                }
            });
        }
    });
    Ok(port)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One keep-alive connection through the proxy to Service 0.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(proxy: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect(proxy).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// One request; its status.
    async fn get(&mut self) -> Result<u16> {
        let h = host(0);
        let req = format!("GET http://{h}/ HTTP/1.1\r\nHost: {h}\r\n\r\n");
        self.stream.write_all(req.as_bytes()).await?;
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
                let status: u16 = head
                    .get(9..12)
                    .and_then(|s| s.parse().ok())
                    .context("status line")?;
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + len {
                    return Ok(status);
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk))
                .await??;
            if n == 0 {
                bail!("the proxy closed the connection");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Requests one after the other until `stop`, counting 200s and anything else (a failed
/// connection included, then reopened).
async fn keep_sending(
    proxy: SocketAddr,
    stop: Arc<AtomicBool>,
    counts: Arc<[AtomicU64; 2]>,
) -> Result<()> {
    let mut conn = Conn::open(proxy).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match conn.get().await {
            Ok(200) => counts[0].fetch_add(1, Ordering::Relaxed),
            Ok(_) => counts[1].fetch_add(1, Ordering::Relaxed),
            Err(_) => {
                conn = Conn::open(proxy).await?;
                counts[1].fetch_add(1, Ordering::Relaxed)
            }
        };
    }
    Ok(())
}

/// Requests per second over 2 s on one keep-alive connection.
async fn rate(proxy: SocketAddr) -> Result<f64> {
    let mut conn = Conn::open(proxy).await?;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        if conn.get().await? != 200 {
            bail!("a request through the proxy failed");
        }
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}
