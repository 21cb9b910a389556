//! Just enough of the device-mapper control interface to create one
//! read-only dm-verity device, so that the initramfs needs no dmsetup,
//! veritysetup or shared libraries.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

const DM_IOCTL_LEN: usize = DM_IOCTL_LEN_U32 as usize;
/// The same as the header's `data_start` holds it.
const DM_IOCTL_LEN_U32: u32 = 312;
const DM_TARGET_SPEC_LEN: usize = 40;
const DM_READONLY_FLAG: u32 = 1 << 0;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xfd << 8) | nr
}
const DM_DEV_CREATE: u64 = iowr(3, DM_IOCTL_LEN);
const DM_DEV_SUSPEND: u64 = iowr(6, DM_IOCTL_LEN);
const DM_TABLE_LOAD: u64 = iowr(9, DM_IOCTL_LEN);

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("opening {path}: {source}")]
    Control {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("device-mapper {op} for {name}: {source}")]
    Ioctl {
        op: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("device-mapper name {0:?} or uuid is too long")]
    NameTooLong(String),
    #[error("a device-mapper request of {0} bytes: too large for its header")]
    TooLarge(usize),
}

/// One table line: `length` sectors of `target` starting at sector 0.
#[derive(Debug)]
pub struct Target<'a> {
    pub sectors: u64,
    pub kind: &'a str,
    pub params: &'a str,
}

/// A device-mapper ioctl buffer: the fixed header plus an optional payload.
fn header(name: &str, uuid: &str, flags: u32, payload_len: usize) -> Result<Vec<u8>, DmError> {
    if name.len() >= 128 || uuid.len() >= 129 {
        return Err(DmError::NameTooLong(name.to_owned()));
    }
    let total = DM_IOCTL_LEN + payload_len;
    let mut buf = vec![0u8; total];
    buf[0..4].copy_from_slice(&4u32.to_ne_bytes()); // interface version 4.0.0
    let data_size = u32::try_from(total).map_err(|_| DmError::TooLarge(total))?;
    buf[12..16].copy_from_slice(&data_size.to_ne_bytes()); // data_size
    buf[16..20].copy_from_slice(&DM_IOCTL_LEN_U32.to_ne_bytes()); // data_start
    buf[28..32].copy_from_slice(&flags.to_ne_bytes());
    buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
    buf[176..176 + uuid.len()].copy_from_slice(uuid.as_bytes());
    Ok(buf)
}

fn ioctl(
    control: &std::fs::File,
    op: &'static str,
    request: u64,
    buf: &mut [u8],
    name: &str,
) -> Result<(), DmError> {
    // SAFETY: `buf` is a live, correctly sized dm_ioctl buffer whose
    // data_size field matches its length; the kernel writes within it.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), request as _, buf.as_mut_ptr()) };
    if rc < 0 {
        return Err(DmError::Ioctl {
            op,
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Creates `name`, loads a read-only table with `target` and resumes it.
/// Returns the new device's (major, minor).
pub fn create_readonly(
    control: &Path,
    name: &str,
    uuid: &str,
    target: &Target<'_>,
) -> Result<(u32, u32), DmError> {
    let control_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(control)
        .map_err(|source| DmError::Control {
            path: control.display().to_string(),
            source,
        })?;

    let mut create = header(name, uuid, 0, 0)?;
    ioctl(&control_file, "create", DM_DEV_CREATE, &mut create, name)?;

    let params_len = (target.params.len() + 1).next_multiple_of(8);
    let mut load = header(name, "", DM_READONLY_FLAG, DM_TARGET_SPEC_LEN + params_len)?;
    load[20..24].copy_from_slice(&1u32.to_ne_bytes()); // target_count
    let spec = &mut load[DM_IOCTL_LEN..];
    spec[8..16].copy_from_slice(&target.sectors.to_ne_bytes());
    let kind = target.kind.as_bytes();
    spec[24..24 + kind.len().min(15)].copy_from_slice(&kind[..kind.len().min(15)]);
    spec[DM_TARGET_SPEC_LEN..DM_TARGET_SPEC_LEN + target.params.len()]
        .copy_from_slice(target.params.as_bytes());
    ioctl(&control_file, "table load", DM_TABLE_LOAD, &mut load, name)?;

    let mut resume = header(name, "", 0, 0)?;
    ioctl(&control_file, "resume", DM_DEV_SUSPEND, &mut resume, name)?;

    let dev = u64::from_ne_bytes(resume[40..48].try_into().unwrap_or([0; 8]));
    Ok((libc::major(dev), libc::minor(dev)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from <linux/dm-ioctl.h> on x86_64.
        assert_eq!(DM_DEV_CREATE, 0xc138fd03);
        assert_eq!(DM_DEV_SUSPEND, 0xc138fd06);
        assert_eq!(DM_TABLE_LOAD, 0xc138fd09);
    }

    #[test]
    fn header_carries_name_and_sizes() {
        let buf = header("root", "uuid-1", DM_READONLY_FLAG, 48).unwrap();
        assert_eq!(buf.len(), DM_IOCTL_LEN + 48);
        assert_eq!(&buf[48..52], b"root");
        assert_eq!(u32::from_ne_bytes(buf[12..16].try_into().unwrap()), 360);
        assert!(header(&"x".repeat(200), "", 0, 0).is_err());
    }
}
