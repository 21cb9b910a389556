//! `/var` takes whatever room the instance's root volume has.
//!
//! The image's disk is only as large as its content, with a small `/var`
//! partition last; the volume EC2 makes from it is as large as the launch
//! template asks. On a boot where the disk has grown, the initramfs moves
//! the GPT's backup table to the disk's new end and extends the last
//! partition (it must be `/var`) up to it; once `/var` is mounted its ext4
//! grows online to the partition's size. Both steps find nothing to do on
//! later boots.

use crate::layout;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub const SECTOR: u64 = SECTOR_LEN as u64;
/// The same, as a buffer's length.
const SECTOR_LEN: usize = 512;
/// Partitions end on a 1 MiB boundary, as the builder places them.
const ALIGN_SECTORS: u64 = (1 << 20) / SECTOR;
const SIGNATURE: &[u8; 8] = b"EFI PART";

#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("the disk has no valid GPT header: {0}")]
    BadHeader(&'static str),
    #[error("the GPT's partition entries do not match their checksum")]
    BadEntries,
    #[error("the disk ({disk_sectors} sectors) is smaller than its GPT says ({needed} sectors)")]
    Shrunk { disk_sectors: u64, needed: u64 },
    #[error("the last partition is not the one to grow (its type is {found})")]
    NotLast { found: String },
    #[error("reading or writing the partition table: {0}")]
    Io(#[from] io::Error),
}

/// What [`extend_last_partition`] changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grown {
    /// The partition's number (1-based, as the kernel counts).
    pub number: u32,
    pub first_lba: u64,
    pub old_last_lba: u64,
    pub new_last_lba: u64,
}

impl Grown {
    pub fn start_bytes(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn old_len_bytes(&self) -> u64 {
        (self.old_last_lba - self.first_lba + 1) * SECTOR
    }
    pub fn len_bytes(&self) -> u64 {
        (self.new_last_lba - self.first_lba + 1) * SECTOR
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Sets a header's checksum (over its first `len` bytes, the field zeroed).
fn seal(header: &mut [u8], len: usize) {
    header[16..20].fill(0);
    let crc = crc32fast::hash(&header[..len]);
    header[16..20].copy_from_slice(&crc.to_le_bytes());
}

/// A GUID as GPT stores it (mixed-endian) from its textual form.
pub fn guid_on_disk(text: &str) -> Option<[u8; 16]> {
    let hex: String = text.chars().filter(|c| *c != '-').collect();
    let raw: [u8; 16] = hex::decode(hex).ok()?.try_into().ok()?;
    Some(layout::gpt_byte_order(raw))
}

/// Moves the backup GPT to the end of a disk of `disk_bytes` and extends
/// the last partition, which must be of type `type_guid` (on-disk form),
/// to the last whole MiB before it. `None` when the table already ends at
/// the disk's end. The new backup is written (and flushed) before the
/// primary table points at it, so a power cut leaves one valid table.
pub fn extend_last_partition(
    disk: &mut File,
    disk_bytes: u64,
    type_guid: [u8; 16],
) -> Result<Option<Grown>, GrowError> {
    let disk_sectors = disk_bytes / SECTOR;
    let mut header = vec![0u8; SECTOR_LEN];
    disk.seek(SeekFrom::Start(SECTOR))?;
    disk.read_exact(&mut header)?;
    if &header[..8] != SIGNATURE {
        return Err(GrowError::BadHeader("no signature"));
    }
    let header_len = u32_at(&header, 12) as usize;
    if !(92..=SECTOR_LEN).contains(&header_len) {
        return Err(GrowError::BadHeader("impossible header size"));
    }
    let mut check = header.clone();
    seal(&mut check, header_len);
    if check[16..20] != header[16..20] {
        return Err(GrowError::BadHeader("checksum mismatch"));
    }
    let alternate = u64_at(&header, 32);
    let entries_lba = u64_at(&header, 72);
    let count = u32_at(&header, 80) as usize;
    let entry_len = u32_at(&header, 84) as usize;
    if !(128..=4096).contains(&entry_len) || count == 0 || count > 1024 {
        return Err(GrowError::BadHeader("impossible partition entries"));
    }
    let mut entries = vec![0u8; count * entry_len];
    disk.seek(SeekFrom::Start(entries_lba * SECTOR))?;
    disk.read_exact(&mut entries)?;
    if crc32fast::hash(&entries).to_le_bytes() != header[88..92] {
        return Err(GrowError::BadEntries);
    }

    let entry_sectors = (entries.len() as u64).div_ceil(SECTOR);
    let new_alternate = disk_sectors.saturating_sub(1);
    if alternate == new_alternate {
        return Ok(None);
    }
    if alternate > new_alternate {
        return Err(GrowError::Shrunk {
            disk_sectors,
            needed: alternate + 1,
        });
    }
    let backup_entries = new_alternate - entry_sectors;
    let last_usable = backup_entries - 1;

    // The partition that ends last is the one that grows.
    let (index, _) = entries
        .chunks(entry_len)
        .enumerate()
        .filter(|(_, e)| e[..16].iter().any(|&b| b != 0))
        .max_by_key(|(_, e)| u64_at(e, 40))
        .ok_or(GrowError::BadHeader("no partitions"))?;
    let entry = &mut entries[index * entry_len..(index + 1) * entry_len];
    if entry[..16] != type_guid {
        return Err(GrowError::NotLast {
            found: layout::guid_text(layout::gpt_byte_order(
                entry[..16].try_into().unwrap_or_default(),
            )),
        });
    }
    let first_lba = u64_at(entry, 32);
    let old_last_lba = u64_at(entry, 40);
    let aligned_end = ((last_usable + 1) / ALIGN_SECTORS * ALIGN_SECTORS).saturating_sub(1);
    let new_last_lba = aligned_end.max(old_last_lba);
    put_u64(entry, 40, new_last_lba);
    let entries_crc = crc32fast::hash(&entries).to_le_bytes();

    let mut primary = header;
    put_u64(&mut primary, 32, new_alternate);
    put_u64(&mut primary, 48, last_usable);
    primary[88..92].copy_from_slice(&entries_crc);
    seal(&mut primary, header_len);
    let mut backup = primary.clone();
    put_u64(&mut backup, 24, new_alternate);
    put_u64(&mut backup, 32, 1);
    put_u64(&mut backup, 72, backup_entries);
    seal(&mut backup, header_len);

    disk.seek(SeekFrom::Start(backup_entries * SECTOR))?;
    disk.write_all(&entries)?;
    disk.seek(SeekFrom::Start(new_alternate * SECTOR))?;
    disk.write_all(&backup)?;
    disk.sync_data()?;
    // The protective MBR's partition covers the disk (capped at 2 TiB).
    let mut mbr = vec![0u8; SECTOR_LEN];
    disk.seek(SeekFrom::Start(0))?;
    disk.read_exact(&mut mbr)?;
    if mbr[446 + 4] == 0xee {
        let len = u32::try_from(disk_sectors - 1).unwrap_or(u32::MAX);
        mbr[446 + 12..446 + 16].copy_from_slice(&len.to_le_bytes());
        disk.seek(SeekFrom::Start(0))?;
        disk.write_all(&mbr)?;
    }
    disk.seek(SeekFrom::Start(entries_lba * SECTOR))?;
    disk.write_all(&entries)?;
    disk.seek(SeekFrom::Start(SECTOR))?;
    disk.write_all(&primary)?;
    disk.sync_data()?;
    Ok(Some(Grown {
        number: u32::try_from(index + 1).unwrap_or(u32::MAX),
        first_lba,
        old_last_lba,
        new_last_lba,
    }))
}

/// The kernel's `struct blkpg_partition` and `struct blkpg_ioctl_arg`.
#[repr(C)]
struct BlkpgPartition {
    start: i64,
    length: i64,
    pno: libc::c_int,
    devname: [u8; 64],
    volname: [u8; 64],
}

#[repr(C)]
struct BlkpgIoctlArg {
    op: libc::c_int,
    flags: libc::c_int,
    datalen: libc::c_int,
    data: *mut libc::c_void,
}

const BLKPG: u64 = 0x1269;
const BLKPG_RESIZE_PARTITION: libc::c_int = 3;
/// `_IOW('f', 16, __u64)`: grow a mounted ext4 to a number of blocks.
const EXT4_IOC_RESIZE_FS: u64 = 0x4008_6610;

/// A block device's size in bytes, from sysfs (`/sys/class/block/NAME/size`
/// counts 512-byte sectors whatever the device's own sector size).
fn sysfs_bytes(sys_class_block: &Path, name: &std::ffi::OsStr) -> io::Result<u64> {
    let sectors = fs::read_to_string(sys_class_block.join(name).join("size"))?;
    let sectors: u64 = sectors
        .trim()
        .parse()
        .map_err(|_| io::Error::other("an unreadable device size in sysfs"))?;
    Ok(sectors * SECTOR)
}

/// The whole disk a partition device (`/dev/nvme0n1p4`) belongs to, from
/// sysfs, as (device path, size in bytes).
fn parent_disk(sys_class_block: &Path, partition: &Path) -> io::Result<(PathBuf, u64)> {
    let name = partition
        .file_name()
        .ok_or_else(|| io::Error::other("a partition device without a name"))?;
    let real = fs::canonicalize(sys_class_block.join(name))?;
    let disk = real
        .parent()
        .and_then(Path::file_name)
        .ok_or_else(|| io::Error::other("a partition without a parent disk in sysfs"))?;
    Ok((
        Path::new("/dev").join(disk),
        sysfs_bytes(sys_class_block, disk)?,
    ))
}

/// Grows the partition `var` (a device under `/dev`) to the end of its
/// disk, the table on disk and the kernel's view of it both.
pub fn grow_var_partition(var: &Path, type_guid: [u8; 16]) -> Result<Option<Grown>, GrowError> {
    let (disk_path, disk_bytes) = parent_disk(Path::new("/sys/class/block"), var)?;
    let mut disk = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk_path)?;
    let Some(grown) = extend_last_partition(&mut disk, disk_bytes, type_guid)? else {
        return Ok(None);
    };
    // The other partitions are in use (the verity root), so the kernel is
    // told of the one that changed rather than asked to re-read the table.
    let mut part = BlkpgPartition {
        start: i64::try_from(grown.start_bytes()).unwrap_or(i64::MAX),
        length: i64::try_from(grown.len_bytes()).unwrap_or(i64::MAX),
        pno: libc::c_int::try_from(grown.number).unwrap_or(libc::c_int::MAX),
        devname: [0; 64],
        volname: [0; 64],
    };
    let mut arg = BlkpgIoctlArg {
        op: BLKPG_RESIZE_PARTITION,
        flags: 0,
        datalen: libc::c_int::try_from(std::mem::size_of::<BlkpgPartition>())
            .unwrap_or(libc::c_int::MAX),
        data: std::ptr::addr_of_mut!(part).cast(),
    };
    // SAFETY: `arg` and the partition it points to outlive the call and
    // have the kernel's layout.
    let rc = unsafe { libc::ioctl(disk.as_raw_fd(), BLKPG as _, std::ptr::addr_of_mut!(arg)) };
    if rc != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(Some(grown))
}

/// Grows the ext4 mounted at `mountpoint` to fill its partition `device`;
/// returns (old, new) sizes in bytes, equal when there was nothing to do.
pub fn grow_filesystem(mountpoint: &Path, device: &Path) -> io::Result<(u64, u64)> {
    let name = device
        .file_name()
        .ok_or_else(|| io::Error::other("a device without a name"))?;
    let part_bytes = sysfs_bytes(Path::new("/sys/class/block"), name)?;
    let dir = File::open(mountpoint)?;
    let (block, old) = fs_size(&dir)?;
    let mut blocks: u64 = part_bytes / block;
    // statvfs leaves out the filesystem's own overhead, so `old` is short
    // of the real size; the kernel does nothing when the count is unchanged.
    // SAFETY: `blocks` is a valid u64 the call reads.
    let rc = unsafe {
        libc::ioctl(
            dir.as_raw_fd(),
            EXT4_IOC_RESIZE_FS as _,
            std::ptr::addr_of_mut!(blocks),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((old, fs_size(&dir)?.1))
}

/// A mounted filesystem's block size and size in bytes (statvfs's, which
/// leaves out its own overhead).
fn fs_size(dir: &File) -> io::Result<(u64, u64)> {
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `dir` is an open descriptor and `st` is writable.
    if unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let block = st.f_frsize.max(1);
    Ok((block, st.f_blocks * block))
}
