//! The boot's self-report: what the running system looks like from inside
//! (root on the verity device and read-only, secrets directory on tmpfs,
//! `/var` writable). slipway-init prints it on every boot; the VM tests read it.

use crate::layout;
use std::fmt;
use std::fs;
use std::path::Path;

/// One mount from `/proc/self/mountinfo`.
#[derive(Debug, PartialEq, Eq)]
pub struct Mount {
    pub dev: String,
    pub mount_point: String,
    pub options: Vec<String>,
    pub fstype: String,
    pub source: String,
    pub super_options: Vec<String>,
}

/// Parses mountinfo; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 3 {
                return None;
            }
            let split = |s: &str| s.split(',').map(str::to_owned).collect();
            Some(Mount {
                dev: l[2].to_owned(),
                mount_point: unescape(l[4]),
                options: split(l[5]),
                fstype: r[0].to_owned(),
                source: r[1].to_owned(),
                super_options: split(r[2]),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The last mount on `point` is the visible one.
fn visible<'a>(mounts: &'a [Mount], point: &str) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| m.mount_point == point)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootCheck {
    pub root_verity: bool,
    pub root_read_only: bool,
    pub secrets_tmpfs: bool,
    pub var_writable: bool,
}

impl BootCheck {
    /// Inspects the system through `proc`, `sys` and `var`, which tests point
    /// at temporary directories.
    pub fn inspect(proc: &Path, sys: &Path, var: &Path) -> Self {
        let mounts = fs::read_to_string(proc.join("self/mountinfo"))
            .map(|t| parse_mountinfo(&t))
            .unwrap_or_default();
        let root = visible(&mounts, "/");
        let root_verity = root.is_some_and(|m| {
            fs::read_to_string(sys.join("dev/block").join(&m.dev).join("dm/uuid"))
                .is_ok_and(|u| u.trim() == layout::DM_ROOT_UUID)
        });
        let root_read_only = root.is_some_and(|m| m.options.iter().any(|o| o == "ro"));
        let secrets_tmpfs = visible(&mounts, crate::contract::SECRETS_DIR).is_some_and(|m| {
            m.fstype == "tmpfs" && m.super_options.iter().any(|o| o == "mode=700")
        });
        let probe = var.join("tmp/.slipway-write-probe");
        let var_writable = fs::write(&probe, b"ok").is_ok() && fs::remove_file(&probe).is_ok();
        Self {
            root_verity,
            root_read_only,
            secrets_tmpfs,
            var_writable,
        }
    }

    pub fn all_ok(&self) -> bool {
        self.root_verity && self.root_read_only && self.secrets_tmpfs && self.var_writable
    }
}

impl fmt::Display for BootCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "root_verity={} root_read_only={} secrets_tmpfs={} var_writable={}",
            yn(self.root_verity),
            yn(self.root_read_only),
            yn(self.secrets_tmpfs),
            yn(self.var_writable)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / ro,relatime shared:1 - erofs /dev/mapper/root ro,user_xattr
23 22 0:5 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=4096k
40 22 259:4 / /var rw,nosuid,nodev shared:9 - ext4 /dev/nvme0n1p4 rw
41 22 0:40 / /srv/kubernetes rw,nosuid,nodev,noexec shared:20 - tmpfs tmpfs rw,size=65536k,mode=700
";

    fn fake_system(uuid: &str) -> (tempfile::TempDir, tempfile::TempDir, tempfile::TempDir) {
        let proc = tempfile::tempdir().unwrap();
        fs::create_dir_all(proc.path().join("self")).unwrap();
        fs::write(proc.path().join("self/mountinfo"), MOUNTINFO).unwrap();
        let sys = tempfile::tempdir().unwrap();
        let dm = sys.path().join("dev/block/254:0/dm");
        fs::create_dir_all(&dm).unwrap();
        fs::write(dm.join("uuid"), format!("{uuid}\n")).unwrap();
        let var = tempfile::tempdir().unwrap();
        fs::create_dir_all(var.path().join("tmp")).unwrap();
        (proc, sys, var)
    }

    #[test]
    fn a_good_boot_passes_every_check() {
        let (proc, sys, var) = fake_system(layout::DM_ROOT_UUID);
        let check = BootCheck::inspect(proc.path(), sys.path(), var.path());
        assert!(check.all_ok(), "{check}");
        assert_eq!(
            check.to_string(),
            "root_verity=yes root_read_only=yes secrets_tmpfs=yes var_writable=yes"
        );
    }

    #[test]
    fn a_root_on_another_device_mapper_device_is_not_verity() {
        let (proc, sys, var) = fake_system("CRYPT-LUKS2-abc");
        let check = BootCheck::inspect(proc.path(), sys.path(), var.path());
        assert!(!check.root_verity);
        assert!(!check.all_ok());
    }

    #[test]
    fn mountinfo_fields_are_parsed() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].fstype, "erofs");
        assert_eq!(m[3].mount_point, "/srv/kubernetes");
        assert!(parse_mountinfo("garbage\n1 2 3\n").is_empty());
    }
}
