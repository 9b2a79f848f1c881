//! `sluice run`: wiring only. Resolves the agent's configuration ([`crate::agent`]), starts the
//! configuration source ([`crate::source`]: a directory, or the Kubernetes API), opens the listeners
//! (outbound 15001, admin 15000 on localhost, metrics 15020, readiness 15021, as in Istio), and
//! drains on SIGTERM/SIGINT. With `--redirect ebpf` it also installs the eBPF redirect (see
//! [`crate::ebpf`]), whose enrollment follows each snapshot, and fails open on the way out.

use crate::agent::{AgentConfig, Env};
use crate::ebpf::{EbpfArgs, EbpfRedirect};
use crate::source::Source;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use sluice_proxy::admin::{self, AdminState};
use sluice_proxy::{AccessLog, Handler, HandlerOptions, Metrics, RedirectOptions};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing_subscriber::{prelude::*, reload, EnvFilter};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Directory of Istio and Kubernetes YAML (standalone mode); watched for changes.
    #[arg(long, env = "SLUICE_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// Kubernetes mode, with this kubeconfig. Without it, `KUBECONFIG` or the in-cluster
    /// environment (`KUBERNETES_SERVICE_HOST`, as in a pod) also select Kubernetes mode when no
    /// --config-dir is given.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (Kubernetes mode: only its Pods are watched) [default: NODE_NAME].
    #[arg(long)]
    pub node_name: Option<String>,
    /// Cluster name for telemetry (Istio's `--clusterID`).
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// How client traffic reaches the proxy: `none` (explicit proxy / Host header) or `ebpf`.
    #[arg(long, value_enum, default_value_t = Redirect::None)]
    pub redirect: Redirect,
    /// Outbound listener (Istio: 15001).
    ///
    /// With --redirect none this is an explicit proxy that serves whoever can connect to it, so
    /// it stays on loopback by default. Binding it wider (0.0.0.0, the node's or a bridge's
    /// address) opens a proxy to every Service of the mesh, with the mesh's policy and as if
    /// from this node, for anyone who can reach that address: other hosts, every pod, every
    /// process of the node. Do that only behind a firewall that admits just the intended clients.
    ///
    /// With --redirect ebpf it must be bound to an address the pods reach (with --proxy-ip
    /// naming it when it listens on all); it then serves only connections the eBPF programs
    /// redirected from enrolled pods of this node and closes any other, counted in
    /// sluice_outbound_refused_connections_total.
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    /// Admin API, localhost only (Istio: 15000).
    #[arg(long, default_value = sluice_admin_api::DEFAULT_ADDR)]
    pub admin_addr: SocketAddr,
    /// The admin API also on this Unix socket (mode 0600), for `sluice` on the node; `none`
    /// serves it on --admin-addr only.
    #[arg(long, env = "SLUICE_ADMIN_SOCKET", default_value = sluice_admin_api::DEFAULT_SOCKET)]
    pub admin_socket: PathBuf,
    /// Prometheus metrics (Istio: 15020).
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness (Istio: 15021, `/healthz/ready`).
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub ready_addr: SocketAddr,
    /// Once every listener is bound, write their addresses to this file (JSON: `outbound`,
    /// `admin`, `admin_socket`, `metrics`, `ready`), as Envoy's `--admin-address-path` does. A
    /// listener given port 0 gets a free port from the kernel; this file says which, so that
    /// a supervisor or a test never has to guess a free port and race others for it.
    #[arg(long)]
    pub address_file: Option<PathBuf>,
    /// Proxy worker threads; 1 runs everything on one thread (lowest overhead).
    #[arg(long, env = "SLUICE_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Finished requests kept for `sluice trace` (0: none; `sluice tap` is unaffected). Each one
    /// (about 490 bytes) stays in memory until as many newer ones have finished, which makes
    /// every request write memory gone cold: at saturation the default costs about 3% of the
    /// throughput (4-6% before each kept request fitted in its slot).
    #[arg(long, env = "SLUICE_RECENT_REQUESTS", default_value_t = sluice_telemetry::recent::DEFAULT_CAPACITY)]
    pub recent_requests: usize,
    /// Kubernetes cluster domain: every short host name is completed with it
    /// (`pricing` -> `pricing.NAMESPACE.svc.DOMAIN`).
    #[arg(long, env = "CLUSTER_DOMAIN", default_value = sluice_policy::DEFAULT_CLUSTER_DOMAIN)]
    pub cluster_domain: String,
    /// Namespace short host names resolve in for clients that are not known pods.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Log filter (`info`, `debug`, `sluice_upstream=debug,info`); `RUST_LOG` also works.
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    pub log: String,
    /// Do not print access-log lines to stdout (they stay available to `sluice logs`).
    #[arg(long)]
    pub no_access_log: bool,
    #[command(flatten)]
    pub trace: sluice_telemetry::trace::TraceArgs,
    /// Access-log entries as Envoy's default text line (`text`) or one JSON object per line with
    /// Istio's JSON access-log keys (`json`).
    #[arg(long, env = "SLUICE_ACCESS_LOG_FORMAT", default_value = "text")]
    pub access_log_format: sluice_proxy::LogFormat,
    /// How often the config directory is checked for changes.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// How long requests under way may take to finish on shutdown.
    #[arg(long, env = "SLUICE_DRAIN", default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Redirected connections on a Service port that declares no protocol: how long to wait for
    /// the client's first bytes before treating it as a server-first protocol (plain TCP). `0s`
    /// waits without limit, as current Istio does.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub protocol_detection_timeout: Duration,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
}

impl RunArgs {
    /// `--admin-socket`, unless `none`.
    pub fn admin_socket(&self) -> Option<PathBuf> {
        (self.admin_socket.as_os_str() != "none").then(|| self.admin_socket.clone())
    }
}

/// Limits on every client connection, with Envoy's meaning (README: "Limits").
#[derive(clap::Args, Debug)]
pub struct LimitArgs {
    /// Time from a request's first byte to the end of its headers (Envoy's
    /// `request_headers_timeout`); past it the client gets 408 and the connection closes. `0s`:
    /// no limit (Envoy's default and Istio's for sidecars); 60s is Istio's EDGE profile.
    #[arg(long, env = "SLUICE_REQUEST_HEADERS_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub request_headers_timeout: Duration,
    /// Time a client connection may stay without a request under way (Envoy's
    /// `common_http_protocol_options.idle_timeout`, 1 h); `0s`: no limit.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT", default_value = "60m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Request headers, in KiB (Envoy's `max_request_headers_kb`, 1 to 8192): over it, 431 on
    /// HTTP/1, a stream reset on HTTP/2.
    #[arg(long, env = "SLUICE_MAX_REQUEST_HEADERS_KB", default_value_t = 60)]
    pub max_request_headers_kb: u32,
    /// Request headers, by count (Envoy's `max_headers_count`): over it, as for the size.
    #[arg(long, env = "SLUICE_MAX_REQUEST_HEADERS_COUNT", default_value_t = 100)]
    pub max_request_headers_count: u32,
    /// Streams at once on one HTTP/2 client connection (Envoy's `max_concurrent_streams`).
    #[arg(
        long,
        env = "SLUICE_HTTP2_MAX_CONCURRENT_STREAMS",
        default_value_t = 2_147_483_647
    )]
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the proxy accepted them, at once, before its
    /// connection gets a GOAWAY (rapid-reset defence of the h2 crate).
    #[arg(
        long,
        env = "SLUICE_HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS",
        default_value_t = 20
    )]
    pub http2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams the proxy may have to reset for a client's protocol errors before its
    /// connection gets a GOAWAY (h2 crate).
    #[arg(
        long,
        env = "SLUICE_HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS",
        default_value_t = 1024
    )]
    pub http2_max_local_error_reset_streams: usize,
    /// Envoy's premature-reset rule: a client connection that reset half this many requests
    /// early (or half of its requests once it had this many) is closed
    /// (`overload.premature_reset_total_stream_count`).
    #[arg(
        long,
        env = "SLUICE_PREMATURE_RESET_TOTAL_STREAM_COUNT",
        default_value_t = 500
    )]
    pub premature_reset_total_stream_count: u64,
    /// What "early" means there: reset before a response, within this many whole seconds
    /// (`overload.premature_reset_min_stream_lifetime_seconds`).
    #[arg(long, env = "SLUICE_PREMATURE_RESET_MIN_STREAM_LIFETIME", default_value = "1s", value_parser = parse_duration)]
    pub premature_reset_min_stream_lifetime: Duration,
    /// Connections one client pod may have open to the proxy at once; a new one over it is
    /// closed unread (counted in sluice_overload_shed_total). 0: no limit.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS_PER_POD", default_value_t = 10_000)]
    pub max_connections_per_pod: u32,
    /// Requests one client pod may have in flight at once; one over it gets 503 with flag OM
    /// (details overload_pod_requests). 0: no limit.
    #[arg(long, env = "SLUICE_MAX_REQUESTS_PER_POD", default_value_t = 10_000)]
    pub max_requests_per_pod: u32,
    /// Upstream connections held for one client pod at once (its HTTP/1 requests under way
    /// upstream, its L4 connections); over it, 503 OM (overload_pod_upstream_connections) or the
    /// L4 connection closed. 0: no limit.
    #[arg(
        long,
        env = "SLUICE_MAX_UPSTREAM_CONNECTIONS_PER_POD",
        default_value_t = 5_000
    )]
    pub max_upstream_connections_per_pod: u32,
    /// Resident memory the proxy may use (bytes, or with Ki/Mi/Gi): past 90% new work from the
    /// pods holding the most is shed, past 95% all new work (503 OM, overload_memory). `auto`:
    /// the memory limit of the agent's cgroup, if it has one; `none`: not watched.
    #[arg(long, env = "SLUICE_MAX_MEMORY", default_value = "auto", value_parser = parse_memory)]
    pub max_memory: MaxMemory,
}

/// `--max-memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MaxMemory {
    Auto,
    None,
    Bytes(u64),
}

fn parse_memory(s: &str) -> Result<MaxMemory, String> {
    match s {
        "auto" => return Ok(MaxMemory::Auto),
        "none" => return Ok(MaxMemory::None),
        _ => {}
    }
    let (num, mult) = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)]
        .iter()
        .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    match num.parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(mult)
            .map(MaxMemory::Bytes)
            .ok_or_else(|| format!("{s:?} is too large")),
        _ => Err(format!(
            "{s:?}: expected auto, none, or a positive size in bytes, Ki, Mi or Gi"
        )),
    }
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

impl LimitArgs {
    /// The limits, checked (`0s` turns a timeout off).
    pub fn limits(&self) -> Result<sluice_proxy::DownstreamLimits> {
        let off_if_zero = |d: Duration| (!d.is_zero()).then_some(d);
        let limits = sluice_proxy::DownstreamLimits {
            request_headers_timeout: off_if_zero(self.request_headers_timeout),
            idle_timeout: off_if_zero(self.idle_timeout),
            max_request_headers_kb: self.max_request_headers_kb,
            max_request_headers_count: self.max_request_headers_count,
            http2_max_concurrent_streams: self.http2_max_concurrent_streams,
            http2_max_pending_accept_reset_streams: self.http2_max_pending_accept_reset_streams,
            http2_max_local_error_reset_streams: self.http2_max_local_error_reset_streams,
            premature_reset_total_stream_count: self.premature_reset_total_stream_count,
            premature_reset_min_stream_lifetime: self.premature_reset_min_stream_lifetime,
        };
        limits
            .validate()
            .map_err(|e| anyhow::anyhow!("--{}: {}", e.field.replace('_', "-"), e.reason))?;
        Ok(limits)
    }

    /// What each client pod may hold, and the proxy's own resource limits.
    pub fn isolation(&self) -> sluice_proxy::IsolationLimits {
        let max_open_files = open_files_limit();
        if let Some(n) = max_open_files.filter(|n| *n < 65_536) {
            tracing::warn!(
                limit = n,
                "RLIMIT_NOFILE is low for a proxy shared by every pod of the node; new work is \
                 shed past 80% of it (raise it, e.g. LimitNOFILE= or the container runtime's)"
            );
        }
        sluice_proxy::IsolationLimits {
            max_connections_per_pod: self.max_connections_per_pod,
            max_requests_per_pod: self.max_requests_per_pod,
            max_upstream_connections_per_pod: self.max_upstream_connections_per_pod,
            max_open_files,
            max_memory: match self.max_memory {
                MaxMemory::Auto => sluice_proxy::cgroup_memory_limit(),
                MaxMemory::None => None,
                MaxMemory::Bytes(n) => Some(n),
            },
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Redirect {
    None,
    Ebpf,
}

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{s:?}: a duration needs a unit (ms, s, m)"))?;
    let n: f64 = num.parse().map_err(|_| format!("{s:?}: not a number"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub fn run(args: RunArgs) -> Result<()> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&args.log))
        .with_context(|| format!("--log {:?} is not a valid filter", args.log))?;
    let (filter, filter_handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Plain text when captured (tests and log collectors grep it).
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    // Memory pressure first gives jemalloc's freed pages back, then sheds what is still over;
    // an idle agent gives them back as they decay.
    sluice_proxy::set_memory_release(crate::alloc::release_free_memory);
    if let Err(rc) = crate::alloc::purge_in_background() {
        tracing::warn!(
            error = rc,
            "jemalloc's background thread did not start: freed memory returns only on allocator activity or memory pressure"
        );
    }

    if args.redirect == Redirect::None {
        let stray = args.ebpf.ebpf_only_flags();
        if !stray.is_empty() {
            bail!("{}: only meaningful with --redirect ebpf", stray.join(", "));
        }
    }
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    if args.redirect == Redirect::Ebpf && args.outbound_addr.port() == 0 {
        bail!("--outbound-addr {}: with --redirect ebpf the programs are given the outbound port before the listener opens, so it cannot be 0 (a port the kernel chooses); pass the port", args.outbound_addr);
    }
    let config = AgentConfig::new(&args, &Env::from_process())?;
    // Spans go to their own export thread, started before the runtime and flushed after it.
    let tracer = sluice_telemetry::trace::Tracer::from_config(
        args.trace
            .config()
            .map_err(|e| anyhow::anyhow!("tracing configuration: {e}"))?,
    )
    .context("starting the OTLP span exporter")?;

    let rt = if args.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(args.workers)
            .enable_all()
            .build()?
    };
    let set_level: admin::SetLogLevel = Arc::new(move |level: &str| {
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("invalid log filter {level:?}: {e}"))?;
        filter_handle.reload(filter).map_err(|e| e.to_string())
    });
    let served = rt.block_on(serve(args, config, set_level, tracer.clone()));
    drop(rt);
    // Spans of the last requests go out before the agent exits.
    if !tracer.flush(Duration::from_secs(5)) {
        tracing::warn!("spans still unexported after 5 s; exiting without them");
    }
    served
}

async fn serve(
    args: RunArgs,
    mut config: AgentConfig,
    set_level: admin::SetLogLevel,
    tracer: sluice_telemetry::trace::Tracer,
) -> Result<()> {
    // A file left by an earlier run would name its ports: gone until this run's are known.
    if let Some(path) = &args.address_file {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| {
                    format!("--address-file {}: cannot replace it", path.display())
                })
            }
            _ => {}
        }
    }
    let handler = Arc::new(
        Handler::new(
            HandlerOptions {
                default_namespace: config.namespace.clone(),
                cluster_id: config.cluster_id.clone(),
                recent_requests: args.recent_requests,
            },
            AccessLog::with_format(config.access_log, args.access_log_format),
            Metrics::new(),
        )
        .with_redirect_options(RedirectOptions {
            protocol_detection_timeout: config.protocol_detection_timeout,
            ..RedirectOptions::default()
        })
        .with_tracer(tracer)
        .with_limits(config.limits.clone())
        .with_isolation(config.isolation.clone()),
    );
    // The configuration source first: standalone mode serves what is on disk from the start.
    let source = Source::start(&config, &handler).await?;
    // The redirect goes in before the listeners open, but redirects nothing until the lease task
    // (started once the outbound listener is bound) renews its lease.
    let ebpf = match args.redirect {
        Redirect::Ebpf => {
            let ebpf = EbpfRedirect::install(&args.ebpf, args.outbound_addr)?;
            if source.is_complete() {
                let snapshot = handler.state().snapshot.clone();
                let e = ebpf.clone();
                tokio::task::spawn_blocking(move || e.sync_enrollment(&snapshot)).await?;
            }
            Some(ebpf)
        }
        Redirect::None => None,
    };
    let (ready_tx, ready_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // A restarted agent starts while its predecessor drains: the predecessor holds its outbound
    // listener until its accept queue is quiet (at most `BACKLOG_MAX` after its lease ended), so
    // an address in use is waited for, for a bounded time. Redirection resumes (the lease task
    // starts) only once this agent listens.
    let bind = |addr: SocketAddr, what: &'static str| async move {
        let deadline = tokio::time::Instant::now() + BIND_WAIT;
        let mut waited = false;
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    if waited {
                        tracing::info!(%addr, "listening on {what} now that it was released");
                    }
                    return Ok(l);
                }
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && tokio::time::Instant::now() < deadline =>
                {
                    if !waited {
                        tracing::info!(%addr, "{what} address in use (a previous agent draining?); waiting up to {BIND_WAIT:?} for it");
                        waited = true;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e)).with_context(|| format!("cannot listen on {addr} ({what}); is another agent or Envoy running? pass --{what}-addr"))
                }
            }
        }
    };
    let outbound = bind(args.outbound_addr, "outbound").await?;
    if let Some(ebpf) = &ebpf {
        ebpf.register_listener(&outbound);
    }
    let admin_l = bind(args.admin_addr, "admin").await?;
    let metrics_l = bind(args.metrics_addr, "metrics").await?;
    let ready_l = bind(args.ready_addr, "ready").await?;
    // What was asked may say port 0: from here on the listeners are known by what they bound.
    let l = &mut config.listeners;
    (l.outbound, l.admin, l.metrics, l.ready) = (
        outbound.local_addr()?,
        admin_l.local_addr()?,
        metrics_l.local_addr()?,
        ready_l.local_addr()?,
    );

    let mut admin_socket = match args.admin_socket() {
        Some(path) => crate::admin_socket::AdminSocket::bind(&path)?,
        None => None,
    };
    let view = config.admin_view()?;
    if let Some(path) = &args.address_file {
        write_address_file(path, &view.listeners)?;
    }
    let admin_state = Arc::new(AdminState {
        handler: handler.clone(),
        set_log_level: set_level,
        agent: view,
        redirect: ebpf.clone().map(|e| {
            let status: admin::RedirectStatus = Arc::new(move || e.status());
            status
        }),
        kubernetes: source.kubernetes_status(),
    });
    // `admin_socket` lives to the end of this function: its drop removes the file.
    if let Some(l) = admin_socket.as_mut().and_then(|s| s.listener.take()) {
        tokio::spawn(admin::serve_admin_unix(
            l,
            admin_state.clone(),
            shutdown_rx.clone(),
        ));
    }
    tokio::spawn(admin::serve_admin(
        admin_l,
        admin_state,
        shutdown_rx.clone(),
    ));
    tokio::spawn(admin::serve_metrics(
        metrics_l,
        handler.clone(),
        shutdown_rx.clone(),
    ));
    tokio::spawn(admin::serve_ready(ready_l, ready_rx, shutdown_rx.clone()));
    let mut config_ready = source.spawn(
        handler.clone(),
        ebpf.clone(),
        config.reload_interval,
        shutdown_rx.clone(),
    );

    let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // A second descriptor of the listening socket, to watch its accept queue.
    let watch = match &ebpf {
        Some(_) => Some(crate::ebpf::AcceptWatch::new(&outbound, accepted.clone())?),
        None => None,
    };
    let mut proxy = tokio::spawn(sluice_proxy::server::serve(
        outbound,
        handler.clone(),
        ebpf.as_ref().map(|e| e.original_dst()),
        accepted,
        shutdown_rx.clone(),
        args.drain,
    ));
    // The lease lives as long as this runtime serves and its accept loop makes progress: renewed
    // only from here, after the bind.
    let (lease_stop_tx, lease_stop_rx) = watch::channel(false);
    let lease = ebpf
        .clone()
        .zip(watch)
        .map(|(e, w)| tokio::spawn(e.keep_lease(w, lease_stop_rx)));
    // Ready once serving and the configuration is complete (Kubernetes: every kind listed).
    tokio::spawn(async move {
        if config_ready.wait_for(|r| *r).await.is_ok() {
            let _ = ready_tx.send(true);
        }
        ready_tx.closed().await;
    });
    tracing::info!(outbound = %config.listeners.outbound, admin = %config.listeners.admin, "sluice is serving");

    let proxy_ended = tokio::select! {
        _ = wait_for_signal() => false,
        _ = &mut proxy => true,
    };
    if proxy_ended {
        tracing::error!("the outbound listener stopped unexpectedly; shutting down");
    }
    tracing::info!("shutting down");
    // Fail open first: enrolled pods' new connections go straight to their destinations while
    // the proxy drains what it has. The accept loop then takes what the programs queued before
    // the lease ended, closes the listener once it is quiet (freeing the address for the next
    // agent) and drains (`sluice_proxy::server::serve`).
    let _ = lease_stop_tx.send(true);
    if let Some(task) = lease {
        let _ = task.await;
    }
    if let Some(ebpf) = &ebpf {
        ebpf.stop();
    }
    let _ = shutdown_tx.send(true);
    if !proxy_ended {
        let _ = proxy.await;
    }
    // The access log's last entries, before the process ends.
    handler.access_log().flush();
    Ok(())
}

/// Writes `--address-file`: whole or not at all (a new file renamed over the path), so that a
/// reader polling for it never sees half of it.
fn write_address_file(
    path: &std::path::Path,
    listeners: &sluice_admin_api::Listeners,
) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let json = serde_json::to_vec_pretty(listeners)?;
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("--address-file {}: cannot write it", path.display()))
}

/// How long a starting agent waits for an address its predecessor still holds.
const BIND_WAIT: Duration = Duration::from_secs(10);

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5h").is_err());
    }

    /// The explicit proxy listens on loopback unless told otherwise, and `sluice run --help`
    /// says what listening wider means.
    #[test]
    fn the_outbound_listener_is_loopback_and_help_says_why() {
        use clap::{Args, Parser};
        #[derive(Parser)]
        struct Run {
            #[command(flatten)]
            args: super::RunArgs,
        }
        let run = Run::parse_from(["run", "--config-dir", "/nonexistent"]);
        assert!(run.args.outbound_addr.ip().is_loopback());
        assert_eq!(run.args.redirect, super::Redirect::None);
        let help = super::RunArgs::augment_args(clap::Command::new("run"))
            .render_long_help()
            .to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for said in [
            "[default: 127.0.0.1:15001]",
            "serves whoever can connect to it, so it stays on loopback by default",
            "opens a proxy to every Service of the mesh",
            "for anyone who can reach that address",
            "serves only connections the eBPF programs redirected from enrolled pods of this node",
        ] {
            assert!(
                help.contains(said),
                "`sluice run --help` lacks {said:?}:\n{help}"
            );
        }
    }
}
