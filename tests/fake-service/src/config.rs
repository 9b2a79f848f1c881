//! The service's configuration, read from the same environment variables as the image.

use std::net::SocketAddr;
use std::time::Duration;

use http::Uri;

use crate::duration;
use crate::inject::ErrorMode;

/// What kind of error [`crate::inject::Injector`] injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// Answer `ERROR_CODE` at once.
    HttpError,
    /// Wait `ERROR_DELAY`, then answer `ERROR_CODE` (the image does not answer 200).
    Delay,
}

/// Everything the service does, fixed at start.
#[derive(Debug, Clone)]
pub struct Config {
    /// `NAME`, default "Service".
    pub name: String,
    /// `MESSAGE`, default "Hello World"; a value starting with `{` is sent as raw JSON.
    pub message: String,
    /// `LISTEN_ADDR`, default 0.0.0.0:9090.
    pub listen_addr: SocketAddr,
    /// `UPSTREAM_URIS`, called in order, one after the other, for every request.
    /// Kept as written: they key `upstream_calls`.
    pub upstream_uris: Vec<String>,
    /// `ERROR_RATE`, default 0.
    pub error_rate: f64,
    /// `ERROR_TYPE`: `http_error` (default) or `delay`.
    pub error_type: ErrorType,
    /// `ERROR_CODE`, default 500.
    pub error_code: http::StatusCode,
    /// `ERROR_DELAY`, a Go duration, default 0.
    pub error_delay: Duration,
    /// `ERROR_MODE` (`deterministic` default, or `random`) with `ERROR_SEED`; not in the image.
    pub error_mode: ErrorMode,
    /// `HTTP_CLIENT_REQUEST_TIMEOUT` (or `UPSTREAM_REQUEST_TIMEOUT`), default 30s.
    pub upstream_timeout: Duration,
    /// `HTTP_PROXY` / `http_proxy`: upstream calls go through this proxy in absolute form.
    pub http_proxy: Option<Uri>,
    /// `NO_PROXY` / `no_proxy`: hosts (or `.suffix`es, or `*`) reached directly.
    pub no_proxy: Vec<String>,
    /// `HTTP_CLIENT_KEEP_ALIVES`: reuse upstream connections. The image defaults to false;
    /// we default to true.
    pub client_keep_alive: bool,
    /// `HTTP_SERVER_KEEP_ALIVES`: keep inbound connections open. The image defaults to
    /// false; we default to true.
    pub server_keep_alive: bool,
    /// `HTTP_CLIENT_APPEND_REQUEST`, default true: upstream calls get the inbound path
    /// appended and the inbound headers copied.
    pub append_request: bool,
}

/// A variable the service cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub value: String,
    pub reason: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "Service".to_owned(),
            message: "Hello World".to_owned(),
            listen_addr: SocketAddr::from(([0, 0, 0, 0], 9090)),
            upstream_uris: Vec::new(),
            error_rate: 0.0,
            error_type: ErrorType::HttpError,
            error_code: http::StatusCode::INTERNAL_SERVER_ERROR,
            error_delay: Duration::ZERO,
            error_mode: ErrorMode::Deterministic,
            upstream_timeout: Duration::from_secs(30),
            http_proxy: None,
            no_proxy: Vec::new(),
            client_keep_alive: true,
            server_keep_alive: true,
            append_request: true,
        }
    }
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Reads variables through `get`, so tests need not touch the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // An empty variable counts as unset, as with the image's env library.
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let bad = |var: &'static str, value: &str, reason: &dyn std::fmt::Display| ConfigError {
            var,
            value: value.to_owned(),
            reason: reason.to_string(),
        };
        let mut cfg = Config::default();
        if let Some(v) = get("NAME") {
            cfg.name = v;
        }
        if let Some(v) = get("MESSAGE") {
            cfg.message = v;
        }
        if let Some(v) = get("LISTEN_ADDR") {
            cfg.listen_addr = v.trim().parse().map_err(|e| bad("LISTEN_ADDR", &v, &e))?;
        }
        if let Some(v) = get("UPSTREAM_URIS") {
            cfg.upstream_uris = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| match parse_http_uri(s) {
                    Ok(_) => Ok(s.to_owned()),
                    Err(e) => Err(bad("UPSTREAM_URIS", s, &e)),
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = get("ERROR_RATE") {
            cfg.error_rate = v.trim().parse().map_err(|e| bad("ERROR_RATE", &v, &e))?;
        }
        if let Some(v) = get("ERROR_TYPE") {
            cfg.error_type = match v.trim() {
                "http_error" => ErrorType::HttpError,
                "delay" => ErrorType::Delay,
                _ => return Err(bad("ERROR_TYPE", &v, &"expected http_error or delay")),
            };
        }
        if let Some(v) = get("ERROR_CODE") {
            cfg.error_code = v
                .trim()
                .parse::<u16>()
                .ok()
                .and_then(|c| http::StatusCode::from_u16(c).ok())
                .ok_or_else(|| bad("ERROR_CODE", &v, &"expected an HTTP status code (100-999)"))?;
        }
        if let Some(v) = get("ERROR_DELAY") {
            cfg.error_delay = duration::parse(v.trim()).map_err(|e| bad("ERROR_DELAY", &v, &e))?;
        }
        if let Some(v) = get("ERROR_MODE") {
            cfg.error_mode = match v.trim() {
                "deterministic" => ErrorMode::Deterministic,
                "random" => {
                    let seed = match get("ERROR_SEED") {
                        Some(s) => s.trim().parse().map_err(|e| bad("ERROR_SEED", &s, &e))?,
                        None => 0,
                    };
                    ErrorMode::Random { seed }
                }
                _ => return Err(bad("ERROR_MODE", &v, &"expected deterministic or random")),
            };
        }
        for var in ["HTTP_CLIENT_REQUEST_TIMEOUT", "UPSTREAM_REQUEST_TIMEOUT"] {
            if let Some(v) = get(var) {
                cfg.upstream_timeout = duration::parse(v.trim()).map_err(|e| bad(var, &v, &e))?;
            }
        }
        for var in ["HTTP_PROXY", "http_proxy"] {
            if let Some(v) = get(var) {
                // curl and Go accept a bare host:port here.
                let with_scheme = if v.contains("://") {
                    v.clone()
                } else {
                    format!("http://{v}")
                };
                cfg.http_proxy =
                    Some(parse_http_uri(with_scheme.trim()).map_err(|e| bad(var, &v, &e))?);
                break;
            }
        }
        for var in ["NO_PROXY", "no_proxy"] {
            if let Some(v) = get(var) {
                cfg.no_proxy = v
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect();
                break;
            }
        }
        for (var, field) in [
            ("HTTP_CLIENT_KEEP_ALIVES", &mut cfg.client_keep_alive),
            ("HTTP_SERVER_KEEP_ALIVES", &mut cfg.server_keep_alive),
            ("HTTP_CLIENT_APPEND_REQUEST", &mut cfg.append_request),
        ] {
            if let Some(v) = get(var) {
                *field = parse_bool(&v).ok_or_else(|| bad(var, &v, &"expected true or false"))?;
            }
        }
        Ok(cfg)
    }

    /// Whether a call to `host` goes through [`Config::http_proxy`].
    pub fn proxied(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.http_proxy.is_some()
            && !self.no_proxy.iter().any(|p| {
                p == "*" || *p == host || host.ends_with(&format!(".{}", p.trim_start_matches('.')))
            })
    }
}

fn parse_http_uri(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(
            "expected an http:// URL with a host (https and gRPC are not supported)".to_owned(),
        );
    }
    Ok(uri)
}

fn parse_bool(s: &str) -> Option<bool> {
    // The values Go's strconv.ParseBool accepts.
    match s.trim() {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_image() {
        let cfg = from(&[]).unwrap();
        assert_eq!(cfg.name, "Service");
        assert_eq!(cfg.listen_addr.to_string(), "0.0.0.0:9090");
        assert_eq!(cfg.error_code, 500);
        assert_eq!(cfg.error_type, ErrorType::HttpError);
        assert_eq!(cfg.upstream_timeout, Duration::from_secs(30));
        assert!(cfg.upstream_uris.is_empty());
    }

    #[test]
    fn reads_the_tutorial_settings() {
        let cfg = from(&[
            ("NAME", "pricing"),
            ("ERROR_RATE", "0.4"),
            ("ERROR_TYPE", "delay"),
            ("ERROR_DELAY", "3s"),
            ("UPSTREAM_URIS", "http://pricing, http://inventory,"),
            ("http_proxy", "127.0.0.1:15001"),
            ("NO_PROXY", "localhost,.svc"),
            ("ERROR_MODE", "random"),
            ("ERROR_SEED", "42"),
        ])
        .unwrap();
        assert_eq!(cfg.name, "pricing");
        assert_eq!(cfg.error_rate, 0.4);
        assert_eq!(cfg.error_type, ErrorType::Delay);
        assert_eq!(cfg.error_delay, Duration::from_secs(3));
        assert_eq!(cfg.upstream_uris.len(), 2);
        assert_eq!(cfg.upstream_uris, ["http://pricing", "http://inventory"]);
        assert_eq!(cfg.http_proxy.as_ref().unwrap().port_u16(), Some(15001));
        assert_eq!(cfg.error_mode, ErrorMode::Random { seed: 42 });
        assert!(cfg.proxied("pricing"));
        assert!(!cfg.proxied("localhost"));
        assert!(!cfg.proxied("pricing.default.svc"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let err = from(&[("ERROR_DELAY", "3")]).unwrap_err();
        assert_eq!(err.var, "ERROR_DELAY");
        assert!(from(&[("ERROR_TYPE", "boom")]).is_err());
        assert!(from(&[("UPSTREAM_URIS", "grpc://x:1")]).is_err());
        assert!(from(&[("ERROR_CODE", "42")]).is_err());
    }
}
