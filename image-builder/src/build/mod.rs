//! `image-builder build`: spec + lock → bootable, verity-protected disk.
//!
//! Stages, each cached by the hash of its inputs: packages (fetch the locked
//! .debs) → rootfs (mmdebstrap, normalise) → root (overlay, EROFS, verity) →
//! var (empty ext4) → esp (initramfs, UKI, FAT) → disk (GPT, raw + qcow2,
//! manifest). A rebuild that changes only overlay files starts at `root`;
//! a rebuild with no change at all stops after hashing the inputs.

pub mod cpio;
pub mod esp;
pub mod gpt;
pub mod rootfs;
pub mod uki;

use crate::cache::{self, Cache, Key};
use crate::debian::{self, DebianError};
use crate::fsio;
use crate::lock::{self, Lock, LockError};
use crate::progress::{self, Outcome, Progress, StageTiming};
use crate::spec::{Spec, SpecError};
use crate::tools::{self, ToolError};
use gpt::Guid;
use rootfs::{Overlay, RootfsError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use slipway_init::{layout, verity};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// Bumped when a stage's output changes for the same inputs.
const BUILDER_EPOCH: &str = "slipway-image-builder-6";
/// How far `/var`'s ext4 can grow online in 4 KiB blocks: 1 TiB, the
/// template's largest root volume.
const VAR_GROWS_TO_BLOCKS: u64 = (1 << 40) / 4096;
const STUB: &str = "usr/lib/systemd/boot/efi/linuxx64.efi.stub";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Rootfs(#[from] RootfsError),
    #[error(transparent)]
    Uki(#[from] uki::UkiError),
    #[error(transparent)]
    Esp(#[from] esp::EspError),
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
    #[error(transparent)]
    Payload(#[from] crate::payload::PayloadError),
    #[error(
        "image.arch = {0:?}: its payload is pinned, but the builder makes amd64 images only \
         (an {0} image needs its Debian packages, kernel and EFI stub, the node binaries \
         built for it, and an AMI registered as such; README: \"Other architectures\")"
    )]
    Arch(String),
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
    /// Publish the image once built (see `image-builder publish`).
    #[command(flatten)]
    pub publish: crate::publish::Target,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileDigest {
    pub file: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub label: String,
    pub type_guid: String,
    pub guid: String,
    pub offset: u64,
    pub size: u64,
    pub content_size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerityInfo {
    pub root_hash: String,
    pub salt: String,
    pub data_blocks: u64,
    pub hash_device_size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackageInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

/// `build-manifest.json`: everything a machine needs to know about a build.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// Hash of every input; equal inputs give an equal disk.
    pub inputs: String,
    pub disk: FileDigest,
    pub qcow2: FileDigest,
    pub disk_guid: String,
    pub partitions: Vec<PartitionInfo>,
    pub verity: VerityInfo,
    pub kernel: String,
    pub cmdline: String,
    pub uki_size: u64,
    pub root_tree_bytes: u64,
    pub packages: Vec<PackageInfo>,
    /// Every payload artifact and image, with its digest.
    #[serde(default)]
    pub payload: crate::payload::Recorded,
    pub stages: Vec<StageTiming>,
    pub total_seconds: f64,
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
    let path = lock::lock_path(&args.spec, args.lock.as_deref());
    if path.exists() {
        let lock = Lock::load(&path)?;
        if !lock.is_current_for(spec) {
            return Err(BuildError::StaleLock {
                lock: path,
                spec: args.spec.clone(),
            });
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

fn dir_size(root: &Path) -> u64 {
    walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

fn sized(path: &Path) -> Result<u64, BuildError> {
    Ok(fs::metadata(path).map_err(fsio::at("reading", path))?.len())
}

/// Runs a stage whose output is a cache directory: `make` fills a temporary
/// directory, which is renamed into place only when it succeeds.
fn cached_dir(
    progress: &Progress,
    stage: &str,
    dir: &Path,
    note: impl Fn(&Path) -> String,
    make: impl FnOnce(&Path) -> Result<(), BuildError>,
) -> Result<(), BuildError> {
    progress.stage(stage, || {
        if dir.exists() {
            Cache::touch(dir);
            return Ok(((), Outcome::cached(note(dir))));
        }
        let parent = dir.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(fsio::at("creating", parent))?;
        let tmp = Cache::temp_for(dir);
        let _ = fs::remove_dir_all(&tmp);
        let result = make(&tmp);
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result?;
        fs::rename(&tmp, dir).map_err(fsio::at("renaming", dir))?;
        Ok(((), Outcome::built(note(dir))))
    })
}

/// Outputs kept per stage: a release and the next one built from the same
/// tree (as the cluster test builds them), and one earlier pair.
const KEEP_PER_STAGE: usize = 4;

/// Drops the outputs of stages no recent build used, so a cache that sees a
/// build per change stays the size of a few builds.
fn prune_stages(cache: &Cache, progress: &Progress) {
    for kind in ["rootfs", "root", "var", "esp"] {
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

fn verity_salt(spec: &Spec) -> Vec<u8> {
    Sha256::digest(format!("{}:{}:verity-salt", spec.image.name, spec.image.version).as_bytes())
        .to_vec()
}

/// Hashes the disk and every partition in one pass.
fn hash_disk(disk: &Path, parts: &[(u64, u64)]) -> Result<(String, Vec<String>), BuildError> {
    let mut f = fs::File::open(disk).map_err(fsio::at("reading", disk))?;
    let mut whole = Sha256::new();
    let mut each: Vec<Sha256> = parts.iter().map(|_| Sha256::new()).collect();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(fsio::at("reading", disk))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        whole.update(chunk);
        for ((off, len), h) in parts.iter().zip(each.iter_mut()) {
            let start = pos.max(*off);
            let end = (pos + n as u64).min(off + len);
            if start < end {
                h.update(&chunk[(start - pos) as usize..(end - pos) as usize]);
            }
        }
        pos += n as u64;
    }
    Ok((
        hex::encode(whole.finalize()),
        each.into_iter()
            .map(|h| hex::encode(h.finalize()))
            .collect(),
    ))
}

fn file_digest(path: &Path) -> Result<FileDigest, BuildError> {
    Ok(FileDigest {
        file: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        size: sized(path)?,
        sha256: cache::sha256_file(path).map_err(fsio::at("hashing", path))?,
    })
}

/// The manifest of an existing output, if it was built from `inputs`.
fn up_to_date(out: &Path, inputs: &str) -> Option<Manifest> {
    let text = fs::read_to_string(out.join("build-manifest.json")).ok()?;
    let m: Manifest = serde_json::from_str(&text).ok()?;
    // The manifest is written last: an output changed after it is suspect.
    let written = fs::metadata(out.join("build-manifest.json"))
        .and_then(|md| md.modified())
        .ok()?;
    let intact = |f: &FileDigest| {
        fs::metadata(out.join(&f.file))
            .is_ok_and(|md| md.len() == f.size && md.modified().is_ok_and(|t| t <= written))
    };
    (m.inputs == inputs && intact(&m.disk) && intact(&m.qcow2)).then_some(m)
}

/// Fetches the payload (cache first) and adds it to the overlay.
fn resolve_payload(
    spec: &Spec,
    spec_dir: &Path,
    args: &Args,
    cache: &Cache,
    progress: &Progress,
    overlay: &mut Overlay,
) -> Result<crate::payload::Recorded, BuildError> {
    use crate::payload;
    let inputs = payload::Inputs::load(spec, spec_dir, &args.payload)?;
    if spec.payload.artifacts.is_empty() && inputs.images.is_empty() {
        return Ok(payload::Recorded::default());
    }
    progress.stage("payload", || {
        let (files, record) = payload::resolve(
            cache,
            &spec.payload.artifacts,
            &inputs,
            &spec.image.arch,
            &|m| progress.note(m),
        )?;
        let bytes: u64 = files
            .iter()
            .map(|f| fs::metadata(&f.src).map(|m| m.len()).unwrap_or(0))
            .sum();
        let note = format!(
            "{} artifacts, {} images, {}",
            record.artifacts.len(),
            record.images.len(),
            progress::bytes(bytes)
        );
        overlay.payload = files;
        Ok::<_, BuildError>((record, Outcome::built(note)))
    })
}

pub fn run(args: &Args) -> Result<Manifest, BuildError> {
    let progress = Progress::new();
    let mut spec = Spec::load(&args.spec)?;
    if let Some(version) = &args.image_version {
        spec.override_version(version, &args.spec)?;
    }
    if !crate::spec::BUILT_ARCHES.contains(&spec.image.arch.as_str()) {
        return Err(BuildError::Arch(spec.image.arch.clone()));
    }
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
    let mut overlay = Overlay::gather(&spec, spec_dir, &bin_dir)?;
    let payload_record = resolve_payload(&spec, spec_dir, args, &cache, &progress, &mut overlay)?;
    let initrd_bin = bin_dir.join("slipway-initrd");
    let initrd_bytes = fs::read(&initrd_bin).map_err(|_| RootfsError::MissingBinary {
        path: initrd_bin.clone(),
    })?;

    // Input keys, cheapest first: these decide what can be reused.
    let rootfs_key = {
        let mut k = Key::new(BUILDER_EPOCH);
        k.str("rootfs")
            .str(&lock.digest())
            .str(&spec.debian.suite)
            .str(&spec.image.source_date_epoch.to_string());
        for e in &spec.debian.exclude {
            k.str(e);
        }
        k.finish()
    };
    let release = format!(
        "IMAGE_NAME={}\nIMAGE_VERSION={}\n",
        spec.image.name, spec.image.version
    );
    let root_key = {
        let mut k = Key::new(BUILDER_EPOCH);
        k.str("root").str(&rootfs_key).str(&release);
        overlay.key(&mut k)?;
        k.finish()
    };
    let inputs = Key::new(BUILDER_EPOCH)
        .str(&root_key)
        .str(&spec_text)
        .bytes(&initrd_bytes)
        .finish();
    if let Some(m) = up_to_date(&args.out, &inputs) {
        eprintln!(
            "{} is up to date ({} {}, disk sha256 {}) in {:.2}s",
            args.out.display(),
            m.name,
            m.version,
            m.disk.sha256,
            progress.elapsed()
        );
        return Ok(m);
    }

    progress.stage("packages", || {
        let missing = lock
            .packages
            .iter()
            .filter(|p| !debian::cached_deb(&cache, p).exists())
            .count();
        if missing == 0 {
            return Ok((
                (),
                Outcome::cached(format!("{} packages", lock.packages.len())),
            ));
        }
        let mirror = debian::resolve_mirror(args.mirror.as_deref(), spec.debian.mirror.as_deref())?;
        let n = debian::fetch_missing(&cache, &lock, &mirror, |m| progress.note(m))?;
        Ok::<_, BuildError>((
            (),
            Outcome::built(format!("fetched {n} of {}", lock.packages.len())),
        ))
    })?;

    let rootfs_dir = cache.entry("rootfs", &rootfs_key);
    cached_dir(
        &progress,
        "rootfs",
        &rootfs_dir,
        |d| progress::bytes(dir_size(d)),
        |tmp| {
            let repo = debian::local_repo(&cache, &lock)?;
            rootfs::install(&spec, &lock, &repo, tmp)?;
            rootfs::normalise(tmp, spec.image.source_date_epoch)?;
            Ok(())
        },
    )?;

    // Root filesystem and its verity tree.
    let root_dir = cache.entry("root", &root_key);
    let salt = verity_salt(&spec);
    let fs_uuid = Guid::derive(&format!(
        "{}:{}:root-fs",
        spec.image.name, spec.image.version
    ));
    let mut root_tree_bytes = 0;
    cached_dir(
        &progress,
        "root filesystem",
        &root_dir,
        |d| {
            format!(
                "{} EROFS",
                progress::bytes(
                    fs::metadata(d.join("root.erofs"))
                        .map(|m| m.len())
                        .unwrap_or(0)
                )
            )
        },
        |tmp| {
            fs::create_dir_all(tmp).map_err(fsio::at("creating", tmp))?;
            let tree = tmp.join("tree");
            rootfs::link_copy(&rootfs_dir, &tree)?;
            overlay.apply(&tree, &release)?;
            rootfs::static_nodes(&tree)?;
            rootfs::mark_updated(&tree, spec.image.source_date_epoch)?;
            rootfs::clamp_mtimes(&tree, spec.image.source_date_epoch)?;
            root_tree_bytes = dir_size(&tree);
            let image = tmp.join("root.erofs");
            let mut cmd = tools::command(tools::MKFS_EROFS)?;
            cmd.arg("--quiet")
                .arg("-zlz4hc")
                .arg(format!("-T{}", spec.image.source_date_epoch))
                .arg(format!("-U{fs_uuid}"))
                .arg("--exclude-regex=^boot/.+")
                .arg(&image)
                .arg(&tree);
            tools::run(&mut cmd)?;
            let result = fs::remove_dir_all(&tree);
            result.map_err(fsio::at("removing", &tree))?;
            // EROFS images are block-aligned already; verity needs whole blocks.
            let len = sized(&image)?;
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .map_err(fsio::at("opening", &image))?;
            f.set_len(len.next_multiple_of(u64::from(verity::BLOCK_SIZE)))
                .map_err(fsio::at("padding", &image))?;
            let input = fs::File::open(&image).map_err(fsio::at("reading", &image))?;
            let tree = verity::build(io::BufReader::new(input), &salt, fs_uuid.bytes()).map_err(
                |source| BuildError::Verity {
                    path: image.clone(),
                    source,
                },
            )?;
            let hash_path = tmp.join("root.verity");
            fs::write(&hash_path, &tree.device).map_err(fsio::at("writing", &hash_path))?;
            let root_hash_path = tmp.join("roothash");
            fs::write(&root_hash_path, hex::encode(tree.root_hash))
                .map_err(fsio::at("writing", &root_hash_path))?;
            fs::write(tmp.join("tree-bytes"), root_tree_bytes.to_string())
                .map_err(fsio::at("writing", tmp))?;
            Ok(())
        },
    )?;
    let root_image = root_dir.join("root.erofs");
    let verity_image = root_dir.join("root.verity");
    let root_hash =
        fs::read_to_string(root_dir.join("roothash")).map_err(fsio::at("reading", &root_dir))?;
    if root_tree_bytes == 0 {
        root_tree_bytes = fs::read_to_string(root_dir.join("tree-bytes"))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
    }
    let data_blocks = sized(&root_image)? / u64::from(verity::BLOCK_SIZE);

    // An empty /var, small; the initramfs fills it from the image on first
    // boot and grows it to the end of the instance's volume.
    let var_mib = spec.image.var_size_mib;
    let var_uuid = Guid::derive(&format!(
        "{}:{}:var-fs",
        spec.image.name, spec.image.version
    ));
    let var_key = Key::new(BUILDER_EPOCH)
        .str("var")
        .str(&var_mib.to_string())
        .str(&var_uuid.to_string())
        .str(&spec.image.source_date_epoch.to_string())
        .finish();
    let var_dir = cache.entry("var", &var_key);
    cached_dir(
        &progress,
        "var filesystem",
        &var_dir,
        |_| format!("{var_mib} MiB ext4"),
        |tmp| {
            fs::create_dir_all(tmp).map_err(fsio::at("creating", tmp))?;
            let mut cmd = tools::command(tools::MKFS_EXT4)?;
            cmd.env(
                "E2FSPROGS_FAKE_TIME",
                spec.image.source_date_epoch.to_string(),
            )
            .arg("-q")
            .arg("-F")
            .arg("-L")
            .arg(layout::VAR_LABEL)
            .arg("-U")
            .arg(var_uuid.to_string())
            // 4 KiB blocks whatever its size, and room in the group
            // descriptors to grow online to the largest root volume the
            // template allows.
            .args(["-b", "4096", "-T", "default"])
            .arg("-E")
            .arg(format!(
                "hash_seed={var_uuid},lazy_itable_init=0,nodiscard,resize={VAR_GROWS_TO_BLOCKS}"
            ))
            .arg(tmp.join("var.ext4"))
            .arg(format!("{var_mib}M"));
            tools::run(&mut cmd)?;
            Ok(())
        },
    )?;
    let var_image = var_dir.join("var.ext4");

    // Initramfs, UKI and ESP.
    let kver = uki::kernel_version(&rootfs_dir)?;
    let cmdline = format!(
        "{} roothash={}",
        spec.kernel.cmdline.trim(),
        root_hash.trim()
    );
    let esp_size = spec.image.esp_size_mib << 20;
    let esp_key = {
        let mut k = Key::new(BUILDER_EPOCH);
        k.str("esp")
            .str(&rootfs_key)
            .str(&cmdline)
            .str(&release)
            .bytes(&initrd_bytes)
            .str(&esp_size.to_string());
        for m in &spec.kernel.initrd_modules {
            k.str(m);
        }
        k.finish()
    };
    let esp_dir = cache.entry("esp", &esp_key);
    let volume_id = u32::from_le_bytes(
        Guid::derive(&format!("{}:esp", spec.image.name)).bytes()[..4]
            .try_into()
            .unwrap_or([0; 4]),
    );
    cached_dir(
        &progress,
        "esp",
        &esp_dir,
        |d| {
            format!(
                "UKI {}",
                progress::bytes(
                    fs::metadata(d.join("uki.efi"))
                        .map(|m| m.len())
                        .unwrap_or(0)
                )
            )
        },
        |tmp| {
            fs::create_dir_all(tmp).map_err(fsio::at("creating", tmp))?;
            let initramfs = uki::initramfs(
                &rootfs_dir,
                &kver,
                &initrd_bin,
                &spec.kernel.initrd_modules,
                spec.image.source_date_epoch,
            )?;
            let stub_path = rootfs_dir.join(STUB);
            let stub = fs::read(&stub_path).map_err(fsio::at(
                "reading the EFI stub (is systemd-boot-efi in debian.packages?)",
                &stub_path,
            ))?;
            let kernel_path = rootfs_dir.join("boot").join(format!("vmlinuz-{kver}"));
            let kernel = fs::read(&kernel_path).map_err(fsio::at("reading", &kernel_path))?;
            let os_release_path = rootfs_dir.join("usr/lib/os-release");
            let packages_os_release = fs::read_to_string(&os_release_path)
                .map_err(fsio::at("reading", &os_release_path))?;
            let os_release = rootfs::image_os_release(&packages_os_release, &release);
            let image = uki::add_sections(
                &stub,
                &[
                    (".osrel", os_release.as_bytes()),
                    (".cmdline", cmdline.as_bytes()),
                    (".uname", kver.as_bytes()),
                    (".initrd", &initramfs),
                    (".linux", &kernel),
                ],
                &stub_path,
            )?;
            let uki_path = tmp.join("uki.efi");
            fs::write(&uki_path, &image).map_err(fsio::at("writing", &uki_path))?;
            let esp_img = esp::build(esp_size, volume_id, &image)?;
            let esp_path = tmp.join("esp.img");
            fs::write(&esp_path, esp_img).map_err(fsio::at("writing", &esp_path))?;
            Ok(())
        },
    )?;
    let esp_image = esp_dir.join("esp.img");
    let uki_size = sized(&esp_dir.join("uki.efi"))?;

    // The disk.
    fs::create_dir_all(&args.out).map_err(fsio::at("creating", &args.out))?;
    let disk_path = args.out.join("disk.raw");
    let qcow2_path = args.out.join("disk.qcow2");
    let id = |what: &str| {
        Guid::derive(&format!(
            "{}:{}:{what}",
            spec.image.name, spec.image.version
        ))
    };
    let guid = |s: &str| Guid::parse(s).unwrap_or(Guid::derive(s));
    let contents = [
        (
            layout::ESP_LABEL,
            layout::ESP_TYPE,
            esp_image.as_path(),
            esp_size,
        ),
        (
            layout::ROOT_LABEL,
            layout::ROOT_X86_64_TYPE,
            root_image.as_path(),
            sized(&root_image)?,
        ),
        (
            layout::VERITY_LABEL,
            layout::ROOT_X86_64_VERITY_TYPE,
            verity_image.as_path(),
            sized(&verity_image)?,
        ),
        (
            layout::VAR_LABEL,
            layout::VAR_TYPE,
            var_image.as_path(),
            var_mib << 20,
        ),
    ];
    let parts: Vec<gpt::Partition<'_>> = contents
        .iter()
        .map(|(label, ty, path, size)| gpt::Partition {
            label,
            type_guid: guid(ty),
            guid: id(label),
            size: *size,
            content: Some(path),
        })
        .collect();
    let disk_guid = id("disk");
    // EBS volumes come in whole GiB; /var grows at boot to the volume's end.
    let disk_gib = spec
        .image
        .disk_size_gib
        .unwrap_or_else(|| gpt::needed_bytes(&parts).div_ceil(1 << 30));
    let disk_size = disk_gib << 30;
    let (placed, disk_sha, part_shas) = progress.stage("disk", || {
        let placed = gpt::write(&disk_path, disk_guid, &parts, disk_size)?;
        let regions: Vec<(u64, u64)> = placed.iter().map(|p| (p.offset(), p.size())).collect();
        let (disk_sha, part_shas) = hash_disk(&disk_path, &regions)?;
        let note = format!("{disk_gib} GiB, sha256 {}", &disk_sha[..16]);
        Ok::<_, BuildError>(((placed, disk_sha, part_shas), Outcome::built(note)))
    })?;
    progress.stage("qcow2", || {
        let _ = fs::remove_file(&qcow2_path);
        let mut cmd = tools::command(tools::QEMU_IMG)?;
        cmd.args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&disk_path)
            .arg(&qcow2_path);
        tools::run(&mut cmd)?;
        Ok::<_, BuildError>(((), Outcome::built(progress::bytes(sized(&qcow2_path)?))))
    })?;

    let partitions = placed
        .iter()
        .zip(&contents)
        .zip(part_shas)
        .map(
            |((p, (label, ty, _, content_size)), sha256)| PartitionInfo {
                label: (*label).to_owned(),
                type_guid: (*ty).to_owned(),
                guid: id(label).to_string(),
                offset: p.offset(),
                size: p.size(),
                content_size: *content_size,
                sha256,
            },
        )
        .collect();
    let manifest = Manifest {
        name: spec.image.name.clone(),
        version: spec.image.version.clone(),
        inputs,
        disk: FileDigest {
            file: "disk.raw".into(),
            size: disk_size,
            sha256: disk_sha,
        },
        qcow2: file_digest(&qcow2_path)?,
        disk_guid: disk_guid.to_string(),
        partitions,
        verity: VerityInfo {
            root_hash: root_hash.trim().to_owned(),
            salt: hex::encode(&salt),
            data_blocks,
            hash_device_size: sized(&verity_image)?,
        },
        kernel: kver,
        cmdline,
        uki_size,
        root_tree_bytes,
        packages: lock
            .packages
            .iter()
            .map(|p| PackageInfo {
                name: p.name.clone(),
                version: p.version.clone(),
                sha256: p.sha256.clone(),
            })
            .collect(),
        payload: payload_record,
        stages: progress.timings(),
        total_seconds: progress.elapsed(),
    };
    let manifest_path = args.out.join("build-manifest.json");
    let json = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    fs::write(&manifest_path, json + "\n").map_err(fsio::at("writing", &manifest_path))?;
    prune_stages(&cache, &progress);
    eprintln!(
        "built {} {} in {:.1}s: {} (sha256 {}), root {} + verity {}, ESP {}",
        manifest.name,
        manifest.version,
        manifest.total_seconds,
        disk_path.display(),
        manifest.disk.sha256,
        progress::bytes(sized(&root_image)?),
        progress::bytes(manifest.verity.hash_device_size),
        progress::bytes(esp_size)
    );
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_partition_hashes_cover_their_regions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let mut data = vec![0u8; 3 << 20];
        data[(1 << 20) + 5] = 9;
        fs::write(&p, &data).unwrap();
        let (whole, parts) = hash_disk(&p, &[(1 << 20, 1 << 20), (2 << 20, 1 << 20)]).unwrap();
        assert_eq!(whole, cache::sha256_bytes(&data));
        assert_eq!(parts[0], cache::sha256_bytes(&data[1 << 20..2 << 20]));
        assert_eq!(parts[1], cache::sha256_bytes(&[0u8; 1 << 20]));
    }
}
