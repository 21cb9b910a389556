//! Slipway's image builder: turns the appliance spec into a bootable,
//! read-only, dm-verity-protected disk image without a builder VM.

pub mod build;
pub mod cache;
pub mod debian;
pub mod fsio;
pub mod lock;
pub mod progress;
pub mod spec;
pub mod tools;

/// The command line: one subcommand per verb, each owning its arguments.
#[derive(Debug, clap::Parser)]
#[command(
    name = "image-builder",
    version,
    about = "Build Slipway's immutable Kubernetes node images",
    long_about = "Build Slipway's immutable Kubernetes node images.\n\n\
        `image-builder build` turns image.toml (and its lock, image.lock) into out/disk.raw, \
        out/disk.qcow2 and out/build-manifest.json: a GPT disk with a UEFI boot partition \
        (one Unified Kernel Image), a read-only EROFS root protected by dm-verity, and a \
        writable /var. No builder VM, no loop devices, no mounting; rebuilds reuse every \
        stage whose inputs did not change."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build the disk image (writes image.lock first if it does not exist).
    Build(build::Args),
    /// Resolve the Debian package set and pin it in image.lock.
    Lock(lock::Args),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
}

pub fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Build(args) => build::run(&args).map(drop)?,
        Command::Lock(args) => lock::run(&args)?,
    }
    Ok(())
}
