//! Scripted upstreams for the oracle: each answers its requests with the next step of a script
//! (status after a delay; the last step repeats) and counts what it received, so the same
//! sequence can be replayed to Envoy and to Sluice and the attempts each made compared.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Clone, Copy, Debug)]
pub struct Step {
    status: u16,
    delay: Duration,
    headers: &'static [(&'static str, &'static str)],
}

impl Step {
    pub fn status(status: u16) -> Self {
        Self::delayed(status, 0)
    }

    pub fn delayed(status: u16, delay_ms: u64) -> Self {
        Self {
            status,
            delay: Duration::from_millis(delay_ms),
            headers: &[],
        }
    }

    /// The same answer with these response headers.
    pub fn with_headers(self, headers: &'static [(&'static str, &'static str)]) -> Self {
        Self { headers, ..self }
    }
}

/// The body of every scripted answer (anything else a client gets is the proxy's own reply).
pub const BODY: &str = "scripted";

/// Request headers the proxies add for the upstream, recorded per request.
pub const RECORDED: &[&str] = &["x-envoy-attempt-count", "x-envoy-expected-rq-timeout-ms"];

/// What an endpoint does with its requests, in order.
#[derive(Clone, Debug)]
pub struct Script {
    first: Vec<Step>,
    then: Option<Step>,
}

impl Script {
    /// `first` in order, then `then` for every later request.
    pub fn new(first: Vec<Step>, then: Step) -> Self {
        Self {
            first,
            then: Some(then),
        }
    }

    pub fn repeat(step: Step) -> Self {
        Self::new(Vec::new(), step)
    }

    /// Nothing listens: connections are refused.
    pub fn refused() -> Self {
        Self {
            first: Vec::new(),
            then: None,
        }
    }
}

struct State {
    script: Script,
    served: usize,
    /// Connections accepted since the last reset.
    connections: usize,
    /// Per request: `name=value` of each [`RECORDED`] header present, and `body=<bytes>` when the
    /// request had a body.
    seen: Vec<String>,
}

/// One endpoint; stops with the test's runtime.
pub struct Upstream {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Upstream {
    pub async fn start(script: Script) -> Self {
        let state = Arc::new(Mutex::new(State {
            script: script.clone(),
            served: 0,
            connections: 0,
            seen: Vec::new(),
        }));
        if script.then.is_none() {
            return Self {
                port: sluice_tests::refusing_port(),
                state,
            };
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let port = listener.local_addr().unwrap().port();
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                shared.lock().connections += 1;
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let mut recorded: Vec<String> = RECORDED
                            .iter()
                            .filter_map(|h| {
                                let v = req.headers().get(*h)?.to_str().ok()?;
                                Some(format!("{h}={v}"))
                            })
                            .collect();
                        let state = state.clone();
                        async move {
                            // The whole request first, as an application reads it; its size is
                            // part of what the upstream saw.
                            let len = match req.into_body().collect().await {
                                Ok(body) => body.to_bytes().len(),
                                Err(_) => return Err("request body failed"),
                            };
                            if len > 0 {
                                recorded.push(format!("body={len}"));
                            }
                            let step = {
                                let mut s = state.lock();
                                s.seen.push(recorded.join(" "));
                                let step = s
                                    .script
                                    .first
                                    .get(s.served)
                                    .copied()
                                    .or(s.script.then)
                                    .expect("a listening script has a last step");
                                s.served += 1;
                                step
                            };
                            tokio::time::sleep(step.delay).await;
                            let mut rsp =
                                Response::new(Full::new(Bytes::from(format!("{BODY}\n"))));
                            *rsp.status_mut() = StatusCode::from_u16(step.status).unwrap();
                            for (name, value) in step.headers {
                                rsp.headers_mut().insert(*name, value.parse().unwrap());
                            }
                            Ok::<_, &'static str>(rsp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { port, state }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Requests received since the last reset.
    pub fn served(&self) -> usize {
        self.state.lock().served
    }

    /// Connections accepted since the last reset.
    pub fn connections(&self) -> usize {
        self.state.lock().connections
    }

    /// The recorded headers of each request since the last reset.
    pub fn seen(&self) -> Vec<String> {
        self.state.lock().seen.clone()
    }

    /// Starts the script over (a connection refused stays refused).
    pub fn reset(&self, script: Script) {
        let mut s = self.state.lock();
        s.script = script;
        s.served = 0;
        s.connections = 0;
        s.seen.clear();
    }
}
