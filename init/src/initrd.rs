//! The initramfs: load the few modules the root needs, open the verity
//! device with the root hash from the (signed-with-the-kernel) command line,
//! mount root read-only, `/var` writable and `/etc` as a tmpfs-backed overlay,
//! then hand over to systemd. Any failure refuses the root and powers off.

use crate::dm;
use crate::grow;
use crate::layout;
use crate::verity::{self, Superblock};
use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The secrets' tmpfs's options: srv-kubernetes.mount's, which the boot
/// check holds the mount to.
pub const SECRETS_TMPFS: &str = "mode=0700,size=64m";

const DEVICE_DEADLINE: Duration = Duration::from_secs(60);
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no partition labelled {label} appeared within {secs} s")]
    NoPartition { label: String, secs: u64 },
    #[error("verity superblock on {path}: {source}")]
    Verity {
        path: PathBuf,
        #[source]
        source: verity::VerityError,
    },
    #[error("activating verity root: {0}")]
    Dm(#[from] dm::DmError),
    #[error("mounting {what} on {target}: {source}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> InitrdError + 'a {
    move |source| InitrdError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What the kernel command line tells the initramfs.
#[derive(Debug, PartialEq, Eq)]
pub struct BootParams {
    /// Hex root hash of the verity tree over the root partition.
    pub root_hash: String,
    /// Program to hand over to.
    pub init: String,
}

impl BootParams {
    pub fn from_cmdline(cmdline: &str) -> Result<Self, InitrdError> {
        let mut root_hash = None;
        let mut init = "/sbin/init".to_owned();
        for word in cmdline.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("roothash=") {
                root_hash = Some(v.to_owned());
            } else if let Some(v) = word.strip_prefix("slipway.init=") {
                init = v.to_owned();
            }
        }
        let root_hash =
            root_hash.ok_or_else(|| InitrdError::Cmdline("no roothash= given".to_owned()))?;
        if root_hash.len() != 64 || !root_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(InitrdError::Cmdline(format!(
                "roothash={root_hash} is not a SHA-256 hex digest"
            )));
        }
        Ok(Self { root_hash, init })
    }
}

/// Finds the block device whose GPT partition name is `label`, by reading
/// the kernel's uevent files under `sys_class_block`.
pub fn find_partition(sys_class_block: &Path, label: &str) -> Option<String> {
    let entries = fs::read_dir(sys_class_block).ok()?;
    for entry in entries.flatten() {
        let Ok(uevent) = fs::read_to_string(entry.path().join("uevent")) else {
            continue;
        };
        let mut devname = None;
        let mut partname = None;
        for line in uevent.lines() {
            if let Some(v) = line.strip_prefix("DEVNAME=") {
                devname = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("PARTNAME=") {
                partname = Some(v.to_owned());
            }
        }
        if partname.as_deref() == Some(label) {
            return devname;
        }
    }
    None
}

fn wait_for_partition(label: &str) -> Result<PathBuf, InitrdError> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(dev) = find_partition(Path::new("/sys/class/block"), label) {
            return Ok(Path::new("/dev").join(dev));
        }
        if start.elapsed() > DEVICE_DEADLINE {
            return Err(InitrdError::NoPartition {
                label: label.to_owned(),
                secs: DEVICE_DEADLINE.as_secs(),
            });
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

fn cstr(s: &str) -> CString {
    // Paths and options here are ours and contain no NUL.
    CString::new(s).unwrap_or_default()
}

fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), InitrdError> {
    let (c_src, c_target, c_type, c_data) = (cstr(src), cstr(target), cstr(fstype), cstr(data));
    // SAFETY: all pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::mount(
            c_src.as_ptr(),
            c_target.as_ptr(),
            if fstype.is_empty() {
                std::ptr::null()
            } else {
                c_type.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                c_data.as_ptr().cast()
            },
        )
    };
    if rc != 0 {
        return Err(InitrdError::Mount {
            what: format!("{fstype} {src}"),
            target: target.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

fn load_modules(dir: &Path) -> Result<(), InitrdError> {
    let order_path = dir.join(layout::INITRD_LOAD_ORDER);
    let order = fs::read_to_string(&order_path).map_err(io_err("reading", &order_path))?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let file = fs::File::open(&path).map_err(io_err("opening module", &path))?;
        let empty = cstr("");
        // SAFETY: a valid fd and a NUL-terminated (empty) parameter string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                empty.as_ptr(),
                MODULE_INIT_COMPRESSED_FILE,
            )
        };
        let err = io::Error::last_os_error();
        if rc != 0 && err.raw_os_error() != Some(libc::EEXIST) {
            return Err(InitrdError::Io {
                what: "loading module",
                path,
                source: err,
            });
        }
    }
    Ok(())
}

fn read_superblock(path: &Path) -> Result<Superblock, InitrdError> {
    let mut buf = vec![0u8; verity::SUPERBLOCK_LEN];
    fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(io_err("reading", path))?;
    Superblock::decode(&buf).map_err(|source| InitrdError::Verity {
        path: path.to_owned(),
        source,
    })
}

fn say(msg: &str) {
    eprintln!("slipway-initrd: {msg}");
}

/// Opens the verity root and mounts the system under `/sysroot`.
fn assemble(params: &BootParams) -> Result<(), InitrdError> {
    let t0 = Instant::now();
    load_modules(Path::new(layout::INITRD_MODULE_DIR))?;
    let data = wait_for_partition(layout::ROOT_LABEL)?;
    let hash = wait_for_partition(layout::VERITY_LABEL)?;
    let var = wait_for_partition(layout::VAR_LABEL)?;
    let sb = read_superblock(&hash)?;
    let table = sb.table_params(
        &data.to_string_lossy(),
        &hash.to_string_lossy(),
        &params.root_hash,
    );
    let (major, minor) = dm::create_readonly(
        Path::new("/dev/mapper/control"),
        layout::DM_ROOT_NAME,
        layout::DM_ROOT_UUID,
        &dm::Target {
            sectors: sb.data_blocks * u64::from(verity::BLOCK_SIZE / 512),
            kind: "verity",
            params: &table,
        },
    )?;
    let root_dev = format!("/dev/mapper/{}", layout::DM_ROOT_NAME);
    let c_root = cstr(&root_dev);
    // SAFETY: valid path; creating a block device node in devtmpfs.
    let rc = unsafe {
        libc::mknod(
            c_root.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(io_err("creating", Path::new(&root_dev))(err));
        }
    }
    say(&format!(
        "verity root {major}:{minor} over {} (hash {}), {} blocks",
        data.display(),
        hash.display(),
        sb.data_blocks
    ));
    mount(&root_dev, "/sysroot", "erofs", libc::MS_RDONLY, "")?;
    grow_var_partition(&var);
    prepare_var(&var)?;
    mount(
        "tmpfs",
        "/sysroot/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    let overlay = Path::new("/sysroot").join(layout::ETC_OVERLAY_DIR.trim_start_matches('/'));
    for sub in ["upper", "work"] {
        let dir = overlay.join(sub);
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
    }
    let o = overlay.display();
    mount(
        "overlay",
        "/sysroot/etc",
        "overlay",
        0,
        &format!("lowerdir=/sysroot/etc,upperdir={o}/upper,workdir={o}/work"),
    )?;
    // The secrets' tmpfs, as srv-kubernetes.mount describes it: mounted
    // here, a system call, it is not a mount(8) run at the head of
    // slipway-init's critical chain; systemd finds it mounted.
    mount(
        "tmpfs",
        &format!("/sysroot{}", crate::contract::SECRETS_DIR),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        SECRETS_TMPFS,
    )?;
    say(&format!(
        "root, /var, /etc and the secrets' tmpfs ready in {} ms",
        t0.elapsed().as_millis()
    ));
    Ok(())
}

/// Extends the `/var` partition over a disk larger than the image's (the
/// instance's root volume); a failure leaves `/var` as it was and is said.
fn grow_var_partition(var: &Path) {
    let Some(ty) = grow::guid_on_disk(layout::VAR_TYPE) else {
        return;
    };
    let t = Instant::now();
    match grow::grow_var_partition(var, ty) {
        Ok(Some(g)) => say(&format!(
            "/var's partition extended from {} to {} MiB, to the end of the disk ({} ms)",
            g.old_len_bytes() >> 20,
            g.len_bytes() >> 20,
            t.elapsed().as_millis()
        )),
        Ok(None) => {}
        Err(e) => say(&format!(
            "not extending /var's partition: {}",
            crate::error_chain(&e, ": ")
        )),
    }
}

/// Mounts the writable `/var` partition. On first boot it is empty: it gets
/// a copy of the image's own `/var` before it is mounted over it.
fn prepare_var(device: &Path) -> Result<(), InitrdError> {
    let staging = Path::new("/var.new");
    fs::create_dir_all(staging).map_err(io_err("creating", staging))?;
    mount(
        &device.to_string_lossy(),
        "/var.new",
        "ext4",
        libc::MS_NOSUID | libc::MS_NODEV,
        "",
    )?;
    let t = Instant::now();
    match grow::grow_filesystem(staging, device) {
        Ok((old, new)) if new > old => say(&format!(
            "/var grown from {} to {} MiB ({} ms)",
            old >> 20,
            new >> 20,
            t.elapsed().as_millis()
        )),
        Ok(_) => {}
        Err(e) => say(&format!("not growing /var's filesystem: {e}")),
    }
    let marker = staging.join(".slipway-populated");
    if !marker.exists() {
        let n = copy_tree(Path::new("/sysroot/var"), staging)?;
        fs::write(&marker, b"").map_err(io_err("writing", &marker))?;
        say(&format!(
            "first boot: /var populated from the image ({n} entries)"
        ));
    }
    mount("/var.new", "/sysroot/var", "", libc::MS_MOVE, "")
}

/// Copies a tree with owners, modes and links; returns the number of entries.
pub fn copy_tree(from: &Path, to: &Path) -> Result<usize, InitrdError> {
    use std::os::unix::fs::{lchown, MetadataExt, PermissionsExt};
    let mut count = 0;
    let entries = fs::read_dir(from).map_err(io_err("reading", from))?;
    for entry in entries {
        let entry = entry.map_err(io_err("reading", from))?;
        let src = entry.path();
        let dest = to.join(entry.file_name());
        let meta = fs::symlink_metadata(&src).map_err(io_err("inspecting", &src))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            if !dest.exists() {
                fs::create_dir(&dest).map_err(io_err("creating", &dest))?;
            }
            count += copy_tree(&src, &dest)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&src).map_err(io_err("reading link", &src))?;
            std::os::unix::fs::symlink(&target, &dest).map_err(io_err("linking", &dest))?;
        } else if kind.is_file() {
            fs::copy(&src, &dest).map_err(io_err("copying to", &dest))?;
        } else {
            continue; // sockets, fifos and devices have no place in an image's /var
        }
        lchown(&dest, Some(meta.uid()), Some(meta.gid())).map_err(io_err("chown", &dest))?;
        if !kind.is_symlink() {
            fs::set_permissions(&dest, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_err("chmod", &dest))?;
        }
        count += 1;
    }
    Ok(count)
}

fn switch_root(init: &str) -> Result<std::convert::Infallible, InitrdError> {
    for api in ["/dev", "/proc", "/sys"] {
        mount(api, &format!("/sysroot{api}"), "", libc::MS_MOVE, "")?;
    }
    std::env::set_current_dir("/sysroot").map_err(io_err("entering", Path::new("/sysroot")))?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = cstr(".");
    // SAFETY: valid path string.
    if unsafe { libc::chroot(dot.as_ptr()) } != 0 {
        return Err(io_err("chroot to", Path::new("/sysroot"))(
            io::Error::last_os_error(),
        ));
    }
    std::env::set_current_dir("/").map_err(io_err("entering", Path::new("/")))?;
    let c_init = cstr(init);
    let argv = [c_init.as_ptr(), std::ptr::null()];
    // SAFETY: argv is a NULL-terminated array of valid strings.
    unsafe { libc::execv(c_init.as_ptr(), argv.as_ptr()) };
    Err(io_err("executing", Path::new(init))(
        io::Error::last_os_error(),
    ))
}

fn mount_api_filesystems() -> Result<(), InitrdError> {
    for (fstype, target) in [("devtmpfs", "/dev"), ("proc", "/proc"), ("sysfs", "/sys")] {
        fs::create_dir_all(target).map_err(io_err("creating", Path::new(target)))?;
        mount(fstype, target, fstype, libc::MS_NOSUID, "")?;
    }
    fs::create_dir_all("/dev/mapper").map_err(io_err("creating", Path::new("/dev/mapper")))?;
    fs::create_dir_all("/sysroot").map_err(io_err("creating", Path::new("/sysroot")))?;
    Ok(())
}

/// The initramfs' whole life. Returns only on failure.
pub fn run() -> InitrdError {
    match try_run() {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn try_run() -> Result<std::convert::Infallible, InitrdError> {
    mount_api_filesystems()?;
    let cmdline = fs::read_to_string("/proc/cmdline")
        .map_err(io_err("reading", Path::new("/proc/cmdline")))?;
    let params = BootParams::from_cmdline(&cmdline)?;
    assemble(&params)?;
    say(&format!("switching to {}", params.init));
    switch_root(&params.init)
}

/// Refuses to boot: reports the error on the console and powers off, so that
/// a tampered or broken image never runs.
pub fn refuse(err: &InitrdError) -> ! {
    say(&format!("FATAL: {}", crate::error_chain(err, ": ")));
    say("refusing to boot this root; powering off");
    // SAFETY: plain syscalls with no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_secrets_tmpfs_is_mounted_as_its_unit_describes_it() {
        let unit = include_str!("../../units/srv-kubernetes.mount");
        let field = |key: &str| {
            unit.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_default()
        };
        assert_eq!(field("Where="), crate::contract::SECRETS_DIR);
        assert_eq!(field("Type="), "tmpfs");
        let mut in_unit: Vec<&str> = field("Options=").split(',').collect();
        let mut here: Vec<&str> = SECRETS_TMPFS.split(',').collect();
        // The flags the mount call passes (MS_NOSUID, MS_NODEV, MS_NOEXEC).
        here.extend(["nosuid", "nodev", "noexec"]);
        in_unit.sort_unstable();
        here.sort_unstable();
        assert_eq!(in_unit, here);
    }

    #[test]
    fn cmdline_gives_root_hash_and_init() {
        let p = BootParams::from_cmdline(&format!("console=ttyS0 roothash={HASH} ro")).unwrap();
        assert_eq!(p.root_hash, HASH);
        assert_eq!(p.init, "/sbin/init");
        let p = BootParams::from_cmdline(&format!("roothash={HASH} slipway.init=/bin/sh")).unwrap();
        assert_eq!(p.init, "/bin/sh");
    }

    #[test]
    fn cmdline_without_a_valid_root_hash_is_refused() {
        assert!(BootParams::from_cmdline("console=ttyS0").is_err());
        assert!(BootParams::from_cmdline("roothash=abc").is_err());
        let bad = format!("roothash={}", "g".repeat(64));
        assert!(BootParams::from_cmdline(&bad).is_err());
    }

    #[test]
    fn copy_tree_keeps_links_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        fs::create_dir_all(from.path().join("lib/x")).unwrap();
        fs::write(from.path().join("lib/x/f"), "data").unwrap();
        fs::set_permissions(
            from.path().join("lib/x/f"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("x/f", from.path().join("lib/l")).unwrap();
        let n = copy_tree(from.path(), to.path()).unwrap();
        assert_eq!(n, 4);
        assert_eq!(
            fs::read_to_string(to.path().join("lib/x/f")).unwrap(),
            "data"
        );
        assert_eq!(
            fs::read_link(to.path().join("lib/l")).unwrap(),
            Path::new("x/f")
        );
        let mode = fs::metadata(to.path().join("lib/x/f"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn partitions_are_found_by_label() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, label) in [("nvme0n1p2", "slipway-root"), ("nvme0n1p3", "other")] {
            let d = sys.path().join(dev);
            fs::create_dir(&d).unwrap();
            fs::write(
                d.join("uevent"),
                format!("MAJOR=259\nMINOR=2\nDEVNAME={dev}\nDEVTYPE=partition\nPARTN=2\nPARTNAME={label}\n"),
            )
            .unwrap();
        }
        fs::create_dir(sys.path().join("nvme0n1")).unwrap();
        assert_eq!(
            find_partition(sys.path(), "slipway-root").as_deref(),
            Some("nvme0n1p2")
        );
        assert_eq!(find_partition(sys.path(), "missing"), None);
    }
}
