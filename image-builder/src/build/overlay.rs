//! What the image adds to the packages' tree: the workspace's binaries,
//! units (enabled through their `WantedBy=`), manifests and overlay tree,
//! the payload, the release's name, and the build-time versions of what
//! systemd would otherwise do at every boot. The root stage lays it over a
//! hard-linked copy of the rootfs; its serialised form, content digests
//! and all, is part of the root stage's key.

use super::rootfs::RootfsError;
use super::stage::Content;
use crate::fsio;
use crate::spec::Spec;
use crate::tools;
use serde::Serialize;
use slipway_init::contract;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the image's tmpfiles.d keeps the kernel's on-demand device nodes.
const STATIC_NODES: &str = "usr/lib/tmpfiles.d/kmod-static-nodes.conf";

/// Does at build time what kmod-static-nodes.service (masked in the image)
/// does at every boot: turns each kernel's `modules.devname` into the
/// tmpfiles.d lines that create those device nodes (`/dev/net/tun`,
/// `/dev/loop-control`, ...), whose first open loads the module.
pub fn static_nodes(root: &Path) -> Result<(), RootfsError> {
    let modules = root.join("usr/lib/modules");
    let mut kernels: Vec<PathBuf> = match fs::read_dir(&modules) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(fsio::at("reading", &modules)(e).into()),
    };
    kernels.sort();
    let mut conf = String::from(
        "# The kernel's on-demand device nodes, from modules.devname (image-builder).\n",
    );
    for kernel in kernels {
        let devname = kernel.join("modules.devname");
        match fs::read_to_string(&devname) {
            Ok(text) => conf.push_str(&static_nodes_conf(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fsio::at("reading", &devname)(e).into()),
        }
    }
    replace_file(&root.join(STATIC_NODES), conf.as_bytes(), 0o644)
}

/// Marks `/etc` and `/var` as up to date with `/usr` (systemd-update-done's
/// stamps, at the image's timestamp, which is every file's mtime), so the
/// units that refresh caches when `/usr` is newer (ldconfig, the journal's
/// catalog, hwdb) do not run at every boot: the image's `/etc` is new at
/// every boot (an overlay in `/run`), but `/usr` never changes under it.
pub fn mark_updated(root: &Path, epoch: u64) -> Result<(), RootfsError> {
    let stamp = format!(
        "# Written by image-builder: the image's /usr is never newer.\nTIMESTAMP_NSEC={}\n",
        u128::from(epoch) * 1_000_000_000
    );
    for dir in ["etc", "var"] {
        replace_file(&root.join(dir).join(".updated"), stamp.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// tmpfiles.d lines for `modules.devname` (`<module> <name> <c|b><major>:<minor>`),
/// as `kmod static-nodes --format=tmpfiles` writes them; malformed lines
/// are skipped, as kmod skips them.
fn static_nodes_conf(devname: &str) -> String {
    let mut dirs = std::collections::BTreeSet::new();
    let mut out = String::new();
    for line in devname.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace().skip(1);
        let (Some(name), Some(dev)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((kind @ ("c" | "b"), numbers)) = dev.get(..1).zip(dev.get(1..)) else {
            continue;
        };
        if !numbers.split_once(':').is_some_and(|(major, minor)| {
            major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok()
        }) {
            continue;
        }
        if let Some((dir, _)) = name.rsplit_once('/') {
            if dirs.insert(dir) {
                out.push_str(&format!("d /dev/{dir} 0755 - - -\n"));
            }
        }
        out.push_str(&format!("{kind}! /dev/{name} 0600 - - - {numbers}\n"));
    }
    out
}

/// A hard-linked copy of `base` at `dest`: cheap, and the overlay replaces
/// files (new inodes) rather than writing through the links.
pub fn link_copy(base: &Path, dest: &Path) -> Result<(), RootfsError> {
    let _ = fs::remove_dir_all(dest);
    let mut cmd = Command::new("cp");
    cmd.arg("-a").arg("--link").arg(base).arg(dest);
    tools::run(&mut cmd)?;
    Ok(())
}

/// Writes `data` at `path` as a new inode (never through a hard link).
fn replace_file(path: &Path, data: &[u8], mode: u32) -> Result<(), RootfsError> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(fsio::at("creating", dir))?;
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(fsio::at("replacing", path)(e).into())
        }
        _ => {}
    }
    fs::write(path, data).map_err(fsio::at("writing", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(fsio::at("chmod", path))?;
    Ok(())
}

/// What the overlay puts into the image, resolved to host files.
#[derive(Debug, Serialize)]
pub struct Overlay {
    pub files: Vec<OverlayFile>,
    /// (link relative to the root, target)
    pub links: Vec<(PathBuf, String)>,
    pub dirs: Vec<(PathBuf, u32)>,
    /// Payload files from the cache, keyed by their digests (never re-read).
    pub payload: Vec<crate::payload::PayloadFile>,
}

/// A file of the workspace the overlay installs.
#[derive(Debug, Serialize)]
pub struct OverlayFile {
    /// Relative to the image's root.
    pub dest: PathBuf,
    pub src: Content,
    pub mode: u32,
}

impl OverlayFile {
    fn new(dest: PathBuf, src: &Path, mode: u32) -> Result<Self, RootfsError> {
        Ok(Self {
            dest,
            src: Content::of(src)?,
            mode,
        })
    }
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>, RootfsError> {
    let mut out = Vec::new();
    for e in walkdir::WalkDir::new(dir).sort_by_file_name() {
        let e = e.map_err(|e| fsio::at("reading", dir)(e.into()))?;
        if e.file_type().is_file() {
            out.push(e.path().to_owned());
        }
    }
    Ok(out)
}

/// `WantedBy=` targets of a unit file.
fn wanted_by(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix("WantedBy="))
        .flat_map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

impl Overlay {
    /// Gathers the overlay from the spec's directories, `bin_dir` and the
    /// payload.
    pub fn gather(
        spec: &Spec,
        spec_dir: &Path,
        bin_dir: &Path,
        payload: Vec<crate::payload::PayloadFile>,
    ) -> Result<Self, RootfsError> {
        let mut files = Vec::new();
        let mut links = Vec::new();
        for name in &spec.overlay.binaries {
            let src = bin_dir.join(name);
            if !src.is_file() {
                return Err(RootfsError::MissingBinary { path: src });
            }
            files.push(OverlayFile::new(
                PathBuf::from("usr/bin").join(name),
                &src,
                0o755,
            )?);
        }
        let units = spec_dir.join(&spec.overlay.units);
        for src in files_under(&units)? {
            let rel = src.strip_prefix(&units).unwrap_or(&src).to_owned();
            let text = fs::read_to_string(&src).map_err(fsio::at("reading", &src))?;
            let unit_dir = PathBuf::from("usr/lib/systemd/system");
            if let Some(name) = rel.file_name().map(|n| n.to_string_lossy().into_owned()) {
                for target in wanted_by(&text) {
                    links.push((
                        unit_dir.join(format!("{target}.wants")).join(&name),
                        format!("../{name}"),
                    ));
                }
            }
            files.push(OverlayFile::new(unit_dir.join(rel), &src, 0o644)?);
        }
        if let Some(tree) = &spec.overlay.root {
            let tree = spec_dir.join(tree);
            for e in walkdir::WalkDir::new(&tree).sort_by_file_name() {
                let e = e.map_err(|e| fsio::at("reading", &tree)(e.into()))?;
                let rel = e.path().strip_prefix(&tree).unwrap_or(e.path()).to_owned();
                if e.path_is_symlink() {
                    let target = fs::read_link(e.path()).map_err(fsio::at("reading", e.path()))?;
                    links.push((rel, target.to_string_lossy().into_owned()));
                } else if e.file_type().is_file() {
                    let mode = if e
                        .metadata()
                        .is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
                    {
                        0o755
                    } else {
                        0o644
                    };
                    files.push(OverlayFile::new(rel, e.path(), mode)?);
                }
            }
        }
        let manifests = spec_dir.join(&spec.overlay.manifests);
        for src in files_under(&manifests)? {
            let rel = src.strip_prefix(&manifests).unwrap_or(&src).to_owned();
            files.push(OverlayFile::new(
                contract::in_tree(contract::MANIFESTS_DIR).join(rel),
                &src,
                0o644,
            )?);
        }
        Ok(Self {
            files,
            links,
            // The secrets' tmpfs mounts here; its mode holds until it does.
            dirs: vec![(contract::in_tree(contract::SECRETS_DIR).to_owned(), 0o700)],
            payload,
        })
    }

    /// Lays the overlay over `root`.
    pub fn apply(&self, root: &Path, release: &str) -> Result<(), RootfsError> {
        for f in &self.files {
            let data = fs::read(&f.src.path).map_err(fsio::at("reading", &f.src.path))?;
            replace_file(&root.join(&f.dest), &data, f.mode)?;
        }
        for p in &self.payload {
            let dest = root.join(&p.dest);
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir).map_err(fsio::at("creating", dir))?;
            }
            if p.unpacked {
                let _ = fs::remove_dir_all(&dest);
                super::layer::unpack(&p.src, &dest)?;
            } else {
                let _ = fs::remove_file(&dest);
                fs::copy(&p.src, &dest).map_err(fsio::at("copying", &p.src))?;
            }
            fs::set_permissions(&dest, fs::Permissions::from_mode(p.mode))
                .map_err(fsio::at("chmod", &dest))?;
        }
        for (link, target) in &self.links {
            let p = root.join(link);
            if let Some(dir) = p.parent() {
                fs::create_dir_all(dir).map_err(fsio::at("creating", dir))?;
            }
            let _ = fs::remove_file(&p);
            symlink(target, &p).map_err(fsio::at("linking", &p))?;
        }
        for (dir, mode) in &self.dirs {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(fsio::at("creating", &p))?;
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode))
                .map_err(fsio::at("chmod", &p))?;
        }
        replace_file(
            &root.join("usr/lib/slipway/release"),
            release.as_bytes(),
            0o644,
        )?;
        stamp_os_release(root, release)
    }
}

/// Names the image in `usr/lib/os-release` (which `/etc/os-release` links
/// to), where a member reads its release (its Node's `slipway/release`
/// label).
fn stamp_os_release(root: &Path, release: &str) -> Result<(), RootfsError> {
    let path = root.join("usr/lib/os-release");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(fsio::at("reading", &path)(e).into()),
    };
    replace_file(&path, image_os_release(&text, release).as_bytes(), 0o644)
}

/// The packages' os-release text with the image named: `IMAGE_ID` and
/// `IMAGE_VERSION` from `release`'s `IMAGE_NAME` and `IMAGE_VERSION`, in
/// place of any the packages wrote. The root filesystem and the UKI's
/// os-release section both carry this text.
pub fn image_os_release(packages: &str, release: &str) -> String {
    let mut text: String = packages
        .lines()
        .filter(|l| !l.starts_with("IMAGE_ID=") && !l.starts_with("IMAGE_VERSION="))
        .map(|l| format!("{l}\n"))
        .collect();
    for line in release.lines() {
        if let Some(name) = line.strip_prefix("IMAGE_NAME=") {
            text.push_str(&format!("IMAGE_ID={name}\n"));
        } else if line.starts_with("IMAGE_VERSION=") {
            text.push_str(&format!("{line}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_replaces_instead_of_writing_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        fs::create_dir_all(base.join("usr/bin")).unwrap();
        fs::write(base.join("usr/bin/tool"), "old").unwrap();
        fs::create_dir_all(base.join("usr/lib")).unwrap();
        fs::write(
            base.join("usr/lib/os-release"),
            "ID=debian\nIMAGE_VERSION=stale\n",
        )
        .unwrap();
        let work = dir.path().join("work");
        link_copy(&base, &work).unwrap();
        let src = dir.path().join("tool");
        fs::write(&src, "new").unwrap();
        let overlay = Overlay {
            files: vec![OverlayFile::new(PathBuf::from("usr/bin/tool"), &src, 0o755).unwrap()],
            links: vec![(
                PathBuf::from("etc/x.wants/u.service"),
                "../u.service".into(),
            )],
            dirs: vec![(PathBuf::from("srv/kubernetes"), 0o700)],
            payload: vec![],
        };
        overlay
            .apply(&work, "IMAGE_NAME=slipway\nIMAGE_VERSION=0.2.0\n")
            .unwrap();
        // The image names itself in os-release, where a member reads its
        // release label from; the package tree's copy is untouched.
        assert_eq!(
            fs::read_to_string(work.join("usr/lib/os-release")).unwrap(),
            "ID=debian\nIMAGE_ID=slipway\nIMAGE_VERSION=0.2.0\n"
        );
        assert_eq!(
            fs::read_to_string(base.join("usr/lib/os-release")).unwrap(),
            "ID=debian\nIMAGE_VERSION=stale\n"
        );
        assert_eq!(
            fs::read_to_string(work.join("usr/bin/tool")).unwrap(),
            "new"
        );
        assert_eq!(
            fs::read_to_string(base.join("usr/bin/tool")).unwrap(),
            "old"
        );
        let mode = fs::metadata(work.join("srv/kubernetes"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn static_nodes_are_written_as_kmod_writes_them() {
        let devname = "# Device nodes to trigger on-demand module loading.\n\
                       cuse cuse c10:203\n\
                       tun net/tun c10:200\n\
                       dm_mod mapper/control c10:236\n\
                       broken onlytwo\n\
                       odd odd x1:2\n\
                       bad bad c10:x\n";
        assert_eq!(
            static_nodes_conf(devname),
            "c! /dev/cuse 0600 - - - 10:203\n\
             d /dev/net 0755 - - -\n\
             c! /dev/net/tun 0600 - - - 10:200\n\
             d /dev/mapper 0755 - - -\n\
             c! /dev/mapper/control 0600 - - - 10:236\n"
        );
    }

    #[test]
    fn wanted_by_lists_targets() {
        assert_eq!(
            wanted_by("[Install]\nWantedBy=multi-user.target local-fs.target\n"),
            ["multi-user.target", "local-fs.target"]
        );
    }
}
