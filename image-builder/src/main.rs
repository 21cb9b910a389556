//! The `image-builder` binary: parse arguments, set up logging, and run the
//! verb. The async runtime and the AWS clients a publish uses are made
//! here and handed to the library.

use clap::Parser;
use image_builder::manifest::Built;
use image_builder::{build, lock, publish, Cli, Command, Error};
use std::process::ExitCode;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLIPWAY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: {}",
                slipway_init::error_chain(&e, "\n  caused by: ")
            );
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Build(args) => {
            let built = build::run(&args.build)?;
            if args.publish.region.is_some() {
                publish_built(&built, &args.publish, &args.template())?;
            }
        }
        Command::Lock(args) => lock::run(&args)?,
        Command::Publish(args) => {
            eprintln!("checking {} against its build manifest", args.out.display());
            let built = Built::read(&args.out)?;
            publish_built(&built, &args.target, &args.template())?;
        }
    }
    Ok(())
}

/// Publishes `built` with clients for the target's regions.
fn publish_built(
    built: &Built,
    target: &publish::Target,
    template: &std::path::Path,
) -> Result<publish::Release, Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| publish::PublishError::Invalid(format!("starting the async runtime: {e}")))?;
    let release = runtime.block_on(async {
        let clients = publish::Clients::for_target(target).await?;
        publish::publish(built, &clients, target, template).await
    })?;
    Ok(release)
}
