//! `image-builder lock`: resolve the spec's Debian package set with
//! mmdebstrap and pin every package (version, pool path, size, sha256) in
//! `image.lock`. Builds install exactly what the lock names.

use crate::cache::{self, Cache};
use crate::debian::{self, DebianError};
use crate::fsio;
use crate::lockfile::{
    inputs_digest, lock_path, Lock, LockFileError, LockedPackage, TOOL_PACKAGES,
};
use crate::progress::{Outcome, Progress};
use crate::spec::{Spec, SpecError};
use crate::tools::{self, ToolError};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub mod update;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Debian(#[from] DebianError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Io(#[from] crate::fsio::PathError),
    #[error(transparent)]
    File(#[from] LockFileError),
    #[error("resolving packages: {0}")]
    Resolve(String),
    #[error(transparent)]
    Payload(#[from] crate::payload::PayloadError),
    #[error("--update: {0}")]
    Update(String),
    #[error("{lock}: {} of {total} payload entries differ from their source:{}", .found.len(), list(.found))]
    Mismatched {
        lock: String,
        total: usize,
        found: Vec<crate::payload::Mismatch>,
    },
}

fn list(found: &[crate::payload::Mismatch]) -> String {
    found.iter().map(|m| format!("\n  {m}")).collect()
}

/// The `pool/` path of a package, as Debian's archive lays it out.
pub fn pool_path(name: &str, source: &str, version: &str, arch: &str) -> String {
    let prefix = if source.starts_with("lib") && source.len() > 3 {
        &source[..4]
    } else {
        &source[..1]
    };
    let upstream = version.split_once(':').map_or(version, |(_, v)| v);
    format!("pool/main/{prefix}/{source}/{name}_{upstream}_{arch}.deb")
}

/// apt's file name for a downloaded package (epoch colon escaped).
fn archive_name(name: &str, version: &str, arch: &str) -> String {
    format!("{name}_{}_{arch}.deb", version.replace(':', "%3a"))
}

/// One installed package from a dpkg status file.
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    pub version: String,
    pub arch: String,
    pub source: String,
}

/// Parses dpkg's status file, keeping packages that are installed.
pub fn parse_status(text: &str) -> Vec<Installed> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |key: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
            };
            if !field("Status")?.ends_with(" installed") {
                return None;
            }
            let name = field("Package")?.to_owned();
            let source = field("Source")
                .map(|s| s.split_whitespace().next().unwrap_or(&name).to_owned())
                .unwrap_or_else(|| name.clone());
            Some(Installed {
                version: field("Version")?.to_owned(),
                arch: field("Architecture")?.to_owned(),
                source,
                name,
            })
        })
        .collect()
}

/// The mmdebstrap invocation shared by resolution and the rootfs build.
pub fn mmdebstrap(source_date_epoch: u64) -> Result<Command, ToolError> {
    tools::require(&[tools::NEWUIDMAP])?;
    let mut cmd = tools::command(tools::MMDEBSTRAP)?;
    cmd.arg("--mode=unshare")
        .arg("--format=directory")
        .arg("--quiet")
        .env("SOURCE_DATE_EPOCH", source_date_epoch.to_string());
    Ok(cmd)
}

/// Resolves the package set and the build's tools against `mirror`, and
/// fills the deb cache.
pub fn resolve(
    spec: &Spec,
    mirror: &str,
    cache: &Cache,
    progress: &Progress,
) -> Result<Lock, LockError> {
    progress.note(&format!(
        "resolving {} packages of {} from {mirror}",
        spec.debian.packages.len(),
        spec.debian.suite
    ));
    let packages = in_workspace(cache, "lock", |work| {
        let debs = work.join("debs");
        fs::create_dir_all(&debs).map_err(fsio::at("creating", &debs))?;
        let mut cmd = mmdebstrap(spec.image.source_date_epoch)?;
        cmd.arg(format!("--variant={}", spec.debian.variant))
            .arg(format!("--include={}", spec.debian.packages.join(",")))
            .arg("--skip=cleanup/apt/cache,essential/unlink")
            .arg(format!(
                "--customize-hook=sync-out /var/cache/apt/archives {}",
                debs.display()
            ))
            .arg(format!(
                "--customize-hook=copy-out /var/lib/dpkg/status {}",
                work.display()
            ))
            .arg(&spec.debian.suite)
            .arg(work.join("root"))
            .arg(mirror);
        tools::run(&mut cmd)?;
        let status_path = work.join("status");
        let status = fs::read_to_string(&status_path).map_err(fsio::at("reading", &status_path))?;
        parse_status(&status)
            .into_iter()
            .map(|p| {
                let file = debs.join(archive_name(&p.name, &p.version, &p.arch));
                pin(cache, p, &file)
            })
            .collect()
    })?;
    Ok(Lock {
        inputs: inputs_digest(spec),
        suite: spec.debian.suite.clone(),
        packages,
        tools: resolve_tools(spec, mirror, cache, progress)?,
    })
}

/// Resolves [`TOOL_PACKAGES`] in the spec's suite with every package they
/// depend on (libc included: the build runs them with their own loader),
/// and fills the deb cache.
pub fn resolve_tools(
    spec: &Spec,
    mirror: &str,
    cache: &Cache,
    progress: &Progress,
) -> Result<Vec<LockedPackage>, LockError> {
    progress.note(&format!(
        "resolving the build's tools ({}) of {}",
        TOOL_PACKAGES.join(", "),
        spec.debian.suite
    ));
    in_workspace(cache, "tools", |work| {
        // `extract` installs nothing, so apt downloads the whole closure;
        // with no tar inside to copy them out, the .debs are read where
        // apt left them in the tree.
        let root = work.join("root");
        let mut cmd = mmdebstrap(spec.image.source_date_epoch)?;
        cmd.arg("--variant=extract")
            .arg(format!("--include={}", TOOL_PACKAGES.join(",")))
            .arg("--skip=cleanup/apt/cache")
            .arg(&spec.debian.suite)
            .arg(&root)
            .arg(mirror);
        tools::run(&mut cmd)?;
        let debs = root.join("var/cache/apt/archives");
        let mut files: Vec<PathBuf> = fs::read_dir(&debs)
            .map_err(fsio::at("listing", &debs))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|file| {
                let fields = tools::run(
                    tools::command(tools::DPKG_DEB)?
                        .arg("--field")
                        .arg(file)
                        .args(["Package", "Version", "Architecture", "Source"]),
                )?;
                let p = parse_control(&fields).ok_or_else(|| {
                    LockError::Resolve(format!("{}: no package name or version", file.display()))
                })?;
                pin(cache, p, file)
            })
            .collect()
    })
}

/// Runs `f` with a fresh work directory, removed afterwards; the pinned
/// packages come back sorted by name.
fn in_workspace(
    cache: &Cache,
    what: &str,
    f: impl FnOnce(&Path) -> Result<Vec<LockedPackage>, LockError>,
) -> Result<Vec<LockedPackage>, LockError> {
    let work = cache.entry("tmp", &format!("{what}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(fsio::at("creating", &work))?;
    let result = f(&work);
    let _ = fs::remove_dir_all(&work);
    let mut packages = result?;
    packages.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(packages)
}

/// Pins a package from the `.deb` apt kept for it, and adopts the file
/// into the cache.
fn pin(cache: &Cache, p: Installed, file: &Path) -> Result<LockedPackage, LockError> {
    let meta = fs::metadata(file).map_err(|_| {
        LockError::Resolve(format!(
            "{} {} was resolved but its .deb was not kept",
            p.name, p.version
        ))
    })?;
    let locked = LockedPackage {
        path: pool_path(&p.name, &p.source, &p.version, &p.arch),
        sha256: cache::sha256_file(file).map_err(fsio::at("hashing", file))?,
        size: meta.len(),
        name: p.name,
        version: p.version,
        arch: p.arch,
    };
    debian::adopt(cache, &locked, file)?;
    Ok(locked)
}

/// Reads one package's control fields (`dpkg-deb --field`'s output).
fn parse_control(text: &str) -> Option<Installed> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
            .map(str::trim)
    };
    let name = field("Package")?.to_owned();
    Some(Installed {
        version: field("Version")?.to_owned(),
        arch: field("Architecture")?.to_owned(),
        source: field("Source")
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or(&name)
            .to_owned(),
        name,
    })
}

/// Arguments of `image-builder lock`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The appliance spec.
    #[arg(long, default_value = "image.toml")]
    pub spec: PathBuf,
    /// Where to write the lock (default: image.lock next to the spec).
    #[arg(long)]
    pub lock: Option<PathBuf>,
    /// Debian mirror URL (default: $SLIPWAY_DEBIAN_MIRROR, the spec's, then apt's).
    #[arg(long)]
    pub mirror: Option<String>,
    /// Cache directory (default: $SLIPWAY_CACHE_DIR or ~/.cache/slipway).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Only pin the payload (payload.lock), not the Debian packages.
    #[arg(long, conflicts_with = "tools_only")]
    pub payload_only: bool,
    /// Only pin the build's own tools (mkfs.erofs and its libraries) again,
    /// keeping the image's package pins and the payload's as they are.
    #[arg(long)]
    pub tools_only: bool,
    /// Change no pin: download every payload artifact and resolve every
    /// image from its source (or the mirrors), and fail, listing each one,
    /// if any differs from its pin.
    #[arg(long, requires = "payload_only")]
    pub check: bool,
    /// Move a payload entry to another release: NAME is an artifact's name
    /// (every artifact from the same download moves with it) or a key of the
    /// image list. Edits the spec or the image list, pins the new release,
    /// and prints what changed. Repeatable.
    #[arg(
        long,
        value_name = "NAME=VERSION",
        requires = "payload_only",
        conflicts_with = "check"
    )]
    pub update: Vec<update::Update>,
    #[command(flatten)]
    pub payload: crate::payload::Sources,
}

/// Pins whatever payload entries `payload.lock` lacks, keeping the rest.
fn lock_payload(
    args: &Args,
    spec: &Spec,
    cache: &Cache,
    progress: &Progress,
) -> Result<(), LockError> {
    use crate::payload;
    let spec_dir = args
        .spec
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let payload::Inputs {
        images,
        lock_path: path,
        lock: old,
        mirrors,
    } = payload::Inputs::load(spec, spec_dir, &args.payload)?;
    if args.check {
        let found = progress.stage("check payload", || {
            let found = payload::check(
                cache,
                &spec.payload.artifacts,
                &images,
                &old,
                &mirrors,
                &spec.pinned_arches(),
                &|m| progress.note(m),
            );
            let n = format!("{} differ", found.len());
            Ok::<_, LockError>((found, Outcome::built(n)))
        })?;
        let total = spec.payload.artifacts.len() * spec.pinned_arches().len()
            + payload::unique_references(&images).len();
        if !found.is_empty() {
            return Err(LockError::Mismatched {
                lock: path.display().to_string(),
                total,
                found,
            });
        }
        eprintln!(
            "{}: all {total} payload entries match their source",
            path.display()
        );
        return Ok(());
    }
    if !args.update.is_empty() {
        return update_payload(args, spec, cache, progress, &path, &old, &mirrors);
    }
    let lock = progress.stage("resolve payload", || {
        payload::refresh(
            cache,
            &spec.payload.artifacts,
            &images,
            &old,
            &mirrors,
            &spec.pinned_arches(),
            &|m| progress.note(m),
        )
        .map(|l| {
            let n = format!("{} artifacts, {} images", l.artifacts.len(), l.images.len());
            (l, Outcome::built(n))
        })
    })?;
    fs::write(&path, lock.to_toml()).map_err(fsio::at("writing", &path))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// `--update`: the spec and image list edited, the new releases pinned,
/// and all three files written only once every pin is known.
fn update_payload(
    args: &Args,
    spec: &Spec,
    cache: &Cache,
    progress: &Progress,
    lock_path: &Path,
    old: &crate::payload::Lock,
    mirrors: &crate::payload::Mirrors,
) -> Result<(), LockError> {
    use crate::payload;
    let read = |p: &Path| fs::read_to_string(p).map_err(fsio::at("reading", p));
    let spec_text = read(&args.spec)?;
    let images_path = spec
        .payload
        .images
        .as_ref()
        .map(|p| args.spec.parent().unwrap_or(Path::new(".")).join(p));
    let images_text = images_path.as_deref().map(read).transpose()?;
    let edited = update::apply(&spec_text, images_text.as_deref(), &args.update)
        .map_err(LockError::Update)?;
    let new_spec = Spec::parse(&edited.spec, &args.spec)?;
    let new_images = match &edited.images {
        Some(text) => {
            toml::from_str(text).map_err(|e| LockError::Update(format!("the image list: {e}")))?
        }
        None => Default::default(),
    };
    let lock = progress.stage("resolve payload", || {
        payload::refresh(
            cache,
            &new_spec.payload.artifacts,
            &new_images,
            old,
            mirrors,
            &new_spec.pinned_arches(),
            &|m| progress.note(m),
        )
        .map(|l| (l, Outcome::built(format!("{} moved", edited.changes.len()))))
    })?;
    let write = |p: &Path, text: &str| {
        let tmp = Cache::temp_for(p);
        fs::write(&tmp, text).map_err(fsio::at("writing", &tmp))?;
        fs::rename(&tmp, p).map_err(fsio::at("renaming", p))
    };
    write(lock_path, &lock.to_toml())?;
    write(&args.spec, &edited.spec)?;
    if let (Some(path), Some(text)) = (&images_path, &edited.images) {
        write(path, text)?;
    }
    let unpinned = || "(no pin)".to_owned();
    for change in &edited.changes {
        println!("{change}");
        match change.what.strip_prefix("artifact ") {
            Some(name) => {
                for arch in new_spec.pinned_arches() {
                    let before = old.artifact(name, &change.from, arch);
                    let after = lock.artifact(name, &change.to, arch);
                    println!(
                        "    {arch} {} -> {}",
                        before.map(|p| p.sha256.clone()).unwrap_or_else(unpinned),
                        after.map(|p| p.sha256.clone()).unwrap_or_else(unpinned)
                    );
                }
            }
            None => println!(
                "    {} -> {}",
                old.image(&change.from)
                    .map(|p| p.digest.clone())
                    .unwrap_or_else(unpinned),
                lock.image(&change.to)
                    .map(|p| p.digest.clone())
                    .unwrap_or_else(unpinned)
            ),
        }
    }
    eprintln!(
        "wrote {}, {}{}",
        lock_path.display(),
        args.spec.display(),
        images_path
            .filter(|_| edited.images.is_some())
            .map(|p| format!(", {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

pub fn run(args: &Args) -> Result<(), LockError> {
    let spec = Spec::load(&args.spec)?;
    let cache = Cache::locate(args.cache_dir.clone());
    if args.payload_only {
        return lock_payload(args, &spec, &cache, &Progress::new());
    }
    let mirror = debian::resolve_mirror(args.mirror.as_deref(), spec.debian.mirror.as_deref())?;
    let progress = Progress::new();
    let path = lock_path(&args.spec, args.lock.as_deref());
    if args.tools_only {
        let mut lock = Lock::load(&path)?;
        lock.tools = progress.stage("resolve tools", || {
            resolve_tools(&spec, &mirror, &cache, &progress).map(|t| {
                let n = format!("{} packages", t.len());
                (t, Outcome::built(n))
            })
        })?;
        lock.save(&path)?;
        eprintln!(
            "wrote {} ({} tool packages)",
            path.display(),
            lock.tools.len()
        );
        return Ok(());
    }
    let lock = progress.stage("resolve packages", || {
        resolve(&spec, &mirror, &cache, &progress).map(|l| {
            let n = format!("{} packages", l.packages.len());
            (l, Outcome::built(n))
        })
    })?;
    lock.save(&path)?;
    eprintln!(
        "wrote {} ({} packages, {} tool packages)",
        path.display(),
        lock.packages.len(),
        lock.tools.len()
    );
    lock_payload(args, &spec, &cache, &progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_paths_follow_the_archive_layout() {
        assert_eq!(
            pool_path("apt", "apt", "3.0.4", "amd64"),
            "pool/main/a/apt/apt_3.0.4_amd64.deb"
        );
        assert_eq!(
            pool_path("libc6", "glibc", "2.41-12", "amd64"),
            "pool/main/g/glibc/libc6_2.41-12_amd64.deb"
        );
        assert_eq!(
            pool_path("libsystemd0", "systemd", "257.9-1", "amd64"),
            "pool/main/s/systemd/libsystemd0_257.9-1_amd64.deb"
        );
        assert_eq!(
            pool_path("conntrack", "conntrack-tools", "1:1.4.8-2", "amd64"),
            "pool/main/c/conntrack-tools/conntrack_1.4.8-2_amd64.deb"
        );
        assert_eq!(
            pool_path("libxz", "libxz", "1", "all"),
            "pool/main/libx/libxz/libxz_1_all.deb"
        );
    }

    #[test]
    fn status_keeps_installed_packages_with_their_source() {
        let status = "Package: a\nStatus: install ok installed\nVersion: 1:2.0-1\nArchitecture: amd64\nSource: asrc (2.0-1)\nDescription: x\n more\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: all\n\nPackage: b\nStatus: install ok installed\nVersion: 3\nArchitecture: all\n";
        let got = parse_status(status);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].source, "asrc");
        assert_eq!(got[0].version, "1:2.0-1");
        assert_eq!(got[1].source, "b");
    }

    #[test]
    fn control_fields_name_the_package_and_its_source() {
        let with_source = "Package: libzstd1\nVersion: 1.5.7+dfsg-1\nArchitecture: amd64\nSource: libzstd (1.5.7+dfsg-1)\n";
        let p = parse_control(with_source).unwrap();
        assert_eq!(
            (p.name.as_str(), p.version.as_str(), p.source.as_str()),
            ("libzstd1", "1.5.7+dfsg-1", "libzstd")
        );
        let own_source = "Package: erofs-utils\nVersion: 1.8.6-1\nArchitecture: amd64\n";
        assert_eq!(parse_control(own_source).unwrap().source, "erofs-utils");
        assert!(parse_control("Version: 1\n").is_none());
    }

    #[test]
    fn lock_round_trips_and_detects_staleness() {
        let dir = tempfile::tempdir().unwrap();
        let lock = Lock {
            inputs: "abc".into(),
            suite: "trixie".into(),
            packages: vec![LockedPackage {
                name: "a".into(),
                version: "1".into(),
                arch: "all".into(),
                path: "pool/main/a/a/a_1_all.deb".into(),
                sha256: "00".repeat(32),
                size: 1,
            }],
            tools: vec![LockedPackage {
                name: "erofs-utils".into(),
                version: "1.8.6-1".into(),
                arch: "amd64".into(),
                path: "pool/main/e/erofs-utils/erofs-utils_1.8.6-1_amd64.deb".into(),
                sha256: "11".repeat(32),
                size: 2,
            }],
        };
        let p = dir.path().join("image.lock");
        lock.save(&p).unwrap();
        let loaded = Lock::load(&p).unwrap();
        assert_eq!(loaded, lock);
        assert!(loaded.has_tools());
        // A lock from before the build pinned its tools still loads, and
        // says what it lacks.
        let text = fs::read_to_string(&p).unwrap();
        let before = &text[..text.find("[[tool]]").unwrap()];
        fs::write(&p, before).unwrap();
        assert!(!Lock::load(&p).unwrap().has_tools());
        fs::write(&p, "garbage = [").unwrap();
        assert!(Lock::load(&p)
            .unwrap_err()
            .to_string()
            .contains("image.lock"));
    }
}
