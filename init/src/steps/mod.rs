//! The boot steps, one module each. Every step is idempotent: it looks
//! before it acts, reports what it did or found already done in one line,
//! and can run again after a crash, a reboot or an instance replacement.

pub mod addons;
pub mod admission;
pub mod api_record;
pub mod approver;
pub mod attempts;
pub mod backup;
pub mod configure;
pub mod deadlines;
pub mod eip;
pub mod images;
pub mod leave;
pub mod private_ip;
pub mod renewal;
pub mod restore;
pub mod secrets;
pub mod signal;
pub mod srcdest;
#[cfg(test)]
pub(crate) mod stand_in;
pub mod volume;

use crate::aws::Clients;
use crate::config::{MasterConfig, Member, Role, StackConfig};
pub use deadlines::Deadlines;
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// The instance this boot runs on.
#[derive(Debug, Clone)]
pub struct Instance {
    pub id: String,
    pub availability_zone: String,
}

/// Where a step reads and writes; tests point these at temporary directories.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The tmpfs that holds every key, token and certificate.
    pub secrets: PathBuf,
    /// `/sys/class/nvme`: one directory per controller, with its serial.
    pub nvme_class: PathBuf,
    /// `/dev`.
    pub dev: PathBuf,
    /// `/proc`.
    pub proc: PathBuf,
    /// Where the data volume is mounted: etcd's data directory.
    pub etcd_data: PathBuf,
    /// `/etc`: rendered host configuration and static pods.
    pub etc: PathBuf,
    /// The templates the image carries (see [`crate::render`]).
    pub manifests: PathBuf,
    /// `/run/slipway`: what one boot remembers between attempts.
    pub run: PathBuf,
    /// The list of the container images the image carries (their layers
    /// beside it, see [`images`]).
    pub images: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Self {
            secrets: PathBuf::from(crate::contract::SECRETS_DIR),
            nvme_class: PathBuf::from("/sys/class/nvme"),
            dev: PathBuf::from("/dev"),
            proc: PathBuf::from("/proc"),
            etcd_data: PathBuf::from("/var/lib/etcd"),
            etc: PathBuf::from("/etc"),
            manifests: PathBuf::from(crate::contract::MANIFESTS_DIR),
            run: PathBuf::from("/run/slipway"),
            images: PathBuf::from(crate::contract::IMAGE_LIST),
        }
    }
}

/// Runs host programs (mkfs, mount); tests substitute their own.
pub trait Runner: std::fmt::Debug + Send + Sync {
    /// Runs `program`, its standard input read from `input` (empty when
    /// `None`), and returns its standard output.
    fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&std::path::Path>,
    ) -> Result<String, StepError>;

    fn run(&self, program: &str, args: &[&str]) -> Result<String, StepError> {
        self.run_with_input(program, args, None)
    }
}

/// The real thing.
#[derive(Debug, Default)]
pub struct System;

impl Runner for System {
    fn run_with_input(
        &self,
        program: &str,
        args: &[&str],
        input: Option<&std::path::Path>,
    ) -> Result<String, StepError> {
        let line = format!("{program} {}", args.join(" "));
        let stdin = match input {
            None => std::process::Stdio::null(),
            Some(path) => std::fs::File::open(path)
                .map_err(|e| StepError::Invalid {
                    what: format!("running {line}: opening {}", path.display()),
                    message: e.to_string(),
                })?
                .into(),
        };
        let out = std::process::Command::new(program)
            .args(args)
            .stdin(stdin)
            .output()
            .map_err(|e| StepError::Invalid {
                what: format!("running {line}"),
                message: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(StepError::Invalid {
                what: format!("running {line}"),
                message: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Everything a step needs.
#[derive(Debug)]
pub struct Context {
    pub config: StackConfig,
    pub instance: Instance,
    pub aws: Clients,
    pub paths: Paths,
    pub runner: Box<dyn Runner>,
    pub deadlines: Deadlines,
}

/// A master's context: the context, the settings only a master has, and
/// the address its stack reserves in this master's zone. Made once where a
/// master's work begins ([`Master::of`]); the steps only a master runs take
/// it, so none of them asks for the role. Reads through to the context.
#[derive(Debug, Clone, Copy)]
pub struct Master<'a> {
    pub ctx: &'a Context,
    pub settings: &'a MasterConfig,
    /// The address the API server, etcd and the master's Node use.
    pub ip: Ipv4Addr,
}

impl<'a> Master<'a> {
    /// The master's view of `ctx`; an error on a node, or when the stack
    /// reserves no address in this instance's zone.
    pub fn of(ctx: &'a Context) -> Result<Self, StepError> {
        Self::if_master(ctx)?.ok_or_else(|| StepError::Invalid {
            what: "role".into(),
            message: "this is a node; only a master does this".into(),
        })
    }

    /// The master's view of `ctx`, or `None` on a node: for the work both
    /// roles do, each its own way. An error when the stack reserves no
    /// address in this master's zone.
    pub fn if_master(ctx: &'a Context) -> Result<Option<Self>, StepError> {
        let Member::Master(settings) = &ctx.config.member else {
            return Ok(None);
        };
        let zone = &ctx.instance.availability_zone;
        let ip = settings
            .addresses
            .get(zone)
            .copied()
            .ok_or_else(|| StepError::Refused {
                what: "master_addresses".into(),
                message: format!(
                    "this master runs in {zone}, but its stack reserves an address only in {}",
                    settings
                        .addresses
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        Ok(Some(Self { ctx, settings, ip }))
    }
}

impl std::ops::Deref for Master<'_> {
    type Target = Context;

    fn deref(&self) -> &Context {
        self.ctx
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// An AWS call that failed after the retries of [`crate::aws::CallPolicy`].
    #[error("{action} ({api}): {message}")]
    Aws {
        action: String,
        /// The API action, as IAM names it (`ec2:AttachVolume`).
        api: &'static str,
        message: String,
    },
    #[error(transparent)]
    Pki(#[from] crate::pki::PkiError),
    #[error(transparent)]
    Render(#[from] crate::render::RenderError),
    #[error("{0}")]
    Wait(String),
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    /// A deliberate refusal that another attempt cannot change (data that
    /// is not ours on the volume, a volume in another zone).
    #[error("{what}: {message}")]
    Refused { what: String, message: String },
}

impl StepError {
    /// Whether running the step again could not help.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Refused { .. } | Self::Render(_) | Self::Pki(_))
    }
}

/// A step that failed, by name.
#[derive(Debug, thiserror::Error)]
#[error("step {step}: {source}")]
pub struct Failed {
    pub step: &'static str,
    #[source]
    pub source: StepError,
}

/// What a step did, for its journal line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub step: &'static str,
    pub changed: bool,
    pub detail: String,
}

impl Report {
    pub fn changed(step: &'static str, detail: impl Into<String>) -> Self {
        Self {
            step,
            changed: true,
            detail: detail.into(),
        }
    }
    pub fn already(step: &'static str, detail: impl Into<String>) -> Self {
        Self {
            step,
            changed: false,
            detail: detail.into(),
        }
    }
    pub fn log(&self) {
        let how = if self.changed { "done" } else { "already done" };
        tracing::info!(step = self.step, "{how}: {}", self.detail);
    }
}

/// Wraps an SDK error with the API action (`ec2:AttachVolume`) and what
/// the step was doing with it.
pub(crate) fn aws_err<E, R>(
    api: &'static str,
    action: impl Into<String>,
) -> impl FnOnce(aws_sdk_ec2::error::SdkError<E, R>) -> StepError
where
    E: aws_sdk_ec2::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug + 'static,
{
    let action = action.into();
    move |e| StepError::Aws {
        message: crate::aws::describe(&e),
        api,
        action,
    }
}

impl Paths {
    /// Every path below `root` (tests and dry runs use a scratch directory).
    pub fn under(root: &Path) -> Self {
        let d = Self::default();
        let re = |p: PathBuf| root.join(p.strip_prefix("/").unwrap_or(&p));
        Self {
            secrets: re(d.secrets),
            nvme_class: re(d.nvme_class),
            dev: re(d.dev),
            proc: re(d.proc),
            etcd_data: re(d.etcd_data),
            etc: re(d.etc),
            manifests: re(d.manifests),
            run: re(d.run),
            images: re(d.images),
        }
    }
}

/// Every AWS action a member of `role` calls, each step's list in boot
/// order: what its instance role must grant (a test reads the template).
pub fn calls(role: Role) -> Vec<&'static str> {
    let lists: &[&[&str]] = match role {
        Role::Master => &[
            srcdest::CALLS,
            restore::CALLS,
            volume::CALLS,
            eip::CALLS,
            private_ip::CALLS,
            api_record::CALLS,
            secrets::MASTER_CALLS,
            signal::CALLS,
            attempts::CALLS,
            approver::CALLS,
            backup::CALLS,
            api_record::LEAVE_CALLS,
        ],
        Role::Node => &[
            srcdest::CALLS,
            secrets::NODE_CALLS,
            signal::CALLS,
            attempts::CALLS,
        ],
    };
    let mut all: Vec<&str> = Vec::new();
    for call in lists.iter().flat_map(|l| l.iter()) {
        if !all.contains(call) {
            all.push(call);
        }
    }
    all
}

/// Leaves the empty file `name` in this boot's run directory: a word from
/// one step to another unit of the same boot.
pub(crate) fn mark(ctx: &Context, name: &str) -> Result<(), StepError> {
    let marker = ctx.paths.run.join(name);
    std::fs::create_dir_all(&ctx.paths.run)
        .and_then(|()| std::fs::write(&marker, b""))
        .map_err(|e| StepError::Invalid {
            what: marker.display().to_string(),
            message: e.to_string(),
        })
}

/// Runs one step within the `step` deadline, naming it if it fails.
pub async fn bounded<T>(
    ctx: &Context,
    step: &'static str,
    work: impl Future<Output = Result<T, StepError>>,
) -> Result<T, Failed> {
    let limit = ctx.deadlines.step;
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(Failed { step, source }),
        Err(_) => Err(Failed {
            step,
            source: StepError::Wait(format!(
                "not done within {}s (the `step` deadline)",
                limit.as_secs()
            )),
        }),
    }
}

/// Runs this boot's AWS and secrets steps for the configured role, logging
/// one line per step as it ends; stops at the first failure. The
/// source/destination check, the instance's own, runs beside the first
/// step that waits (a master's data volume, a node's bundle), and either
/// one's failure ends the other where it is. The rest run
/// in order: a master takes over its address and name only once its
/// predecessor let go of the volume, and generates a PKI only once the
/// volume told whether the cluster had one. Every step is idempotent, so
/// running it all again continues where a failed attempt stopped.
pub async fn bootstrap(ctx: &Context) -> Result<Vec<Report>, Failed> {
    let master = Master::if_master(ctx).map_err(|source| Failed {
        step: "config",
        source,
    })?;
    // Boxed: side by side, the two steps' futures would otherwise sit on
    // the stack of whatever polls the boot (the SDK's futures are large).
    let srcdest = Box::pin(logged(
        bounded(ctx, srcdest::STEP, srcdest::run(ctx)),
        |r| r,
    ));
    match master {
        Some(ref m) => {
            let volume = volume::run(m, &ctx.paths.etcd_data);
            let volume = Box::pin(logged(bounded(ctx, volume::STEP, volume), |r| r));
            let (srcdest, volume) = tokio::try_join!(srcdest, volume)?;
            let mut reports = vec![srcdest, volume];
            let mut record = |r: Report| {
                r.log();
                reports.push(r);
            };
            let (r, public_ip) = bounded(ctx, eip::STEP, eip::run(m)).await?;
            record(r);
            record(bounded(ctx, private_ip::STEP, private_ip::run(m)).await?);
            record(bounded(ctx, api_record::STEP, api_record::run(m)).await?);
            let pki = secrets::master(m, Some(public_ip));
            let (r, bundle) = bounded(ctx, secrets::STEP, pki).await?;
            record(r);
            let render = async { configure::run(ctx, &bundle) };
            record(bounded(ctx, configure::STEP, render).await?);
            Ok(reports)
        }
        None => {
            let fetch = secrets::node(ctx, ctx.deadlines.node_bundle);
            let fetch = Box::pin(logged(bounded(ctx, secrets::STEP, fetch), |(r, _)| r));
            let (srcdest, (r, bundle)) = tokio::try_join!(srcdest, fetch)?;
            let render = async { configure::run(ctx, &bundle) };
            let configured = bounded(ctx, configure::STEP, render).await?;
            configured.log();
            Ok(vec![srcdest, r, configured])
        }
    }
}

/// A step that runs beside another, its report logged as soon as it ends
/// (the two log in the order they end).
async fn logged<T>(
    step: impl Future<Output = Result<T, Failed>>,
    report: impl FnOnce(&T) -> &Report,
) -> Result<T, Failed> {
    let done = step.await?;
    report(&done).log();
    Ok(done)
}

/// A context for unit tests: a member of `role` in cluster `demo`, its
/// host programs played by `runner`, its files below `root`, and an AWS
/// endpoint nothing answers on.
#[cfg(test)]
pub(crate) async fn test_context(role: &str, runner: Box<dyn Runner>, root: &Path) -> Context {
    let master = if role == "master" {
        "master_eip_allocation = \"eipalloc-0123456789abcdef0\"\nmaster_dns_zone = \"Z0123456789\"\nmaster_addresses = { \"us-east-1a\" = \"10.0.1.10\", \"us-east-1b\" = \"10.0.2.10\" }\n"
    } else {
        ""
    };
    let text = format!("role = \"{role}\"\ncluster_name = \"demo\"\nsecrets_bucket = \"b-1\"\napi_name = \"api.demo.slipway.internal\"\npod_cidr = \"10.244.0.0/16\"\nservice_cidr = \"10.96.0.0/12\"\n{master}");
    Context {
        config: crate::config::StackConfig::parse(text.as_bytes()).unwrap(),
        instance: Instance {
            id: "i-0123456789abcdef0".into(),
            availability_zone: "us-east-1a".into(),
        },
        aws: crate::aws::Clients::new(Some("us-east-1"), Some("http://127.0.0.1:9")).await,
        paths: Paths::under(root),
        runner,
        deadlines: Deadlines::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The API actions a module's code names where it calls AWS: the first
    /// argument of each `aws_err(` and each `api:` field (tests left out).
    fn api_names(source: &str) -> Vec<String> {
        let code = source.split("#[cfg(test)]").next().unwrap_or(source);
        let mut names = Vec::new();
        for marker in ["aws_err(", "api: "] {
            for (at, _) in code.match_indices(marker) {
                let rest = code[at + marker.len()..].trim_start();
                if let Some(lit) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                    names.push(lit.to_owned());
                }
            }
        }
        names
    }

    #[test]
    fn every_aws_call_in_a_step_is_in_its_list() {
        let modules: &[(&str, &str, &[&str])] = &[
            ("srcdest", include_str!("srcdest.rs"), srcdest::CALLS),
            ("volume", include_str!("volume.rs"), volume::CALLS),
            ("restore", include_str!("restore.rs"), restore::CALLS),
            ("eip", include_str!("eip.rs"), eip::CALLS),
            (
                "private_ip",
                include_str!("private_ip.rs"),
                private_ip::CALLS,
            ),
            ("secrets", include_str!("secrets.rs"), secrets::MASTER_CALLS),
            ("signal", include_str!("signal.rs"), signal::CALLS),
            ("attempts", include_str!("attempts.rs"), attempts::CALLS),
            ("approver", include_str!("approver.rs"), approver::CALLS),
            ("backup", include_str!("backup.rs"), backup::CALLS),
        ];
        for (name, source, listed) in modules {
            let used = api_names(source);
            for api in &used {
                assert!(
                    listed.contains(&api.as_str()),
                    "{name} calls {api} but does not list it"
                );
            }
            for api in *listed {
                assert!(
                    used.iter().any(|u| u == api),
                    "{name} lists {api} but never calls it"
                );
            }
        }
        // Modules with no AWS call of their own.
        for (name, source) in [
            ("configure", include_str!("configure.rs")),
            ("images", include_str!("images.rs")),
            ("addons", include_str!("addons.rs")),
            ("renewal", include_str!("renewal.rs")),
            ("leave", include_str!("leave.rs")),
        ] {
            assert!(
                api_names(source).is_empty(),
                "{name} calls AWS: add it to calls()"
            );
        }
    }

    #[test]
    fn a_node_calls_less_than_a_master() {
        let (master, node) = (calls(Role::Master), calls(Role::Node));
        assert!(node.iter().all(|c| master.contains(c)));
        assert!(!node.contains(&"s3:PutObject"));
        assert!(!node.contains(&"ec2:AttachVolume"));
    }
}
