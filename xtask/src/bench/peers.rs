//! Configuration of the upstream and the three proxies, with the same policy everywhere:
//! 10 s request timeout, 2 retries on connect failure / refused stream / 5xx, limits high
//! enough never to trigger, keep-alive on both sides.

use std::path::Path;

/// nginx as the fixed upstream: one process, no master, `200 ok`.
pub fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 \"ok\"; }}
    }}
}}
"
    )
}

/// HAProxy 2.6, one thread; with `access_log`, `option httplog` to stdout.
pub fn haproxy_cfg(port: u16, upstream: u16, access_log: bool, threads: usize) -> String {
    let (global_log, defaults_log) = if access_log {
        (
            "    log stdout format raw local0\n",
            "    log global\n    option httplog\n",
        )
    } else {
        ("", "")
    };
    format!(
        "global
    nbthread {threads}
    maxconn 9000
{global_log}
defaults
{defaults_log}    mode http
    timeout connect 10s
    timeout client 60s
    timeout server 10s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always
    retries 2
    retry-on conn-failure empty-response response-timeout 503

frontend bench
    bind 127.0.0.1:{port}
    maxconn 9000
    default_backend upstream

backend upstream
    server nginx 127.0.0.1:{upstream} maxconn 9000
"
    )
}

/// Envoy, run with `--concurrency 1`: route timeout and retry policy as Istio would
/// generate for the VirtualService, circuit breakers as high as the DestinationRule.
pub fn envoy_yaml(port: u16, admin: u16, upstream: u16, access_log: bool) -> String {
    // Envoy's default format, to stdout, as Istio's `accessLogFile: /dev/stdout` sets it.
    let access_log = if access_log {
        r#"
          access_log:
          - name: envoy.access_loggers.stdout
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"#
    } else {
        ""
    };
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: bench
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench{access_log}
          codec_type: AUTO
          route_config:
            name: bench
            virtual_hosts:
            - name: bench-upstream
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: bench-upstream
                  timeout: 10s
                  retry_policy:
                    retry_on: "connect-failure,refused-stream,5xx"
                    num_retries: 2
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: bench-upstream
    type: STATIC
    connect_timeout: 10s
    circuit_breakers:
      thresholds:
      - {{ max_connections: 10000, max_pending_requests: 10000, max_requests: 10000, max_retries: 10000 }}
    outlier_detection: {{ consecutive_5xx: 100, interval: 10s, base_ejection_time: 30s }}
    load_assignment:
      cluster_name: bench-upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {upstream} }} }} }}
"#
    )
}

/// The Kubernetes and Istio resources `sluice run --config-dir` reads.
pub fn sluice_yaml(upstream: u16) -> String {
    service_yaml("bench-upstream", "10.96.0.10", upstream)
        + "---\n"
        + "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bench-upstream
  namespace: default
spec:
  hosts:
  - bench-upstream
  http:
  - route:
    - destination:
        host: bench-upstream
    timeout: 10s
    retries:
      attempts: 2
      retryOn: connect-failure,refused-stream,5xx
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bench-upstream
  namespace: default
spec:
  host: bench-upstream
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 10000
      http:
        http1MaxPendingRequests: 10000
        http2MaxRequests: 10000
    outlierDetection:
      consecutive5xxErrors: 100
      interval: 10s
      baseEjectionTime: 30s
"
}

/// A Service (port 80) in `default` whose one endpoint is `127.0.0.1:port`, and its
/// EndpointSlice.
pub fn service_yaml(name: &str, ip: &str, port: u16) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: default
spec:
  clusterIP: {ip}
  ports:
  - name: http
    port: 80
    targetPort: {port}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: default
  labels:
    kubernetes.io/service-name: {name}
addressType: IPv4
endpoints:
- addresses: [\"127.0.0.1\"]
  conditions:
    ready: true
ports:
- name: http
  port: {port}
  protocol: TCP
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_carry_the_ports_and_the_policy() {
        let h = haproxy_cfg(8001, 9000, false, 1);
        assert!(h.contains("bind 127.0.0.1:8001") && h.contains("127.0.0.1:9000"));
        assert!(h.contains("retries 2") && h.contains("nbthread 1"));
        assert!(!h.contains("httplog"));
        assert!(haproxy_cfg(8001, 9000, true, 2).contains("    log global\n    option httplog\n"));
        let e = envoy_yaml(8002, 8003, 9000, false);
        assert!(e.contains("port_value: 8002") && e.contains("port_value: 9000"));
        assert!(e.contains("num_retries: 2"));
        assert!(!e.contains("access_log"));
        let logged = envoy_yaml(8002, 8003, 9000, true);
        assert!(logged.contains("StdoutAccessLog"));
        let s = sluice_yaml(9000);
        assert_eq!(s.matches("\n---\n").count(), 3);
        assert!(s.contains("targetPort: 9000") && s.contains("port: 9000"));
        let parsed = sluice_config::parse_str("bench.yaml", &s);
        assert!(parsed.problems.is_empty(), "{:#?}", parsed.problems);
        let (_, problems) =
            sluice_config::build(&parsed.objects, &sluice_config::BuildOptions::default());
        assert!(problems.is_empty(), "{problems:#?}");
        let n = nginx_conf(Path::new("/tmp/x"), 9000);
        assert!(n.contains("listen 127.0.0.1:9000;") && n.contains("pid /tmp/x/nginx.pid;"));
    }
}
