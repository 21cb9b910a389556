//! `image-builder build`: spec + lock → bootable, verity-protected disk.
//!
//! The stages, one file each, in the order [`run`] wires them:
//!
//! payload (binaries and images, by digest) → packages (the locked .debs) →
//! rootfs (mmdebstrap, normalised) → root (the overlay over it, EROFS,
//! dm-verity) → var (an empty ext4) → esp (initramfs, UKI, FAT) → disk
//! (GPT written, hashed and mapped in one pass; qcow2) → the manifest.
//!
//! Each cached stage is a value holding its inputs; its serialised form is
//! its cache key ([`stage`]). A rebuild that changes only overlay files
//! starts at root; one with no change at all stops after hashing the inputs.

pub mod cpio;
pub mod disk;
pub mod esp;
pub mod fat;
pub mod gpt;
pub mod layer;
pub mod overlay;
pub mod packages;
pub mod payload;
pub mod pinned_tools;
pub mod root;
pub mod rootfs;
pub mod stage;
pub mod uki;
pub mod var;

use crate::cache::Cache;
use crate::debian::{self, DebianError};
use crate::fsio;
use crate::lock::{self, LockError};
use crate::lockfile::{self, Lock, LockFileError};
use crate::manifest::{self, Built, Manifest, PackageInfo, VerityInfo};
use crate::progress::{self, Outcome, Progress};
use crate::spec::{Spec, SpecError};
use crate::tools::{self, ToolError};
use gpt::Guid;
use overlay::Overlay;
use rootfs::RootfsError;
use serde::Serialize;
use sha2::{Digest, Sha256};
use slipway_init::verity;
use stage::Content;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    LockFile(#[from] LockFileError),
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Uki(#[from] uki::UkiError),
    #[error(transparent)]
    Fat(#[from] fat::FatError),
    #[error(transparent)]
    Gpt(#[from] gpt::GptError),
    #[error("verity over {path}: {source}")]
    Verity {
        path: PathBuf,
        #[source]
        source: verity::VerityError,
    },
    #[error(transparent)]
    Io(#[from] crate::fsio::PathError),
    #[error("{lock} does not match {spec} (its package list or suite changed); run `image-builder lock` to re-resolve")]
    StaleLock { lock: PathBuf, spec: PathBuf },
    #[error("{lock} pins no build tools (the mkfs.erofs the root filesystem is written with); run `image-builder lock --tools-only` to pin them and keep every other pin")]
    NoTools { lock: PathBuf },
    #[error(transparent)]
    Payload(#[from] crate::payload::PayloadError),
    #[error(
        "image.arch = {0:?}: its payload is pinned, but the builder makes amd64 images only \
         (an {0} image needs its Debian packages, kernel and EFI stub, the node binaries \
         built for it, and an AMI registered as such; README: \"Other architectures\")"
    )]
    Arch(String),
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("the {stage} stage's inputs: {message}")]
    Inputs {
        stage: &'static str,
        message: String,
    },
}

/// Arguments of `image-builder build`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The appliance spec.
    #[arg(long, default_value = "image.toml")]
    pub spec: PathBuf,
    /// The lock (default: image.lock next to the spec); written if missing.
    #[arg(long)]
    pub lock: Option<PathBuf>,
    /// Build this image version instead of the spec's `image.version`
    /// (e.g. a release stamped by a pipeline); it names the AMI and the
    /// release, and is the image's IMAGE_VERSION.
    #[arg(long, value_name = "VERSION")]
    pub image_version: Option<String>,
    /// Output directory for disk.raw, disk.qcow2 and build-manifest.json.
    #[arg(long, short, default_value = "out")]
    pub out: PathBuf,
    /// Directory holding the workspace binaries the overlay installs
    /// (default: $CARGO_TARGET_DIR/release, else target/release).
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Debian mirror URL (default: $SLIPWAY_DEBIAN_MIRROR, the spec's, then apt's).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Cache directory (default: $SLIPWAY_CACHE_DIR or ~/.cache/slipway).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    #[command(flatten)]
    pub payload: crate::payload::Sources,
}

/// Where the workspace's binaries are unless told otherwise.
pub fn default_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("release")
}

/// Loads the lock, resolving (and writing) it on the first build.
fn ensure_lock(
    spec: &Spec,
    args: &Args,
    cache: &Cache,
    progress: &Progress,
) -> Result<Lock, BuildError> {
    let path = lockfile::lock_path(&args.spec, args.lock.as_deref());
    if path.exists() {
        let lock = Lock::load(&path)?;
        if !lock.is_current_for(spec) {
            return Err(BuildError::StaleLock {
                lock: path,
                spec: args.spec.clone(),
            });
        }
        if !lock.has_tools() {
            return Err(BuildError::NoTools { lock: path });
        }
        return Ok(lock);
    }
    let mirror = debian::resolve_mirror(args.mirror.as_deref(), spec.debian.mirror.as_deref())?;
    let lock = progress.stage("lock", || {
        lock::resolve(spec, &mirror, cache, progress)
            .map(|l| {
                let n = format!("{} packages pinned in {}", l.packages.len(), path.display());
                (l, Outcome::built(n))
            })
            .map_err(BuildError::from)
    })?;
    lock.save(&path)?;
    Ok(lock)
}

/// Outputs kept per stage: a release and the next one built from the same
/// tree (as the cluster test builds them), and one earlier pair.
const KEEP_PER_STAGE: usize = 4;

/// Drops the outputs of stages no recent build used, so a cache that sees a
/// build per change stays the size of a few builds.
fn prune_stages(cache: &Cache, progress: &Progress) {
    use stage::Stage;
    for kind in [
        rootfs::Rootfs::KIND,
        pinned_tools::PinnedTools::KIND,
        root::Root::KIND,
        var::Var::KIND,
        esp::Esp::KIND,
    ] {
        match cache.prune(kind, KEEP_PER_STAGE) {
            Ok(removed) if !removed.is_empty() => progress.note(&format!(
                "cache: removed {} older {kind} entries",
                removed.len()
            )),
            Ok(_) => {}
            Err(e) => progress.note(&format!("cache: could not prune {kind}: {e}")),
        }
    }
}

/// The manifest of an existing output, if it was built from `inputs`.
fn up_to_date(out: &Path, inputs: &str) -> Option<Manifest> {
    let m = Manifest::load(out).ok()?;
    // The manifest is written last: an output changed after it is suspect.
    let written = fs::metadata(out.join(manifest::FILE))
        .and_then(|md| md.modified())
        .ok()?;
    let intact = |f: &manifest::FileDigest| {
        fs::metadata(out.join(&f.file))
            .is_ok_and(|md| md.len() == f.size && md.modified().is_ok_and(|t| t <= written))
    };
    // A manifest without a data map is an older builder's: its publish
    // would have nothing to send.
    let mapped = !m.data_blocks.is_empty();
    (m.inputs == inputs && mapped && intact(&m.disk) && intact(&m.qcow2)).then_some(m)
}

/// The spec, with `--image-version` applied and its architecture checked.
fn load_spec(args: &Args) -> Result<Spec, BuildError> {
    let mut spec = Spec::load(&args.spec)?;
    if let Some(version) = &args.image_version {
        spec.override_version(version, &args.spec)?;
    }
    if !crate::spec::BUILT_ARCHES.contains(&spec.image.arch.as_str()) {
        return Err(BuildError::Arch(spec.image.arch.clone()));
    }
    Ok(spec)
}

/// Everything a build reads; hashed, it is the manifest's `inputs`, and a
/// build directory whose manifest has the same is up to date.
#[derive(Serialize)]
struct Inputs<'a> {
    spec: &'a str,
    release: &'a str,
    rootfs: &'a rootfs::Rootfs<'a>,
    tools: &'a pinned_tools::PinnedTools<'a>,
    overlay: &'a Overlay,
    initrd: &'a Content,
}

/// Builds the disk into `args.out` (see the module docs).
pub fn run(args: &Args) -> Result<Built, BuildError> {
    let progress = Progress::new();
    let spec = load_spec(args)?;
    let spec_text = fs::read_to_string(&args.spec).map_err(fsio::at("reading", &args.spec))?;
    let spec_dir = args
        .spec
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tools::require(tools::BUILD_TOOLS)?;
    let cache = Cache::locate(args.cache_dir.clone());
    let lock = ensure_lock(&spec, args, &cache, &progress)?;
    let bin_dir = args.bin_dir.clone().unwrap_or_else(default_bin_dir);
    let (payload, recorded) = payload::resolve(&spec, spec_dir, &args.payload, &cache, &progress)?;
    let overlay = Overlay::gather(&spec, spec_dir, &bin_dir, payload)?;
    let initrd_path = bin_dir.join("slipway-initrd");
    let initrd =
        Content::of(&initrd_path).map_err(|_| RootfsError::MissingBinary { path: initrd_path })?;

    let image = &spec.image;
    let epoch = image.source_date_epoch;
    // Seeds every identity in the image: filesystem UUIDs, GUIDs, the salt.
    let identity = format!("{}:{}", image.name, image.version);
    let uuid = |what: &str| Guid::derive(&format!("{identity}:{what}")).to_string();
    let release = format!(
        "IMAGE_NAME={}\nIMAGE_VERSION={}\n",
        image.name, image.version
    );
    let rootfs = rootfs::Rootfs {
        lock: &lock,
        suite: &spec.debian.suite,
        exclude: &spec.debian.exclude,
        source_date_epoch: epoch,
        cache: &cache,
    };
    let build_tools = pinned_tools::PinnedTools {
        packages: &lock.tools,
        cache: &cache,
    };
    let inputs = stage::digest(
        "build",
        &Inputs {
            spec: &spec_text,
            release: &release,
            rootfs: &rootfs,
            tools: &build_tools,
            overlay: &overlay,
            initrd: &initrd,
        },
    )?;
    if let Some(manifest) = up_to_date(&args.out, &inputs) {
        eprintln!(
            "{} is up to date ({} {}, disk sha256 {}) in {:.2}s",
            args.out.display(),
            manifest.name,
            manifest.version,
            manifest.disk.sha256,
            progress.elapsed()
        );
        return Ok(Built::from_manifest(&args.out, manifest));
    }

    packages::fetch(
        &cache,
        &lock,
        || {
            let mirror = args.mirror.as_deref();
            Ok(debian::resolve_mirror(
                mirror,
                spec.debian.mirror.as_deref(),
            )?)
        },
        &progress,
    )?;
    let rootfs = stage::run(&cache, &progress, &rootfs)?;
    let build_tools = stage::run(&cache, &progress, &build_tools)?;
    let salt = Sha256::digest(format!("{identity}:verity-salt").as_bytes());
    let root = stage::run(
        &cache,
        &progress,
        &root::Root {
            rootfs: &rootfs,
            overlay: &overlay,
            tools: &build_tools,
            release: &release,
            source_date_epoch: epoch,
            compression: &root::COMPRESSION,
            uuid: uuid("root-fs"),
            salt: hex::encode(salt),
        },
    )?;
    let var = stage::run(
        &cache,
        &progress,
        &var::Var {
            size_mib: image.var_size_mib,
            uuid: uuid("var-fs"),
            source_date_epoch: epoch,
        },
    )?;
    let cmdline = format!(
        "{} roothash={}",
        spec.kernel.cmdline.trim(),
        root.output.root_hash
    );
    let esp_size = image.esp_size_mib << 20;
    let esp = stage::run(
        &cache,
        &progress,
        &esp::Esp {
            rootfs: &rootfs,
            initrd: &initrd,
            modules: &spec.kernel.initrd_modules,
            cmdline: cmdline.clone(),
            release: &release,
            size: esp_size,
            // The ESP's FAT volume ID: the same for every version.
            volume_id: u32::from_le_bytes(
                Guid::derive(&format!("{}:esp", image.name)).bytes()[..4]
                    .try_into()
                    .unwrap_or([0; 4]),
            ),
            source_date_epoch: epoch,
        },
    )?;
    let disk = disk::Disk {
        esp: &esp,
        esp_size,
        root: &root,
        var: &var,
        size_gib: image.disk_size_gib,
        identity: &identity,
    }
    .write(&args.out, &progress)?;

    let manifest = Manifest {
        name: image.name.clone(),
        version: image.version.clone(),
        inputs,
        disk: disk.raw,
        qcow2: disk.qcow2,
        disk_guid: disk.guid.to_string(),
        partitions: disk.partitions,
        data_blocks: manifest::block_ranges(&disk.data_blocks),
        verity: VerityInfo {
            root_hash: root.output.root_hash.clone(),
            salt: hex::encode(salt),
            data_blocks: root.output.data_blocks(),
            hash_device_size: root.output.hash_tree_bytes,
        },
        kernel: rootfs.output.kernel.clone(),
        cmdline,
        uki_size: esp.output.uki_bytes,
        root_tree_bytes: root.output.tree_bytes,
        packages: lock
            .packages
            .iter()
            .map(|p| PackageInfo {
                name: p.name.clone(),
                version: p.version.clone(),
                sha256: p.sha256.clone(),
            })
            .collect(),
        payload: recorded,
        stages: progress.timings(),
        total_seconds: progress.elapsed(),
    };
    manifest.save(&args.out)?;
    prune_stages(&cache, &progress);
    eprintln!(
        "built {} {} in {:.1}s: {} (sha256 {}), root {} + verity {}, ESP {}",
        manifest.name,
        manifest.version,
        manifest.total_seconds,
        args.out.join(disk::RAW).display(),
        manifest.disk.sha256,
        progress::bytes(root.output.image_bytes),
        progress::bytes(root.output.hash_tree_bytes),
        progress::bytes(esp_size)
    );
    Ok(Built {
        out: args.out.clone(),
        manifest,
        data_blocks: disk.data_blocks,
    })
}
