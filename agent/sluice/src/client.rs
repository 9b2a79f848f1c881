//! The operator side: talks to a running agent's admin API (its Unix socket, or 127.0.0.1:15000)
//! with the typed answers of `sluice-admin-api`, and prints tables.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use sluice_admin_api as api;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Where the agent's admin API is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Target {
    /// `--admin ADDR` wins, then `--admin-socket PATH`; with neither, the default socket when it
    /// exists (the agent on this node), else the default address.
    pub fn choose(admin: Option<SocketAddr>, socket: Option<PathBuf>) -> Self {
        match (admin, socket) {
            (Some(addr), _) => Self::Tcp(addr),
            (None, Some(path)) => Self::Unix(path),
            (None, None) => {
                let socket = PathBuf::from(api::DEFAULT_SOCKET);
                if socket.exists() {
                    Self::Unix(socket)
                } else {
                    Self::Tcp(api::DEFAULT_ADDR.parse().expect("a valid default address"))
                }
            }
        }
    }

    fn connect(&self) -> Result<Box<dyn ReadWrite>> {
        match self {
            Self::Tcp(addr) => {
                let s = TcpStream::connect_timeout(addr, Duration::from_secs(2)).with_context(|| {
                    format!("cannot reach the agent's admin API at {addr}: is `sluice run` running on this node? (pass --admin ADDR or --admin-socket PATH if it listens elsewhere)")
                })?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                Ok(Box::new(s))
            }
            Self::Unix(path) => {
                let s = UnixStream::connect(path).with_context(|| {
                    let why = if !path.exists() {
                        "it does not exist: is `sluice run` running on this node?"
                    } else {
                        "nobody answers on it (the agent stopped?), or you may not use it (it is mode 0600: run as root)"
                    };
                    format!("cannot reach the agent's admin socket {}: {why} (pass --admin-socket PATH, or --admin ADDR for TCP)", path.display())
                })?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                Ok(Box::new(s))
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

trait ReadWrite: Read + Write {
    fn no_timeout(&self);
}

impl ReadWrite for TcpStream {
    fn no_timeout(&self) {
        let _ = self.set_read_timeout(None);
    }
}

impl ReadWrite for UnixStream {
    fn no_timeout(&self) {
        let _ = self.set_read_timeout(None);
    }
}

/// One HTTP/1.0 request to the admin API; the body of a 2xx answer.
pub fn request(target: &Target, method: &str, path: &str) -> Result<String> {
    let mut stream = target.connect()?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n"
    )?;
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .context("reading the admin API's answer")?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw.as_str(), ""));
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if !status.starts_with('2') {
        bail!("admin API answered {path} with {status}: {}", body.trim());
    }
    Ok(body.to_owned())
}

/// A typed GET.
pub fn get<T: DeserializeOwned>(target: &Target, path: &str) -> Result<T> {
    let body = request(target, "GET", path)?;
    serde_json::from_str(&body).with_context(|| {
        format!("the admin API's answer to {path} is not what this `sluice` expects (an agent of another version?)")
    })
}

/// Calls `line` with each line of a streamed GET until it returns false or the stream ends.
pub fn stream(
    target: &Target,
    path: &str,
    mut line: impl FnMut(&str) -> Result<bool>,
) -> Result<()> {
    let mut stream = target.connect()?;
    // A live stream may be quiet for long: no read timeout.
    stream.no_timeout();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut reader = BufReader::new(stream);
    let mut buf = String::new();
    // The response head.
    reader.read_line(&mut buf)?;
    let status = buf.split_whitespace().nth(1).unwrap_or("").to_owned();
    loop {
        buf.clear();
        if reader.read_line(&mut buf)? == 0 || buf == "\r\n" {
            break;
        }
    }
    if !status.starts_with('2') {
        let mut body = String::new();
        reader.read_to_string(&mut body)?;
        bail!("admin API answered {path} with {status}: {}", body.trim());
    }
    loop {
        buf.clear();
        if reader.read_line(&mut buf)? == 0 {
            return Ok(());
        }
        if !line(buf.trim_end_matches(['\r', '\n']))? {
            return Ok(());
        }
    }
}

/// Percent-encodes a query value.
pub fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_queries() {
        assert_eq!(encode_query("pricing.default"), "pricing.default");
        assert_eq!(encode_query("a b,c=d"), "a%20b%2Cc%3Dd");
    }

    #[test]
    fn explicit_targets_win() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            Target::choose(Some(addr), Some("/x".into())),
            Target::Tcp(addr)
        );
        assert_eq!(
            Target::choose(None, Some("/x".into())),
            Target::Unix("/x".into())
        );
    }

    #[test]
    fn a_missing_socket_says_the_agent_is_not_running() {
        let dir = tempfile::tempdir().unwrap();
        let t = Target::Unix(dir.path().join("admin.sock"));
        let err = format!("{:#}", request(&t, "GET", "/status").unwrap_err());
        assert!(
            err.contains("is `sluice run` running on this node?"),
            "{err}"
        );
    }
}
