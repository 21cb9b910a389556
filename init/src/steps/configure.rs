//! Renders this boot's host configuration (kubelet, containerd) and, on a
//! master, the control plane's static pods, the add-ons and the master
//! kubelet's own kubeconfig. Everything is rewritten at every boot from the
//! templates; files whose content is unchanged are left alone.

use super::{Context, Master, Report, StepError};
use crate::config::MasterConfig;
use crate::pki::{self, Bundle, PkiError};
use crate::render::{self, Inputs, Target, Templates};
use std::path::{Path, PathBuf};

pub const STEP: &str = "configure";

/// Writes `content` to `path` unless it already holds it; `true` if written.
fn write_if_changed(path: &Path, content: &str, mode: u32) -> Result<bool, PkiError> {
    if std::fs::read(path).is_ok_and(|old| old == content.as_bytes()) {
        return Ok(false);
    }
    // Secrets' directories stay as closed as the tmpfs they are on.
    let dir_mode = if mode & 0o077 == 0 { 0o700 } else { 0o755 };
    pki::write_file(path, content.as_bytes(), mode, dir_mode)?;
    Ok(true)
}

/// The master kubelet's own kubeconfig, on the tmpfs.
pub fn kubelet_conf(ctx: &Context) -> PathBuf {
    ctx.paths.secrets.join("kubelet.conf")
}

/// How close to their end a master's certificates are renewed.
pub fn renew_window(settings: &MasterConfig) -> time::Duration {
    time::Duration::days(i64::from(settings.renew_before_days))
}

/// Whether the kubeconfig at `path` is missing or its certificate ends
/// within `window`.
fn kubelet_conf_due(path: &Path, window: time::Duration) -> Result<bool, PkiError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(true);
    };
    let file = path.display().to_string();
    let (cert, _) = pki::kubeconfig_credentials(&file, &text)?;
    let cert = pki::certificate(&file, &cert)?;
    Ok(cert.not_after - time::OffsetDateTime::now_utc() <= window)
}

/// Writes, once per boot (the tmpfs starts empty), the controller
/// manager's and the scheduler's loopback serving pairs below `pki`
/// ([`pki::loopback_serving`]). Returns how many files it wrote.
fn write_loopback_serving(pki: &Path) -> Result<usize, PkiError> {
    let mut written = 0;
    for (stem, cn) in pki::LOOPBACK_SERVING {
        let crt = pki.join(format!("{stem}.crt"));
        let key = pki.join(format!("{stem}.key"));
        if crt.exists() && key.exists() {
            continue;
        }
        let (cert_pem, key_pem) = pki::loopback_serving(cn, &pki::Validity::now())?;
        pki::write_file(&key, key_pem.as_bytes(), 0o600, 0o700)?;
        pki::write_file(&crt, cert_pem.as_bytes(), 0o600, 0o700)?;
        written += 2;
    }
    Ok(written)
}

pub fn run(ctx: &Context, bundle: &Bundle) -> Result<Report, StepError> {
    let config = &ctx.config;
    let templates = Templates::load(&ctx.paths.manifests)?;
    let pki = ctx.paths.secrets.join("pki");
    let master = Master::if_master(ctx)?;
    let node_name = super::leave::own_node(ctx)?;
    // What only a master's templates use.
    let (token, encryption_key) = match master {
        Some(_) => (
            Some(bundle.get("bootstrap-token")?),
            Some(bundle.get(pki::ENCRYPTION_KEY)?),
        ),
        None => (None, None),
    };
    let files = templates.render(&Inputs {
        config,
        node_name: node_name.clone(),
        node_ip: master.map(|m| m.ip),
        pki: pki.clone(),
        bootstrap_token: token,
        token_expires: master.and(bundle.token_expires.as_deref()),
        encryption_key,
        release: render::image_release(&ctx.paths.etc),
    })?;
    let mut written = 0;
    for f in &files {
        let (root, mode) = match f.target {
            Target::Etc => (&ctx.paths.etc, 0o644),
            Target::Secrets => (&ctx.paths.secrets, 0o600),
        };
        written += usize::from(write_if_changed(&f.destination(root), &f.content, mode)?);
    }
    if master.is_some() {
        written += write_loopback_serving(&pki)?;
    }
    if let Some(m) = master {
        // Signed here at the first boot and again when it nears its end
        // (the renewal restarts kubelet to read it).
        let path = kubelet_conf(ctx);
        if kubelet_conf_due(&path, renew_window(m.settings))? {
            // Its own API server, wherever the API's name points yet.
            let server = "https://127.0.0.1:6443";
            let kubeconfig = bundle.kubelet_kubeconfig(&node_name, server, &config.cluster_name)?;
            written += usize::from(write_if_changed(&path, &kubeconfig, 0o600)?);
        }
    }
    let detail = format!("{} files for {node_name} ({written} written)", files.len());
    Ok(if written > 0 {
        Report::changed(STEP, detail)
    } else {
        Report::already(STEP, detail)
    })
}
