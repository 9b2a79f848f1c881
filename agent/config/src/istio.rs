//! Serde types for Istio's `VirtualService` and `DestinationRule` (`networking.istio.io/v1`, `v1beta1`,
//! `v1alpha3`), as written in YAML. They only describe the shape: values are checked and defaulted
//! when converted to `sluice_policy` types (see `convert`). Fields Istio defines but Sluice does not
//! implement are kept as raw values so that conversion can warn about them by path, rather than
//! letting them pass as unknown.

use serde::{Deserialize, Deserializer};
use serde_yaml::Value;
use std::collections::BTreeMap;

/// `null` (or an empty key) reads as the default, as Kubernetes treats it.
pub(crate) fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Kubernetes object metadata (only what Sluice reads; everything else is accepted and ignored).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339; Istio orders conflicting resources by it.
    #[serde(default)]
    pub creation_timestamp: Option<String>,
    /// uid, resourceVersion, managedFields, ...: not Sluice's concern.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl ObjectMeta {
    pub fn namespace(&self) -> &str {
        match self.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns,
            _ => "default",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualService {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: VirtualServiceSpec,
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VirtualServiceSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub hosts: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub gateways: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub http: Vec<HttpRoute>,
    #[serde(default, deserialize_with = "nullable")]
    pub tcp: Vec<TcpRoute>,
    /// Namespaces that see this VirtualService: `.`, `*` or names (empty: the mesh default, `*`).
    #[serde(default, deserialize_with = "nullable")]
    pub export_to: Vec<String>,
    // Unsupported: warned.
    pub tls: Option<Value>,
}

/// One `tcp[]` rule: opaque TCP connections to the VirtualService's hosts.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TcpRoute {
    #[serde(rename = "match", default, deserialize_with = "nullable")]
    pub matches: Vec<L4MatchAttributes>,
    #[serde(default, deserialize_with = "nullable")]
    pub route: Vec<RouteDestination>,
}

/// `tcp[].match[]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct L4MatchAttributes {
    #[serde(default, deserialize_with = "nullable")]
    pub destination_subnets: Vec<String>,
    pub port: Option<i64>,
    #[serde(default, deserialize_with = "nullable")]
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub gateways: Vec<String>,
    // Unsupported: warned (deprecated in Istio).
    pub source_subnet: Option<Value>,
}

/// `tcp[].route[]`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RouteDestination {
    pub destination: Option<Destination>,
    pub weight: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRoute {
    pub name: Option<String>,
    #[serde(rename = "match", default, deserialize_with = "nullable")]
    pub matches: Vec<HttpMatchRequest>,
    #[serde(default, deserialize_with = "nullable")]
    pub route: Vec<HttpRouteDestination>,
    pub timeout: Option<String>,
    pub retries: Option<HttpRetry>,
    pub fault: Option<HttpFaultInjection>,
    pub direct_response: Option<HttpDirectResponse>,
    pub headers: Option<Headers>,
    // Unsupported: warned.
    pub redirect: Option<Value>,
    pub delegate: Option<Value>,
    pub rewrite: Option<Value>,
    pub mirror: Option<Value>,
    pub mirrors: Option<Value>,
    pub mirror_percent: Option<Value>,
    #[serde(rename = "mirror_percent")]
    pub mirror_percent_legacy: Option<Value>,
    pub mirror_percentage: Option<Value>,
    pub cors_policy: Option<Value>,
}

/// `directResponse`: the proxy answers with `status` and `body` itself.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpDirectResponse {
    pub status: Option<i64>,
    pub body: Option<HttpBody>,
}

/// `directResponse.body`: one of `string` or `bytes` (base64).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpBody {
    pub string: Option<String>,
    pub bytes: Option<String>,
}

/// `headers` of an HTTP route.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Headers {
    pub response: Option<HeaderOperations>,
    // Unsupported: warned.
    pub request: Option<Value>,
}

/// `set`, `add` and `remove` of one direction's headers.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HeaderOperations {
    #[serde(default, deserialize_with = "nullable")]
    pub set: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub add: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub remove: Vec<String>,
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex`; `{}` (none) means "present".
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StringMatchSpec {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpMatchRequest {
    pub name: Option<String>,
    pub uri: Option<StringMatchSpec>,
    pub scheme: Option<StringMatchSpec>,
    pub method: Option<StringMatchSpec>,
    pub authority: Option<StringMatchSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub headers: BTreeMap<String, Option<StringMatchSpec>>,
    #[serde(default, deserialize_with = "nullable")]
    pub without_headers: BTreeMap<String, Option<StringMatchSpec>>,
    #[serde(default, deserialize_with = "nullable")]
    pub query_params: BTreeMap<String, Option<StringMatchSpec>>,
    pub port: Option<i64>,
    pub ignore_uri_case: Option<bool>,
    /// Per-match gateway binding: a match whose list lacks `mesh` does not apply to mesh traffic.
    #[serde(default, deserialize_with = "nullable")]
    pub gateways: Vec<String>,
    /// The client workload's labels must include these (the client is known by its Pod).
    #[serde(default, deserialize_with = "nullable")]
    pub source_labels: BTreeMap<String, String>,
    /// The client workload's namespace.
    pub source_namespace: Option<String>,
    // Unsupported: warned.
    pub stat_prefix: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteDestination {
    pub destination: Option<Destination>,
    pub weight: Option<i64>,
    // Unsupported: warned.
    pub headers: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Destination {
    #[serde(default, deserialize_with = "nullable")]
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<PortSelector>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PortSelector {
    pub number: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpRetry {
    pub attempts: Option<i64>,
    pub per_try_timeout: Option<String>,
    pub retry_on: Option<String>,
    pub retry_remote_localities: Option<bool>,
    pub retry_ignore_previous_hosts: Option<bool>,
    pub backoff: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HttpFaultInjection {
    pub delay: Option<FaultDelaySpec>,
    pub abort: Option<FaultAbortSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Percent {
    pub value: Option<f64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelaySpec {
    pub fixed_delay: Option<String>,
    pub percentage: Option<Percent>,
    /// Deprecated integer percent, used when `percentage` is absent.
    pub percent: Option<i64>,
    // Unsupported: rejected as Istio does.
    pub exponential_delay: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbortSpec {
    pub http_status: Option<i64>,
    pub grpc_status: Option<String>,
    pub percentage: Option<Percent>,
    // Unsupported: rejected as Istio does.
    pub http2_error: Option<Value>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRule {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: DestinationRuleSpec,
    #[serde(default)]
    pub status: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub host: String,
    pub traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub subsets: Vec<Subset>,
    /// Namespaces that see this DestinationRule: `.`, `*` or names (empty: the mesh default, `*`).
    #[serde(default, deserialize_with = "nullable")]
    pub export_to: Vec<String>,
    // Unsupported: warned.
    pub workload_selector: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subset {
    #[serde(default, deserialize_with = "nullable")]
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    pub traffic_policy: Option<TrafficPolicySpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub load_balancer: Option<LoadBalancerSpec>,
    #[serde(default, deserialize_with = "nullable")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    // Unsupported: warned.
    pub tls: Option<Value>,
    pub tunnel: Option<Value>,
    pub proxy_protocol: Option<Value>,
    pub retry_budget: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortTrafficPolicy {
    pub port: Option<PortSelector>,
    pub connection_pool: Option<ConnectionPoolSpec>,
    pub outlier_detection: Option<OutlierDetectionSpec>,
    pub load_balancer: Option<LoadBalancerSpec>,
    // Unsupported: warned.
    pub tls: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ConnectionPoolSpec {
    pub tcp: Option<TcpSettings>,
    pub http: Option<HttpSettings>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpSettings {
    pub max_connections: Option<i64>,
    pub connect_timeout: Option<String>,
    pub tcp_keepalive: Option<TcpKeepaliveSpec>,
    pub max_connection_duration: Option<String>,
    pub idle_timeout: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct TcpKeepaliveSpec {
    pub probes: Option<i64>,
    pub time: Option<String>,
    pub interval: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpSettings {
    #[serde(rename = "http1MaxPendingRequests")]
    pub http1_max_pending_requests: Option<i64>,
    #[serde(rename = "http2MaxRequests")]
    pub http2_max_requests: Option<i64>,
    #[serde(rename = "maxRequestsPerConnection")]
    pub max_requests_per_connection: Option<i64>,
    #[serde(rename = "maxRetries")]
    pub max_retries: Option<i64>,
    #[serde(rename = "idleTimeout")]
    pub idle_timeout: Option<String>,
    #[serde(rename = "h2UpgradePolicy")]
    pub h2_upgrade_policy: Option<String>,
    #[serde(rename = "useClientProtocol")]
    pub use_client_protocol: Option<bool>,
    // Unsupported: warned.
    #[serde(rename = "maxConcurrentStreams")]
    pub max_concurrent_streams: Option<Value>,
    #[serde(rename = "http2KeepAlive")]
    pub http2_keep_alive: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct OutlierDetectionSpec {
    /// Deprecated: consecutive gateway errors (and it disables the 5xx detector).
    #[serde(rename = "consecutiveErrors")]
    pub consecutive_errors: Option<i64>,
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    #[serde(rename = "consecutiveGatewayErrors")]
    pub consecutive_gateway_errors: Option<i64>,
    #[serde(rename = "consecutiveLocalOriginFailures")]
    pub consecutive_local_origin_failures: Option<i64>,
    #[serde(rename = "splitExternalLocalOriginErrors")]
    pub split_external_local_origin_errors: Option<bool>,
    pub interval: Option<String>,
    #[serde(rename = "baseEjectionTime")]
    pub base_ejection_time: Option<String>,
    #[serde(rename = "maxEjectionPercent")]
    pub max_ejection_percent: Option<i64>,
    #[serde(rename = "minHealthPercent")]
    pub min_health_percent: Option<i64>,
    // Unsupported: warned.
    #[serde(rename = "outlierDetectionHttpErrorCodes")]
    pub outlier_detection_http_error_codes: Option<Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    pub simple: Option<String>,
    /// Integer seconds or a duration string.
    pub warmup_duration_secs: Option<Value>,
    pub warmup: Option<Value>,
    // Unsupported: warned.
    pub consistent_hash: Option<Value>,
    pub locality_lb_setting: Option<Value>,
    pub zone_aware_lb_setting: Option<Value>,
}
