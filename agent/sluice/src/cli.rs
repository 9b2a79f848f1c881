//! Command-line surface. Tables for people, `-o json|yaml` for scripts.

use crate::client::{self, Target};
use crate::{run, show};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_admin_api::{self as api, paths};
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
    /// Clusters with endpoints, outlier state, connection-pool occupancy and recent ejections.
    Clusters(Query),
    /// Every endpoint with its health and outlier check (5xx run, ejected for, ejections),
    /// active requests and connections.
    Endpoints {
        /// Only this service's (`pricing`, `pricing.default`, or the FQDN).
        service: Option<String>,
        #[command(flatten)]
        query: Query,
    },
    /// The pods the agent knows: enrolled or not and why, IP, cgroup, labels.
    Workloads(Query),
    /// The Services of the registry with their cluster IPs and ports.
    Services(Query),
    /// The eBPF redirect: programs, pins, lease, counters, exclusions, enrolled pods.
    Redirects(Query),
    /// Open connections that carry HTTP: clients' to the proxy and the proxy's pooled ones to
    /// endpoints, with pod, peer, age and bytes.
    Connections(Query),
    /// The effective routes and traffic policy for one service.
    Policy {
        /// Service host (`pricing`, `pricing.default`, or the FQDN).
        service: String,
        #[command(flatten)]
        query: Query,
    },
    /// Traffic through this node per source workload and destination service: requests/s,
    /// success, latency, retries and response flags; refreshed every second.
    Top {
        /// Print one frame and exit.
        #[arg(long)]
        once: bool,
        /// Column to sort by.
        #[arg(long, value_enum, default_value_t = show::TopSort::Rps)]
        sort: show::TopSort,
        /// Seconds of traffic each frame covers (at most 60: the agent counts the last minute).
        #[arg(long, default_value_t = 10.0)]
        window: f64,
        #[command(flatten)]
        query: Query,
    },
    /// Requests as they finish, filtered.
    Tap {
        #[command(flatten)]
        filter: TapFilter,
        /// Stop after this many requests.
        #[arg(long)]
        count: Option<usize>,
        /// The admin API's address (default: the socket if present, else 127.0.0.1:15000).
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// `json`: one JSON object a line.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// One recent request's timeline by its x-request-id: cluster, each attempt with endpoint,
    /// time and outcome, why the next step happened, the final code and flags.
    Trace {
        request_id: String,
        #[command(flatten)]
        query: Query,
    },
    /// Follow the access log live.
    Logs {
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// Stop after this many lines.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Change the agent's log level (e.g. `debug`, `sluice_upstream=debug,info`).
    LogLevel {
        level: String,
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Print a shell completion script (`sluice completions bash > /etc/bash_completion.d/sluice`).
    Completions { shell: clap_complete::Shell },
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
    /// The agent's admin address (default: the admin socket if present, else 127.0.0.1:15000).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// The agent's admin socket (default /var/run/sluice/admin.sock).
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl Query {
    fn target(&self) -> Target {
        Target::choose(self.admin, self.admin_socket.clone())
    }
}

/// `sluice tap`'s filters; every one given must match.
#[derive(clap::Args, Debug, Default)]
pub struct TapFilter {
    /// Only requests from this pod (`namespace/name`, `name`) or workload.
    #[arg(long)]
    pub from: Option<String>,
    /// Only requests to this service (`pricing`, `pricing.default` or the FQDN).
    #[arg(long)]
    pub to: Option<String>,
    /// Only these statuses: `503`, `5xx`, `4xx`, `0` (no response).
    #[arg(long)]
    pub status: Option<String>,
    /// Only requests with any of these response flags (`UO,URX`).
    #[arg(long, value_delimiter = ',')]
    pub flags: Vec<String>,
    /// Only requests that took at least this long (`1s`, `250ms`).
    #[arg(long, value_parser = parse_duration)]
    pub min_duration: Option<std::time::Duration>,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a duration (1s, 250ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

impl TapFilter {
    pub fn matches(&self, r: &sluice_admin_api::Request) -> bool {
        let pod_matches = |want: &str| {
            let name_of = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
            [&r.source, &r.source_workload]
                .iter()
                .any(|s| s.as_str() == want || name_of(s) == want)
        };
        let service_matches = |want: &str| {
            r.service == want
                || r.service.starts_with(&format!("{want}."))
                || r.authority
                    .as_deref()
                    .is_some_and(|a| a == want || a.split(':').next() == Some(want))
        };
        let status_matches = |want: &str| match want.strip_suffix("xx") {
            Some(class) => class.parse::<u16>().is_ok_and(|c| r.status / 100 == c),
            None => want.parse::<u16>().is_ok_and(|c| r.status == c),
        };
        self.from.as_deref().is_none_or(pod_matches)
            && self.to.as_deref().is_none_or(service_matches)
            && self.status.as_deref().is_none_or(status_matches)
            && (self.flags.is_empty()
                || r.flags
                    .split(',')
                    .any(|f| self.flags.iter().any(|w| w == f)))
            && self
                .min_duration
                .is_none_or(|d| r.duration_ms >= d.as_secs_f64() * 1000.0)
    }
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
        Command::Status(q) => show_typed(&q, paths::STATUS, |v: &api::Status| show::status(v)),
        Command::Config(q) => show_typed(&q, paths::CONFIG_DUMP, |v: &serde_json::Value| {
            serde_yaml::to_string(v).unwrap_or_default()
        }),
        Command::Clusters(q) => show_typed(&q, paths::CLUSTERS, |v: &Vec<api::Cluster>| {
            show::clusters(v)
        }),
        Command::Endpoints { service, query } => {
            let path = match &service {
                Some(s) => format!("{}?service={}", paths::ENDPOINTS, client::encode_query(s)),
                None => paths::ENDPOINTS.to_owned(),
            };
            show_typed(&query, &path, |v: &Vec<api::Endpoint>| show::endpoints(v))
        }
        Command::Workloads(q) => show_typed(&q, paths::WORKLOADS, |v: &Vec<api::Workload>| {
            show::workloads(v)
        }),
        Command::Services(q) => show_typed(&q, paths::SERVICES, |v: &Vec<api::Service>| {
            show::services(v)
        }),
        Command::Redirects(q) => show_typed(&q, paths::REDIRECTS, |v: &api::RedirectStatus| {
            show::redirects(v)
        }),
        Command::Connections(q) => {
            show_typed(&q, paths::CONNECTIONS, |v: &Vec<api::Connection>| {
                show::connections(v)
            })
        }
        Command::Policy { service, query } => {
            let path = format!(
                "{}?service={}",
                paths::POLICY,
                client::encode_query(&service)
            );
            show_typed(&query, &path, |v: &api::Policy| {
                serde_yaml::to_string(v).unwrap_or_default()
            })
        }
        Command::Top {
            once,
            sort,
            window,
            query,
        } => top(&query, once, sort, window),
        Command::Tap {
            filter,
            count,
            admin,
            admin_socket,
            output,
        } => tap(&Target::choose(admin, admin_socket), &filter, count, output),
        Command::Trace { request_id, query } => {
            let path = format!("{}{}", paths::REQUEST, client::encode_query(&request_id));
            let target = query.target();
            let r: api::Request = client::get(&target, &path)?;
            print_as(query.output, &r, || show::trace(&r))
        }
        Command::Logs {
            admin,
            admin_socket,
            count,
        } => {
            let mut seen = 0;
            client::stream(
                &Target::choose(admin, admin_socket),
                paths::ACCESS_LOG,
                |line| {
                    out(&format!("{line}\n"))?;
                    seen += 1;
                    Ok(count.is_none_or(|c| seen < c))
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Uninstall { pin_dir } => uninstall(&pin_dir),
        Command::LogLevel {
            level,
            admin,
            admin_socket,
        } => {
            let body = client::request(
                &Target::choose(admin, admin_socket),
                "POST",
                &format!("{}?level={}", paths::LOGGING, client::encode_query(&level)),
            )?;
            println!("{}", body.trim());
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut cmd = <Args as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "sluice", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Writes to stdout and flushes (a live stream is read as it comes); a reader that went away
/// (`sluice tap | head`) surfaces as [`std::io::ErrorKind::BrokenPipe`], which `main` ends quietly on.
fn out(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

fn print_as<T: serde::Serialize>(
    output: Output,
    v: &T,
    table: impl FnOnce() -> String,
) -> Result<ExitCode> {
    match output {
        Output::Json => out(&(serde_json::to_string_pretty(v)? + "\n"))?,
        Output::Yaml => out(&serde_yaml::to_string(v)?)?,
        Output::Table => out(&table())?,
    }
    Ok(ExitCode::SUCCESS)
}

fn show_typed<T: serde::de::DeserializeOwned + serde::Serialize>(
    q: &Query,
    path: &str,
    table: impl FnOnce(&T) -> String,
) -> Result<ExitCode> {
    let v: T = client::get(&q.target(), path)?;
    print_as(q.output, &v, || table(&v))
}

fn top(q: &Query, once: bool, sort: show::TopSort, window: f64) -> Result<ExitCode> {
    let target = q.target();
    let path = format!("{}?window={window}", paths::TOP);
    loop {
        let v: api::Top = client::get(&target, &path)?;
        if once || q.output != Output::Table {
            return print_as(q.output, &v, || show::top(&v, sort));
        }
        // Clear the screen and home the cursor, as top(1) does.
        out(&format!("\x1b[2J\x1b[H{}", show::top(&v, sort)))?;
        // The CLI has no runtime: a plain thread waiting between frames blocks nothing.
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn tap(
    target: &Target,
    filter: &TapFilter,
    count: Option<usize>,
    output: Output,
) -> Result<ExitCode> {
    let mut seen = 0;
    client::stream(target, paths::TAP, |line| {
        let r: api::Request = serde_json::from_str(line)
            .context("the agent's tap stream is not what this `sluice` expects")?;
        if !filter.matches(&r) {
            return Ok(true);
        }
        match output {
            Output::Json => out(&(serde_json::to_string(&r)? + "\n"))?,
            Output::Yaml => out(&format!("---\n{}", serde_yaml::to_string(&r)?))?,
            Output::Table => out(&(show::tap_line(&r) + "\n"))?,
        }
        seen += 1;
        Ok(count.is_none_or(|c| seen < c))
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn request(status: u16, flags: &str, ms: f64) -> api::Request {
        api::Request {
            source: "default/web-7d4b9c".into(),
            source_workload: "default/web".into(),
            service: "pricing.default.svc.cluster.local".into(),
            authority: Some("pricing:80".into()),
            status,
            flags: flags.into(),
            duration_ms: ms,
            ..api::Request::default()
        }
    }

    #[test]
    fn tap_filters_match_as_documented() {
        let r = request(503, "UF,URX", 1500.0);
        let all = TapFilter::default();
        assert!(all.matches(&r));
        let f = |from: Option<&str>, to: Option<&str>, status: Option<&str>| TapFilter {
            from: from.map(Into::into),
            to: to.map(Into::into),
            status: status.map(Into::into),
            ..TapFilter::default()
        };
        for yes in [
            f(Some("web-7d4b9c"), None, None),
            f(Some("default/web"), None, None),
            f(None, Some("pricing"), None),
            f(None, Some("pricing.default"), None),
            f(None, None, Some("5xx")),
            f(None, None, Some("503")),
        ] {
            assert!(yes.matches(&r), "{yes:?}");
        }
        for no in [
            f(Some("batch"), None, None),
            f(None, Some("inventory"), None),
            f(None, None, Some("4xx")),
            f(None, None, Some("500")),
        ] {
            assert!(!no.matches(&r), "{no:?}");
        }
        let flags = |list: &[&str]| TapFilter {
            flags: list.iter().map(|s| (*s).to_owned()).collect(),
            ..TapFilter::default()
        };
        assert!(flags(&["UO", "URX"]).matches(&r));
        assert!(!flags(&["UO"]).matches(&r));
        let slow = |d| TapFilter {
            min_duration: Some(d),
            ..TapFilter::default()
        };
        assert!(slow(std::time::Duration::from_secs(1)).matches(&r));
        assert!(!slow(std::time::Duration::from_secs(2)).matches(&r));
    }

    #[test]
    fn durations_parse() {
        use std::time::Duration;
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
