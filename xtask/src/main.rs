//! `cargo xtask`: project tasks that are not part of the product (benchmarks, eBPF
//! build, demo).

/// The agent's allocator: `bench-config` runs the agent's store and proxy in this process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod bench;
mod bench_config;
mod bench_isolation;
mod bench_redirect;
mod bolt;
mod dashboards;
mod demo;
mod ebpf;
mod fuzz;
mod http1;
mod pgo;
mod prometheus;
mod traces;
mod tutorial;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "Sluice project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Compare Sluice with HAProxy and Envoy on loopback (not a test; installs missing tools).
    Bench(bench::BenchArgs),
    /// eBPF redirect benchmark in throwaway pods: connect() cost, sk_msg vs TCP vs iptables (root).
    BenchRedirect(bench_redirect::BenchRedirectArgs),
    /// Connect timer / accept-and-drop listener used by `bench-redirect` inside pods.
    #[command(hide = true)]
    RedirectProbe(bench_redirect::ProbeArgs),
    /// Build the eBPF programs into target/bpf/sluice-ebpf.o (--install: missing prerequisites).
    BuildEbpf(ebpf::BuildEbpfArgs),
    /// Build the agent with profile-guided optimization (instrumented build, a training run on
    /// loopback, optimized build) into target/pgo/sluice.
    BuildPgo(pgo::BuildPgoArgs),
    /// Run the libFuzzer targets (configuration parsers, HTTP front) N seconds each (nightly).
    Fuzz(fuzz::FuzzArgs),
    /// The seed tutorial's steps 3-8 and the blog's experiments in pods with eBPF redirection (as
    /// root; explicit-proxy mode on loopback otherwise).
    Demo(demo::DemoArgs),
    /// The demo's traffic generator, run inside the client pod (prints JSON).
    #[command(hide = true)]
    DemoClient(demo::ClientArgs),
    /// What one pod's connection flood or slow requests cost another pod on the node proxy
    /// (p50/p99 ratios to a quiet node, interleaved rounds).
    BenchIsolation(bench_isolation::BenchIsolationArgs),
    /// The control plane at scale: snapshot build and update times for 10,000 Services, 100,000
    /// endpoints, 2,000 VirtualServices and DestinationRules, RSS, and the proxy serving meanwhile.
    BenchConfig(bench_config::BenchConfigArgs),
    /// The misbehaving pod of `bench-isolation`.
    #[command(hide = true)]
    Flood(bench_isolation::FloodArgs),
    /// An HTTP/1.1 upstream answering after a delay, for `bench-isolation`.
    #[command(hide = true)]
    SlowUpstream(bench_isolation::SlowUpstreamArgs),
    /// Open-loop fixed-rate load generator used by `bench` (prints JSON).
    #[command(hide = true)]
    Loadgen(bench::loadgen::LoadgenArgs),
    /// A bare hyper reverse proxy, the floor `bench` measures Sluice against.
    #[command(hide = true)]
    FloorProxy(bench::floor::FloorArgs),
    /// The seed tutorial's steps 3-8 on this machine, explicit-proxy mode (no root).
    Tutorial(tutorial::TutorialArgs),
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Cmd::Bench(args) => bench::run(args)?,
        Cmd::BenchRedirect(args) => bench_redirect::run(args)?,
        Cmd::RedirectProbe(args) => bench_redirect::probe_main(args)?,
        Cmd::Loadgen(args) => bench::loadgen::main(args)?,
        Cmd::FloorProxy(args) => bench::floor::main(args)?,
        Cmd::BenchIsolation(args) => bench_isolation::run(args)?,
        Cmd::BenchConfig(args) => bench_config::run(args)?,
        Cmd::Flood(args) => bench_isolation::flood(args)?,
        Cmd::SlowUpstream(args) => bench_isolation::slow_upstream(args)?,
        Cmd::BuildEbpf(args) => return ebpf::run(args),
        Cmd::BuildPgo(args) => pgo::run(args)?,
        Cmd::Fuzz(args) => return fuzz::run(args),
        Cmd::Demo(args) => return demo::run(args),
        Cmd::DemoClient(args) => return demo::client(args),
        Cmd::Tutorial(args) => return tutorial::run(args),
    }
    Ok(ExitCode::SUCCESS)
}
