//! `slipway-init`: runs on every boot, before the container runtime and
//! kubelet. Checks the boot's shape, then (given a stack config) runs the
//! bootstrap steps for the instance's role.

use clap::Parser;
use slipway_init::steps::{self, Context, Instance, Paths};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Turn a Slipway image into a master or a node, idempotently, at every boot"
)]
struct Args {
    /// Stack config (TOML). Without one only the boot check runs.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This instance's ID (default: from the instance metadata service).
    #[arg(long, requires = "availability_zone")]
    instance_id: Option<String>,
    /// This instance's availability zone (default: from the metadata service).
    #[arg(long, requires = "instance_id")]
    availability_zone: Option<String>,
    /// Treat this directory as `/` for every path slipway-init touches.
    #[arg(long)]
    root: Option<PathBuf>,
    /// Skip the boot check (when running outside the image).
    #[arg(long)]
    no_boot_check: bool,
}

fn chain(e: &dyn std::error::Error) -> String {
    slipway_init::error_chain(e, ": ")
}

fn fail(msg: &str) -> ExitCode {
    println!("SLIPWAY-INIT-FAILED {msg}");
    tracing::error!("{msg}");
    ExitCode::FAILURE
}

async fn identity(args: &Args) -> Result<Instance, String> {
    if let (Some(id), Some(az)) = (&args.instance_id, &args.availability_zone) {
        return Ok(Instance {
            id: id.clone(),
            availability_zone: az.clone(),
        });
    }
    let imds = aws_config::imds::Client::builder().build();
    let get = |path: &'static str| {
        let imds = imds.clone();
        async move {
            imds.get(path)
                .await
                .map(String::from)
                .map_err(|e| format!("reading {path} from the instance metadata service: {e}"))
        }
    };
    Ok(Instance {
        id: get("/latest/meta-data/instance-id").await?,
        availability_zone: get("/latest/meta-data/placement/availability-zone").await?,
    })
}

async fn bootstrap(args: &Args, config_path: &PathBuf) -> Result<(), String> {
    let bytes = std::fs::read(config_path)
        .map_err(|e| format!("reading {}: {e}", config_path.display()))?;
    let config = slipway_init::config::StackConfig::parse(&bytes).map_err(|e| e.to_string())?;
    let instance = identity(args).await?;
    let aws =
        slipway_init::aws::Clients::new(config.region.as_deref(), config.aws_endpoint.as_deref())
            .await;
    let paths = args
        .root
        .as_deref()
        .map_or_else(Paths::default, Paths::under);
    let ctx = Context {
        config,
        instance,
        aws,
        paths,
        runner: Box::new(steps::System),
    };
    let result = steps::bootstrap(&ctx).await;
    if let Some(r) = steps::signal::cloudformation(&ctx, result.is_ok())
        .await
        .map_err(|e| chain(&e))?
    {
        r.log();
    }
    result.map(drop).map_err(|e| chain(&e))
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
    if !args.no_boot_check {
        match slipway_init::run(&slipway_init::Context::default()) {
            Ok(check) => println!("SLIPWAY-BOOT-CHECK {check}"),
            Err(e) => return fail(&chain(&e)),
        }
    }
    if let Some(config) = &args.config {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return fail(&format!("starting the async runtime: {e}")),
        };
        if let Err(msg) = runtime.block_on(bootstrap(&args, config)) {
            return fail(&msg);
        }
    } else {
        tracing::info!("no stack config given: bootstrap steps skipped");
    }
    if let Err(e) = steps::signal::notify(std::env::var("NOTIFY_SOCKET").ok().as_deref(), "READY=1")
    {
        tracing::warn!("{e}");
    }
    println!("SLIPWAY-INIT-DONE");
    ExitCode::SUCCESS
}
