//! An open-loop, fixed-rate HTTP/1.1 load generator (Debian's `wrk` has no `-R`).
//!
//! Request `i` is due at `start + i / rate`. Latency runs from the moment the generator
//! woke up to send it to the end of the response, and includes any wait for a free
//! keep-alive connection; a request sent more than the timer's slack after its due
//! time is timed from its due time. A slow target therefore cannot hide its queueing
//! (no coordinated omission), while the generator's 1 ms timer granularity is not
//! charged to the target.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::stats::percentile;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Target address (host:port).
    #[arg(long)]
    pub target: SocketAddr,
    /// Connect from this local address (a pod's, on loopback).
    #[arg(long)]
    pub source: Option<std::net::IpAddr>,
    /// `Host` header to send.
    #[arg(long, default_value = "bench-upstream")]
    pub host: String,
    /// Requests per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds to run.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Take turns with other generators: time is cut into `--slot-ms` slots from `--epoch-ns`,
    /// and this one sends only in slot `--slot` of every `--slots`, at `--rate` within its slots
    /// (so `--duration` seconds of sending take `--slots` times as long). Generators started
    /// together against different targets then share the machine's hiccups alike.
    #[arg(long, default_value_t = 1)]
    pub slots: u32,
    /// This generator's slot, 0 to `--slots` - 1.
    #[arg(long, default_value_t = 0)]
    pub slot: u32,
    #[arg(long, default_value_t = 100)]
    pub slot_ms: u64,
    /// When slot 0 of the first round of slots starts, in CLOCK_MONOTONIC nanoseconds (shared by
    /// every process on the machine, network namespaces included); default: as soon as the
    /// connections are up.
    #[arg(long)]
    pub epoch_ns: Option<u64>,
}

/// When request `i` is due, counted from the schedule's start: every `interval` apart, or, when
/// taking turns, the same within this generator's slots only.
fn due_offset(i: u64, interval: Duration, args: &LoadgenArgs) -> Duration {
    if args.slots <= 1 {
        return interval.mul_f64(i as f64);
    }
    let slot = Duration::from_millis(args.slot_ms);
    let per_slot = (slot.as_nanos() / interval.as_nanos().max(1)).max(1) as u64;
    let (turn, j) = (i / per_slot, i % per_slot);
    let slot_index = turn * u64::from(args.slots) + u64::from(args.slot);
    slot.mul_f64(slot_index as f64) + interval.mul_f64(j as f64)
}

/// What one fixed-rate run measured; printed as JSON by `cargo xtask loadgen`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LoadgenReport {
    pub sent: u64,
    pub ok: u64,
    pub errors: u64,
    pub achieved_rps: f64,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    /// The same percentiles for each second of sending (`--rate` requests, in schedule order).
    /// Generators taking turns send their `k`-th second in the same stretch of time, so two
    /// targets can be compared second by second, under the same hiccups of the host.
    #[serde(default)]
    pub seconds: Vec<Window>,
}

/// The percentiles of one second of sending; `None` where none of its requests succeeded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

/// Each second's percentiles of `latencies` (indexed by request, `None` for a failed one),
/// `per_second` requests at a time.
fn seconds(latencies: &[Option<u64>], per_second: usize) -> Vec<Window> {
    latencies
        .chunks(per_second.max(1))
        .map(|chunk| {
            let mut ok: Vec<u64> = chunk.iter().flatten().copied().collect();
            ok.sort_unstable();
            Window {
                p50_us: percentile(&ok, 50.0),
                p99_us: percentile(&ok, 99.0),
            }
        })
        .collect()
}

type Sender = http1::SendRequest<Empty<Bytes>>;

/// How late tokio's millisecond timer may fire on its own.
const TIMER_SLACK: Duration = Duration::from_millis(2);

async fn connect(args: &LoadgenArgs) -> Result<Sender> {
    let tcp = match args.source {
        Some(ip) => {
            let socket = match ip {
                std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(args.target).await
        }
        None => TcpStream::connect(args.target).await,
    }
    .with_context(|| format!("cannot connect to {}", args.target))?;
    tcp.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Runs the schedule on the current (single-threaded) runtime.
pub async fn run(args: LoadgenArgs) -> Result<LoadgenReport> {
    if args.rate == 0 || args.connections == 0 {
        bail!("--rate and --connections must be positive");
    }
    if args.slot >= args.slots.max(1) || args.slot_ms == 0 {
        bail!(
            "--slot {} of --slots {} (--slot-ms {}): the slot must be below the count, the length positive",
            args.slot,
            args.slots,
            args.slot_ms
        );
    }
    let (idle_tx, mut idle_rx) = mpsc::unbounded_channel::<Sender>();
    for _ in 0..args.connections {
        idle_tx.send(connect(&args).await?).expect("receiver alive");
    }
    // Each request reports its index and its latency (`None` if it failed).
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(u64, Option<u64>)>();
    let total = args.rate as u64 * args.duration;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let start = match args.epoch_ns {
        Some(epoch) => {
            let now = sluice_redirect::monotonic_ns();
            if epoch < now {
                bail!(
                    "--epoch-ns is {} ms in the past (the connections took too long?)",
                    (now - epoch) / 1_000_000
                );
            }
            Instant::now() + Duration::from_nanos(epoch - now)
        }
        None => Instant::now(),
    };

    for i in 0..total {
        let due = start + due_offset(i, interval, &args);
        tokio::time::sleep_until(due).await;
        let now = Instant::now();
        // Lateness within the timer's 1 ms granularity is the generator's; more means
        // it was held up waiting for a connection for an earlier request, which is the
        // target's doing, so this request is timed from when it was due.
        let woke = if now.duration_since(due) > TIMER_SLACK {
            due
        } else {
            now
        };
        // Waiting here for a connection is the target's fault, so it is timed.
        let mut sender = idle_rx.recv().await.context("all connections failed")?;
        if sender.ready().await.is_err() {
            sender = connect(&args).await?;
        }
        let req = http::Request::get("/")
            .header(http::header::HOST, &args.host)
            .body(Empty::<Bytes>::new())?;
        let (idle_tx, done_tx) = (idle_tx.clone(), done_tx.clone());
        tokio::spawn(async move {
            let ok = match sender.send_request(req).await {
                Ok(resp) => {
                    let status = resp.status();
                    resp.into_body().collect().await.is_ok() && status.is_success()
                }
                Err(_) => false,
            };
            let _ = done_tx.send((i, ok.then(|| woke.elapsed().as_micros() as u64)));
            let _ = idle_tx.send(sender);
        });
    }
    drop(done_tx);
    let mut by_request = vec![None; total as usize];
    let mut reported = 0;
    // Bounded: every spawned request reports once, or the 30 s deadline ends the wait.
    let deadline = Instant::now() + Duration::from_secs(30);
    while reported < total {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some((i, us))) => {
                by_request[i as usize] = us;
                reported += 1;
            }
            Ok(None) | Err(_) => break,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut latencies: Vec<u64> = by_request.iter().flatten().copied().collect();
    latencies.sort_unstable();
    let ok = latencies.len() as u64;
    Ok(LoadgenReport {
        sent: total,
        ok,
        errors: total - ok,
        achieved_rps: ok as f64 / elapsed,
        p50_us: percentile(&latencies, 50.0),
        p90_us: percentile(&latencies, 90.0),
        p99_us: percentile(&latencies, 99.0),
        max_us: latencies.last().copied(),
        seconds: seconds(&by_request, args.rate as usize),
    })
}

/// The order of `n` generators' slots in round `round` (from 1): slot `k` goes to generator
/// `order[k]`. A slot starts as the one before it ends, so what that one left on the proxies' CPU
/// (idle since the direct run's slot, or another proxy's code and data in its caches) is carried
/// into it. One order for every round gave each target the same predecessor each time, which no
/// number of rounds averages out (Sluice, always after the direct run's slot, measured 1.01x and
/// 1.03x its twin of the same build at the median); each round here steps through the targets by
/// another stride prime to `n`, so each meets another predecessor in each round while strides last.
pub(crate) fn slot_order(n: usize, round: usize) -> Vec<usize> {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    // Stride 1 is prime to every n, so the cycle is never empty.
    let stride = (1..n.max(2))
        .filter(|&s| gcd(s, n) == 1)
        .cycle()
        .nth(round.saturating_sub(1))
        .unwrap_or(1);
    (0..n).map(|k| k * stride % n).collect()
}

/// Runs one fixed-rate generator per target at once, each sending only in its own slot of
/// `slot_ms` (see `LoadgenArgs::slots`), so that a hiccup of the host falls on every target
/// alike, and returns each one's report or why it has none. Every generator ends by itself
/// (its schedule, then at most 30 s for replies).
pub(crate) fn taking_turns<'a>(
    order: &[&'a str],
    slot_ms: u64,
    cmd: impl Fn(&str) -> Result<Command>,
) -> Result<Vec<(&'a str, Result<LoadgenReport, String>)>> {
    // Two seconds for every generator to start and open its connections.
    let epoch = sluice_redirect::monotonic_ns() + 2_000_000_000;
    let mut children = Vec::new();
    for (k, &v) in order.iter().enumerate() {
        let spawned = cmd(v).and_then(|mut c| {
            c.args([
                "--slots",
                &order.len().to_string(),
                "--slot",
                &k.to_string(),
                "--slot-ms",
                &slot_ms.to_string(),
                "--epoch-ns",
                &epoch.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
            c.spawn().context("cannot start the load generator")
        });
        match spawned {
            Ok(child) => children.push((v, child)),
            Err(e) => {
                for (_, mut c) in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e);
            }
        }
    }
    let mut out = Vec::new();
    for (v, child) in children {
        let o = child.wait_with_output()?;
        let rep = serde_json::from_slice::<LoadgenReport>(&o.stdout).map_err(|_| {
            format!(
                "load generator failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )
        });
        out.push((v, rep));
    }
    Ok(out)
}

/// Entry point of the hidden `cargo xtask loadgen` subcommand (run pinned by `bench`).
pub fn main(args: LoadgenArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_round_gives_each_generator_another_predecessor() {
        // Seven targets (the bench without the log) over five rounds.
        let predecessors = |round| {
            let order = slot_order(7, round);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..7).collect::<Vec<_>>(), "a permutation");
            // Slots wrap: the first follows the last of the turn before.
            (0..7)
                .map(|k| (order[k], order[(k + 6) % 7]))
                .collect::<std::collections::HashMap<_, _>>()
        };
        let rounds: Vec<_> = (1..=5).map(predecessors).collect();
        for target in 0..7 {
            let mut seen: Vec<usize> = rounds.iter().map(|p| p[&target]).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 5, "target {target} met {seen:?}");
        }
        // Round 1 keeps the order given; eight targets (with the log) have four strides, then
        // they repeat; one or two targets have one order.
        assert_eq!(slot_order(7, 1), (0..7).collect::<Vec<_>>());
        assert_eq!(slot_order(8, 5), slot_order(8, 1));
        assert_ne!(slot_order(8, 2), slot_order(8, 1));
        assert_eq!(slot_order(1, 3), [0]);
        assert_eq!(slot_order(2, 2), [0, 1]);
    }

    fn args(slots: u32, slot: u32) -> LoadgenArgs {
        LoadgenArgs {
            target: "127.0.0.1:1".parse().unwrap(),
            source: None,
            host: String::new(),
            rate: 1000,
            duration: 1,
            connections: 1,
            slots,
            slot,
            slot_ms: 100,
            epoch_ns: None,
        }
    }

    #[test]
    fn requests_fall_in_their_generators_slots_only() {
        let ms = Duration::from_millis;
        let interval = ms(1);
        // Alone: one request per millisecond.
        assert_eq!(due_offset(250, interval, &args(1, 0)), ms(250));
        // Slot 2 of 4, 100 ms each: requests 0-99 in 200-299 ms, 100-199 in 600-699 ms.
        let a = args(4, 2);
        assert_eq!(due_offset(0, interval, &a), ms(200));
        assert_eq!(due_offset(99, interval, &a), ms(299));
        assert_eq!(due_offset(100, interval, &a), ms(600));
        for i in 0..1000 {
            let at = due_offset(i, interval, &a).as_millis() as u64;
            assert_eq!((at / 100) % 4, 2, "request {i} at {at} ms");
        }
    }

    /// Each second's percentiles are of its own requests, failures left out; a last, shorter
    /// second is kept, and a second where all failed has none.
    #[test]
    fn each_second_has_its_own_percentiles() {
        let mut lat: Vec<Option<u64>> = (1..=100).map(Some).collect();
        lat.extend((0..100).map(|i| (i % 2 == 0).then_some(1000 + i)));
        lat.extend([None, None]);
        lat.push(Some(7));
        let w = seconds(&lat, 100);
        assert_eq!(w.len(), 3);
        assert_eq!(w[0].p50_us, Some(50));
        assert_eq!(w[0].p99_us, Some(99));
        // The even ones of 1000..1099: 50 values.
        assert_eq!(
            w[1].p50_us,
            percentile(&(0..50).map(|k| 1000 + 2 * k).collect::<Vec<_>>(), 50.0)
        );
        assert_eq!(w[1].p99_us, Some(1098));
        assert_eq!(
            w[2],
            Window {
                p50_us: Some(7),
                p99_us: Some(7)
            }
        );
        assert_eq!(
            seconds(&[None, None], 2),
            vec![Window {
                p50_us: None,
                p99_us: None
            }]
        );
    }
}
