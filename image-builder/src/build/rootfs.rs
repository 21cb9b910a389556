//! The rootfs stage: the Debian packages of the lock installed by
//! mmdebstrap (unshare mode, offline, from a local repository of exactly the
//! locked packages) and normalised for reproducibility. The root stage lays
//! the image's own files over a copy of it.

use super::stage::{self, Stage};
use super::{uki, BuildError};
use crate::cache::Cache;
use crate::debian;
use crate::fsio;
use crate::lock;
use crate::lockfile::Lock;
use crate::progress::{self, Progress};
use crate::tools::{self, ToolError};
use filetime::FileTime;
use serde::{Deserialize, Serialize, Serializer};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Io(#[from] crate::fsio::PathError),
    #[error("overlay binary {path} does not exist; build it first (cargo build --release) or pass --bin-dir")]
    MissingBinary { path: PathBuf },
    #[error("unpacking the image layer {path}: {message}")]
    Layer { path: PathBuf, message: String },
}

/// Paths removed from the installed tree: host leftovers, caches, logs, and
/// anything that would make two builds differ or two instances share an identity.
const REMOVE: &[&str] = &[
    "etc/hostname",
    "etc/resolv.conf",
    "var/lib/dbus/machine-id",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/available-old",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
];
/// Directories emptied (kept, as packages own them).
const EMPTY: &[&str] = &[
    "var/log",
    "var/cache/apt",
    "var/lib/apt/lists",
    "tmp",
    "var/tmp",
];

/// The packages' tree: every input of the rootfs stage.
#[derive(Debug, Serialize)]
pub struct Rootfs<'a> {
    /// Keyed by its digest: the packages' names, versions and sha256s.
    #[serde(serialize_with = "lock_digest")]
    pub lock: &'a Lock,
    pub suite: &'a str,
    /// dpkg path-exclude patterns.
    pub exclude: &'a [String],
    pub source_date_epoch: u64,
    /// Where the locked .debs are (by sha256, so not an input).
    #[serde(skip)]
    pub cache: &'a Cache,
}

fn lock_digest<S: Serializer>(lock: &&Lock, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&lock.digest())
}

/// What the rootfs stage learnt.
#[derive(Debug, Serialize, Deserialize)]
pub struct RootfsOutput {
    /// The size of its files.
    pub bytes: u64,
    /// The version of the kernel the packages installed.
    pub kernel: String,
}

/// The tree's directory inside the stage's.
pub const TREE: &str = "tree";

impl Stage for Rootfs<'_> {
    const NAME: &'static str = "rootfs";
    const KIND: &'static str = "rootfs";
    type Output = RootfsOutput;

    fn make(&self, dir: &Path, _: &Progress) -> Result<RootfsOutput, BuildError> {
        let repo = debian::local_repo(self.cache, self.lock)?;
        let tree = dir.join(TREE);
        self.install(&repo, &tree)?;
        normalise(&tree, self.source_date_epoch)?;
        Ok(RootfsOutput {
            bytes: stage::tree_bytes(&tree),
            kernel: uki::kernel_version(&tree)?,
        })
    }

    fn note(&self, output: &RootfsOutput) -> String {
        format!(
            "{}, kernel {}",
            progress::bytes(output.bytes),
            output.kernel
        )
    }
}

impl Rootfs<'_> {
    /// Installs the locked packages from `repo` into `dest` (which must not exist).
    fn install(&self, repo: &Path, dest: &Path) -> Result<(), RootfsError> {
        let names: Vec<&str> = self.lock.packages.iter().map(|p| p.name.as_str()).collect();
        let mut cmd = lock::mmdebstrap(self.source_date_epoch)?;
        cmd.arg("--variant=custom")
            .arg(format!("--include={}", names.join(",")));
        for pattern in self.exclude {
            cmd.arg(format!("--dpkgopt=path-exclude={pattern}"));
        }
        // The tree is thrown away if the build fails: no need for dpkg's fsyncs.
        cmd.arg("--dpkgopt=force-unsafe-io");
        // The image's initramfs is ours; never let the kernel package build one.
        cmd.arg("--dpkgopt=path-exclude=/etc/kernel/postinst.d/initramfs-tools")
            .arg(self.suite)
            .arg(dest)
            .arg(format!("deb [trusted=yes] copy://{} ./", repo.display()));
        tools::run(&mut cmd)?;
        Ok(())
    }
}

fn remove_children(dir: &Path) -> io::Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        if e.file_type()?.is_dir() {
            fs::remove_dir_all(&p)?;
        } else {
            fs::remove_file(&p)?;
        }
    }
    Ok(())
}

/// Makes the installed tree reproducible and identity-free.
pub fn normalise(root: &Path, epoch: u64) -> Result<(), RootfsError> {
    for rel in REMOVE {
        let p = root.join(rel);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(fsio::at("removing", &p)(e).into())
            }
            _ => {}
        }
    }
    for rel in EMPTY {
        let p = root.join(rel);
        remove_children(&p).map_err(fsio::at("emptying", &p))?;
    }
    // mmdebstrap leaves the build's own (local, temporary) repository here.
    let sources = root.join("etc/apt/sources.list");
    if sources.exists() {
        fs::write(
            &sources,
            "# This image is immutable: its packages come from its build, not from apt.\n",
        )
        .map_err(fsio::at("writing", &sources))?;
    }
    let machine_id = root.join("etc/machine-id");
    fs::write(&machine_id, b"").map_err(fsio::at("writing", &machine_id))?;
    clamp_mtimes(root, epoch)
}

/// Sets every mtime and atime under `root` to `epoch`, links included.
pub fn clamp_mtimes(root: &Path, epoch: u64) -> Result<(), RootfsError> {
    let t = FileTime::from_unix_time(epoch as i64, 0);
    for entry in walkdir::WalkDir::new(root).contents_first(true) {
        let entry = entry.map_err(|e| fsio::at("walking", root)(e.into()))?;
        filetime::set_symlink_file_times(entry.path(), t, t)
            .map_err(fsio::at("setting times on", entry.path()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_removes_identity_and_clamps_times() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        for d in [
            "etc",
            "var/log/apt",
            "var/lib/apt/lists",
            "tmp",
            "var/tmp",
            "var/cache/apt",
        ] {
            fs::create_dir_all(r.join(d)).unwrap();
        }
        fs::write(r.join("etc/hostname"), "buildhost\n").unwrap();
        fs::write(r.join("etc/machine-id"), "0123\n").unwrap();
        fs::write(r.join("var/log/apt/history.log"), "x").unwrap();
        fs::write(r.join("etc/keep"), "x").unwrap();
        normalise(r, 1000).unwrap();
        assert!(!r.join("etc/hostname").exists());
        assert_eq!(fs::read(r.join("etc/machine-id")).unwrap(), b"");
        assert!(r.join("var/log").exists() && !r.join("var/log/apt").exists());
        let m = fs::metadata(r.join("etc/keep")).unwrap();
        assert_eq!(
            FileTime::from_last_modification_time(&m).unix_seconds(),
            1000
        );
    }
}
