//! The agent's own configuration: one serialisable struct made from the flags and the environment
//! once, shown by `sluice status` (`agent`) and `sluice config` (`agent`), so an operator sees
//! exactly what runs: the mode (standalone or Kubernetes), the node, the listeners, the knobs.

use crate::run::{Redirect, RunArgs};
use anyhow::{bail, Result};
use serde::Serialize;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the configuration comes from; flattened into [`AgentConfig`], so `sluice status` reads
/// `agent.mode` and `agent.config_dir` (standalone) or `agent.node_name` (Kubernetes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// A directory of YAML files (`--config-dir`); none at all serves an empty configuration.
    Standalone { config_dir: Option<PathBuf> },
    /// The Kubernetes API server.
    Kubernetes {
        /// The kubeconfig used (`--kubeconfig` or `KUBECONFIG`); `None`: the pod's in-cluster
        /// service account.
        kubeconfig: Option<PathBuf>,
        /// This node (`--node-name` or `NODE_NAME`): only its Pods are watched.
        node_name: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listeners {
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// The admin API's Unix socket, if it serves one.
    pub admin_socket: Option<PathBuf>,
    pub metrics: SocketAddr,
    pub ready: SocketAddr,
}

/// The eBPF redirect's settings (`--redirect ebpf`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EbpfConfig {
    pub object: Option<PathBuf>,
    pub cgroup: Option<PathBuf>,
    pub pin_dir: PathBuf,
    pub proxy_ip: Vec<IpAddr>,
    pub exclude_ports: Vec<u16>,
    pub exclude_cidrs: Vec<String>,
    #[serde(with = "secs")]
    pub lease: Duration,
    pub debug_log: bool,
    pub sockmap: bool,
}

/// Everything `sluice run` was told, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentConfig {
    pub version: String,
    #[serde(flatten)]
    pub mode: Mode,
    pub cluster_domain: String,
    /// `--cluster-id`: Istio's `source_cluster` / `destination_cluster` metric labels.
    pub cluster_id: String,
    pub redirect: &'static str,
    pub listeners: Listeners,
    pub workers: usize,
    /// Namespace short names resolve in for clients that are not known pods.
    pub namespace: String,
    #[serde(with = "secs")]
    pub reload_interval: Duration,
    #[serde(with = "secs")]
    pub drain: Duration,
    #[serde(with = "secs")]
    pub protocol_detection_timeout: Duration,
    pub log: String,
    pub access_log: bool,
    /// What each client connection may do (`--request-headers-timeout`, `--idle-timeout`, ...).
    pub limits: sluice_proxy::DownstreamLimits,
    /// What each client pod may hold, and the proxy's file-descriptor and memory limits.
    pub isolation: sluice_proxy::IsolationLimits,
    pub ebpf: Option<EbpfConfig>,
}

/// The process environment the mode is chosen from (a parameter so tests need not set variables).
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub kubeconfig: Option<String>,
    pub kubernetes_service_host: Option<String>,
    pub node_name: Option<String>,
}

impl Env {
    pub fn from_process() -> Self {
        let var = |k| std::env::var(k).ok().filter(|v: &String| !v.is_empty());
        Self {
            kubeconfig: var("KUBECONFIG"),
            kubernetes_service_host: var("KUBERNETES_SERVICE_HOST"),
            node_name: var("NODE_NAME"),
        }
    }
}

impl AgentConfig {
    /// Resolves the mode: `--config-dir` is standalone; `--kubeconfig`, else `KUBECONFIG`, else
    /// the in-cluster environment (`KUBERNETES_SERVICE_HOST`) is Kubernetes mode. Giving both
    /// `--config-dir` and `--kubeconfig` is an error; the environment never overrides an explicit
    /// `--config-dir`.
    pub fn new(args: &RunArgs, env: &Env) -> Result<Self> {
        if !args.admin_addr.ip().is_loopback() {
            bail!("--admin-addr {}: the admin API changes the agent (log level) and shows every request of the node, so it listens only on loopback (127.0.0.1 or ::1); reach it from elsewhere through `kubectl port-forward` or the node, or use --admin-socket", args.admin_addr)
        }
        let mode = match (&args.config_dir, &args.kubeconfig) {
            (Some(_), Some(_)) => {
                bail!("--config-dir (standalone mode) and --kubeconfig (Kubernetes mode) exclude each other: pass one")
            }
            (Some(dir), None) => Mode::Standalone {
                config_dir: Some(dir.clone()),
            },
            (None, flag) => {
                // KUBECONFIG may list several files; the first is the one read.
                let from_env = env
                    .kubeconfig
                    .as_deref()
                    .and_then(|k| k.split(':').find(|p| !p.is_empty()))
                    .map(PathBuf::from);
                let kubeconfig = flag.clone().or(from_env);
                if kubeconfig.is_none() && env.kubernetes_service_host.is_none() {
                    Mode::Standalone { config_dir: None }
                } else {
                    let Some(node_name) = args.node_name.clone().or(env.node_name.clone()) else {
                        bail!("Kubernetes mode needs this node's name: pass --node-name or set NODE_NAME (in a DaemonSet, from the downward API: fieldRef spec.nodeName)")
                    };
                    Mode::Kubernetes {
                        kubeconfig,
                        node_name,
                    }
                }
            }
        };
        let ebpf = (args.redirect == Redirect::Ebpf).then(|| EbpfConfig {
            object: args.ebpf.ebpf_object.clone(),
            cgroup: args.ebpf.cgroup.clone(),
            pin_dir: args.ebpf.pin_dir.clone(),
            proxy_ip: args.ebpf.proxy_ip.clone(),
            exclude_ports: args.ebpf.exclude_ports.clone(),
            exclude_cidrs: args
                .ebpf
                .exclude_cidrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            lease: args.ebpf.lease,
            debug_log: args.ebpf.ebpf_debug_log,
            sockmap: !args.ebpf.no_sockmap,
        });
        Ok(Self {
            version: env!("CARGO_PKG_VERSION").to_string(),
            mode,
            cluster_domain: args.cluster_domain.clone(),
            cluster_id: args.cluster_id.clone(),
            redirect: match args.redirect {
                Redirect::None => "none",
                Redirect::Ebpf => "ebpf",
            },
            listeners: Listeners {
                outbound: args.outbound_addr,
                admin: args.admin_addr,
                admin_socket: args.admin_socket(),
                metrics: args.metrics_addr,
                ready: args.ready_addr,
            },
            workers: args.workers,
            namespace: args.namespace.clone(),
            reload_interval: args.reload_interval,
            drain: args.drain,
            protocol_detection_timeout: args.protocol_detection_timeout,
            log: args.log.clone(),
            access_log: !args.no_access_log,
            limits: args.limits.limits()?,
            isolation: args.limits.isolation(),
            ebpf,
        })
    }

    pub fn build_options(&self) -> sluice_config::BuildOptions {
        sluice_config::BuildOptions {
            cluster_domain: self.cluster_domain.clone(),
            ..sluice_config::BuildOptions::default()
        }
    }

    /// How the admin API shows this configuration (`agent` in `/status`): the fields clients
    /// read typed, every other setting by its name.
    pub fn admin_view(&self) -> Result<sluice_admin_api::Agent> {
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
        let (mode, config_dir, kubeconfig, node_name) = match &self.mode {
            Mode::Standalone { config_dir } => ("standalone", path(config_dir), None, None),
            Mode::Kubernetes {
                kubeconfig,
                node_name,
            } => (
                "kubernetes",
                None,
                path(kubeconfig),
                Some(node_name.clone()),
            ),
        };
        let l = &self.listeners;
        let mut settings = std::collections::BTreeMap::new();
        let mut set = |k: &str, v: serde_json::Result<serde_json::Value>| -> Result<()> {
            settings.insert(k.to_owned(), v?);
            Ok(())
        };
        let secs = |d: Duration| Ok(serde_json::json!(d.as_secs_f64()));
        set("workers", Ok(self.workers.into()))?;
        set("namespace", Ok(self.namespace.clone().into()))?;
        set("reload_interval", secs(self.reload_interval))?;
        set("drain", secs(self.drain))?;
        set(
            "protocol_detection_timeout",
            secs(self.protocol_detection_timeout),
        )?;
        set("log", Ok(self.log.clone().into()))?;
        set("access_log", Ok(self.access_log.into()))?;
        set("limits", serde_json::to_value(&self.limits))?;
        set("ebpf", serde_json::to_value(&self.ebpf))?;
        Ok(sluice_admin_api::Agent {
            version: self.version.clone(),
            mode: mode.to_owned(),
            config_dir,
            kubeconfig,
            node_name,
            cluster_domain: self.cluster_domain.clone(),
            cluster_id: self.cluster_id.clone(),
            redirect: self.redirect.to_owned(),
            listeners: sluice_admin_api::Listeners {
                outbound: l.outbound.to_string(),
                admin: l.admin.to_string(),
                admin_socket: path(&l.admin_socket),
                metrics: l.metrics.to_string(),
                ready: l.ready.to_string(),
            },
            settings,
        })
    }

    pub fn kubeconfig(&self) -> Option<&Path> {
        match &self.mode {
            Mode::Kubernetes { kubeconfig, .. } => kubeconfig.as_deref(),
            Mode::Standalone { .. } => None,
        }
    }
}

/// Durations as seconds (`0.25`), as people read them in `sluice config`.
mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> RunArgs {
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            run: RunArgs,
        }
        let mut all = vec!["sluice"];
        all.extend_from_slice(args);
        P::try_parse_from(all).expect("valid flags").run
    }

    #[test]
    fn the_mode_comes_from_flags_then_the_environment() {
        let none = Env::default();
        let cfg = AgentConfig::new(&parse(&["--config-dir", "/etc/sluice"]), &none).unwrap();
        assert_eq!(
            cfg.mode,
            Mode::Standalone {
                config_dir: Some("/etc/sluice".into())
            }
        );

        let cfg =
            AgentConfig::new(&parse(&["--kubeconfig", "/k", "--node-name", "n1"]), &none).unwrap();
        assert_eq!(
            cfg.mode,
            Mode::Kubernetes {
                kubeconfig: Some("/k".into()),
                node_name: "n1".into(),
            }
        );

        let in_cluster = Env {
            kubernetes_service_host: Some("10.96.0.1".into()),
            node_name: Some("n2".into()),
            ..Env::default()
        };
        let cfg = AgentConfig::new(&parse(&[]), &in_cluster).unwrap();
        assert!(
            matches!(cfg.mode, Mode::Kubernetes { kubeconfig: None, ref node_name, .. } if node_name == "n2")
        );
        // An explicit directory wins over the environment.
        let cfg = AgentConfig::new(&parse(&["--config-dir", "/d"]), &in_cluster).unwrap();
        assert!(matches!(cfg.mode, Mode::Standalone { .. }));

        let env_kubeconfig = Env {
            kubeconfig: Some("/a:/b".into()),
            ..Env::default()
        };
        let err = AgentConfig::new(&parse(&[]), &env_kubeconfig).unwrap_err();
        assert!(err.to_string().contains("--node-name"), "{err}");
        let cfg = AgentConfig::new(&parse(&["--node-name", "n"]), &env_kubeconfig).unwrap();
        assert_eq!(cfg.kubeconfig(), Some(Path::new("/a")));

        let err = AgentConfig::new(&parse(&["--config-dir", "/d", "--kubeconfig", "/k"]), &none)
            .unwrap_err();
        assert!(err.to_string().contains("exclude each other"), "{err}");
    }

    #[test]
    fn limits_come_from_flags() {
        let none = Env::default();
        let cfg = AgentConfig::new(&parse(&[]), &none).unwrap();
        assert_eq!(cfg.limits, sluice_proxy::DownstreamLimits::default());
        let cfg = AgentConfig::new(
            &parse(&[
                "--request-headers-timeout",
                "0s",
                "--idle-timeout",
                "90s",
                "--max-request-headers-kb",
                "96",
                "--max-request-headers-count",
                "200",
                "--http2-max-concurrent-streams",
                "100",
            ]),
            &none,
        )
        .unwrap();
        assert_eq!(cfg.limits.request_headers_timeout, None);
        assert_eq!(cfg.limits.idle_timeout, Some(Duration::from_secs(90)));
        assert_eq!(cfg.limits.max_request_headers_kb, 96);
        assert_eq!(cfg.limits.max_request_headers_count, 200);
        assert_eq!(cfg.limits.http2_max_concurrent_streams, 100);
        let err =
            AgentConfig::new(&parse(&["--max-request-headers-kb", "9000"]), &none).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--max-request-headers-kb: must be 1 to 8192 (Envoy's range)"
        );
    }

    #[test]
    fn every_field_is_shown() {
        let cfg = AgentConfig::new(
            &parse(&[
                "--kubeconfig",
                "/k",
                "--node-name",
                "n1",
                "--cluster-id",
                "east",
                "--cluster-domain",
                "corp.example",
            ]),
            &Env::default(),
        )
        .unwrap();
        let v = serde_json::to_value(&cfg).unwrap();
        assert_eq!(v["mode"], "kubernetes");
        assert_eq!(v["node_name"], "n1");
        assert_eq!(v["cluster_id"], "east");
        assert_eq!(v["kubeconfig"], "/k");
        assert_eq!(v["cluster_domain"], "corp.example");
        assert_eq!(v["listeners"]["ready"], "127.0.0.1:15021");
        assert_eq!(v["reload_interval"], 0.25);
        assert_eq!(v["limits"]["request_headers_timeout"], 60.0);
        assert_eq!(v["limits"]["max_request_headers_kb"], 60);
        assert_eq!(cfg.build_options().cluster_domain, "corp.example");
    }
}
