//! The admin API's Unix socket: created mode 0600 (only root on the node, or whoever runs the
//! agent, may use it), a stale file from a killed agent replaced, a live agent's socket left alone,
//! and removed when the agent stops.

use anyhow::{Context, Result};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use tokio::net::UnixListener;

/// The socket while the agent serves it; its file goes when this is dropped.
pub struct AdminSocket {
    pub listener: Option<UnixListener>,
    path: PathBuf,
}

impl AdminSocket {
    /// Binds `path`. Another agent answering on it already keeps it (this one then serves the
    /// admin API on TCP only, with a warning): two agents on one node is a test or a mistake,
    /// and taking the socket from the running one would hide it.
    pub fn bind(path: &Path) -> Result<Option<Self>> {
        if let Some(dir) = path.parent().filter(|d| !d.exists()) {
            // A directory made here is the agent's alone (0700): nobody reaches the socket in the
            // moment between its bind and its chmod.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {} for --admin-socket", dir.display()))?;
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                tracing::warn!(socket = %path.display(), "another agent serves the admin socket; serving the admin API on TCP only");
                return Ok(None);
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale admin socket {}", path.display()))?;
        }
        let listener = UnixListener::bind(path).with_context(|| {
            format!(
                "cannot listen on the admin socket {} (pass --admin-socket PATH or none)",
                path.display()
            )
        })?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Some(Self {
            listener: Some(listener),
            path: path.to_owned(),
        }))
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
