//! A container image's layer unpacked at build time into the directory
//! containerd's overlayfs snapshotter would have made of it at boot: the
//! layer's files with their owners, modes and extended attributes, and
//! the OCI whiteouts turned into overlayfs's (a `.wh.NAME` entry becomes
//! the character device 0:0 at `NAME`; a `.wh..wh..opq` entry marks its
//! directory opaque). slipway-init hands each such directory to
//! containerd as the layer's snapshot, so no member unpacks a layer.

use super::rootfs::RootfsError;
use std::ffi::CString;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// The prefix OCI layers mark a removed entry with.
const WHITEOUT: &str = ".wh.";
/// The entry that makes its directory hide everything below it.
const OPAQUE: &str = ".wh..wh..opq";
/// The attribute overlayfs reads an opaque directory's mark from.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What an unpacking made.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Unpacked {
    pub entries: usize,
    pub whiteouts: usize,
}

/// Unpacks the layer at `blob` (a tar, gzip-compressed or not) into `dest`,
/// which must not exist. Runs as root: it sets owners and makes devices.
pub fn unpack(blob: &Path, dest: &Path) -> Result<Unpacked, RootfsError> {
    let failed = |message: String| RootfsError::Layer {
        path: blob.to_owned(),
        message,
    };
    let stream = open(blob).map_err(failed)?;
    fs::create_dir(dest).map_err(|e| failed(format!("creating {}: {e}", dest.display())))?;
    unpack_tar(stream, dest).map_err(failed)
}

/// The tar stream of the layer at `blob`, gzip-compressed or not.
pub fn open(blob: &Path) -> Result<Box<dyn Read>, String> {
    let file = fs::File::open(blob).map_err(|e| format!("opening: {e}"))?;
    let mut reader = BufReader::new(file);
    let magic = reader.fill_buf().map_err(|e| format!("reading: {e}"))?;
    Ok(match magic {
        [0x1f, 0x8b, ..] => Box::new(flate2::read::GzDecoder::new(reader)),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            return Err(
                "is zstd-compressed; only gzip and uncompressed layers are supported".into(),
            )
        }
        _ => Box::new(reader),
    })
}

fn unpack_tar(stream: impl Read, dest: &Path) -> Result<Unpacked, String> {
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(true);
    // Owners are set below: the tar crate refuses an empty owner field,
    // which Go's archive/tar (and so containerd) reads as 0.
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    let mut made = Unpacked::default();
    let entries = archive.entries().map_err(|e| format!("reading: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading an entry: {e}"))?;
        let path = entry
            .path()
            .map_err(|e| format!("an entry's path: {e}"))?
            .into_owned();
        let at = |e: io::Error| {
            format!(
                "{}: {}",
                path.display(),
                slipway_init::error_chain(&e, ": ")
            )
        };
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        match name.as_deref() {
            Some(OPAQUE) => {
                let dir = dest.join(inside(&path.with_file_name(""))?);
                fs::create_dir_all(&dir).map_err(at)?;
                set_xattr(&dir, OPAQUE_XATTR, b"y").map_err(at)?;
                made.whiteouts += 1;
            }
            Some(n) if n.starts_with(WHITEOUT) => {
                let hidden = dest.join(inside(&path.with_file_name(&n[WHITEOUT.len()..]))?);
                if let Some(dir) = hidden.parent() {
                    fs::create_dir_all(dir).map_err(at)?;
                }
                remove_any(&hidden).map_err(at)?;
                whiteout(&hidden).map_err(at)?;
                made.whiteouts += 1;
            }
            _ => {
                let header = entry.header();
                let owner = (
                    owner_id(&header.as_old().uid, header.uid()).map_err(at)?,
                    owner_id(&header.as_old().gid, header.gid()).map_err(at)?,
                );
                let mode = header.mode().map_err(at)? & 0o7777;
                let symlink = header.entry_type().is_symlink();
                let xattrs = pax_xattrs(&mut entry).map_err(at)?;
                if entry.unpack_in(dest).map_err(at)? && owner != (0, 0) {
                    // The build runs as root, so what it made is root's.
                    // A new owner clears the set-ID bits and the file
                    // capabilities the kernel guards: they are set again.
                    let made_at = dest.join(inside(&path)?);
                    let id = |n: u64| u32::try_from(n).ok();
                    std::os::unix::fs::lchown(&made_at, id(owner.0), id(owner.1)).map_err(at)?;
                    if !symlink {
                        fs::set_permissions(&made_at, fs::Permissions::from_mode(mode))
                            .map_err(at)?;
                    }
                    for (name, value) in &xattrs {
                        set_xattr(&made_at, name, value).map_err(at)?;
                    }
                }
                made.entries += 1;
            }
        }
    }
    Ok(made)
}

/// The extended attributes an entry's PAX header carries, by name.
fn pax_xattrs<R: Read>(entry: &mut tar::Entry<R>) -> io::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(extensions) = entry.pax_extensions()? {
        for ext in extensions {
            let ext = ext?;
            if let Ok(key) = ext.key() {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    out.push((name.to_owned(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

/// A header's owner field: as the tar crate reads it, but an empty one
/// (all NULs or spaces) is 0, as Go's archive/tar reads it.
fn owner_id(raw: &[u8], parsed: io::Result<u64>) -> io::Result<u64> {
    if raw.iter().all(|b| *b == 0 || *b == b' ') {
        Ok(0)
    } else {
        parsed
    }
}

/// `path` as a relative path that stays below the layer's root.
fn inside(path: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("{} leaves the layer", path.display()))
            }
        }
    }
    Ok(out)
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))
}

/// overlayfs's whiteout: a character device numbered 0:0.
fn whiteout(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    os_result(unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR, libc::makedev(0, 0)) })
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = c_path(path)?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both strings are NUL-terminated and outlive the call; the
    // value's pointer and length describe one live slice.
    os_result(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
}

/// A system call's return code as a result: 0 is success.
fn os_result(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    /// A layer of `entries`; an owner of `None` leaves the header's
    /// owner fields empty (NULs), as some image builders write them.
    fn layer(entries: &[(&str, tar::EntryType, &[u8], Option<u32>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, owner) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(data.len() as u64);
            h.set_mode(if kind.is_dir() { 0o755 } else { 0o4750 });
            match owner {
                Some(id) => {
                    h.set_uid(u64::from(*id));
                    h.set_gid(u64::from(*id));
                }
                None => {
                    h.as_old_mut().uid = [0; 8];
                    h.as_old_mut().gid = [0; 8];
                }
            }
            b.append_data(&mut h, path, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    // Sets owners and makes a device: run as root, as the build is.
    #[test]
    fn files_keep_owners_and_modes_and_whiteouts_become_overlayfs_ones() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("layer.tar.gz");
        let tar = layer(&[
            ("etc/", tar::EntryType::Directory, b"", None),
            (
                "etc/app.conf",
                tar::EntryType::Regular,
                b"x=1\n",
                Some(65532),
            ),
            ("etc/.wh.old.conf", tar::EntryType::Regular, b"", Some(0)),
            (
                "var/cache/.wh..wh..opq",
                tar::EntryType::Regular,
                b"",
                Some(0),
            ),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &tar).unwrap();
        fs::write(&blob, gz.finish().unwrap()).unwrap();
        let dest = dir.path().join("tree");

        let made = unpack(&blob, &dest).unwrap();

        assert_eq!(
            made,
            Unpacked {
                entries: 2,
                whiteouts: 2
            }
        );
        let conf = fs::metadata(dest.join("etc/app.conf")).unwrap();
        assert_eq!(
            (conf.uid(), conf.gid(), conf.mode() & 0o7777),
            (65532, 65532, 0o4750),
            "owned as the layer says, its set-user-ID bit kept"
        );
        let etc = fs::metadata(dest.join("etc")).unwrap();
        assert_eq!((etc.uid(), etc.gid()), (0, 0), "an empty owner is root");
        assert_eq!(fs::read(dest.join("etc/app.conf")).unwrap(), b"x=1\n");
        let old = fs::symlink_metadata(dest.join("etc/old.conf")).unwrap();
        assert!(old.file_type().is_char_device() && old.rdev() == 0);
        assert!(!dest.join("etc/.wh.old.conf").exists());
        let c = c_path(&dest.join("var/cache")).unwrap();
        let n = CString::new(OPAQUE_XATTR).unwrap();
        let mut value = [0u8; 4];
        // SAFETY: the strings are NUL-terminated; the buffer is live and its length is passed.
        let len = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        assert_eq!(&value[..usize::try_from(len).unwrap()], b"y");
    }

    #[test]
    fn a_whiteout_outside_the_layer_and_a_zstd_layer_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let blob = dir.path().join("escape.tar");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        // The tar crate refuses `..` in set_path; write the name raw.
        h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../.wh.passw");
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        fs::write(&blob, b.into_inner().unwrap()).unwrap();
        let err = unpack(&blob, &dir.path().join("a"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the layer"), "{err}");

        let zstd = dir.path().join("layer.tar.zst");
        fs::write(&zstd, [0x28, 0xb5, 0x2f, 0xfd, 0, 0]).unwrap();
        let err = unpack(&zstd, &dir.path().join("b"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("zstd"), "{err}");
        assert!(!dir.path().join("b").exists());
    }
}
