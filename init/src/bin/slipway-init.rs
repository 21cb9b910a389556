//! `slipway-init`: runs on every boot, before kubelet. Checks the boot's
//! shape, reads the stack config (user data from the instance metadata
//! service, or a file), runs the bootstrap steps for the instance's role and
//! renders the host's configuration. On a master,
//! `slipway-init addons` then waits for the API server, applies the add-ons
//! and signals the stack.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use slipway_init::aws::CallPolicy;
use slipway_init::bootcheck::BootCheck;
use slipway_init::config::Member;
use slipway_init::imds::Imds;
use slipway_init::steps::attempts::{self, Attempts, Next, FINAL_EXIT};
use slipway_init::steps::{self, Context, Deadlines, Instance, Master, Paths, Report};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Turn a Slipway image into a master or a node, idempotently, at every boot",
    long_about = "Turn a Slipway image into a master or a node, idempotently, at every boot.\n\n\
        Without a subcommand, runs the boot: checks that the root is verity-protected and \
        read-only, reads the stack config, then (by role) turns off the source/destination \
        check, attaches and mounts the master's data volume, associates its Elastic IP and \
        stable private IP, fetches or creates the cluster's PKI in the secrets bucket, and \
        renders kubelet's, containerd's and the control plane's configuration. Every step \
        can run again without harm.\n\n\
        A failed attempt exits 1 and systemd runs it again; the last of --attempts, or a \
        refusal no attempt can change, exits 2 (the last one after marking the instance \
        unhealthy, so its Auto Scaling group replaces it).\n\n\
        Prints SLIPWAY-INIT-DONE or SLIPWAY-INIT-FAILED <reason> on its last line."
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Stack config (TOML) to use instead of the instance's user data.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// The instance metadata service.
    #[arg(
        long,
        global = true,
        env = "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        default_value = slipway_init::imds::DEFAULT_ENDPOINT
    )]
    imds_endpoint: String,
    /// Override one deadline, e.g. `--deadline node-bundle=600` (repeatable;
    /// the table is at the end of `--help`).
    #[arg(long, global = true, value_name = "NAME=SECONDS")]
    deadline: Vec<String>,
    /// Attempts this boot makes at the command (counted across systemd's
    /// restarts in /run/slipway) before giving up.
    #[arg(long, global = true, default_value_t = 5)]
    attempts: u32,
    /// Send every AWS call to this endpoint instead of AWS's own (a local
    /// AWS in tests). Never read from the stack config: user data cannot
    /// redirect an instance's credentials.
    #[arg(long, global = true, env = "SLIPWAY_AWS_ENDPOINT", value_name = "URL", value_parser = endpoint_url)]
    aws_endpoint: Option<String>,
    /// Attempts per AWS call (throttling, 5xx, resets and timeouts are
    /// retried with jittered exponential backoff).
    #[arg(long, global = true, env = "AWS_MAX_ATTEMPTS", default_value_t = CallPolicy::default().max_attempts)]
    aws_max_attempts: u32,
    /// This instance's ID (default: from the metadata service).
    #[arg(long, global = true, requires = "availability_zone")]
    instance_id: Option<String>,
    /// This instance's availability zone (default: from the metadata service).
    #[arg(long, global = true, requires = "instance_id")]
    availability_zone: Option<String>,
    /// Treat this directory as `/` for every path slipway-init touches.
    #[arg(long, global = true)]
    root: Option<PathBuf>,
    /// Templates to render (default: the image's /usr/share/slipway/manifests).
    #[arg(long, global = true)]
    manifests: Option<PathBuf>,
    /// Skip the boot check (when running outside the image).
    #[arg(long)]
    no_boot_check: bool,
}

/// `--aws-endpoint`: an http(s) URL.
fn endpoint_url(value: &str) -> Result<String, String> {
    if (value.starts_with("http://") || value.starts_with("https://")) && value.len() <= 200 {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?} is not an http(s) URL"))
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run this boot's steps (the default).
    Boot,
    /// Import the image's pre-pulled container images into containerd and
    /// pin them (needs no stack config).
    Images {
        /// The list the image build wrote.
        #[arg(long, default_value = slipway_init::contract::IMAGE_LIST)]
        list: PathBuf,
        /// containerd's API socket.
        #[arg(long, default_value = steps::images::SOCKET)]
        containerd: PathBuf,
    },
    /// Master only: wait for the API server, apply the add-ons, signal the stack.
    Addons,
    /// Master only (an hourly timer runs it): renew every leaf certificate of
    /// the cluster's bundle that ends within the renewal window
    /// (`master_renew_before_days`, default 90) and restart the control
    /// plane one component at a time to read them. The boot renews too.
    Renew,
    /// Master only: print every certificate's end, the bootstrap token and
    /// the time of the last renewal.
    Certs,
    /// Node only (a unit runs it at every boot): wait until this node is
    /// Ready in the API (up to the `node-ready` deadline), lift the cordon
    /// its own last departure left, then signal the stack SUCCESS, or
    /// FAILURE at the deadline, so a rolling update moves on only once the
    /// new node carries pods. A master does the same after its add-ons.
    Ready,
    /// Register this member's Node again if the API lost it (a timer runs
    /// it every minute): once this boot has seen the Node Ready, a Node the
    /// API server no longer has (etcd restored from a backup taken before
    /// it joined) restarts kubelet, which registers it again, since a
    /// kubelet registers only as it starts.
    Rejoin,
    /// Leave the cluster cleanly (a unit runs it as the instance shuts
    /// down): every member cordons its Node and evicts its pods,
    /// disruption budgets allowing, up to the `drain` deadline; a master
    /// then stops kubelet, then its control plane, etcd last, so its data
    /// volume detaches with etcd's data consistent.
    Leave,
    /// Master only (a timer runs it every five minutes): snapshot etcd into
    /// the secrets bucket (`<cluster>/etcd-backups/`, with its revision and
    /// sha256) once the newest backup is `master_backup_minutes` old, then
    /// delete what the retention lets go (the newest `master_backups_kept`,
    /// and the newest of each day for `master_backup_days`, stay).
    Backup {
        /// Take one now, due or not.
        #[arg(long)]
        now: bool,
        /// Only list the cluster's backups, oldest first.
        #[arg(long, conflicts_with = "now")]
        list: bool,
    },
    /// Master only: list the cluster's data volumes and EBS snapshots, or
    /// restore a named snapshot or etcd backup to roll the cluster back. A
    /// restore makes a volume in this master's zone (from the snapshot, or
    /// empty and filled from the backup at its next boot), tags the current
    /// volume superseded (never deleted) and moves the cluster's tag to the
    /// new one, as a master does at boot when its zone has no volume. This
    /// master keeps running on its old volume until its next boot: reboot
    /// it, or terminate it and its Auto Scaling group launches one on the
    /// restored volume. Without --yes, says what it would do and changes
    /// nothing.
    Restore {
        /// List the volumes and snapshots (the newest completed snapshot,
        /// which a master restores at boot, is marked).
        #[arg(long, conflicts_with_all = ["snapshot", "backup", "yes"])]
        list: bool,
        /// The snapshot to restore (one tagged as this cluster's etcd data).
        #[arg(
            long,
            value_name = "SNAPSHOT_ID",
            required_unless_present_any = ["list", "backup"],
            conflicts_with = "backup"
        )]
        snapshot: Option<String>,
        /// The etcd backup to restore, by its key (`slipway-init backup
        /// --list` prints them).
        #[arg(long, value_name = "KEY")]
        backup: Option<String>,
        /// Restore, rather than only say what would be done.
        #[arg(long)]
        yes: bool,
    },
    /// Master only (a service runs it): decide kubelets' certificate
    /// requests by what EC2 says of this cluster's instances. A client
    /// certificate goes only to a running instance of the node group
    /// (never under the master's name); a serving certificate only to a
    /// node asking for itself with its own addresses. Everything else for
    /// those signers is denied, with the reason in the journal. About once
    /// a minute it also deletes the Nodes of instances EC2 no longer has,
    /// once NotReady for 5 minutes (never the master's, nor a stopped
    /// node's). The loop starts once this boot's add-ons step has seen the
    /// API server answer; `--once` does not wait.
    Approve {
        /// Seconds between passes.
        #[arg(long, default_value_t = 5)]
        interval: u64,
        /// One pass, then exit.
        #[arg(long)]
        once: bool,
    },
}

/// The deadlines table for `--help`.
fn deadlines_help() -> String {
    let mut text = String::from("Deadlines (override with --deadline NAME=SECONDS):\n");
    for row in Deadlines::default().rows() {
        text.push_str(&format!(
            "  {:<17} {:>5}s  {}\n",
            row.name,
            row.value.as_secs(),
            row.bounds
        ));
    }
    text
}

fn chain(e: &dyn std::error::Error) -> String {
    slipway_init::error_chain(e, ": ")
}

/// How a command ended when it did not succeed: its last line and exit status.
#[derive(Debug)]
struct Ending {
    line: String,
    status: u8,
}

impl Ending {
    fn retry(line: String) -> Self {
        Self { line, status: 1 }
    }
    fn last(line: String) -> Self {
        Self {
            line,
            status: FINAL_EXIT,
        }
    }
}

/// Writes `line` to the kernel's log, whose console shows it as it is
/// made. This service's standard output reaches the console through
/// journald, which early in a boot is still starting: in the cluster
/// test the verdict reached the console 1.4 to 4.1 s later that way.
/// Falls back to standard output.
fn to_kernel_log(line: &str) {
    use std::io::Write;
    // daemon.notice: userspace may not write as the kernel's facility.
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut kmsg| kmsg.write_all(format!("<29>slipway-init: {line}\n").as_bytes()));
    if written.is_err() {
        println!("{line}");
    }
}

fn fail(ending: &Ending) -> ExitCode {
    println!("SLIPWAY-INIT-FAILED {}", ending.line);
    tracing::error!("{}", ending.line);
    ExitCode::from(ending.status)
}

/// Why the context could not be made: the config (no attempt can fix
/// it), or something that may answer next time (the metadata service).
enum ContextError {
    Config(String),
    Transient(String),
}

/// Outside the counted boot and add-ons: a bad config is final, anything
/// else is for the next run.
impl From<ContextError> for Ending {
    fn from(e: ContextError) -> Self {
        match e {
            ContextError::Config(line) => Ending::last(line),
            ContextError::Transient(line) => Ending::retry(line),
        }
    }
}

fn paths(args: &Args) -> Paths {
    let mut paths = args
        .root
        .as_deref()
        .map_or_else(Paths::default, Paths::under);
    if let Some(m) = &args.manifests {
        paths.manifests = m.clone();
    }
    paths
}

/// The stack config and this instance's identity, from the flags or IMDS.
/// The stack config: the file `--config` names, or the instance's user
/// data.
async fn stack_config(
    args: &Args,
    imds: &Imds,
) -> Result<slipway_init::config::StackConfig, ContextError> {
    let bytes = match &args.config {
        Some(path) => std::fs::read(path)
            .map_err(|e| ContextError::Config(format!("reading {}: {e}", path.display())))?,
        None => imds
            .user_data()
            .await
            .map_err(|e| ContextError::Transient(chain(&e)))?,
    };
    slipway_init::config::StackConfig::parse(&bytes)
        .map_err(|e| ContextError::Config(e.to_string()))
}

async fn context(args: &Args, deadlines: Deadlines) -> Result<Context, ContextError> {
    let imds = Imds::new(&args.imds_endpoint, deadlines.metadata)
        .map_err(|e| ContextError::Transient(chain(&e)))?;
    let config = stack_config(args, &imds).await?;
    let instance = match (&args.instance_id, &args.availability_zone) {
        (Some(id), Some(az)) => Instance {
            id: id.clone(),
            availability_zone: az.clone(),
        },
        _ => imds
            .instance()
            .await
            .map_err(|e| ContextError::Transient(chain(&e)))?,
    };
    tracing::info!(
        step = "config",
        "{} of cluster {} (instance {} in {})",
        config.role(),
        config.cluster_name,
        instance.id,
        instance.availability_zone
    );
    let policy = CallPolicy {
        max_attempts: args.aws_max_attempts.max(1),
        ..CallPolicy::default()
    };
    let aws = slipway_init::aws::Clients::with_policy(
        config.region.as_deref(),
        args.aws_endpoint.as_deref(),
        policy,
    )
    .await;
    Ok(Context {
        config,
        instance,
        aws,
        paths: paths(args),
        runner: Box::new(steps::System),
        deadlines,
    })
}

/// Signals the stack (a master after its add-ons, a node once Ready); a
/// failure to signal is logged, not fatal.
async fn signal(ctx: &Context, success: bool) {
    match steps::signal::cloudformation(ctx, success).await {
        Ok(Some(r)) => r.log(),
        Ok(None) => {}
        Err(e) => tracing::warn!("{}", chain(&e)),
    }
}

/// One attempt at `boot` or `addons`, counted; on failure, says which step
/// failed and what happens next, and on the last attempt gives up loudly.
async fn attempt(args: &Args, deadlines: Deadlines, addons: bool) -> Result<(), Ending> {
    let name = if addons { "addons" } else { "boot" };
    let attempts = Attempts::new(&paths(args).run, name, args.attempts);
    let n = attempts.begin().map_err(|e| Ending::retry(chain(&e)))?;
    let ctx = match context(args, deadlines).await {
        Ok(ctx) => ctx,
        Err(ContextError::Config(line)) => return Err(Ending::last(line)),
        Err(ContextError::Transient(line)) if n < attempts.limit => {
            return Err(Ending::retry(format!(
                "{line} (attempt {n} of {}); systemd runs the {name} again",
                attempts.limit
            )))
        }
        Err(ContextError::Transient(line)) => {
            return Err(Ending::last(format!(
                "{line} (attempt {n}, the last); giving up (without the instance's \
                 identity it cannot report itself unhealthy)"
            )))
        }
    };
    let result = if addons {
        add_ons(&ctx).await
    } else {
        boot(&ctx).await
    };
    let failed = match result {
        Ok(()) => {
            attempts.succeeded();
            // A master is in service once its add-ons are applied; a node
            // only once it is Ready (`slipway-init ready` signals for it).
            if addons && ctx.config.member != Member::Node {
                signal(&ctx, true).await;
            }
            return Ok(());
        }
        Err(failed) => failed,
    };
    let next = attempts.next(n, &failed.source);
    let line = attempts.describe(&failed, next);
    tracing::error!(step = failed.step, "{line}");
    Err(match next {
        Next::Retry { .. } => Ending::retry(line),
        Next::GiveUp { .. } => {
            match attempts::report_unhealthy(&ctx).await {
                Ok(r) => r.log(),
                Err(e) => tracing::error!(step = attempts::STEP, "{}", chain(&e)),
            }
            Ending::last(line)
        }
        Next::Stop => {
            // The stack learns at once, instead of when its timeout runs out.
            signal(&ctx, false).await;
            Ending::last(line)
        }
    })
}

/// The boot steps; then a node waits for the cluster to admit it before
/// its kubelet starts, a wait that ends the boot either way.
async fn boot(ctx: &Context) -> Result<(), steps::Failed> {
    steps::bootstrap(ctx).await?;
    if ctx.config.member == Member::Node {
        let step = steps::admission::STEP;
        steps::admission::run(ctx)
            .await
            .map_err(|source| steps::Failed { step, source })?
            .log();
    }
    Ok(())
}

/// `addons`: a master's add-ons step; a node has none.
async fn add_ons(ctx: &Context) -> Result<(), steps::Failed> {
    let step = steps::addons::STEP;
    let failed = |source| steps::Failed { step, source };
    let Some(master) = Master::if_master(ctx).map_err(failed)? else {
        Report::already(step, "nothing to apply on a node").log();
        return Ok(());
    };
    let api = steps::addons::Readyz::local(ctx).map_err(failed)?;
    let local = steps::addons::LocalApi::local(ctx).map_err(failed)?;
    let report = steps::bounded(ctx, step, steps::addons::run(&master, &api, &local)).await?;
    report.log();
    Ok(())
}

/// `renew` or `certs`: one run, no attempt counting (the timer runs the
/// renewal again the next hour; the window leaves weeks of such hours).
async fn maintain(args: &Args, deadlines: Deadlines, renew: bool) -> Result<(), Ending> {
    let ctx = context(args, deadlines).await?;
    if renew {
        let step = steps::renewal::STEP;
        let master = Master::if_master(&ctx).map_err(|e| Ending::last(chain(&e)))?;
        let Some(master) = master else {
            Report::already(step, "a node holds no certificate of the cluster's bundle").log();
            return Ok(());
        };
        let report = steps::bounded(&ctx, step, steps::renewal::run(&master))
            .await
            .map_err(|failed| Ending::retry(chain(&failed)))?;
        report.log();
    } else {
        let master = as_master(&ctx, "holds the cluster's certificates")?;
        let now = time::OffsetDateTime::now_utc();
        let text = steps::renewal::status(&master, now)
            .await
            .map_err(|e| Ending::retry(chain(&e)))?;
        print!("{text}");
    }
    Ok(())
}

/// `ready` (a node signals its stack once Ready) or `leave` (the member
/// leaves the cluster cleanly as it shuts down): one run each.
async fn arrive_or_leave(args: &Args, deadlines: Deadlines, arrive: bool) -> Result<(), Ending> {
    let ctx = context(args, deadlines).await?;
    if !arrive {
        let report = steps::leave::leave(&ctx)
            .await
            .map_err(|e| Ending::retry(chain(&e)))?;
        report.log();
        return Ok(());
    }
    // Only a node signals here (a master does after its add-ons).
    let node = ctx.config.member == Member::Node;
    match steps::leave::ready(&ctx).await {
        Ok(report) => {
            report.log();
            if node {
                signal(&ctx, true).await;
            }
            Ok(())
        }
        Err(e) => {
            // The stack learns at once, instead of when its wait runs out.
            signal(&ctx, false).await;
            Err(Ending::retry(chain(&e)))
        }
    }
}

/// `rejoin`: this member's Node registered again if the API lost it.
async fn rejoin(args: &Args, deadlines: Deadlines) -> Result<(), Ending> {
    let ctx = context(args, deadlines).await?;
    let report = steps::leave::rejoin(&ctx)
        .await
        .map_err(|e| Ending::retry(chain(&e)))?;
    report.log();
    Ok(())
}

/// The master's view of the context of a command only a master runs; on a
/// node, an error that says what only a master does.
fn as_master<'a>(ctx: &'a Context, does: &str) -> Result<Master<'a>, Ending> {
    Master::if_master(ctx)
        .map_err(|e| Ending::last(chain(&e)))?
        .ok_or_else(|| Ending::last(format!("only a master {does}")))
}

/// `backup`: one backup when due (or now), or the list of them.
async fn backup(args: &Args, deadlines: Deadlines, now: bool, list: bool) -> Result<(), Ending> {
    let ctx = context(args, deadlines).await?;
    let ctx = as_master(&ctx, "backs etcd up")?;
    if list {
        let backups = steps::backup::list(&ctx)
            .await
            .map_err(|e| Ending::retry(chain(&e)))?;
        print!("{}", steps::backup::table(&backups));
        return Ok(());
    }
    let at = time::OffsetDateTime::now_utc();
    let step = steps::backup::STEP;
    let report = steps::bounded(&ctx, step, steps::backup::run(&ctx, at, now))
        .await
        .map_err(|failed| Ending::retry(chain(&failed)))?;
    report.log();
    Ok(())
}

/// `restore`: the volumes and snapshots, or a restore of a named snapshot
/// or etcd backup.
async fn restore(
    args: &Args,
    deadlines: Deadlines,
    named: Option<&str>,
    yes: bool,
) -> Result<(), Ending> {
    let ctx = context(args, deadlines).await?;
    let ctx = as_master(&ctx, "restores its data volume")?;
    let failed = |e: steps::StepError| Ending::retry(chain(&e));
    match named {
        None => {
            let volumes = steps::restore::volumes(&ctx).await.map_err(failed)?;
            let snapshots = steps::restore::snapshots(&ctx).await.map_err(failed)?;
            print!("{}", steps::restore::table(&volumes, &snapshots));
        }
        Some(name) => {
            let said = steps::restore::restore_named(&ctx, name, yes)
                .await
                .map_err(failed)?;
            println!("{said}");
        }
    }
    Ok(())
}

/// The approver's loop: a pass every `interval`; a failed pass (the API
/// server restarting, EC2 throttled) is logged and the next one tries again.
async fn approve(
    args: &Args,
    deadlines: Deadlines,
    interval: u64,
    once: bool,
) -> Result<(), Ending> {
    let ctx = context(args, deadlines).await?;
    let ctx = as_master(&ctx, "approves certificate requests")?;
    if !once {
        steps::approver::until_api_answered(&ctx).await;
    }
    // The sweep of gone instances' Nodes runs about once a minute.
    let sweep_every = (60 / interval.max(1)).max(1);
    let mut pass = 0u64;
    // The API server is spoken to in-process, one client kept from pass to
    // pass: a pass costs next to no CPU. The client is made again with
    // each sweep, so a renewed super-admin certificate is taken up within
    // a minute, and after a failed pass.
    let mut client = None;
    loop {
        let sweep = pass % sweep_every == 0;
        if sweep {
            client = None;
        }
        let result = async {
            let api = match client.take() {
                Some(api) => api,
                None => steps::addons::LocalApi::local(&ctx)?,
            };
            if sweep {
                let nodes = api.get(steps::approver::NODES).await?;
                let now = time::OffsetDateTime::now_utc();
                steps::approver::sweep(&ctx, &api, &nodes, now).await?;
            }
            let csrs = api.get(steps::approver::CSRS).await?;
            steps::approver::once(&ctx, &api, &csrs).await?;
            Ok::<_, steps::StepError>(api)
        }
        .await;
        match result {
            Ok(_) if once => return Ok(()),
            Ok(api) => client = Some(api),
            Err(e) if once => return Err(Ending::retry(chain(&e))),
            Err(e) => tracing::warn!(step = steps::approver::STEP, "{}", chain(&e)),
        }
        pass += 1;
        tokio::time::sleep(std::time::Duration::from_secs(interval.max(1))).await;
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,aws=warn,hyper=warn")),
        )
        .without_time()
        .with_ansi(false)
        .with_target(false)
        .with_writer(std::io::stderr)
        .init();
    let matches = Args::command()
        .after_long_help(deadlines_help())
        .get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    tracing::info!("slipway-init {} starting", env!("CARGO_PKG_VERSION"));
    let deadlines = match Deadlines::with_overrides(&args.deadline) {
        Ok(d) => d,
        Err(e) => return fail(&Ending::last(e.to_string())),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&Ending::retry(format!("starting the async runtime: {e}"))),
    };
    let result = match &args.command {
        None | Some(Command::Boot) => {
            if !args.no_boot_check {
                let root = args.root.as_deref().unwrap_or(Path::new("/"));
                let check =
                    BootCheck::inspect(&root.join("proc"), &root.join("sys"), &root.join("var"));
                tracing::info!(step = "boot-check", "{check}");
                if !check.all_ok() {
                    // The image itself is wrong: no attempt can change that.
                    return fail(&Ending::last(format!("boot check failed: {check}")));
                }
                let verdict = format!("SLIPWAY-BOOT-CHECK {check}");
                if args.root.is_none() {
                    to_kernel_log(&verdict);
                } else {
                    println!("{verdict}");
                }
            }
            runtime.block_on(attempt(&args, deadlines, false))
        }
        Some(Command::Images { list, containerd }) => {
            let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
            runtime
                .block_on(steps::images::import(list, &root, containerd))
                .map(|r| r.log())
                .map_err(|e| Ending::retry(chain(&e)))
        }
        Some(Command::Addons) => runtime.block_on(attempt(&args, deadlines, true)),
        Some(Command::Renew) => runtime.block_on(maintain(&args, deadlines, true)),
        Some(Command::Ready) => runtime.block_on(arrive_or_leave(&args, deadlines, true)),
        Some(Command::Leave) => runtime.block_on(arrive_or_leave(&args, deadlines, false)),
        Some(Command::Rejoin) => runtime.block_on(rejoin(&args, deadlines)),
        Some(Command::Approve { interval, once }) => {
            runtime.block_on(approve(&args, deadlines, *interval, *once))
        }
        Some(Command::Backup { now, list: true }) => {
            // A table on standard output, nothing else.
            return match runtime.block_on(backup(&args, deadlines, *now, true)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ending) => fail(&ending),
            };
        }
        Some(Command::Backup { now, list: false }) => {
            runtime.block_on(backup(&args, deadlines, *now, false))
        }
        Some(Command::Restore {
            snapshot,
            backup,
            yes,
            ..
        }) => {
            // What it found or did on standard output, nothing else.
            let named = snapshot.as_deref().or(backup.as_deref());
            return match runtime.block_on(restore(&args, deadlines, named, *yes)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ending) => fail(&ending),
            };
        }
        Some(Command::Certs) => {
            // A table on standard output, nothing else.
            return match runtime.block_on(maintain(&args, deadlines, false)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ending) => fail(&ending),
            };
        }
    };
    if let Err(ending) = result {
        return fail(&ending);
    }
    println!("SLIPWAY-INIT-DONE");
    ExitCode::SUCCESS
}
