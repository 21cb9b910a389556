//! What a build hands on: `build-manifest.json` (everything a machine needs
//! to know about a disk) and [`Built`], the disk with its manifest and the
//! map of the blocks that hold data. `build` makes one while it writes the
//! disk; `publish` takes one, from the build in the same run or read back
//! from a build directory once ([`Built::read`]).

use crate::fsio;
use crate::progress::StageTiming;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The manifest's name in a build directory.
pub const FILE: &str = "build-manifest.json";

/// The unit a disk's data is mapped in: the EBS direct APIs' block, so a
/// snapshot upload sends exactly the blocks the map lists.
pub const DATA_BLOCK: u64 = DATA_BLOCK_LEN as u64;
/// The same, as a buffer's length.
pub const DATA_BLOCK_LEN: usize = 512 * 1024;

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
    /// The disk's [`DATA_BLOCK`]s that hold anything but zeros, as
    /// `[first, end)` ranges of block indices: what a snapshot upload sends.
    #[serde(default)]
    pub data_blocks: Vec<[u64; 2]>,
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

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Io(#[from] fsio::PathError),
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} has sha256 {actual}, but the build manifest says {expected}: rebuild before publishing")]
    DiskChanged {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

impl Manifest {
    /// Reads `build-manifest.json` from a build directory.
    pub fn load(out: &Path) -> Result<Self, ManifestError> {
        let path = out.join(FILE);
        let text = fs::read(&path).map_err(fsio::at("reading", &path))?;
        serde_json::from_slice(&text).map_err(|source| ManifestError::Parse { path, source })
    }

    /// Writes it into a build directory (last, so a newer output is suspect).
    pub fn save(&self, out: &Path) -> Result<(), ManifestError> {
        let path = out.join(FILE);
        let mut json =
            serde_json::to_string_pretty(self).map_err(|source| ManifestError::Parse {
                path: path.clone(),
                source,
            })?;
        json.push('\n');
        fs::write(&path, json).map_err(fsio::at("writing", &path))?;
        Ok(())
    }
}

/// A built disk: its directory, its manifest, and which of its
/// [`DATA_BLOCK`]s hold anything but zeros.
#[derive(Debug, Clone)]
pub struct Built {
    pub out: PathBuf,
    pub manifest: Manifest,
    /// Indices of the data blocks, ascending.
    pub data_blocks: Vec<u64>,
}

impl Built {
    /// A build directory found up to date: its manifest's map is trusted as
    /// its disk's size and time are.
    pub fn from_manifest(out: &Path, manifest: Manifest) -> Self {
        let data_blocks = manifest
            .data_blocks
            .iter()
            .flat_map(|[first, end]| *first..*end)
            .collect();
        Self {
            out: out.to_owned(),
            manifest,
            data_blocks,
        }
    }

    pub fn disk(&self) -> PathBuf {
        self.out.join(&self.manifest.disk.file)
    }

    /// A build directory made earlier: its manifest, and the disk read once
    /// to check it against the manifest's sha256 and to map its data.
    pub fn read(out: &Path) -> Result<Self, ManifestError> {
        let manifest = Manifest::load(out)?;
        let disk = out.join(&manifest.disk.file);
        let mut file = fs::File::open(&disk).map_err(fsio::at("reading", &disk))?;
        let mut map = DataMap::default();
        let mut buf = vec![0u8; DATA_BLOCK_LEN];
        loop {
            let n = read_full(&mut file, &mut buf).map_err(fsio::at("reading", &disk))?;
            if n == 0 {
                break;
            }
            map.update(&buf[..n]);
        }
        let (sha256, data_blocks) = map.finish();
        if sha256 != manifest.disk.sha256 {
            return Err(ManifestError::DiskChanged {
                path: disk,
                expected: manifest.disk.sha256,
                actual: sha256,
            });
        }
        Ok(Self {
            out: out.to_owned(),
            manifest,
            data_blocks,
        })
    }
}

/// Ascending block indices as `[first, end)` ranges.
pub fn block_ranges(blocks: &[u64]) -> Vec<[u64; 2]> {
    let mut ranges: Vec<[u64; 2]> = Vec::new();
    for &b in blocks {
        match ranges.last_mut() {
            Some(last) if last[1] == b => last[1] = b + 1,
            _ => ranges.push([b, b + 1]),
        }
    }
    ranges
}

/// Fills `buf` unless the file ends first; returns the bytes read.
fn read_full(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// A disk's sha256 and data map, fed its bytes in order.
#[derive(Debug, Default)]
pub struct DataMap {
    hash: Sha256,
    pos: u64,
    blocks: Vec<u64>,
}

impl DataMap {
    pub fn update(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        let mut at = 0;
        while at < bytes.len() {
            let block = (self.pos + at as u64) / DATA_BLOCK;
            // At most a block away.
            let block_end =
                usize::try_from((block + 1) * DATA_BLOCK - self.pos).unwrap_or(usize::MAX);
            let chunk = &bytes[at..block_end.min(bytes.len())];
            if self.blocks.last() != Some(&block) && chunk.iter().any(|&b| b != 0) {
                self.blocks.push(block);
            }
            at += chunk.len();
        }
        self.pos += bytes.len() as u64;
    }

    /// `len` zero bytes, hashed without being mapped.
    pub fn zeros(&mut self, len: u64) {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(ZEROS.len());
            self.hash.update(&ZEROS[..n]);
            left -= n as u64;
        }
        self.pos += len;
    }

    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The sha256 (hex) and the data blocks' indices.
    pub fn finish(self) -> (String, Vec<u64>) {
        (hex::encode(self.hash.finalize()), self.blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_map_hashes_every_byte_and_maps_only_blocks_with_data() {
        let block = DATA_BLOCK_LEN;
        let mut disk = vec![0u8; 5 * block];
        disk[block + 7] = 1; // block 1
        disk[3 * block - 1] = 2; // the last byte of block 2
        disk[4 * block] = 3; // block 4

        // Fed in odd pieces, with the zero runs skipped as the writer skips them.
        let mut map = DataMap::default();
        map.update(&disk[..block + 100]);
        map.zeros(block as u64 - 200);
        map.update(&disk[2 * block - 100..3 * block + 3]);
        map.zeros(block as u64 - 3);
        map.update(&disk[4 * block..]);
        assert_eq!(map.position(), disk.len() as u64);
        let (sha256, blocks) = map.finish();

        assert_eq!(sha256, crate::cache::sha256_bytes(&disk));
        assert_eq!(blocks, [1, 2, 4]);
        assert_eq!(block_ranges(&blocks), [[1, 3], [4, 5]]);
        assert!(block_ranges(&[]).is_empty());
    }
}
