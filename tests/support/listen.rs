//! `sluice run`'s listeners on loopback ports the kernel chooses. A test that picked a free port
//! itself (bind port 0, read it, close) and handed the number over would race every other test
//! running in parallel for it, connections' own ephemeral ports included; the agent binds port 0
//! instead and writes what it bound to `--address-file`, which the test reads back.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;
use tokio::time::Instant;

/// Where an agent writes its addresses (a file in the test's own temporary directory).
pub struct Listen {
    file: PathBuf,
}

/// The addresses an agent listens on.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub ready: SocketAddr,
}

impl Listen {
    /// The address file `name` in `dir`.
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            file: dir.join(name),
        }
    }

    /// `sluice run`'s arguments: all four listeners on 127.0.0.1 port 0, and the address file.
    pub fn args(&self) -> Vec<OsString> {
        let mut args = vec!["--outbound-addr".into(), "127.0.0.1:0".into()];
        args.extend(self.local_args());
        args
    }

    /// The same without `--outbound-addr`, for an agent whose outbound listener is elsewhere
    /// (with `--redirect ebpf` the programs need its port before it is bound).
    pub fn local_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = [
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--ready-addr",
            "127.0.0.1:0",
            "--address-file",
        ]
        .map(OsString::from)
        .to_vec();
        args.push(self.file.clone().into_os_string());
        args
    }

    /// Waits, at most `within`, until the agent has written its addresses; an error if it
    /// exits (or has not written them) first.
    pub async fn bound(&self, agent: &mut Child, within: Duration) -> Result<Bound, String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(bound) = self.try_read() {
                return Ok(bound);
            }
            if let Ok(Some(status)) = agent.try_wait() {
                return Err(format!("sluice run exited with {status} before listening"));
            }
            if Instant::now() >= deadline {
                return Err(format!("sluice run did not listen within {within:?}"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// [`Listen::bound`], panicking with the agent's log (`log`, its stderr) if it fails.
    pub async fn expect_bound(&self, agent: &mut Child, within: Duration, log: &Path) -> Bound {
        match self.bound(agent, within).await {
            Ok(bound) => bound,
            Err(e) => panic!("{e}:\n{}", std::fs::read_to_string(log).unwrap_or_default()),
        }
    }

    /// The addresses, if the agent has written them (it writes the whole file at once, so a
    /// file that does not parse is a defect, and panics).
    pub fn try_read(&self) -> Option<Bound> {
        let text = std::fs::read_to_string(&self.file).ok()?;
        let file = self.file.display();
        let l: sluice_admin_api::Listeners =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}:\n{text}"));
        let addr =
            |s: &str| -> SocketAddr { s.parse().unwrap_or_else(|e| panic!("{file}: {s:?}: {e}")) };
        Some(Bound {
            outbound: addr(&l.outbound),
            admin: addr(&l.admin),
            metrics: addr(&l.metrics),
            ready: addr(&l.ready),
        })
    }
}
