//! What tracing does: propagation on or off, the sampler, and where spans are exported. Read from
//! the standard OpenTelemetry environment variables ([`TraceConfig::from_env`]) and the flags of
//! `sluice run` ([`TraceArgs`], which win over the environment).
//!
//! Sampling, by default as an Istio sidecar samples: a decision the client sent (B3's, else the
//! `traceparent` flag) is kept both ways; `x-client-trace-id` forces a trace (Istio configures
//! Envoy's `client_sampling` at 100%), and so does an `x-request-id` in which an Envoy upstream
//! packed its trace reason; otherwise Istio's random percentage, 1% unless changed (Istio's
//! `PILOT_TRACE_SAMPLING`, the fallback when neither the Telemetry API's
//! `randomSamplingPercentage` nor `meshConfig.defaultConfig.tracing.sampling` is set), drawn from
//! the request id's first 8 hex digits as Envoy does, so a request keeps one decision across
//! proxies that see the same `x-request-id`. `OTEL_TRACES_SAMPLER` selects OpenTelemetry's samplers
//! instead.

use http::header::{HeaderName, HeaderValue};
use http::Uri;
use std::time::Duration;

/// Istio's mesh-wide default: 1% of requests without a prior decision.
pub const DEFAULT_SAMPLING_PERCENT: f64 = 1.0;

/// How a request without a usable decision is sampled, and whether a client's decision counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampler {
    /// Istio's: the client's decision, `x-client-trace-id`, a packed Envoy trace reason, else
    /// this percentage of requests (by request id).
    Istio {
        percent: f64,
    },
    /// OpenTelemetry's `always_on` / `always_off` / `traceidratio` (the client's flag ignored).
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
    /// OpenTelemetry's `parentbased_*`: the client's decision when it sent one, else the root.
    ParentBased(Root),
}

/// The root sampler of [`Sampler::ParentBased`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::Istio {
            percent: DEFAULT_SAMPLING_PERCENT,
        }
    }
}

impl Sampler {
    /// `client`: the decision the client sent, if any.
    #[cfg(test)]
    pub(crate) fn sample(
        &self,
        client: Option<bool>,
        headers: &http::HeaderMap,
        trace_id: u128,
    ) -> bool {
        self.sample_seen(client, &super::context::Seen::of(headers), trace_id)
    }

    /// `seen`: what one pass over the request's headers found.
    pub(crate) fn sample_seen(
        &self,
        client: Option<bool>,
        seen: &super::context::Seen<'_>,
        trace_id: u128,
    ) -> bool {
        match *self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(r) => by_trace_id(trace_id, r),
            Sampler::ParentBased(root) => client.unwrap_or(match root {
                Root::AlwaysOn => true,
                Root::AlwaysOff => false,
                Root::TraceIdRatio(r) => by_trace_id(trace_id, r),
            }),
            Sampler::Istio { percent } => {
                if let Some(decided) = client {
                    return decided;
                }
                if seen.client_trace_id {
                    return true;
                }
                let rid = seen.request_id.map(HeaderValue::as_bytes);
                // Envoy packs its trace reason into the UUID's version digit: 9 sampled,
                // a forced, b client (a plain v4 UUID has 4 there).
                if rid.is_some_and(|r| r.len() == 36 && matches!(r[14], b'9' | b'a' | b'b')) {
                    return true;
                }
                let draw = rid
                    .and_then(|r| r.get(..8))
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u64::from_str_radix(h, 16).ok())
                    .map_or_else(|| fastrand::u64(0..10_000), |v| v % 10_000);
                (draw as f64) < (percent * 100.0).round()
            }
        }
    }
}

/// OpenTelemetry's trace-id ratio: the low 63 bits of the trace id against the ratio, so every
/// sampler that sees the same trace id decides alike.
fn by_trace_id(trace_id: u128, ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    let bound = (ratio.max(0.0) * (1u64 << 63) as f64) as u64;
    ((trace_id as u64) >> 1) < bound
}

/// The OTLP transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf`: `POST <endpoint>` with an `application/x-protobuf` body.
    HttpProtobuf,
    /// `grpc`: `TraceService/Export` over cleartext HTTP/2.
    Grpc,
}

/// Where and how spans are exported.
#[derive(Clone, Debug, PartialEq)]
pub struct ExportConfig {
    /// The full URL spans are sent to (`http://host:port/v1/traces` for http/protobuf).
    pub endpoint: Uri,
    pub protocol: OtlpProtocol,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// One export's limit (`OTEL_EXPORTER_OTLP_TIMEOUT`, 10 s).
    pub timeout: Duration,
    /// The resource's `service.name` (`OTEL_SERVICE_NAME`, else `sluice`).
    pub service_name: String,
    /// Further resource attributes (`OTEL_RESOURCE_ATTRIBUTES`).
    pub resource: Vec<(String, String)>,
    /// Finished requests waiting for export; more are dropped and counted
    /// (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048).
    pub max_queue: usize,
    /// Spans per export at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512).
    pub max_batch: usize,
    /// How long spans wait for a fuller batch (`OTEL_BSP_SCHEDULE_DELAY`, 5 s).
    pub delay: Duration,
}

impl ExportConfig {
    /// Defaults for `endpoint` (already complete: nothing is appended).
    pub fn new(endpoint: Uri, protocol: OtlpProtocol) -> Self {
        Self {
            endpoint,
            protocol,
            headers: Vec::new(),
            timeout: Duration::from_secs(10),
            service_name: "sluice".into(),
            resource: Vec::new(),
            max_queue: 2048,
            max_batch: 512,
            delay: Duration::from_secs(5),
        }
    }
}

/// Tracing's whole configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// Read and write trace headers (Istio propagates unless the Telemetry API's
    /// `disableContextPropagation` says otherwise). Off, with no exporter, tracing costs nothing.
    pub propagate: bool,
    pub sampler: Sampler,
    /// `None`: spans are not exported (headers still propagate, with the sampling decision).
    pub export: Option<ExportConfig>,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            propagate: true,
            sampler: Sampler::default(),
            export: None,
        }
    }
}

/// A setting that cannot be used: which variable or flag, its value, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

fn bad(name: &str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name: name.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

impl TraceConfig {
    /// From the process environment (the OpenTelemetry SDK's variables).
    pub fn from_env() -> Result<Self, ConfigError> {
        let not_unicode = std::cell::RefCell::new(None);
        let cfg = Self::from_vars(|name| match std::env::var(name) {
            Ok(v) => Some(v),
            Err(std::env::VarError::NotPresent) => None,
            Err(std::env::VarError::NotUnicode(v)) => {
                not_unicode.borrow_mut().get_or_insert((name.to_owned(), v));
                None
            }
        });
        if let Some((name, v)) = not_unicode.into_inner() {
            return Err(bad(&name, &v.to_string_lossy(), "not valid UTF-8"));
        }
        cfg
    }

    /// From variables looked up by `var` (tests pass a map).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // An empty value is unset, as the OpenTelemetry specification says.
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let mut cfg = TraceConfig {
            sampler: sampler_from(&var)?,
            ..TraceConfig::default()
        };
        let disabled = match var("OTEL_SDK_DISABLED") {
            Some(v) => parse_bool("OTEL_SDK_DISABLED", &v)?,
            None => false,
        };
        let exporter = var("OTEL_TRACES_EXPORTER");
        match exporter.as_deref().map(str::trim) {
            None | Some("otlp") => {}
            Some("none") => return Ok(cfg),
            Some(other) => {
                return Err(bad(
                    "OTEL_TRACES_EXPORTER",
                    other,
                    "Sluice exports spans over OTLP only: use otlp or none",
                ))
            }
        }
        if disabled {
            return Ok(cfg);
        }
        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") {
            Some(v) => parse_protocol("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", &v)?,
            None => match var("OTEL_EXPORTER_OTLP_PROTOCOL") {
                Some(v) => parse_protocol("OTEL_EXPORTER_OTLP_PROTOCOL", &v)?,
                None => OtlpProtocol::HttpProtobuf,
            },
        };
        let endpoint = if let Some(v) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            parse_endpoint("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &v, protocol, false)?
        } else if let Some(v) = var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            parse_endpoint("OTEL_EXPORTER_OTLP_ENDPOINT", &v, protocol, true)?
        } else {
            return Ok(cfg);
        };
        let mut export = ExportConfig::new(endpoint, protocol);
        export.headers = match var("OTEL_EXPORTER_OTLP_TRACES_HEADERS") {
            Some(v) => parse_headers("OTEL_EXPORTER_OTLP_TRACES_HEADERS", &v)?,
            None => match var("OTEL_EXPORTER_OTLP_HEADERS") {
                Some(v) => parse_headers("OTEL_EXPORTER_OTLP_HEADERS", &v)?,
                None => Vec::new(),
            },
        };
        for name in [
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ] {
            if let Some(v) = var(name) {
                export.timeout = Duration::from_millis(parse_count(name, &v, 1)?);
                break;
            }
        }
        if let Some(v) = var("OTEL_RESOURCE_ATTRIBUTES") {
            export.resource = parse_pairs("OTEL_RESOURCE_ATTRIBUTES", &v)?;
        }
        if let Some((_, name)) = export.resource.iter().find(|(k, _)| k == "service.name") {
            export.service_name = name.clone();
        }
        if let Some(v) = var("OTEL_SERVICE_NAME") {
            export.service_name = v;
        }
        export.resource.retain(|(k, _)| k != "service.name");
        if let Some(v) = var("OTEL_BSP_SCHEDULE_DELAY") {
            export.delay = Duration::from_millis(parse_count("OTEL_BSP_SCHEDULE_DELAY", &v, 1)?);
        }
        if let Some(v) = var("OTEL_BSP_MAX_QUEUE_SIZE") {
            export.max_queue = parse_count("OTEL_BSP_MAX_QUEUE_SIZE", &v, 1)? as usize;
        }
        if let Some(v) = var("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            export.max_batch = parse_count("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", &v, 1)? as usize;
        }
        cfg.export = Some(export);
        Ok(cfg)
    }
}

fn sampler_from(var: &impl Fn(&str) -> Option<String>) -> Result<Sampler, ConfigError> {
    let Some(name) = var("OTEL_TRACES_SAMPLER") else {
        return Ok(Sampler::default());
    };
    let ratio = || -> Result<f64, ConfigError> {
        let Some(arg) = var("OTEL_TRACES_SAMPLER_ARG") else {
            return Ok(1.0);
        };
        let r: f64 = arg.trim().parse().map_err(|_| {
            bad(
                "OTEL_TRACES_SAMPLER_ARG",
                &arg,
                "not a number: the ratio of traces sampled, 0.0 to 1.0",
            )
        })?;
        if !(0.0..=1.0).contains(&r) {
            return Err(bad(
                "OTEL_TRACES_SAMPLER_ARG",
                &arg,
                "out of range: the ratio of traces sampled, 0.0 to 1.0",
            ));
        }
        Ok(r)
    };
    Ok(match name.trim() {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatio(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Root::AlwaysOn),
        "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
        "parentbased_traceidratio" => Sampler::ParentBased(Root::TraceIdRatio(ratio()?)),
        other => {
            return Err(bad(
                "OTEL_TRACES_SAMPLER",
                other,
                "unknown sampler: use always_on, always_off, traceidratio, parentbased_always_on, \
                 parentbased_always_off or parentbased_traceidratio",
            ))
        }
    })
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(bad(name, v, "use true or false")),
    }
}

fn parse_count(name: &str, v: &str, min: u64) -> Result<u64, ConfigError> {
    match v.trim().parse::<u64>() {
        Ok(n) if n >= min => Ok(n),
        Ok(_) => Err(bad(name, v, format!("must be at least {min}"))),
        Err(_) => Err(bad(name, v, "not a whole number")),
    }
}

fn parse_protocol(name: &str, v: &str) -> Result<OtlpProtocol, ConfigError> {
    match v.trim() {
        "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
        "grpc" => Ok(OtlpProtocol::Grpc),
        "http/json" => Err(bad(
            name,
            v,
            "http/json is not supported: use http/protobuf or grpc",
        )),
        _ => Err(bad(name, v, "unknown protocol: use http/protobuf or grpc")),
    }
}

/// An OTLP endpoint URL. The generic endpoint (`generic`) is a base: `v1/traces` is appended for
/// http/protobuf; a signal's own endpoint is used as it is. gRPC uses the service's fixed path.
pub(crate) fn parse_endpoint(
    name: &str,
    v: &str,
    protocol: OtlpProtocol,
    generic: bool,
) -> Result<Uri, ConfigError> {
    let uri: Uri = v
        .trim()
        .parse()
        .map_err(|e| bad(name, v, format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                name,
                v,
                "https is not supported: send spans to a collector over http (an OpenTelemetry \
                 Collector on the node or in the cluster)",
            ))
        }
        _ => {
            return Err(bad(
                name,
                v,
                "needs http://host[:port][/path] (for example http://otel-collector:4318)",
            ))
        }
    }
    let authority = uri
        .authority()
        .filter(|a| !a.host().is_empty())
        .ok_or_else(|| bad(name, v, "has no host"))?
        .clone();
    let path = match (protocol, generic) {
        (OtlpProtocol::Grpc, _) => {
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export".to_owned()
        }
        (OtlpProtocol::HttpProtobuf, true) => {
            format!("{}/v1/traces", uri.path().trim_end_matches('/'))
        }
        (OtlpProtocol::HttpProtobuf, false) => uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
    };
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| bad(name, v, format!("not a URL: {e}")))
}

/// `key=value,key2=value2`, values percent-decoded (the OpenTelemetry format for headers and
/// resource attributes).
fn parse_pairs(name: &str, v: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, val) = item
            .split_once('=')
            .ok_or_else(|| bad(name, v, format!("{item:?} is not key=value")))?;
        let k = percent_decode(k.trim()).ok_or_else(|| bad(name, v, "bad percent-encoding"))?;
        if k.is_empty() {
            return Err(bad(name, v, format!("{item:?} has an empty key")));
        }
        let val = percent_decode(val.trim()).ok_or_else(|| bad(name, v, "bad percent-encoding"))?;
        out.push((k, val));
    }
    Ok(out)
}

fn parse_headers(name: &str, v: &str) -> Result<Vec<(HeaderName, HeaderValue)>, ConfigError> {
    parse_pairs(name, v)?
        .into_iter()
        .map(|(k, val)| {
            let k = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| bad(name, v, format!("{k:?} is not a header name")))?;
            let val = HeaderValue::from_str(&val)
                .map_err(|_| bad(name, v, format!("the value of {k} is not a header value")))?;
            Ok((k, val))
        })
        .collect()
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The flags of `sluice run` for tracing; they win over the environment.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct TraceArgs {
    /// OTLP collector to export spans to, a base URL like OTEL_EXPORTER_OTLP_ENDPOINT
    /// (`/v1/traces` is appended for http/protobuf): for example http://otel-collector:4318.
    /// Without it (or the OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT variables) no span is exported;
    /// trace headers are still propagated.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: http/protobuf (default) or grpc [OTEL_EXPORTER_OTLP_PROTOCOL].
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<String>,
    /// Percentage of requests traced when the client sent no sampling decision (Istio's
    /// meshConfig.defaultConfig.tracing.sampling; default 1). Overrides OTEL_TRACES_SAMPLER.
    #[arg(long, value_name = "PERCENT", value_parser = parse_percent)]
    pub trace_sampling: Option<f64>,
    /// Do not read or write trace headers (Istio's disableContextPropagation); spans are still
    /// exported for sampled requests.
    #[arg(long)]
    pub no_trace_propagation: bool,
}

fn parse_percent(v: &str) -> Result<f64, String> {
    match v.trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        Ok(_) => Err("a percentage from 0 to 100".into()),
        Err(_) => Err("not a number: a percentage from 0 to 100".into()),
    }
}

impl TraceArgs {
    /// The environment's configuration with these flags applied.
    pub fn config(&self) -> Result<TraceConfig, ConfigError> {
        self.apply(TraceConfig::from_env()?)
    }

    /// `cfg` (read from the environment) with these flags applied.
    pub fn apply(&self, mut cfg: TraceConfig) -> Result<TraceConfig, ConfigError> {
        if let Some(p) = self.trace_sampling {
            cfg.sampler = Sampler::Istio { percent: p };
        }
        if self.no_trace_propagation {
            cfg.propagate = false;
        }
        let protocol = match &self.otlp_protocol {
            Some(p) => Some(parse_protocol("--otlp-protocol", p)?),
            None => None,
        };
        if let Some(url) = &self.otlp_endpoint {
            let protocol = protocol
                .or(cfg.export.as_ref().map(|e| e.protocol))
                .unwrap_or(OtlpProtocol::HttpProtobuf);
            let endpoint = parse_endpoint("--otlp-endpoint", url, protocol, true)?;
            match &mut cfg.export {
                Some(e) => {
                    e.endpoint = endpoint;
                    e.protocol = protocol;
                }
                None => cfg.export = Some(ExportConfig::new(endpoint, protocol)),
            }
        } else if let (Some(protocol), Some(e)) = (protocol, &mut cfg.export) {
            if protocol != e.protocol {
                return Err(bad(
                    "--otlp-protocol",
                    self.otlp_protocol.as_deref().unwrap_or_default(),
                    "changes the protocol of an endpoint given in the environment: give \
                     --otlp-endpoint too, or set OTEL_EXPORTER_OTLP_PROTOCOL",
                ));
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::X_REQUEST_ID;
    use http::HeaderMap;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<TraceConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TraceConfig::from_vars(|k| map.get(k).cloned())
    }

    #[test]
    fn nothing_set_is_istios_default_without_export() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c, TraceConfig::default());
        assert_eq!(c.sampler, Sampler::Istio { percent: 1.0 });
        assert!(c.propagate);
    }

    #[test]
    fn the_generic_endpoint_gets_v1_traces_and_the_traces_endpoint_is_used_as_is() {
        let c = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")]).unwrap();
        let e = c.export.unwrap();
        assert_eq!(e.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(e.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(e.service_name, "sluice");
        let c = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/base/")]).unwrap();
        assert_eq!(
            c.export.unwrap().endpoint,
            "http://collector:4318/base/v1/traces"
        );
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ignored:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://collector:9411/custom",
            ),
        ])
        .unwrap();
        assert_eq!(c.export.unwrap().endpoint, "http://collector:9411/custom");
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        let e = c.export.unwrap();
        assert_eq!(e.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            e.endpoint,
            "http://collector:4317/opentelemetry.proto.collector.trace.v1.TraceService/Export"
        );
    }

    #[test]
    fn service_name_resource_headers_and_batching() {
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "service.name=from-attrs, deployment.environment=prod,k8s.node.name=node%2Da",
            ),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=a%20b"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "10"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "3"),
        ])
        .unwrap();
        let e = c.export.unwrap();
        assert_eq!(e.service_name, "from-attrs");
        assert_eq!(
            e.resource,
            [
                ("deployment.environment".to_string(), "prod".to_string()),
                ("k8s.node.name".into(), "node-a".into())
            ]
        );
        assert_eq!(e.headers[0].0, "x-tenant");
        assert_eq!(e.headers[0].1, "a b");
        assert_eq!(e.timeout, Duration::from_millis(2500));
        assert_eq!(
            (e.delay, e.max_queue, e.max_batch),
            (Duration::from_millis(100), 10, 3)
        );
        let c = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
            ("OTEL_SERVICE_NAME", "mesh-agent"),
        ])
        .unwrap();
        assert_eq!(c.export.unwrap().service_name, "mesh-agent");
    }

    #[test]
    fn samplers_from_the_environment() {
        let s = |name: &str, arg: Option<&str>| {
            let mut v = vec![("OTEL_TRACES_SAMPLER", name)];
            if let Some(a) = arg {
                v.push(("OTEL_TRACES_SAMPLER_ARG", a));
            }
            cfg(&v).map(|c| c.sampler)
        };
        assert_eq!(s("always_on", None), Ok(Sampler::AlwaysOn));
        assert_eq!(s("always_off", None), Ok(Sampler::AlwaysOff));
        assert_eq!(
            s("traceidratio", Some("0.25")),
            Ok(Sampler::TraceIdRatio(0.25))
        );
        assert_eq!(s("traceidratio", None), Ok(Sampler::TraceIdRatio(1.0)));
        assert_eq!(
            s("parentbased_always_on", None),
            Ok(Sampler::ParentBased(Root::AlwaysOn))
        );
        assert_eq!(
            s("parentbased_always_off", None),
            Ok(Sampler::ParentBased(Root::AlwaysOff))
        );
        assert_eq!(
            s("parentbased_traceidratio", Some("0.5")),
            Ok(Sampler::ParentBased(Root::TraceIdRatio(0.5)))
        );
    }

    #[test]
    fn bad_values_name_the_variable_and_the_reason() {
        let err = |vars: &[(&str, &str)]| cfg(vars).unwrap_err();
        let e = err(&[("OTEL_TRACES_SAMPLER", "sometimes")]);
        assert_eq!(e.name, "OTEL_TRACES_SAMPLER");
        assert!(e.to_string().contains("unknown sampler"), "{e}");
        let e = err(&[
            ("OTEL_TRACES_SAMPLER", "traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "1.5"),
        ]);
        assert_eq!(
            e.to_string(),
            "OTEL_TRACES_SAMPLER_ARG=\"1.5\": out of range: the ratio of traces sampled, 0.0 to 1.0"
        );
        let e = err(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "half"),
        ]);
        assert_eq!(e.name, "OTEL_TRACES_SAMPLER_ARG");
        assert!(e.reason.contains("not a number"));
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")]);
        assert!(e.reason.contains("https is not supported"), "{e}");
        let e = err(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]);
        assert_eq!(e.name, "OTEL_EXPORTER_OTLP_ENDPOINT");
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
        ]);
        assert_eq!(e.name, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL");
        let e = err(&[("OTEL_TRACES_EXPORTER", "zipkin")]);
        assert!(e.reason.contains("OTLP only"), "{e}");
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ]);
        assert_eq!(e.reason, "must be at least 1");
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
        ]);
        assert!(e.reason.contains("not key=value"), "{e}");
        let e = err(&[("OTEL_SDK_DISABLED", "yes")]);
        assert_eq!(e.name, "OTEL_SDK_DISABLED");
    }

    #[test]
    fn export_off_switches() {
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let c = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"), off]).unwrap();
            assert_eq!(c.export, None, "{off:?}");
        }
    }

    #[test]
    fn flags_win_over_the_environment() {
        let env = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
            ("OTEL_TRACES_SAMPLER", "always_on"),
            ("OTEL_SERVICE_NAME", "kept"),
        ])
        .unwrap();
        let args = TraceArgs {
            otlp_endpoint: Some("http://flag:4318".into()),
            trace_sampling: Some(25.0),
            ..Default::default()
        };
        let c = args.apply(env).unwrap();
        let e = c.export.unwrap();
        assert_eq!(e.endpoint, "http://flag:4318/v1/traces");
        assert_eq!(e.service_name, "kept");
        assert_eq!(c.sampler, Sampler::Istio { percent: 25.0 });
        let args = TraceArgs {
            otlp_protocol: Some("grpc".into()),
            ..Default::default()
        };
        let e = args
            .apply(cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")]).unwrap())
            .unwrap_err();
        assert_eq!(e.name, "--otlp-protocol");
        assert_eq!(
            parse_percent("101"),
            Err("a percentage from 0 to 100".into())
        );
        assert!(parse_percent("x").is_err());
    }

    fn incoming(h: &[(&str, &str)]) -> (Option<bool>, HeaderMap) {
        let mut m = HeaderMap::new();
        for (k, v) in h {
            m.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        (super::super::context::Incoming::read(&m).sampled, m)
    }

    #[test]
    fn istio_sampling_keeps_the_clients_decision_and_forces_as_envoy_does() {
        let none = Sampler::Istio { percent: 0.0 };
        let all = Sampler::Istio { percent: 100.0 };
        let (i, h) = incoming(&[("x-b3-sampled", "1")]);
        assert!(none.sample(i, &h, 1));
        let (i, h) = incoming(&[(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        )]);
        assert!(!all.sample(i, &h, 1));
        let (i, h) = incoming(&[("x-client-trace-id", "abc")]);
        assert!(none.sample(i, &h, 1));
        for packed in ["9", "a", "b"] {
            let rid = format!("5ee2b5c0-0000-{packed}000-8000-000000000001");
            let (i, h) = incoming(&[("x-request-id", &rid)]);
            assert!(none.sample(i, &h, 1), "{rid}");
        }
        // The draw is the request id's first 8 hex digits modulo 10000: 0x00001387 = 4999.
        let half = Sampler::Istio { percent: 50.0 };
        let (i, h) = incoming(&[("x-request-id", "00001387-0000-4000-8000-000000000000")]);
        assert!(half.sample(i, &h, 1));
        let (i, h) = incoming(&[("x-request-id", "00001388-0000-4000-8000-000000000000")]);
        assert!(!half.sample(i, &h, 1));
    }

    #[test]
    fn istio_percentage_over_many_requests() {
        let s = Sampler::Istio { percent: 1.0 };
        let n = 200_000;
        let hits = (0..n)
            .filter(|_| {
                let mut h = HeaderMap::new();
                h.insert(X_REQUEST_ID, super::super::new_request_id());
                s.sample(None, &h, 1)
            })
            .count();
        let pct = hits as f64 * 100.0 / n as f64;
        assert!((0.8..1.2).contains(&pct), "{pct}% sampled");
    }

    #[test]
    fn otel_samplers_decide_as_the_specification_says() {
        let (parent_yes, h) = incoming(&[("x-b3-sampled", "1")]);
        let (parent_no, _) = incoming(&[("x-b3-sampled", "0")]);
        let none = None;
        assert!(Sampler::AlwaysOn.sample(parent_no, &h, 1));
        assert!(!Sampler::AlwaysOff.sample(parent_yes, &h, 1));
        let pb = Sampler::ParentBased(Root::AlwaysOff);
        assert!(pb.sample(parent_yes, &h, 1));
        assert!(!pb.sample(none, &h, 1));
        let pb = Sampler::ParentBased(Root::AlwaysOn);
        assert!(!pb.sample(parent_no, &h, 1));
        assert!(pb.sample(none, &h, 1));
        // traceidratio ignores the parent and is deterministic per trace id.
        let r = Sampler::TraceIdRatio(0.5);
        assert!(r.sample(parent_no, &h, 0x1234_0000_0000_0000_0000_0000_0000_0002));
        assert!(!r.sample(parent_yes, &h, 0xffff_ffff_ffff_fffe));
        let n = 100_000u32;
        let hits = (0..n)
            .filter(|_| Sampler::TraceIdRatio(0.1).sample(none, &h, fastrand::u128(..)))
            .count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
    }
}
