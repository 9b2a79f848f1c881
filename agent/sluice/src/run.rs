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
    #[arg(long, default_value = "127.0.0.1:15001")]
    pub outbound_addr: SocketAddr,
    /// Admin API, localhost only (Istio: 15000).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (Istio: 15020).
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness (Istio: 15021, `/healthz/ready`).
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub ready_addr: SocketAddr,
    /// Proxy worker threads; 1 runs everything on one thread (lowest overhead).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
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
    /// How often the config directory is checked for changes.
    #[arg(long, default_value = "250ms", value_parser = parse_duration)]
    pub reload_interval: Duration,
    /// How long requests under way may take to finish on shutdown.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Redirected connections on a Service port that declares no protocol: how long to wait for
    /// the client's first bytes before treating it as a server-first protocol (plain TCP). `0s`
    /// waits without limit, as current Istio does.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub protocol_detection_timeout: Duration,
    #[command(flatten)]
    pub ebpf: EbpfArgs,
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

    if args.redirect == Redirect::None {
        let stray = args.ebpf.ebpf_only_flags();
        if !stray.is_empty() {
            bail!("{}: only meaningful with --redirect ebpf", stray.join(", "));
        }
    }
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let config = AgentConfig::new(&args, &Env::from_process())?;

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
    rt.block_on(serve(args, config, set_level))
}

async fn serve(args: RunArgs, config: AgentConfig, set_level: admin::SetLogLevel) -> Result<()> {
    let handler = Arc::new(
        Handler::new(
            HandlerOptions {
                default_namespace: config.namespace.clone(),
            },
            AccessLog::new(config.access_log),
            Metrics::new(),
        )
        .with_redirect_options(RedirectOptions {
            protocol_detection_timeout: config.protocol_detection_timeout,
            ..RedirectOptions::default()
        }),
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

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({what}); is another agent or Envoy running? pass --{what}-addr"))
    };
    let outbound = bind(args.outbound_addr, "outbound").await?;
    let admin_l = bind(args.admin_addr, "admin").await?;
    let metrics_l = bind(args.metrics_addr, "metrics").await?;
    let ready_l = bind(args.ready_addr, "ready").await?;

    let admin_state = Arc::new(AdminState {
        handler: handler.clone(),
        set_log_level: set_level,
        agent: serde_json::to_value(&config)?,
        redirect: ebpf.clone().map(|e| {
            let status: admin::RedirectStatus = Arc::new(move || e.status());
            status
        }),
        kubernetes: source.kubernetes_status(),
    });
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
    tracing::info!(outbound = %args.outbound_addr, admin = %args.admin_addr, "sluice is serving");

    let proxy_ended = tokio::select! {
        _ = wait_for_signal() => false,
        _ = &mut proxy => true,
    };
    if proxy_ended {
        tracing::error!("the outbound listener stopped unexpectedly; shutting down");
    }
    tracing::info!("shutting down");
    // Fail open first: enrolled pods' new connections go straight to their destinations while
    // the proxy drains what it has.
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
    Ok(())
}

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
}
