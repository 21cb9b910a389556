//! A real moto server (pinned in `vm-tests/requirements.txt`, installed into
//! the cache's venv by `just deps`) on a free loopback port, one per test so
//! tests never share AWS state. Killed when the handle drops.

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

fn moto_server() -> PathBuf {
    match std::env::var_os("SLIPWAY_MOTO_SERVER") {
        Some(p) => PathBuf::from(p),
        None => venv_bin("moto_server"),
    }
}

/// A program from the test venv that `just deps` installs into the cache
/// (moto, cfn-lint: the versions pinned in `vm-tests/requirements.txt`).
pub fn venv_bin(name: &str) -> PathBuf {
    crate::cache_dir().join("venv/bin").join(name)
}

/// checkov, from the venv of its own that `just deps` installs
/// (`vm-tests/requirements-checkov.txt`).
pub fn checkov_bin() -> PathBuf {
    crate::cache_dir().join("checkov-venv/bin/checkov")
}

/// Credentials moto accepts; set once for the SDK's default chain.
pub fn fake_credentials() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    });
}

impl Moto {
    pub fn start() -> Result<Self> {
        fake_credentials();
        let bin = moto_server();
        if !bin.exists() {
            bail!(
                "{} is missing: run `just deps` (it installs moto into the cache's venv)",
                bin.display()
            );
        }
        let port = crate::free_port()?;
        let child = crate::die_with_parent(&mut Command::new(&bin))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut moto = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let start = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = moto.child.try_wait() {
                bail!("moto exited at start: {status}");
            }
            if start.elapsed() > Duration::from_secs(30) {
                bail!("moto did not listen on {addr} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(Some(status)) = moto.child.try_wait() {
            bail!("moto exited at start ({status}): something else answers on {addr}");
        }
        Ok(moto)
    }
}

impl Moto {
    /// Every A record of moto's hosted zones now (name without the final
    /// dot, first address), from moto's own model rather than Route 53's API:
    /// moto refuses Route 53's signed GETs once IAM is enforced (it
    /// computes another signature for them). The dump holds every model,
    /// so this is for a test's one look, not for polling.
    pub fn a_records(&self) -> Result<std::collections::BTreeMap<String, std::net::Ipv4Addr>> {
        let (status, body) =
            crate::iam::http("GET", &self.endpoint, "/moto-api/data.json", &[], "")?;
        anyhow::ensure!(status == 200, "moto's model dump: {status}");
        let data: serde_json::Value = serde_json::from_str(&body)?;
        // Every record set moto ever made stays in the dump; each zone's
        // accepted changes, replayed in order, say which are current.
        let mut records = std::collections::BTreeMap::new();
        let changes = data["route53"]["FakeZone"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|z| z["rr_changes"].as_array().into_iter().flatten());
        for change in changes {
            let set = &change["ResourceRecordSet"];
            let text = |v: &serde_json::Value| v.as_str().map(str::to_owned).unwrap_or_default();
            crate::faults::apply_change(
                &mut records,
                &text(&change["Action"]),
                &text(&set["Type"]),
                &text(&set["Name"]),
                &text(&set["ResourceRecords"][0]["Value"]),
            );
        }
        Ok(records)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
