//! `fake-service`: reads the image's environment variables, listens, prints
//! `listening on ADDR` once ready, and serves until SIGINT or SIGTERM.

use std::io::Write;

use anyhow::Context;
use fake_service::{serve, Config};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env().context("bad configuration")?;
    let listener = TcpListener::bind(cfg.listen_addr)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen_addr))?;
    let addr = listener.local_addr()?;
    // Tests and scripts wait for this line (LISTEN_ADDR may end in :0).
    println!("listening on {addr}");
    std::io::stdout().flush()?;

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        res = serve(cfg, listener) => res.context("server stopped")?,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
