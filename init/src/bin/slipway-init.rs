//! `slipway-init`: runs on every boot, before kubelet. Checks the boot's
//! shape, reads the stack config (user data from the instance metadata
//! service, or a file), runs the bootstrap steps for the instance's role and
//! renders the host's configuration. On a master,
//! `slipway-init addons` then waits for the API server, applies the add-ons
//! and signals the stack.

use clap::{Parser, Subcommand};
use slipway_init::imds::Imds;
use slipway_init::steps::{self, Context, Instance, Paths};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// How long to wait for the metadata service to answer, in seconds.
    #[arg(long, global = true, default_value_t = 300)]
    imds_deadline: u64,
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Run this boot's steps (the default).
    Boot,
    /// Import the image's pre-pulled container images into containerd and
    /// pin them (needs no stack config).
    Images {
        /// The list the image build wrote.
        #[arg(long, default_value = steps::images::LIST)]
        list: PathBuf,
    },
    /// Master only: wait for the API server, apply the add-ons, signal the stack.
    Addons {
        /// How long to wait for the API server, in seconds.
        #[arg(long, default_value_t = steps::addons::API_DEADLINE.as_secs())]
        api_deadline: u64,
    },
}

fn chain(e: &dyn std::error::Error) -> String {
    slipway_init::error_chain(e, ": ")
}

fn fail(msg: &str) -> ExitCode {
    println!("SLIPWAY-INIT-FAILED {msg}");
    tracing::error!("{msg}");
    ExitCode::FAILURE
}

/// The stack config and this instance's identity, from the flags or IMDS.
async fn context(args: &Args) -> Result<Context, String> {
    let imds = Imds::new(&args.imds_endpoint, Duration::from_secs(args.imds_deadline))
        .map_err(|e| chain(&e))?;
    let bytes = match &args.config {
        Some(path) => {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?
        }
        None => imds.user_data().await.map_err(|e| chain(&e))?,
    };
    let config = slipway_init::config::StackConfig::parse(&bytes).map_err(|e| e.to_string())?;
    let instance = match (&args.instance_id, &args.availability_zone) {
        (Some(id), Some(az)) => Instance {
            id: id.clone(),
            availability_zone: az.clone(),
        },
        _ => imds.instance().await.map_err(|e| chain(&e))?,
    };
    tracing::info!(
        step = "config",
        "{} of cluster {} (instance {} in {})",
        config.role,
        config.cluster_name,
        instance.id,
        instance.availability_zone
    );
    let aws =
        slipway_init::aws::Clients::new(config.region.as_deref(), config.aws_endpoint.as_deref())
            .await;
    let mut paths = args
        .root
        .as_deref()
        .map_or_else(Paths::default, Paths::under);
    if let Some(m) = &args.manifests {
        paths.manifests = m.clone();
    }
    Ok(Context {
        config,
        instance,
        aws,
        paths,
        runner: Box::new(steps::System),
    })
}

/// Signals a master's stack; a failure to signal is logged, not fatal.
async fn signal(ctx: &Context, success: bool) {
    match steps::signal::cloudformation(ctx, success).await {
        Ok(Some(r)) => r.log(),
        Ok(None) => {}
        Err(e) => tracing::warn!("{}", chain(&e)),
    }
}

async fn boot(args: &Args) -> Result<(), String> {
    let ctx = context(args).await?;
    if let Err(e) = steps::bootstrap(&ctx).await {
        // The stack learns at once, instead of when its timeout runs out.
        signal(&ctx, false).await;
        return Err(chain(&e));
    }
    Ok(())
}

async fn addons(args: &Args, deadline: Duration) -> Result<(), String> {
    let ctx = context(args).await?;
    let result = steps::addons::run(&ctx, deadline).await;
    signal(&ctx, result.is_ok()).await;
    result.map(|r| r.log()).map_err(|e| chain(&e))
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
    let args = Args::parse();
    tracing::info!("slipway-init {} starting", env!("CARGO_PKG_VERSION"));
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("starting the async runtime: {e}")),
    };
    let result = match &args.command {
        None | Some(Command::Boot) => {
            if !args.no_boot_check {
                match slipway_init::run(&slipway_init::Context::default()) {
                    Ok(check) => println!("SLIPWAY-BOOT-CHECK {check}"),
                    Err(e) => return fail(&chain(&e)),
                }
            }
            runtime.block_on(boot(&args))
        }
        Some(Command::Images { list }) => {
            let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
            let content = root.join(steps::images::CONTENT_STORE.trim_start_matches('/'));
            steps::images::import(&steps::System, list, &root, &content)
                .map(|r| r.log())
                .map_err(|e| chain(&e))
        }
        Some(Command::Addons { api_deadline }) => {
            runtime.block_on(addons(&args, Duration::from_secs(*api_deadline)))
        }
    };
    if let Err(msg) = result {
        return fail(&msg);
    }
    if let Err(e) = steps::signal::notify(std::env::var("NOTIFY_SOCKET").ok().as_deref(), "READY=1")
    {
        tracing::warn!("{e}");
    }
    println!("SLIPWAY-INIT-DONE");
    ExitCode::SUCCESS
}
