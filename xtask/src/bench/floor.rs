//! The floor under Sluice's figures: a reverse proxy of bare hyper on the runtime Sluice uses (one
//! current-thread tokio runtime, hyper's HTTP/1.1 server and client, keep-alive connections to the
//! upstream kept for reuse) and nothing else: no routing, policy, timers, retries, metrics, records
//! or trace headers. The bench runs it beside Sluice so that what Sluice's own work costs per
//! request is measured apart from what its HTTP stack costs.

use anyhow::{Context, Result};
use clap::Args;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct FloorArgs {
    /// Where it listens.
    #[arg(long)]
    pub listen: SocketAddr,
    /// The one upstream every request goes to.
    #[arg(long)]
    pub upstream: SocketAddr,
}

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Idle upstream connections, most recently used last.
type Idle = Arc<Mutex<Vec<SendRequest<Incoming>>>>;

/// Entry point of the hidden `cargo xtask floor-proxy` subcommand (run pinned by `bench`).
pub fn main(args: FloorArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: FloorArgs) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let (idle, upstream) = (Idle::default(), args.upstream);
    let svc = hyper::service::service_fn(move |req| forward(idle.clone(), upstream, req));
    crate::http1::serve(listener, svc).await;
    anyhow::bail!("accepting on {} failed", args.listen)
}

/// One request to the upstream in origin form on an idle connection (a new one when none is
/// ready); the connection is offered for reuse once the response head is in. A failure is a 502.
async fn forward(
    idle: Idle,
    upstream: SocketAddr,
    mut req: http::Request<Incoming>,
) -> Result<http::Response<Body>, hyper::Error> {
    let origin = req.uri().path_and_query().cloned();
    *req.uri_mut() = origin.map(http::Uri::from).unwrap_or_default();
    let Some(mut send) = connection(&idle, upstream).await else {
        return Ok(bad_gateway());
    };
    let rsp = send.send_request(req).await;
    idle.lock().push(send);
    Ok(match rsp {
        Ok(rsp) => rsp.map(BodyExt::boxed_unsync),
        Err(_) => bad_gateway(),
    })
}

async fn connection(idle: &Idle, upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    loop {
        let reuse = idle.lock().pop();
        let Some(mut send) = reuse else { break };
        // Ready once its previous response has been read to the end; closed ones are dropped.
        if send.ready().await.is_ok() {
            return Some(send);
        }
    }
    crate::http1::connect(upstream).await
}

fn bad_gateway() -> http::Response<Body> {
    let mut rsp = http::Response::new(
        Full::new(Bytes::new())
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *rsp.status_mut() = http::StatusCode::BAD_GATEWAY;
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request through the floor reaches the upstream in origin form and its answer comes back;
    /// with the upstream gone, a 502.
    #[test]
    fn forwards_and_reports_a_dead_upstream() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = up.local_addr().unwrap();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let svc = hyper::service::service_fn({
                let seen = seen.clone();
                move |req: http::Request<Incoming>| {
                    seen.lock().push(req.uri().to_string());
                    async {
                        Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from("up"))))
                    }
                }
            });
            tokio::spawn(crate::http1::serve(up, svc));
            let mut send = floor_to(upstream).await;
            let get = |path: &str| {
                http::Request::get(format!("http://bench-upstream{path}"))
                    .header("host", "bench-upstream")
                    .body(Full::new(Bytes::new()))
                    .unwrap()
            };
            for _ in 0..3 {
                let rsp = send.send_request(get("/a?b=1")).await.unwrap();
                assert_eq!(rsp.status(), 200);
                let body = rsp.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], b"up");
            }
            // Each reached the upstream in origin form.
            assert_eq!(*seen.lock(), vec!["/a?b=1"; 3]);

            // A floor whose upstream port has no listener answers 502.
            let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let upstream = dead.local_addr().unwrap();
            drop(dead);
            let rsp = floor_to(upstream).await.send_request(get("/")).await;
            assert_eq!(rsp.unwrap().status(), 502);
        });
    }

    /// A floor proxy to `upstream` on a free port, and a client connection to it (bounded wait).
    async fn floor_to(
        upstream: SocketAddr,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = front.local_addr().unwrap();
        drop(front);
        tokio::spawn(serve(FloorArgs { listen, upstream }));
        for _ in 0..100 {
            if let Some(send) = crate::http1::connect(listen).await {
                return send;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the floor proxy did not listen within 1 s")
    }
}
