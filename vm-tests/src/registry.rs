//! Debian's `docker-registry` (the CNCF distribution registry) on a free
//! loopback port, storing into a temporary directory; one per test, killed
//! when the handle drops. Tests reach its blob files to tamper with them.

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BINARY: &str = "/usr/bin/docker-registry";

#[derive(Debug)]
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    data: PathBuf,
    /// `127.0.0.1:<port>`: what image references name.
    pub host: String,
}

impl Registry {
    /// A registry with throwaway storage.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// A registry storing below `data` (kept after it stops), or in a
    /// temporary directory.
    pub fn start_with(data: Option<&Path>) -> Result<Self> {
        if !Path::new(BINARY).exists() {
            bail!("{BINARY} is missing: run `just deps` (it installs Debian's docker-registry)");
        }
        let port = crate::free_port()?;
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                data.map_or_else(|| dir.path().join("data"), Path::to_path_buf).display()
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new(BINARY)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {BINARY}"))?;
        let mut registry = Self {
            child,
            data: data.map_or_else(|| dir.path().join("data"), Path::to_path_buf),
            dir,
            host: format!("127.0.0.1:{port}"),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(status) = registry.child.try_wait()? {
                bail!(
                    "docker-registry exited early ({status}): {}",
                    registry.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "docker-registry did not listen on {addr}: {}",
                    registry.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps the blob with this `sha256:` digest.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
