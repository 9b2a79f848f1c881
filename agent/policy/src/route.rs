//! Routing for one destination host: the ordered HTTP routes of its VirtualService (or Istio's implicit
//! default route), each with its matches, weighted destinations and resilience settings.

use crate::ClusterKey;
use bytes::Bytes;
use regex::Regex;
use serde::{Serialize, Serializer};
use std::time::Duration;

/// The routes that apply to one destination host.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualHost {
    /// `namespace/name` of the VirtualService, or `default` for the implicit route.
    pub name: String,
    /// Routes in order; the first whose match succeeds wins.
    pub routes: Vec<Route>,
    /// `tcp[]`, for connections proxied at L4, in order; the first that matches wins, none
    /// matching leaves the connection on the service port's own cluster. A rule with a
    /// destination without `port` on a Service of several ports is one rule per port here (each
    /// matching only its port), so every destination names its port.
    pub tcp_routes: Vec<TcpRoute>,
}

/// One `tcp[]` entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TcpRoute {
    /// Any one of these must match; empty matches every connection.
    pub matches: Vec<L4Match>,
    /// Where matching connections go, by weight.
    pub destinations: Vec<WeightedDestination>,
}

/// One `tcp[].match[]` entry: every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct L4Match {
    /// The original destination's address is in one of these (empty: any).
    pub destination_subnets: Vec<IpNet>,
    /// The original destination's port.
    pub port: Option<u16>,
    /// The client pod carries all of these labels (an unknown client matches none).
    pub source_labels: std::collections::BTreeMap<String, String>,
    /// The client pod's namespace.
    pub source_namespace: Option<String>,
}

/// An address with a prefix length (`10.0.0.0/8`, `fd00::/64`; a bare address is a host prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl IpNet {
    /// Parses `ADDR` or `ADDR/PREFIX` (Istio's `ValidateIPSubnet`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("prefix length {p:?} is not in 0..{max}")),
            },
        };
        Ok(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::{V4, V6};
        let bits = |a: u128, b: u128, width: u32| {
            let shift = width - u32::from(self.prefix);
            shift >= width || (a >> shift) == (b >> shift)
        };
        match (self.addr, ip) {
            (V4(net), V4(ip)) => bits(u32::from(net).into(), u32::from(ip).into(), 32),
            (V6(net), V6(ip)) => bits(u128::from(net), u128::from(ip), 128),
            _ => false,
        }
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One `http[]` entry.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    /// `http[].name`, or `VSNAME.INDEX` when unnamed.
    pub name: String,
    /// Any one of these must match; empty matches everything.
    pub matches: Vec<RequestMatch>,
    /// Where matching requests go; weights sum to the total used for picking. A destination
    /// without `port` has port [`INCOMING_PORT`].
    pub destinations: Vec<WeightedDestination>,
    /// `timeout`: whole-request deadline including retries; `None` is no deadline.
    #[serde(serialize_with = "crate::serde_duration::opt")]
    pub timeout: Option<Duration>,
    /// `retries`, or Istio's default retry policy when absent.
    pub retry: RetryPolicy,
    /// `fault`. As in Istio, the route keeps its retries and timeout: the fault filter runs before the
    /// router, so an injected fault is never retried or timed out, other requests are.
    pub fault: Option<Fault>,
    /// `directResponse`: the proxy answers itself (no destinations, no retries, no timeout).
    pub direct_response: Option<DirectResponse>,
    /// `headers.response`: applied to every response of the route except injected aborts.
    pub response_headers: Option<HeaderOperations>,
}

/// `directResponse`, with its body decoded once at configuration time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectResponse {
    /// 200 to 599.
    pub status: u16,
    /// `body.string` or the decoded `body.bytes`; empty without a body.
    #[serde(serialize_with = "ser_body")]
    pub body: Bytes,
}

fn ser_body<S: Serializer>(body: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    match std::str::from_utf8(body) {
        Ok(text) => s.serialize_str(text),
        Err(_) => s.serialize_str(&format!("<{} bytes, not UTF-8>", body.len())),
    }
}

/// Header manipulation of one direction, applied as Envoy applies it: `remove`, then `set`
/// (replacing any value), then `add` (appending). Names are lower case.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderOperations {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

/// A destination with its weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WeightedDestination {
    /// The cluster. Port [`INCOMING_PORT`] (an HTTP route's destination without `port`) stands for
    /// the Service port the request came in on, as istiod fills it in per listener port.
    pub cluster: ClusterKey,
    pub weight: u32,
}

/// The port of a destination that goes to the port the request came in on.
pub const INCOMING_PORT: u16 = 0;

impl WeightedDestination {
    /// The cluster for a request that came in on `port`.
    pub fn cluster_for(&self, port: u16) -> ClusterKey {
        if self.cluster.port == INCOMING_PORT {
            ClusterKey {
                port,
                ..self.cluster.clone()
            }
        } else {
            self.cluster.clone()
        }
    }

    /// Whether the destination takes the port the request came in on.
    pub fn takes_incoming_port(&self) -> bool {
        self.cluster.port == INCOMING_PORT
    }
}

/// One `match[]` entry: every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestMatch {
    pub uri: Option<StringMatch>,
    pub scheme: Option<StringMatch>,
    pub method: Option<StringMatch>,
    pub authority: Option<StringMatch>,
    /// Header names are lower case.
    pub headers: Vec<HeaderMatch>,
    pub without_headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryMatch>,
    pub port: Option<u16>,
    pub ignore_uri_case: bool,
    /// `sourceLabels`: the client pod's labels must include these.
    pub source_labels: std::collections::BTreeMap<String, String>,
    /// `sourceNamespace`: the client pod's namespace.
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HeaderMatch {
    pub name: String,
    pub value: StringMatch,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueryMatch {
    pub name: String,
    pub value: StringMatch,
}

/// Istio's `StringMatch`. Regexes are RE2 syntax and must match the whole value.
#[derive(Clone, Debug, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(#[serde(serialize_with = "ser_regex")] Regex),
    /// `{}`: the header or parameter is present, whatever its value.
    Present,
}

/// Two regexes are the same condition when their patterns are.
impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b)) | (Self::Prefix(a), Self::Prefix(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            (Self::Present, Self::Present) => true,
            _ => false,
        }
    }
}

fn ser_regex<S: Serializer>(re: &Regex, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(re.as_str())
}

impl StringMatch {
    /// A full-match regex, anchored as Envoy's `safe_regex` is.
    pub fn regex(pattern: &str) -> Result<Self, regex::Error> {
        Regex::new(&format!("^(?:{pattern})$")).map(Self::Regex)
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Regex(re) => re.is_match(value),
            Self::Present => true,
        }
    }

    /// Case-insensitive form, for `ignoreUriCase`.
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value.eq_ignore_ascii_case(s),
            Self::Prefix(p) => {
                value.len() >= p.len()
                    && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            Self::Regex(re) => re.is_match(value),
            Self::Present => true,
        }
    }
}

/// `retries`, as Envoy's route retry policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt (Istio's `attempts` is Envoy's `num_retries`); 0 disables.
    pub num_retries: u32,
    /// `perTryTimeout`; `None` leaves each attempt bounded only by the route timeout.
    #[serde(serialize_with = "crate::serde_duration::opt")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
    /// Base of the fully jittered exponential back-off (Envoy: 25 ms).
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub backoff_base: Duration,
    /// Cap of the back-off (Envoy: 10 x base = 250 ms).
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub backoff_max: Duration,
    /// Prefer a host not tried before for a retry (Istio adds Envoy's `previous_hosts` predicate).
    pub avoid_previous_hosts: bool,
    /// `retryRemoteLocalities` (single-locality here, recorded for config dumps).
    pub retry_remote_localities: bool,
}

impl RetryPolicy {
    /// Istio's default when a route has no `retries` block: 2 retries on
    /// `connect-failure,refused-stream,unavailable,cancelled`, to a different host when there is one.
    /// (Istio 1.24 dropped `retriable-status-codes`/503 from the default.)
    pub fn istio_default() -> Self {
        Self {
            num_retries: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                unavailable: true,
                cancelled: true,
                ..RetryOn::default()
            },
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            avoid_previous_hosts: true,
            retry_remote_localities: false,
        }
    }

    /// No retries at all (`attempts: 0`, or a route with a fault).
    pub fn disabled() -> Self {
        Self {
            num_retries: 0,
            ..Self::istio_default()
        }
    }
}

/// `retryOn` conditions (Envoy `x-envoy-retry-on` and `x-envoy-retry-grpc-on` names).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, and resets, connect failures, refused streams, per-try timeouts.
    pub five_xx: bool,
    /// `gateway-error`: 502/503/504 responses, and resets, connect failures, per-try timeouts.
    pub gateway_error: bool,
    /// `reset`: disconnect, reset or per-try timeout with no response.
    pub reset: bool,
    /// `connect-failure`: the connection could not be established.
    pub connect_failure: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `refused-stream`: HTTP/2 REFUSED_STREAM.
    pub refused_stream: bool,
    /// `retriable-status-codes` together with `retriable_status_codes`; Istio also turns a bare
    /// numeric code in `retryOn` into this.
    pub retriable_status_codes: Vec<u16>,
    /// gRPC: `cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable`.
    pub cancelled: bool,
    pub deadline_exceeded: bool,
    pub internal: bool,
    pub resource_exhausted: bool,
    pub unavailable: bool,
}

/// `fault`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultDelay {
    #[serde(serialize_with = "crate::serde_duration::one")]
    pub fixed_delay: Duration,
    /// Percent of requests, 0.0 to 100.0 (`percentage.value`, or legacy integer `percent`).
    pub percentage: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum FaultAbort {
    /// `httpStatus`.
    Http { status: u16, percentage: f64 },
    /// `grpcStatus` (e.g. `UNAVAILABLE`), sent as a trailers-only gRPC response.
    Grpc { status: String, percentage: f64 },
}

/// gRPC status names in code order (`GRPC_STATUS_NAMES[14] == "UNAVAILABLE"`), as `grpcStatus` takes them.
pub const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let net = IpNet::parse("10.96.0.0/12").unwrap();
        assert!(net.contains("10.96.0.10".parse().unwrap()));
        assert!(net.contains("10.111.255.255".parse().unwrap()));
        assert!(!net.contains("10.112.0.0".parse().unwrap()));
        assert!(!net.contains("::1".parse().unwrap()));
        let host = IpNet::parse("10.0.0.1").unwrap();
        assert_eq!(host.to_string(), "10.0.0.1/32");
        assert!(host.contains("10.0.0.1".parse().unwrap()));
        assert!(!host.contains("10.0.0.2".parse().unwrap()));
        assert!(IpNet::parse("0.0.0.0/0")
            .unwrap()
            .contains("192.0.2.1".parse().unwrap()));
        assert!(IpNet::parse("fd00::/8")
            .unwrap()
            .contains("fd12::1".parse().unwrap()));
        assert!(IpNet::parse("10.0.0.0/33").is_err());
        assert!(IpNet::parse("example.com").is_err());
    }
}
