//! GPT disk assembly on a plain file: protective MBR, primary header and
//! entries, partitions aligned to 1 MiB, backup entries and header at the
//! end. Identities (disk and partition GUIDs) are given, so output is
//! reproducible.

use crate::manifest::DataMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

pub const SECTOR: u64 = 512;
pub const ALIGN: u64 = 1 << 20;
const ENTRIES: u32 = 128;
const ENTRY_LEN: u32 = 128;
/// The entry array's bytes (16 KiB).
const TABLE_BYTES: usize = ENTRIES as usize * ENTRY_LEN as usize;
const ENTRY_SECTORS: u64 = TABLE_BYTES as u64 / SECTOR;

/// A GUID in its textual form, e.g. `c12a7328-f81f-11d2-ba4b-00a0c93ec93b`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid([u8; 16]);

impl Guid {
    pub fn parse(s: &str) -> Option<Self> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        let raw = hex::decode(&hex).ok()?;
        let raw: [u8; 16] = raw.try_into().ok()?;
        Some(Self(raw))
    }

    /// A stable, RFC 4122 version-4-shaped GUID derived from a seed.
    pub fn derive(seed: &str) -> Self {
        use sha2::Digest;
        let d = sha2::Sha256::digest(seed.as_bytes());
        let mut raw = [0u8; 16];
        raw.copy_from_slice(&d[..16]);
        raw[6] = (raw[6] & 0x0f) | 0x40;
        raw[8] = (raw[8] & 0x3f) | 0x80;
        Self(raw)
    }

    pub fn bytes(&self) -> [u8; 16] {
        self.0
    }

    /// The mixed-endian layout GPT stores on disk.
    fn on_disk(&self) -> [u8; 16] {
        slipway_init::layout::gpt_byte_order(self.0)
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&slipway_init::layout::guid_text(self.0))
    }
}

/// A partition to place: its content comes from a file (or is empty).
#[derive(Debug, Clone)]
pub struct Partition<'a> {
    pub label: &'a str,
    pub type_guid: Guid,
    pub guid: Guid,
    pub size: u64,
    pub content: Option<&'a Path>,
}

/// Where a partition landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub label: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Placed {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }
    pub fn size(&self) -> u64 {
        (self.last_lba - self.first_lba + 1) * SECTOR
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GptError {
    #[error("the partitions need {needed} bytes ({needed_gib} GiB when rounded up) but the disk is {disk} bytes; set image.disk_size_gib to at least {needed_gib}")]
    TooSmall {
        needed: u64,
        needed_gib: u64,
        disk: u64,
    },
    #[error("partition {label}: content is {len} bytes, larger than its {size}-byte slot")]
    ContentTooLarge { label: String, len: u64, size: u64 },
    #[error("writing disk {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The smallest disk that holds `parts`: the primary table, each
/// partition aligned to 1 MiB, and the backup table.
pub fn needed_bytes(parts: &[Partition<'_>]) -> u64 {
    let end: u64 = ALIGN
        + parts
            .iter()
            .map(|p| p.size.next_multiple_of(ALIGN))
            .sum::<u64>();
    end + (ENTRY_SECTORS + 1) * SECTOR
}

/// Lays out partitions from 1 MiB, each aligned to 1 MiB.
pub fn layout(parts: &[Partition<'_>], disk_size: u64) -> Result<Vec<Placed>, GptError> {
    let mut next = ALIGN;
    let mut placed = Vec::new();
    for p in parts {
        let size = p.size.next_multiple_of(ALIGN);
        placed.push(Placed {
            label: p.label.to_owned(),
            first_lba: next / SECTOR,
            last_lba: (next + size) / SECTOR - 1,
        });
        next += size;
    }
    let needed = needed_bytes(parts);
    if needed > disk_size {
        return Err(GptError::TooSmall {
            needed,
            needed_gib: needed.div_ceil(1 << 30),
            disk: disk_size,
        });
    }
    Ok(placed)
}

fn utf16_name(label: &str) -> [u8; 72] {
    let mut out = [0u8; 72];
    for (i, unit) in label.encode_utf16().take(36).enumerate() {
        out[i * 2..i * 2 + 2].copy_from_slice(&unit.to_le_bytes());
    }
    out
}

fn header(
    disk_guid: Guid,
    my_lba: u64,
    alt_lba: u64,
    entries_lba: u64,
    last_usable: u64,
    entries_crc: u32,
) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[0..8].copy_from_slice(b"EFI PART");
    h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
    h[12..16].copy_from_slice(&92u32.to_le_bytes());
    h[24..32].copy_from_slice(&my_lba.to_le_bytes());
    h[32..40].copy_from_slice(&alt_lba.to_le_bytes());
    h[40..48].copy_from_slice(&(2 + ENTRY_SECTORS).to_le_bytes());
    h[48..56].copy_from_slice(&last_usable.to_le_bytes());
    h[56..72].copy_from_slice(&disk_guid.on_disk());
    h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
    h[80..84].copy_from_slice(&ENTRIES.to_le_bytes());
    h[84..88].copy_from_slice(&ENTRY_LEN.to_le_bytes());
    h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A disk as written: where its partitions landed, and what the writer
/// saw of every byte on the way.
#[derive(Debug)]
pub struct Written {
    pub placed: Vec<Placed>,
    /// The whole disk's sha256 (hex).
    pub sha256: String,
    /// Each partition's sha256 (its content and the zeros after it).
    pub partition_sha256: Vec<String>,
    /// The [`DATA_BLOCK`]s that hold anything but zeros.
    pub data_blocks: Vec<u64>,
}

/// Writes the whole disk to `path` as a sparse file of `disk_size` bytes,
/// front to back, hashing and mapping it as it goes: the disk is never read
/// back.
pub fn write(
    path: &Path,
    disk_guid: Guid,
    parts: &[Partition<'_>],
    disk_size: u64,
) -> Result<Written, GptError> {
    let io_err = |source| GptError::Io {
        path: path.display().to_string(),
        source,
    };
    let placed = layout(parts, disk_size)?;
    let total_lba = disk_size / SECTOR;
    let last_lba = total_lba - 1;
    let backup_entries = last_lba - ENTRY_SECTORS;
    let last_usable = backup_entries - 1;

    let mut entries = vec![0u8; TABLE_BYTES];
    for (e, (p, at)) in entries
        .chunks_exact_mut(ENTRY_LEN as usize)
        .zip(parts.iter().zip(&placed))
    {
        e[0..16].copy_from_slice(&p.type_guid.on_disk());
        e[16..32].copy_from_slice(&p.guid.on_disk());
        e[32..40].copy_from_slice(&at.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&at.last_lba.to_le_bytes());
        e[56..128].copy_from_slice(&utf16_name(p.label));
    }
    let entries_crc = crc32fast::hash(&entries);

    let mut mbr = [0u8; 512];
    mbr[446 + 1..446 + 4].copy_from_slice(&[0x00, 0x02, 0x00]);
    mbr[446 + 4] = 0xee;
    mbr[446 + 5..446 + 8].copy_from_slice(&[0xff, 0xff, 0xff]);
    mbr[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    let mbr_len = u32::try_from(total_lba - 1).unwrap_or(u32::MAX);
    mbr[446 + 12..446 + 16].copy_from_slice(&mbr_len.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    let _ = std::fs::remove_file(path);
    let file = File::create(path).map_err(io_err)?;
    file.set_len(disk_size).map_err(io_err)?;
    let mut disk = Sink {
        file,
        map: DataMap::default(),
    };
    disk.data(&mbr).map_err(io_err)?;
    disk.data(&header(disk_guid, 1, last_lba, 2, last_usable, entries_crc))
        .map_err(io_err)?;
    disk.data(&entries).map_err(io_err)?;

    let mut partition_sha256 = Vec::with_capacity(parts.len());
    for (p, at) in parts.iter().zip(&placed) {
        disk.zeros_to(at.offset()).map_err(io_err)?;
        let mut hash = DataMap::default();
        if let Some(src) = p.content {
            let mut input = File::open(src).map_err(io_err)?;
            let len = input.metadata().map_err(io_err)?.len();
            if len > at.size() {
                return Err(GptError::ContentTooLarge {
                    label: p.label.to_owned(),
                    len,
                    size: at.size(),
                });
            }
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = input.read(&mut buf).map_err(io_err)?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                disk.data(&buf[..n]).map_err(io_err)?;
            }
        }
        hash.zeros(at.size() - hash.position());
        partition_sha256.push(hash.finish().0);
    }
    disk.zeros_to(backup_entries * SECTOR).map_err(io_err)?;
    disk.data(&entries).map_err(io_err)?;
    disk.data(&header(
        disk_guid,
        last_lba,
        1,
        backup_entries,
        last_usable,
        entries_crc,
    ))
    .map_err(io_err)?;
    let (sha256, data_blocks) = disk.map.finish();
    Ok(Written {
        placed,
        sha256,
        partition_sha256,
        data_blocks,
    })
}

/// The disk file, written front to back, and its running hash and map.
struct Sink {
    file: File,
    map: DataMap,
}

impl Sink {
    /// Writes `bytes` at the current position, seeking over all-zero 4 KiB
    /// chunks so the file stays sparse.
    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.map.update(bytes);
        for chunk in bytes.chunks(4096) {
            if chunk.iter().all(|&b| b == 0) {
                self.file.seek(SeekFrom::Current(chunk.len() as i64))?;
            } else {
                self.file.write_all(chunk)?;
            }
        }
        Ok(())
    }

    /// Moves on to `offset` over zeros (the file is already that long).
    fn zeros_to(&mut self, offset: u64) -> io::Result<()> {
        self.map.zeros(offset - self.map.position());
        self.file.seek(SeekFrom::Start(offset))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DATA_BLOCK;

    #[test]
    fn guids_print_and_parse() {
        let g = Guid::parse("c12a7328-f81f-11d2-ba4b-00a0c93ec93b").unwrap();
        assert_eq!(g.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        assert_eq!(&g.on_disk()[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(Guid::derive("a"), Guid::derive("a"));
        assert_ne!(Guid::derive("a"), Guid::derive("b"));
        assert_eq!(Guid::derive("a").to_string().as_bytes()[14], b'4');
    }

    #[test]
    fn a_disk_too_small_says_how_big_it_must_be() {
        let parts = [Partition {
            label: "big",
            type_guid: Guid::derive("t"),
            guid: Guid::derive("p"),
            size: 3 << 30,
            content: None,
        }];
        let err = layout(&parts, 2 << 30).unwrap_err().to_string();
        assert!(err.contains("at least 4"), "{err}");
    }

    #[test]
    fn headers_and_entries_are_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("c");
        std::fs::write(&content, vec![0xabu8; 10000]).unwrap();
        let parts = [
            Partition {
                label: "esp",
                type_guid: Guid::derive("t1"),
                guid: Guid::derive("g1"),
                size: 1 << 20,
                content: Some(&content),
            },
            Partition {
                label: "data",
                type_guid: Guid::derive("t2"),
                guid: Guid::derive("g2"),
                size: 3 << 20,
                content: None,
            },
        ];
        let disk = dir.path().join("disk");
        let size = 8 << 20;
        let written = write(&disk, Guid::derive("disk"), &parts, size).unwrap();
        let placed = &written.placed;
        assert_eq!(placed[0].first_lba, 2048);
        assert_eq!(placed[1].first_lba, 4096);
        let bytes = std::fs::read(&disk).unwrap();
        assert_eq!(bytes.len() as u64, size);
        // What the writer saw is what it wrote: the disk, each partition's
        // region, and the blocks with data (the tables and the content).
        assert_eq!(written.sha256, crate::cache::sha256_bytes(&bytes));
        for (p, sha256) in placed.iter().zip(&written.partition_sha256) {
            let start = usize::try_from(p.offset()).unwrap();
            let region = &bytes[start..start + usize::try_from(p.size()).unwrap()];
            assert_eq!(*sha256, crate::cache::sha256_bytes(region), "{}", p.label);
        }
        let last = size / DATA_BLOCK - 1;
        assert_eq!(written.data_blocks, [0, 2, last]);
        let primary = &bytes[512..1024];
        let backup = &bytes[bytes.len() - 512..];
        assert_eq!(&primary[..8], b"EFI PART");
        assert_eq!(&backup[..8], b"EFI PART");
        // Header CRCs verify.
        for h in [primary, backup] {
            let mut copy = h[..92].to_vec();
            copy[16..20].fill(0);
            assert_eq!(crc32fast::hash(&copy).to_le_bytes(), h[16..20]);
        }
        // The entries' CRC matches the table.
        let entries = &bytes[1024..1024 + 128 * 128];
        assert_eq!(crc32fast::hash(entries).to_le_bytes(), primary[88..92]);
        // Content landed at the partition's offset.
        assert_eq!(bytes[(1 << 20) as usize], 0xab);
        assert_eq!(bytes[(1 << 20) + 10000], 0);
    }

    /// The layout the initramfs grows: the builder's disk, then the
    /// instance's larger volume.
    fn two_partitions(dir: &Path, disk_size: u64) -> std::path::PathBuf {
        let parts = [
            Partition {
                label: "root",
                type_guid: Guid::derive("root-type"),
                guid: Guid::derive("g1"),
                size: 1 << 20,
                content: None,
            },
            Partition {
                label: "var",
                type_guid: Guid::parse(slipway_init::layout::VAR_TYPE).unwrap(),
                guid: Guid::derive("g2"),
                size: 2 << 20,
                content: None,
            },
        ];
        let disk = dir.join("disk");
        write(&disk, Guid::derive("disk"), &parts, disk_size).unwrap();
        disk
    }

    fn sfdisk(args: &[&str], disk: &Path) -> String {
        let out = std::process::Command::new("sfdisk")
            .args(args)
            .arg(disk)
            .output()
            .expect("sfdisk (Debian package fdisk) runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "sfdisk {args:?}: {text}");
        text
    }

    #[test]
    fn the_initramfs_extends_var_to_a_larger_volume_and_sfdisk_agrees() {
        use slipway_init::grow;
        let dir = tempfile::tempdir().unwrap();
        let disk = two_partitions(dir.path(), 8 << 20);
        let var = grow::guid_on_disk(slipway_init::layout::VAR_TYPE).unwrap();
        let bigger: u64 = (20 << 20) + (64 << 10);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        f.set_len(bigger).unwrap();
        let grown = grow::extend_last_partition(&mut f, bigger, var)
            .unwrap()
            .expect("the partition grows");
        assert_eq!(grown.number, 2);
        assert_eq!(grown.old_last_lba, (4 << 20) / SECTOR - 1);
        // To the last whole MiB before the backup table.
        assert_eq!(grown.new_last_lba, (20 << 20) / SECTOR - 1);
        let dump = sfdisk(&["--dump"], &disk);
        assert!(
            dump.contains(&format!("last-lba: {}", bigger / SECTOR - 34)),
            "{dump}"
        );
        assert!(
            dump.contains("start=        4096, size=       36864"),
            "{dump}"
        );
        let verify = sfdisk(&["--verify"], &disk);
        assert!(verify.contains("No errors detected"), "{verify}");
        // Nothing to do on the next boot.
        assert_eq!(
            grow::extend_last_partition(&mut f, bigger, var).unwrap(),
            None
        );
        // A disk smaller than its table says is refused, and left alone.
        let before = std::fs::read(&disk).unwrap();
        let err = grow::extend_last_partition(&mut f, 8 << 20, var).unwrap_err();
        assert!(err.to_string().contains("smaller than its GPT"), "{err}");
        assert_eq!(std::fs::read(&disk).unwrap(), before);
    }

    #[test]
    fn only_var_is_grown_and_a_damaged_table_is_left_alone() {
        use slipway_init::grow;
        let dir = tempfile::tempdir().unwrap();
        let disk = two_partitions(dir.path(), 8 << 20);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk)
            .unwrap();
        f.set_len(16 << 20).unwrap();
        let before = std::fs::read(&disk).unwrap();
        let other = grow::guid_on_disk(&Guid::derive("root-type").to_string()).unwrap();
        let err = grow::extend_last_partition(&mut f, 16 << 20, other).unwrap_err();
        assert!(err.to_string().contains("not the one to grow"), "{err}");
        // One flipped bit in the entries: refused by their checksum.
        let mut damaged = before.clone();
        damaged[1024 + 128 + 40] ^= 1;
        std::fs::write(&disk, &damaged).unwrap();
        let var = grow::guid_on_disk(slipway_init::layout::VAR_TYPE).unwrap();
        let err = grow::extend_last_partition(&mut f, 16 << 20, var).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert_eq!(std::fs::read(&disk).unwrap(), damaged);
    }
}
