//! Slipway's image builder: turns the appliance spec into a bootable,
//! read-only, dm-verity-protected disk image without a builder VM.

pub mod build;
pub mod cache;
pub mod debian;
pub mod fetch;
pub mod fsio;
pub mod lock;
pub mod lockfile;
pub mod manifest;
pub mod oci;
pub mod payload;
pub mod progress;
pub mod publish;
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
        stage whose inputs did not change.\n\n\
        With --region (or `image-builder publish` for an image already built) the disk is \
        uploaded as an EBS snapshot, registered as an AMI there and copied to the --copy-to \
        regions, and out/template.json (the CloudFormation template naming exactly those \
        AMIs) and out/release.json are written: one image version, one template version."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Build the disk image (writes image.lock first if it does not exist).
    Build(Box<BuildArgs>),
    /// Pin the Debian package set (image.lock) and whatever payload entries
    /// payload.lock lacks; with --payload-only, --check verifies every
    /// payload pin against its source and --update moves an entry to
    /// another release.
    Lock(lock::Args),
    /// Upload a built image as an EBS snapshot, register it as an AMI in
    /// --region (copying it to --copy-to), and render the release's
    /// CloudFormation template and release.json.
    Publish(publish::Args),
}

/// `image-builder build`: the build's arguments, and where to publish it.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub build: build::Args,
    /// Publish the image once built (see `image-builder publish`).
    #[command(flatten)]
    pub publish: publish::Target,
}

impl BuildArgs {
    /// The template a publish renders: `--template`, else the spec's
    /// `cfn/template.yaml`.
    pub fn template(&self) -> std::path::PathBuf {
        self.publish.template.clone().unwrap_or_else(|| {
            let dir = self
                .build
                .spec
                .parent()
                .unwrap_or(std::path::Path::new("."));
            dir.join("cfn/template.yaml")
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    #[error(transparent)]
    Publish(#[from] publish::PublishError),
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn an_arm64_build_is_refused_saying_what_it_still_needs() {
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("image.toml");
        std::fs::write(
            &spec,
            "[image]\nname = \"x\"\nversion = \"1\"\nsource_date_epoch = 0\narch = \"arm64\"\n\
             [debian]\nsuite = \"trixie\"\npackages = [\"systemd\"]\n\
             [kernel]\ncmdline = \"ro\"\ninitrd_modules = []\n\
             [overlay]\nunits = \"u\"\nmanifests = \"m\"\nbinaries = []\n",
        )
        .unwrap();
        let cli = super::Cli::try_parse_from([
            "image-builder",
            "build",
            "--spec",
            spec.to_str().unwrap(),
            "--out",
            dir.path().join("out").to_str().unwrap(),
        ])
        .unwrap();
        let super::Command::Build(args) = cli.command else {
            panic!("not a build");
        };
        let err = crate::build::run(&args.build).unwrap_err().to_string();
        assert!(err.starts_with("image.arch = \"arm64\""), "{err}");
        assert!(err.contains("Other architectures"), "{err}");
        assert!(!dir.path().join("out").exists());
    }

    #[test]
    fn the_debian_lock_and_the_payload_lock_are_separate_flags() {
        let cli = super::Cli::try_parse_from([
            "image-builder",
            "build",
            "--lock",
            "image.lock",
            "--payload-lock",
            "pins.lock",
        ])
        .unwrap();
        let super::Command::Build(args) = cli.command else {
            panic!("not a build");
        };
        assert_eq!(
            args.build.lock.as_deref(),
            Some(std::path::Path::new("image.lock"))
        );
        assert_eq!(
            args.build.payload.payload_lock.as_deref(),
            Some(std::path::Path::new("pins.lock"))
        );
    }
}
