//! The renewal on a running master (`slipway-init renew`, hourly from a
//! timer): the boot's own PKI step, which renews the due leaves of the
//! shared bundle and replaces the bootstrap token at half its life, the
//! files rendered again, the new token's Secret applied, and, when
//! certificates changed, the control plane restarted one component at a time so that
//! each reads its new files: etcd first (the API server's backend), then
//! the API server (waited for until it is ready), then its clients, then
//! kubelet if its own kubeconfig was renewed. What is still owed to the
//! running control plane is marked on the tmpfs first, so a run that
//! dies halfway is finished by the next one.
//!
//! Leaf keys survive a renewal, so the order is for a calm restart rather
//! than for trust: old and new certificates verify alike throughout.

use super::{configure, eip, secrets, Context, Master, Report, StepError};
use crate::pki::{self, Certificate};
use crate::retry::{self, Backoff};
use time::OffsetDateTime;

pub const STEP: &str = "renew";

/// The static pods' containers, in the order a renewal restarts them.
pub const ORDER: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
];

/// The owed item that stands for the restarted API server becoming ready.
/// It is a line of its own after the API server's restart, so a run that
/// gives up waiting owes only the wait: stopping a slow API server again
/// each time would keep it from ever getting ready.
const API_READY: &str = "kube-apiserver/readyz";

/// What a renewal owes the running control plane, in order: each
/// component's restart, and the API server's readiness after its own.
fn restart_work() -> Vec<&'static str> {
    ORDER
        .iter()
        .flat_map(|&c| {
            if c == "kube-apiserver" {
                vec![c, API_READY]
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Runs crictl against containerd's CRI socket (named, so crictl does not
/// probe for others) with a request timeout a busy master's runtime meets:
/// crictl's default of 2 s can run out for a stop or a listing under load,
/// and a failed call ends the run that made it.
pub(crate) fn crictl(ctx: &Context, args: &[&str]) -> Result<String, StepError> {
    let mut all = vec![
        "--runtime-endpoint=unix:///run/containerd/containerd.sock",
        "--timeout=60s",
    ];
    all.extend_from_slice(args);
    ctx.runner.run("crictl", &all)
}

pub async fn run(ctx: &Master<'_>) -> Result<Report, StepError> {
    // The Elastic IP's address is one of the API server certificate's names.
    let (r, public_ip) = eip::run(ctx).await?;
    r.log();
    let kubelet_conf = configure::kubelet_conf(ctx);
    let kubelet_before = std::fs::read(&kubelet_conf).ok();
    let outcome = secrets::master_outcome(ctx, Some(public_ip)).await?;
    outcome.report.log();
    configure::run(ctx, &outcome.bundle)?.log();
    let kubelet_renewed = std::fs::read(&kubelet_conf).ok() != kubelet_before;
    // What the bundle's change still asks of this master, kept on the
    // tmpfs until done: a run that dies between the bucket and the API
    // leaves it for the next run, which finds nothing due in the bucket.
    let token_pending = Pending::new(ctx, "token");
    let restart_pending = Pending::new(ctx, "restart");
    if outcome.rotated.is_some() {
        token_pending.set()?;
    }
    if !outcome.renewed.is_empty() {
        restart_pending.set_all(&restart_work())?;
    }
    let mut done = Vec::new();
    if token_pending.is_set() {
        // The new token's Secret, and the end of tokens that never expire.
        let kubectl = super::addons::kubectl(ctx);
        let file = ctx
            .paths
            .secrets
            .join("addons")
            .join(super::addons::TOKEN_FILE);
        let file = file.to_string_lossy();
        kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=slipway",
            "-f",
            &file,
        ])?;
        super::addons::retire_tokens(ctx)?;
        token_pending.clear()?;
        done.push("applied the new bootstrap token".to_owned());
    }
    let mut restarted = Vec::new();
    if restart_pending.is_set() {
        // Only what is still owed: a component restarted by a run that
        // died later already serves the new certificates, and stopping it
        // again (etcd above all) would only take the API away once more.
        let owed = restart_pending.owed()?;
        for (done, item) in owed.iter().enumerate() {
            if item == API_READY {
                api_ready(ctx).await?;
            } else {
                restart(ctx, item).await?;
                restarted.push(item.clone());
            }
            restart_pending.set_all(&owed[done + 1..])?;
        }
        restart_pending.clear()?;
    }
    if kubelet_renewed {
        ctx.runner
            .run("systemctl", &["restart", "kubelet.service"])?;
        restarted.push("kubelet".to_owned());
    }
    if !restarted.is_empty() {
        done.push(format!("renewed; restarted {}", restarted.join(", ")));
    }
    if done.is_empty() {
        return Ok(Report::already(STEP, "no certificate or token is due"));
    }
    Ok(Report::changed(STEP, done.join("; ")))
}

/// A marker on the tmpfs (`/run/slipway/renew-<what>.pending`): work a
/// renewal still owes the running control plane, one item (a component to
/// restart) per line. Gone at reboot, when the boot starts everything from
/// the new files anyway.
struct Pending(std::path::PathBuf);

impl Pending {
    fn new(ctx: &Context, what: &str) -> Self {
        Self(ctx.paths.run.join(format!("renew-{what}.pending")))
    }
    fn is_set(&self) -> bool {
        self.0.exists()
    }
    /// Marks the work as owed (work without items: a token to apply).
    fn set(&self) -> Result<(), StepError> {
        self.set_all::<&str>(&[])
    }
    /// Marks the work as owed, with `items` still to do.
    fn set_all<S: AsRef<str>>(&self, items: &[S]) -> Result<(), StepError> {
        let text: String = items.iter().map(|i| format!("{}\n", i.as_ref())).collect();
        pki::write_file(&self.0, text.as_bytes(), 0o600, 0o755)?;
        Ok(())
    }
    /// The items still owed.
    fn owed(&self) -> Result<Vec<String>, StepError> {
        let text = std::fs::read_to_string(&self.0).map_err(|e| StepError::Invalid {
            what: self.0.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(text.lines().map(str::to_owned).collect())
    }
    fn clear(&self) -> Result<(), StepError> {
        match std::fs::remove_file(&self.0) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StepError::Invalid {
                what: self.0.display().to_string(),
                message: e.to_string(),
            }),
            _ => Ok(()),
        }
    }
}

/// The IDs of `name`'s running containers.
pub(crate) fn running(ctx: &Context, name: &str) -> Result<Vec<String>, StepError> {
    let exact = format!("^{name}$");
    let out = crictl(
        ctx,
        &["ps", "--state", "running", "--name", &exact, "--quiet"],
    )?;
    Ok(out.split_whitespace().map(str::to_owned).collect())
}

/// Stops `name`'s running container and waits until kubelet runs a new
/// one (up to `restart`). A component not running now is left to kubelet.
async fn restart(ctx: &Context, name: &str) -> Result<(), StepError> {
    let old = running(ctx, name)?;
    if old.is_empty() {
        tracing::warn!(step = STEP, "{name} is not running; kubelet starts it");
        return Ok(());
    }
    for id in &old {
        crictl(ctx, &["stop", "--timeout", "30", id])?;
    }
    retry::until(
        &format!("waiting for kubelet to run {name} again"),
        Backoff::new(ctx.deadlines.restart),
        || async {
            let now = running(ctx, name).unwrap_or_default();
            Ok::<_, StepError>(now.iter().any(|id| !old.contains(id)).then_some(()))
        },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))?;
    tracing::info!(step = STEP, "restarted {name}");
    Ok(())
}

/// Waits for the restarted API server to be ready (up to `restart`).
async fn api_ready(ctx: &Context) -> Result<(), StepError> {
    let kubectl = super::addons::kubectl(ctx);
    retry::until(
        "waiting for the restarted API server to be ready",
        Backoff::new(ctx.deadlines.restart),
        || async { Ok::<_, StepError>(kubectl(&["get", "--raw=/readyz"]).ok().map(|_| ())) },
    )
    .await
    .map_err(|e| StepError::Wait(e.to_string()))
}

/// Every certificate of the cluster's bundle (and this master's kubelet
/// client certificate, when it has one) with its end and the days left,
/// the bootstrap token, and the time of the last renewal: what
/// `slipway-init certs` prints.
pub async fn status(ctx: &Master<'_>, now: OffsetDateTime) -> Result<String, StepError> {
    let bundle = secrets::shared(ctx)
        .await?
        .ok_or_else(|| StepError::Invalid {
            what: secrets::pki_key(&ctx.config.cluster_name),
            message: "the cluster has no PKI yet (its first master creates it)".into(),
        })?;
    let mut certs = bundle.certificates()?;
    let kubelet_conf = configure::kubelet_conf(ctx);
    if let Ok(text) = std::fs::read_to_string(&kubelet_conf) {
        let (cert, _) = pki::kubeconfig_credentials("kubelet.conf", &text)?;
        certs.push(pki::certificate("kubelet.conf (this master)", &cert)?);
    }
    let window = configure::renew_window(ctx.settings);
    let mut out = format!(
        "{:<28} {:<44} {:<10} {:>6}  {}\n",
        "FILE", "SUBJECT", "EXPIRES", "LEFT", "STATE"
    );
    for c in &certs {
        out.push_str(&row(c, now, window));
    }
    let token = pki::token_id(bundle.get("bootstrap-token")?);
    let expired = if bundle.token_expired(now)? {
        " (EXPIRED)"
    } else {
        ""
    };
    out.push_str(&format!(
        "bootstrap token {token}: expires {}{expired}\nlast renewal: {}\n",
        bundle.token_expires.as_deref().unwrap_or("never"),
        bundle.renewed.as_deref().unwrap_or("never")
    ));
    for warning in bundle.ca_warnings(now)? {
        out.push_str(&format!("warning: {warning}\n"));
    }
    Ok(out)
}

fn row(c: &Certificate, now: OffsetDateTime, window: time::Duration) -> String {
    let left = c.not_after - now;
    let state = if left <= time::Duration::ZERO {
        "EXPIRED"
    } else if c.ca && left <= pki::CA_WARNING {
        "CA ends within a year"
    } else if c.ca {
        "CA"
    } else if left <= window {
        "due for renewal"
    } else {
        "ok"
    };
    format!(
        "{:<28} {:<44} {:<10} {:>5}d  {state}\n",
        c.file,
        c.subject,
        pki::day(c.not_after),
        left.whole_days()
    )
}
