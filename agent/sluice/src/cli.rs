//! Command-line surface. Tables for people, `-o json|yaml` for scripts.

use crate::{client, run};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "sluice",
    version,
    about = "Sidecarless node mesh agent: Istio resilience policies without sidecars"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent: the outbound proxy, admin API, metrics and readiness endpoints.
    Run(Box<run::RunArgs>),
    /// Check Istio and Kubernetes YAML files offline; non-zero exit on any error.
    Validate {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Exit non-zero on warnings too.
        #[arg(long)]
        strict: bool,
        /// Kubernetes cluster domain short host names are completed with.
        #[arg(long, default_value = sluice_policy::DEFAULT_CLUSTER_DOMAIN)]
        cluster_domain: String,
    },
    /// What the agent runs: config generation, rejected config, clusters, listeners.
    Status(Query),
    /// The effective configuration (the checked snapshot) as the proxy uses it.
    Config(Query),
    /// Clusters with endpoints, outlier state and connection-pool occupancy.
    Clusters(Query),
    /// The effective routes and traffic policy for one service.
    Policy {
        /// Service host (`pricing`, `pricing.default`, or the FQDN).
        service: String,
        #[command(flatten)]
        query: Query,
    },
    /// Follow the access log live.
    Logs {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Change the agent's log level (e.g. `debug`, `sluice_upstream=debug,info`).
    LogLevel {
        level: String,
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Detach the eBPF redirect programs and remove their pins (safe to repeat). Enrolled pods'
    /// new connections then go straight to their destinations.
    Uninstall {
        /// The pin directory `sluice run --redirect ebpf` used.
        #[arg(long, default_value = sluice_redirect::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct Query {
    /// The agent's admin address.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

pub fn dispatch(args: Args) -> Result<ExitCode> {
    match args.command {
        Command::Run(run_args) => run::run(*run_args).map(|()| ExitCode::SUCCESS),
        Command::Validate {
            paths,
            strict,
            cluster_domain,
        } => validate(&paths, strict, cluster_domain),
        Command::Status(q) => show(&q, "/status", client::print_status),
        Command::Config(q) => show(&q, "/config_dump", client::print_yaml),
        Command::Clusters(q) => show(&q, "/clusters", client::print_clusters),
        Command::Policy { service, query } => {
            let path = format!("/policy?service={}", client::encode_query(&service));
            show(&query, &path, client::print_policy)
        }
        Command::Logs { admin, count } => {
            client::follow_logs(admin, count).map(|()| ExitCode::SUCCESS)
        }
        Command::Uninstall { pin_dir } => uninstall(&pin_dir),
        Command::LogLevel { level, admin } => {
            let body = client::request(
                admin,
                "POST",
                &format!("/logging?level={}", client::encode_query(&level)),
            )?;
            println!("{}", body.trim());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn show(
    q: &Query,
    path: &str,
    table: impl Fn(&serde_json::Value) -> Result<()>,
) -> Result<ExitCode> {
    let body = client::request(q.admin, "GET", path)?;
    let value: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("admin API answered {path} with non-JSON"))?;
    match q.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&value)?),
        Output::Table => table(&value)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn uninstall(pin_dir: &std::path::Path) -> Result<ExitCode> {
    let report = sluice_redirect::uninstall(pin_dir).with_context(|| {
        format!(
            "uninstalling the eBPF redirect pinned under {}",
            pin_dir.display()
        )
    })?;
    if report.is_empty() {
        println!(
            "nothing to remove: no eBPF redirect pinned under {}",
            pin_dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    if !report.detached.is_empty() {
        println!("detached: {}", report.detached.join(", "));
    }
    println!(
        "removed {} pin(s) under {}:",
        report.removed.len(),
        pin_dir.display()
    );
    for p in &report.removed {
        println!("  {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(paths: &[PathBuf], strict: bool, cluster_domain: String) -> Result<ExitCode> {
    for p in paths {
        if !p.exists() {
            bail!("{}: no such file or directory", p.display());
        }
    }
    let opts = sluice_config::BuildOptions {
        cluster_domain,
        ..sluice_config::BuildOptions::default()
    };
    let problems = sluice_config::validate_paths(paths, &opts);
    let mut errors = 0;
    let mut warnings = 0;
    for p in &problems {
        match p.severity {
            sluice_config::Severity::Error => {
                errors += 1;
                println!("error: {p}");
            }
            sluice_config::Severity::Warning => {
                warnings += 1;
                println!("warning: {p}");
            }
        }
    }
    println!("{errors} error(s), {warnings} warning(s)");
    Ok(if errors > 0 || (strict && warnings > 0) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
