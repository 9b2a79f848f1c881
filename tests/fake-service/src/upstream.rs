//! Calls to `UPSTREAM_URIS`: a pooled HTTP/1.1 client that goes direct or through an
//! HTTP proxy, and the translation of each answer into a nested [`Response`].

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::config::Config;
use crate::response::Response;

/// The upstream client; cheap to clone.
#[derive(Clone)]
pub struct Upstreams {
    client: Client<Connector, Empty<Bytes>>,
    cfg: std::sync::Arc<Config>,
}

impl Upstreams {
    pub fn new(cfg: std::sync::Arc<Config>) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        if !cfg.client_keep_alive {
            builder.pool_max_idle_per_host(0);
        }
        let client = builder.build(Connector { cfg: cfg.clone() });
        Self { client, cfg }
    }

    /// Calls `uri` once and describes the outcome; `Err` carries the same description
    /// when the call counts as failed (unreachable, timed out, or not 200).
    pub async fn call(
        &self,
        raw_uri: &str,
        inbound: &http::request::Parts,
    ) -> Result<Response, Response> {
        let target = match raw_uri.parse::<Uri>() {
            Ok(uri) if self.cfg.append_request => append_path(raw_uri, &uri, inbound.uri.path()),
            Ok(uri) => uri,
            Err(e) => {
                return Err(Response {
                    uri: raw_uri.to_owned(),
                    code: -1,
                    error: format!("Error creating upstream request: {e}"),
                    ..Default::default()
                })
            }
        };
        let mut req = Request::get(target.clone())
            .body(Empty::<Bytes>::new())
            .expect("a GET with a parsed URI is valid");
        if self.cfg.append_request {
            copy_headers(&inbound.headers, req.headers_mut());
        }
        if !self.cfg.client_keep_alive {
            req.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }

        let exchange = async {
            let resp = self.client.request(req).await?;
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, bytes))
        };
        let outcome = tokio::time::timeout(self.cfg.upstream_timeout, exchange).await;

        let mut r = Response::default();
        let result = match outcome {
            Err(_) => Err(format!(
                "Error communicating with upstream service: Get \"{target}\": timed out after {} (HTTP_CLIENT_REQUEST_TIMEOUT)",
                crate::duration::format(self.cfg.upstream_timeout)
            )),
            Ok(Err(e)) => Err(format!(
                "Error communicating with upstream service: Get \"{target}\": {}",
                error_chain(&*e)
            )),
            Ok(Ok((parts, bytes))) => {
                // A body that is not ours (say, a proxy's own error page) leaves the
                // nested response blank, as in the image.
                r = serde_json::from_slice(&bytes).unwrap_or_default();
                r.code = i32::from(parts.status.as_u16());
                r.headers = canonical_headers(&parts.headers);
                if parts.status == http::StatusCode::OK {
                    Ok(())
                } else {
                    Err(format!(
                        "Error processing upstream request: {target}, expected code 200, got {}",
                        parts.status.as_u16()
                    ))
                }
            }
        };
        r.uri = raw_uri.to_owned();
        match result {
            Ok(()) => Ok(r),
            Err(e) => {
                if r.code == 0 {
                    r.code = -1;
                }
                r.error = e;
                Err(r)
            }
        }
    }
}

/// The image appends the inbound path to the upstream's path (`http://pricing` + `/` ->
/// `http://pricing/`).
fn append_path(raw: &str, uri: &Uri, inbound_path: &str) -> Uri {
    // `Uri` turns an empty path into "/", so look at what was written.
    let after_scheme = raw.split_once("://").map_or(raw, |(_, rest)| rest);
    let base = if after_scheme.contains('/') {
        uri.path()
    } else {
        ""
    };
    let mut path = format!("{base}{inbound_path}");
    if let Some(q) = uri.query() {
        path = format!("{path}?{q}");
    }
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path.parse().ok();
    Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
}

/// Copies the inbound headers (trace ids, `x-envoy-*`, ...) except per-hop ones.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    const SKIP: [HeaderName; 8] = [
        header::HOST,
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::TRAILER,
    ];
    for (name, value) in from {
        if !SKIP.contains(name)
            && name != "keep-alive"
            && name != "proxy-connection"
            && !to.contains_key(name)
        {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Response headers as Go reports them: `Content-Type`, values joined with commas.
fn canonical_headers(headers: &HeaderMap) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for name in headers.keys() {
        let canonical = name
            .as_str()
            .split('-')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("-");
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        out.insert(canonical, joined);
    }
    out
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

/// Connects to the upstream, or to the proxy when one applies; in the latter case the
/// connection says so, and hyper then writes requests in absolute form
/// (`GET http://pricing/ HTTP/1.1`).
#[derive(Clone)]
struct Connector {
    cfg: std::sync::Arc<Config>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let cfg = self.cfg.clone();
        Box::pin(async move {
            let host = dst
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "URI without host"))?;
            let proxied = cfg.proxied(host);
            let (host, port) = match (&cfg.http_proxy, proxied) {
                (Some(proxy), true) => (
                    proxy.host().unwrap_or_default().to_owned(),
                    proxy.port_u16().unwrap_or(80),
                ),
                _ => (host.to_owned(), dst.port_u16().unwrap_or(80)),
            };
            // `[::1]` style hosts keep their brackets in a URI.
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            Ok(Stream {
                io: TokioIo::new(tcp),
                proxied,
            })
        })
    }
}

/// A TCP connection that remembers whether it leads to a proxy.
struct Stream {
    io: TokioIo<TcpStream>,
    proxied: bool,
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        Connected::new().proxy(self.proxied)
    }
}

impl hyper::rt::Read for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_the_inbound_path_like_the_image() {
        let at = |raw: &str, path| append_path(raw, &raw.parse().unwrap(), path).to_string();
        assert_eq!(at("http://pricing", "/"), "http://pricing/");
        assert_eq!(at("http://pricing", "/a/b"), "http://pricing/a/b");
        assert_eq!(at("http://pricing/", "/"), "http://pricing//");
        assert_eq!(
            at("http://pricing:8080/api", "/"),
            "http://pricing:8080/api/"
        );
    }

    #[test]
    fn canonicalizes_header_names() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/plain".parse().unwrap());
        h.append("x-envoy-upstream-service-time", "3".parse().unwrap());
        h.append("set-thing", "a".parse().unwrap());
        h.append("set-thing", "b".parse().unwrap());
        let c = canonical_headers(&h);
        assert_eq!(c["Content-Type"], "text/plain");
        assert_eq!(c["X-Envoy-Upstream-Service-Time"], "3");
        assert_eq!(c["Set-Thing"], "a,b");
    }
}
